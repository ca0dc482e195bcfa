"""The Leffa loss (Zhou et al., CVPR 2025, §3.2–3.3): learning flow fields in attention.

For a generative-UNet attention layer l with queries from the generative tokens and keys from
the reference tokens, the head-averaged attention ``Â = mean_heads softmax(QKᵀ/√d / τ)``
(Eq. 2) turns into a flow field ``F = Â · C`` (Eq. 3), C the normalised coordinates of the
reference tokens. Warping the reference image with F (upsampled to image size) should
reproduce the target inside the mask (Eq. 4):

    L_leffa = Σ_l mean((I_tgt·I_m − I_warp^l·I_m)²),

summed over the layers whose resolution h_l/H exceeds θ_resolution and gated to timesteps
t < θ_timestep. Training adds it to the diffusion loss with weight λ_leffa (Eq. 5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from leffa.flow import attention_flow, warp_with_flow

__all__ = ["diffusion_loss", "flow_loss", "leffa_loss"]

THETA_RESOLUTION = 1 / 32
THETA_TIMESTEP = 500
TAU = 2.0
LAMBDA_LEFFA = 1e-3


def flow_loss(flows: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], ref_image: torch.Tensor,
              tgt_image: torch.Tensor, mask: torch.Tensor, timesteps: torch.Tensor | None = None, *,
              theta_resolution: float = THETA_RESOLUTION, theta_timestep: int = THETA_TIMESTEP) -> torch.Tensor:
    """Eq. 4 from flow fields: Σ_l mean over batch, channels, pixels of ``(tgt·m − warp_l·m)²``.

    Args:
        flows: per layer, (B, h_l, w_l, 2) flow fields in ``grid_sample`` convention.
        ref_image, tgt_image: (B, C, H, W); mask: (B, 1, H, W) in [0, 1].
        timesteps: (B,) diffusion timesteps; samples with t ≥ θ_timestep contribute zero
            (they still count in the batch mean). None: no gating.
    Layers with h_l / H ≤ θ_resolution are skipped.
    """
    flows = list(flows.values()) if isinstance(flows, Mapping) else list(flows)
    b, _, h_img, _ = tgt_image.shape
    gate = torch.ones(b, device=tgt_image.device, dtype=tgt_image.dtype)
    if timesteps is not None:
        gate = (timesteps.to(tgt_image.device) < theta_timestep).to(tgt_image.dtype)
    total = tgt_image.new_zeros(())
    target = tgt_image * mask
    for flow in flows:
        if flow.shape[1] / h_img <= theta_resolution:
            continue
        warped = warp_with_flow(ref_image, flow) * mask
        per_sample = ((target - warped) ** 2).flatten(1).mean(dim=1)  # (B,)
        total = total + (per_sample * gate).mean()
    return total


def _grid_of(n: int, height: int, width: int) -> tuple[int, int]:
    h = round(math.sqrt(n * height / width))
    if h * round(n / h) != n:
        raise ValueError(f"{n} tokens do not form a grid with the image's aspect ratio {height}x{width}")
    return h, n // h


def leffa_loss(attn_maps: Sequence[torch.Tensor], ref_image: torch.Tensor, tgt_image: torch.Tensor,
               mask: torch.Tensor, timesteps: torch.Tensor | None = None, *,
               theta_resolution: float = THETA_RESOLUTION, theta_timestep: int = THETA_TIMESTEP) -> torch.Tensor:
    """The Leffa loss (Eq. 4) from attention maps.

    Args:
        attn_maps: per layer, (B, n_l, n_l) head-averaged attention of generative queries over
            reference keys (rows sum to 1; τ already applied where the maps were made), on
            token grids h_l×w_l with the image's aspect ratio.
        ref_image: (B, C, H, W) the reference (garment / source person).
        tgt_image: (B, C, H, W) the target; mask: (B, 1, H, W) the region the loss looks at.
        timesteps: (B,) or None (no gating).
    """
    h_img, w_img = tgt_image.shape[-2:]
    flows = [attention_flow(a, *_grid_of(a.shape[1], h_img, w_img)) for a in attn_maps]
    return flow_loss(flows, ref_image, tgt_image, mask, timesteps, theta_resolution=theta_resolution,
                     theta_timestep=theta_timestep)


def diffusion_loss(noise_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The latent-diffusion objective (Eq. 1): ``‖ε − ε_θ(z_t, t, c)‖²``, mean over all elements."""
    return F.mse_loss(noise_pred.float(), noise.float())
