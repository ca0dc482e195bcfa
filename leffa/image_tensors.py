"""Re-export: images as tensors moved to ``runtime.image_tensors`` (shared by the model families)."""

from runtime.image_tensors import ImageInput, image_to_tensor, mask_to_tensor, repaint_blend

__all__ = ["ImageInput", "image_to_tensor", "mask_to_tensor", "repaint_blend"]
