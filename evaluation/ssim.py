"""SSIM (Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity",
IEEE TIP 2004) as torchmetrics' ``StructuralSimilarityIndexMeasure(data_range=1.0)`` computes it,
the Leffa authors' choice: on the RGB channels (no grayscale conversion), an 11×11 Gaussian window
with σ = 1.5, K1 = 0.01, K2 = 0.03, variances clamped at 0, and the map averaged over channels and
pixels of each image.

Borders (``SsimBorder``): torchmetrics ≥ 1.4.2 reflect-pads by 5 pixels and averages the whole
map; up to 1.4.1 it cropped those 5 pixels again, which equals the "valid" windows of Wang et al.'s
MATLAB code and skimage.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


class SsimBorder(str, Enum):
    REFLECT = "reflect"  # torchmetrics ≥ 1.4.2 (the current one)
    VALID = "valid"  # torchmetrics ≤ 1.4.1, MATLAB, skimage


def smallest_side(border: SsimBorder) -> int:
    """The smallest image side (pixels) that ``border`` allows."""
    return WINDOW // 2 + 1 if border is SsimBorder.REFLECT else WINDOW


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian, centred (torchmetrics' ``_gaussian``)."""
    x = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    g = torch.exp(-((x / sigma) ** 2) / 2)
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0,
         border: SsimBorder = SsimBorder.REFLECT) -> torch.Tensor:
    """(B, C, H, W) × 2 with values in [0, data_range] -> (B,) mean SSIM per image."""
    pad, least = WINDOW // 2, smallest_side(border)
    if min(x.shape[-2:]) < least:
        raise ValueError(f"SSIM with {border.value} borders needs images of at least {least}×{least} pixels; "
                         f"got {tuple(x.shape[-2:])}")
    if border is SsimBorder.REFLECT:
        x, y = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (x, y))
    c = x.shape[1]
    g = gaussian_window().to(x)
    window = torch.outer(g, g).expand(c, 1, WINDOW, WINDOW)  # torchmetrics' 2-D window and operation order
    mu_x, mu_y, xx, yy, xy = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), window, groups=c).split(len(x))
    mu_xx, mu_yy, mu_xy = mu_x**2, mu_y**2, mu_x * mu_y
    var_x, var_y = (xx - mu_xx).clamp(min=0), (yy - mu_yy).clamp(min=0)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mu_xy + c1) * (2 * (xy - mu_xy) + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
