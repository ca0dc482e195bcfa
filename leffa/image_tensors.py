"""Pipeline images as tensors and back: PIL images or tensors in [-1, 1] to (B, C, H, W) float
tensors, masks to {0, 1}, and the repaint blend of the output (spec §4.11). Used by the
pipeline and the training datasets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

ImageInput = torch.Tensor | Image.Image | Sequence[Image.Image]


def _pil_list(x: ImageInput) -> list[Image.Image] | None:
    if isinstance(x, Image.Image):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(i, Image.Image) for i in x):
        return list(x)
    return None


def image_to_tensor(x: ImageInput, name: str) -> torch.Tensor:
    """PIL image(s) or a (B, 3, H, W) / (3, H, W) tensor in [-1, 1] -> (B, 3, H, W) float."""
    pil = _pil_list(x)
    if pil is not None:
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in pil]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"{name}: the images of a batch must have the same size")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a PIL image, a list of them or a tensor, got {type(x).__name__}")
    t = x.unsqueeze(0) if x.ndim == 3 else x
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [-1, 1], got {t.dtype}")
    lo, hi = t.min().item(), t.max().item()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"{name}: values must lie in [-1, 1] (found {lo:.3g}..{hi:.3g}); "
                         "scale uint8 images with x / 127.5 - 1")
    return t.float()


def mask_to_tensor(x: ImageInput) -> torch.Tensor:
    """PIL mask(s) (binarised at 128) or a {0, 1} tensor -> (B, 1, H, W) float, 1 = generate."""
    pil = _pil_list(x)
    if pil is not None:
        arrays = [(np.asarray(im.convert("L")) >= 128).astype(np.float32) for im in pil]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("mask: the masks of a batch must have the same size")
        return torch.from_numpy(np.stack(arrays))[:, None]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mask: expected a PIL image, a list of them or a tensor, got {type(x).__name__}")
    t = x
    while t.ndim < 4:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"mask: expected shape (B, 1, H, W), (1, H, W) or (H, W), got {tuple(x.shape)}")
    if not torch.all((t == 0) | (t == 1)):
        raise ValueError("mask: values must be 0 (keep) or 1 (generate); binarise it first, "
                         "e.g. (mask > 0.5).float()")
    return t.float()


def repaint_blend(person: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste the generated region back onto the person with a feathered mask (spec §4.11).

    person, generated: (B, 3, H, W) in [0, 1]; mask: (B, 1, H, W) in {0, 1}. The mask is
    blurred with PIL's Gaussian of radius k = H // 100 rounded up to odd (11 at 1024 px).
    """
    k = person.shape[-2] // 100
    k += 1 - k % 2
    soft = []
    for m in mask[:, 0].cpu().numpy():
        im = Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(k))
        soft.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    alpha = torch.stack(soft)[:, None].to(person.device, person.dtype)
    return person * (1 - alpha) + generated * alpha
