"""Opt-in options for faster denoising steps, each keeping the images equal to the plain path
within a stated tolerance (tests/test_memory.py).

* **Attention kernels.** Every attention runs through ``F.scaled_dot_product_attention`` with no
  mask, which picks FlashAttention-2 on CUDA (sm80 and newer) when q, k and v are float16 or
  bfloat16, their head dimension is at most 256 and a multiple of 8 and their last dimension is
  contiguous; else the memory-efficient kernel (float32 too), else the math one. Ours qualify:
  head dimensions 40, 80 and 160 (SD1.5: 8 heads) and 64 (SDXL); ``q`` is a transposed view of
  the projection (last dimension contiguous), ``k`` and ``v`` are concatenations (contiguous).
  A CUDA test runs the pipeline with only the flash kernel allowed.
* ``fuse_qkv``: the self-attention layers (``attn1``) get diffusers' fused ``to_qkv`` projection
  (``Attention.fuse_projections``): one matrix product for q, k and v of the generative tokens
  instead of three. The reference features keep the ``to_k``/``to_v`` projections (diffusers keeps
  them beside ``to_qkv``, so the checkpoint layout is unchanged); it costs their weights once more
  in memory (3·c² per layer: +4% for SD1.5's UNets, +12% for SDXL's).
* ``channels_last``: the convolution weights of the UNets and the VAE in channels-last layout,
  which cuDNN's half-precision convolutions prefer; activations follow.
* ``compile``: ``torch.compile`` of the generative UNet (``nn.Module.compile``, in place: names and
  state dict unchanged). Our processors trace without a graph break (``torch._dynamo.explain``
  on a UNet: one graph); the reference K/V cache has two graphs (empty, filled), and no value
  that changes per generation is read inside (no recompiling per image). The first generation
  at a new size compiles (tens of seconds to minutes on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from leffa.model import LeffaModel


@dataclass(frozen=True)
class SpeedOptions:
    """Options applied by ``LeffaModel.place(..., speed=SpeedOptions(...))`` (module docstring).
    Once applied they stay: placing again with an option off does not undo it."""

    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False


def self_attention_modules(model: LeffaModel):
    """The ``attn1`` modules of both UNets (those with our processors that read ``to_qkv``)."""
    for unet in (model.unet, model.reference_unet):
        for name, module in unet.named_modules():
            if name.endswith(".attn1"):
                yield module


def fuse_qkv(model: LeffaModel) -> None:
    """diffusers' ``to_qkv`` on every ``attn1`` not fused yet (cross-attention is never run)."""
    for attn in self_attention_modules(model):
        if not attn.fused_projections:
            attn.fuse_projections()


def apply_speed_options(model: LeffaModel, options: SpeedOptions) -> None:
    """The layout options (fusing, channels-last): before any offloading hook copies the weights.
    ``compile`` is applied last, by ``compile_unet`` (``leffa.memory.place_model``)."""
    if options.fuse_qkv:
        fuse_qkv(model)
    if options.channels_last:
        for module in (model.vae, model.unet, model.reference_unet):
            torch.nn.Module.to(module, memory_format=torch.channels_last)


def compile_unet(model: LeffaModel, backend: str = "inductor") -> None:
    """``torch.compile`` the generative UNet in place (the reference UNet runs once per step at most,
    and stops early by an exception, which compiling would only slow down)."""
    model.unet.compile(backend=backend)
