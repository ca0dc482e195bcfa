"""Token grids and the attention flow field (paper §3.2, spec §6 grid convention)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_grid(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a UNet layer holding ``num_tokens`` tokens for a latent of size ``latent_hw``.

    Each UNet level halves the previous one with ``ceil`` (stride-2 conv, padding 1).
    """
    h, w = latent_hw
    while h * w > num_tokens:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a UNet level of a {latent_hw} latent")
    return h, w


def coordinate_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised (x, y) coordinates of a ``height × width`` token grid, row-major: (h·w, 2).

    Token (0, 0) is (−1, −1) and token (h−1, w−1) is (1, 1): ``grid_sample`` with
    ``align_corners=True``.
    """
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(height * width, 2)


def attention_flow(attn: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Flow field of an attention map (paper Eq. 3: ``F = Â · C``).

    Args:
        attn: (B, n, n) head-averaged attention of generative queries over reference keys,
            rows summing to 1, with n = height·width.
    Returns:
        (B, height, width, 2): for each query token, the expected (x, y) position it reads
        from in the reference, in ``grid_sample`` convention (align_corners=True).
    """
    b, n, n_ref = attn.shape
    if n != height * width or n_ref != height * width:
        raise ValueError(f"attention {tuple(attn.shape)} does not match a {height}x{width} grid")
    coords = coordinate_grid(height, width, device=attn.device, dtype=attn.dtype)  # (n, 2)
    return (attn @ coords).view(b, height, width, 2)


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a flow field (B, h, w, 2) to ``size`` = (H, W) bilinearly with
    ``align_corners=True``, the grid convention of the values, so an affine field (the
    identity among them) stays exact: (B, H, W, 2)."""
    out = F.interpolate(flow.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=True)
    return out.permute(0, 2, 3, 1)


def warp_with_flow(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Warp ``image`` (B, C, H, W) by a token-grid ``flow`` (B, h, w, 2) (Eq. 4's I_warp).

    The flow is upsampled bilinearly to H×W with ``align_corners=True`` (so an identity flow
    stays the identity) and used as a ``grid_sample`` grid.
    """
    grid = resize_flow(flow, tuple(image.shape[-2:]))
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", align_corners=True)
