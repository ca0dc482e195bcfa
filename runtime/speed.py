"""Opt-in options for faster denoising steps, each keeping the images equal to the plain path
within a stated tolerance (tests/test_memory.py). A model family applies them to its own modules
(``leffa.speed``), before any offloading hook copies the weights (``runtime.placement``), and
``compile`` last.

* ``fuse_qkv``: the self-attention layers (``attn1``) of diffusers UNets get diffusers' fused
  ``to_qkv`` projection (``Attention.fuse_projections``): one matrix product for q, k and v instead
  of three. diffusers keeps ``to_q``/``to_k``/``to_v`` beside it (the checkpoint layout is
  unchanged, and attention processors may still use them), so it costs their weights once more
  in memory (3·c² per layer; ``runtime.memory.qkv_projection_numel``).
* ``channels_last``: convolution weights in channels-last layout, which cuDNN's half-precision
  convolutions prefer; activations follow.
* ``compile``: ``torch.compile`` of a module in place (``nn.Module.compile``: names and state dict
  unchanged). The first generation at a new size compiles (tens of seconds to minutes on a GPU).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SpeedOptions:
    """Options applied when a model is placed (``LeffaModel.place(..., speed=SpeedOptions(...))``;
    module docstring). Once applied they stay: placing again with an option off does not undo it."""

    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False


def self_attention_layers(unet: nn.Module) -> Iterator[nn.Module]:
    """A diffusers UNet's self-attention layers (``attn1`` of its transformer blocks)."""
    for name, module in unet.named_modules():
        if name.endswith(".attn1"):
            yield module


def fuse_qkv(unets: Iterable[nn.Module]) -> None:
    """diffusers' ``to_qkv`` on every self-attention layer of ``unets`` not fused yet."""
    for unet in unets:
        for attn in self_attention_layers(unet):
            if not attn.fused_projections:
                attn.fuse_projections()


def to_channels_last(modules: Iterable[nn.Module]) -> None:
    """The convolution weights of ``modules`` in channels-last layout (torch's own ``to``: diffusers'
    override warns on every call)."""
    for module in modules:
        torch.nn.Module.to(module, memory_format=torch.channels_last)


def apply_layout_options(options: SpeedOptions, fused: Iterable[nn.Module],
                         channels_last: Iterable[nn.Module]) -> None:
    """The layout options of ``options``: fused q/k/v in the UNets ``fused``, channels-last for the
    modules ``channels_last``. Before any offloading hook copies the weights (``compile`` comes
    last, by ``compile_in_place``)."""
    if options.fuse_qkv:
        fuse_qkv(fused)
    if options.channels_last:
        to_channels_last(channels_last)


def compile_in_place(module: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` ``module`` in place (its names and state dict stay)."""
    module.compile(backend=backend)
