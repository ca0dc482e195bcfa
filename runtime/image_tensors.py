"""Pipeline images as tensors and back: PIL images or tensors in [-1, 1] to (B, C, H, W) float
tensors, masks binarised to {0, 1} at 0.5, and the repaint blend of the output in 8-bit
arithmetic (spec §4.11), both as the original computes them. Used by the pipeline and the
training datasets."""

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
    """PIL mask(s) or a tensor mask -> (B, 1, H, W) float in {0, 1}, 1 = generate.

    Binarised as the original binarises its masks (spec §4; its transform sets values
    ``< 0.5`` to 0 and ``>= 0.5`` to 1): PIL masks are read as grayscale ``L / 255``, so a pixel
    generates when ``L >= 128``; tensor masks (any dtype, bool included) generate where
    ``mask >= 0.5``, so a soft mask with 0.3 / 0.7 becomes 0 / 1. Tensor values outside [0, 1]
    or NaN are rejected with a ValueError (the original would silently binarise a 0..255 mask
    to all ones and keep NaN as NaN).
    """
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
    t = t.float()
    if torch.isnan(t).any():
        raise ValueError("mask: contains NaN; values must lie in [0, 1] (0 = keep, 1 = generate)")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"mask: values must lie in [0, 1] (0 = keep, 1 = generate; binarised at 0.5), found "
                         f"{t.min().item():.3g}..{t.max().item():.3g}; scale a 0..255 mask with mask / 255")
    return (t >= 0.5).float()


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) or (H, W) in [0, 1] -> (H, W, C) or (H, W) uint8 as the original's image
    conversion does it: float32 ``(x * 255).round()`` (half to even), then uint8."""
    a = x.detach().float().cpu().numpy()
    a = a.transpose(1, 2, 0) if a.ndim == 3 else a
    return np.clip((a * 255).round(), 0, 255).astype(np.uint8)


def repaint_blend(person: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste the generated region back onto the person with a feathered mask (spec §4.11),
    with the original's 8-bit arithmetic.

    person, generated: (B, 3, H, W) in [0, 1]; mask: (B, 1, H, W) in {0, 1}. As the original:
    person, generated image and mask are first converted to uint8 (``(x * 255).round()``); the
    mask is blurred with PIL's Gaussian of radius k = H // 100 rounded up to odd (11 at
    1024 px), read back as ``a = blurred / 255`` (float64), and the blend
    ``person_u8 * (1 - a) + generated_u8 * a`` is computed in float64 and **truncated** to
    uint8 (not rounded; in the feather band this is up to one level below the rounded value,
    and where person and generated agree, float64 error can make it one level below both).

    Returns (B, 3, H, W) float32 on ``generated``'s device: those uint8 values / 255, so
    ``(out * 255).round()`` gives back exactly the original's 8-bit image.
    """
    k = person.shape[-2] // 100
    k += 1 - k % 2
    blended = []
    for p, g, m in zip(person, generated, mask[:, 0]):
        blurred = Image.fromarray(_to_uint8(m)).filter(ImageFilter.GaussianBlur(k))
        a = (np.asarray(blurred) / 255)[:, :, None]  # float64, as numpy's uint8 / int
        blended.append((_to_uint8(p) * (1 - a) + _to_uint8(g) * a).astype(np.uint8))
    out = torch.from_numpy(np.stack(blended)).permute(0, 3, 1, 2).float() / 255
    return out.to(generated.device)
