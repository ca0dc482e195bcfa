"""``SpeedOptions`` (``runtime.speed``) applied to a ``LeffaModel``: which of its modules each option
touches, and why that keeps Leffa's images (tests/test_memory.py).

* **Attention kernels.** Every attention runs through ``F.scaled_dot_product_attention`` with no
  mask, which picks FlashAttention-2 on CUDA (sm80 and newer) when q, k and v are float16 or
  bfloat16, their head dimension is at most 256 and a multiple of 8 and their last dimension is
  contiguous; else the memory-efficient kernel (float32 too), else the math one. Ours qualify:
  head dimensions 40, 80 and 160 (SD1.5: 8 heads) and 64 (SDXL); ``q`` is a transposed view of
  the projection (last dimension contiguous), ``k`` and ``v`` are concatenations (contiguous).
  A CUDA test runs the pipeline with only the flash kernel allowed.
* ``fuse_qkv``: the ``attn1`` layers of both UNets. ``to_qkv`` serves the generative tokens; the
  reference features keep the ``to_k``/``to_v`` projections. It costs +4% of SD1.5's UNets' weights,
  +12% of SDXL's.
* ``channels_last``: the UNets and the VAE.
* ``compile``: the generative UNet only. Our processors trace without a graph break
  (``torch._dynamo.explain`` on a UNet: one graph); the reference K/V cache has two graphs (empty,
  filled), and no value that changes per generation is read inside (no recompiling per image).
  The reference UNet runs once per step at most, and stops early by an exception, which compiling
  would only slow down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime import speed
from runtime.speed import SpeedOptions

if TYPE_CHECKING:  # pragma: no cover

    from leffa.model import LeffaModel

__all__ = ["SpeedOptions", "apply_speed_options", "compile_unet", "fuse_qkv"]


def fuse_qkv(model: LeffaModel) -> None:
    """diffusers' ``to_qkv`` on every ``attn1`` not fused yet (cross-attention is never run)."""
    speed.fuse_qkv((model.unet, model.reference_unet))


def apply_speed_options(model: LeffaModel, options: SpeedOptions) -> None:
    """The layout options (fusing, channels-last): before any offloading hook copies the weights.
    ``compile`` is applied last, by ``compile_unet`` (``leffa.memory.place_model``)."""
    speed.apply_layout_options(options, fused=(model.unet, model.reference_unet),
                               channels_last=(model.vae, model.unet, model.reference_unet))


def compile_unet(model: LeffaModel, backend: str = "inductor") -> None:
    """``torch.compile`` the generative UNet in place (module docstring)."""
    speed.compile_in_place(model.unet, backend)
