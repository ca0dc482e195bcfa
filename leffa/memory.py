"""Leffa's memory figures and placement: the modules each phase of its pipeline runs, where its
weights live under a memory preset, and how much memory that takes.

``LeffaModel.place(device, dtype, memory=MemoryPreset.BALANCED)`` (or ``load_model(..., memory=...)``)
applies a preset with ``runtime.placement`` (its table says what each preset does) to the three
modules: the VAE moves by phase (to encode and decode); the reference UNet runs alone in its
single pass with reference acceleration, then leaves; without, it stays beside the generative UNet
while denoising. Under ``low`` and ``low-fp8`` both UNets are offloaded block by block, and the
reference UNet runs to its end instead of stopping after its last captured feature
(``leffa.attention.run_reference_unet``): the early exit would skip the group hooks' ``post_forward``.

``estimate_memory`` says what a model needs under a preset, and ``runtime.memory.free_memory`` what
a device has, so that a caller can refuse a model before loading it. The generic names
(``Placement``, ``Phase``, ``MemoryNeed``, ``fits``...) live in ``runtime`` and are re-exported here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn

from runtime.memory import (FLOAT8, FreeMemory, GiB, MemoryNeed, NotEnoughMemoryError, available_host_memory,
                            fits, free_accelerator_memory, free_memory, group_offload_peak, module_bytes,
                            normalized_device, not_enough_memory, qkv_projection_numel, stores_float8)
from runtime.placement import Phase, Placement, enter_phase, idle_after, place_modules
from runtime.placement import remove_offloading as remove_module_offloading
from runtime.presets import MemoryPreset

if TYPE_CHECKING:  # pragma: no cover
    from leffa.model import BaseModel, LeffaModel
    from leffa.speed import SpeedOptions

__all__ = ["ACTIVATIONS_768X1024", "FLOAT8", "FreeMemory", "GiB", "MODEL_SIZE", "MODULE_NAMES", "MemoryNeed",
           "MemoryPreset", "NotEnoughMemoryError", "Phase", "Placement", "UNET_NAMES", "activation_bytes",
           "available_host_memory", "enter_phase", "estimate_memory", "fits", "free_accelerator_memory",
           "free_memory", "idle_after", "leffa_placement", "meta_model", "model_modules", "normalized_device",
           "not_enough_memory", "phase_modules", "place_model", "remove_offloading", "stores_float8"]

UNET_NAMES = ("unet", "reference_unet")
MODULE_NAMES = ("vae", *UNET_NAMES)


# -- Leffa's modules and phases ----------------------------------------------------------------------
def model_modules(model: LeffaModel) -> dict[str, nn.Module]:
    """The modules ``runtime.placement`` places, by name."""
    return {name: getattr(model, name) for name in MODULE_NAMES}


def phase_modules(phase: Phase, ref_acceleration: bool = False) -> frozenset[str]:
    """The modules ``phase`` runs: with reference acceleration, the denoising loop no longer runs
    the reference UNet (its features and K/V are cached)."""
    if phase is Phase.DENOISE:
        return frozenset({"unet"} if ref_acceleration else UNET_NAMES)
    return frozenset({Phase.ENCODE: {"vae"}, Phase.REFERENCE: {"reference_unet"}, Phase.DECODE: {"vae"},
                      Phase.IDLE: set()}[phase])


def leffa_placement(device: torch.device | str, dtype: torch.dtype, vae_dtype: torch.dtype,
                    memory: MemoryPreset = MemoryPreset.FAST) -> Placement:
    """A placement of Leffa's modules: the UNets computing in ``dtype``, the VAE in ``vae_dtype``,
    moved by Leffa's phases (``phase_modules``)."""
    return Placement(normalized_device(device), dtype, phase_modules, MemoryPreset(memory),
                     dtypes={"vae": vae_dtype})


# -- applying a preset ---------------------------------------------------------------------------
def remove_offloading(model: LeffaModel) -> None:
    """Take off the hooks of an earlier placement (``runtime.placement.remove_offloading``)."""
    remove_module_offloading(model_modules(model).values())
    model.placement = None


def place_model(model: LeffaModel, placement: Placement, speed: SpeedOptions | None = None) -> Placement:
    """Apply ``placement`` (see ``LeffaModel.place``): cast and move the modules, apply the speed
    options, then the preset's hooks (both UNets grouped under ``low``). A model placed before is
    re-placed (its hooks removed first)."""
    from leffa.speed import apply_speed_options, compile_unet

    model.placement = None
    prepare = None if speed is None else (lambda: apply_speed_options(model, speed))
    place_modules(model_modules(model), placement, grouped=UNET_NAMES, prepare=prepare)
    # the early exit skips the group hooks' post_forward (module docstring)
    model.attn_state.reference_early_exit = not placement.memory.group_offload
    if speed is not None and speed.compile:
        compile_unet(model)
    return placement


# -- how much memory ------------------------------------------------------------------------------
# Working memory of one generation at 768x1024 in a 2-byte dtype, beside the weights, with a margin:
# the VAE's (its decode is the largest: +2.9 GiB in float32 on the CPU; the H100 runs of
# benchmarks/bench_pipeline.py peaked 1.86 GiB above the weights for SD1.5 with a float16 VAE and
# 3.8 GiB for SDXL with a float32 one) and one denoising step's, with CFG, the reference features
# and their K/V (SD1.5: +1.9 GiB in float32 on the CPU). Scaled by the number of pixels and the
# dtype's size; benchmarks/bench_gpu.py prints these estimates beside the measured peaks.
ACTIVATIONS_768X1024 = {"vae": 2.0 * GiB, "sd15": 1.25 * GiB, "sdxl": 1.5 * GiB}
MODEL_SIZE = (768, 1024)


def activation_bytes(is_sdxl: bool, dtype: torch.dtype, vae_dtype: torch.dtype,
                     size: tuple[int, int] = MODEL_SIZE) -> tuple[int, int]:
    """(VAE, UNet) working memory of one generation at ``size`` (width, height)."""
    scale = size[0] * size[1] / (MODEL_SIZE[0] * MODEL_SIZE[1])
    vae = ACTIVATIONS_768X1024["vae"] * scale * vae_dtype.itemsize / 2
    unet = ACTIVATIONS_768X1024["sdxl" if is_sdxl else "sd15"] * scale * dtype.itemsize / 2
    return int(vae), int(unet)


def estimate_memory(model: LeffaModel, memory: MemoryPreset, device: torch.device | str,
                    dtype: torch.dtype, vae_dtype: torch.dtype | None = None,
                    size: tuple[int, int] = MODEL_SIZE, fuse_qkv: bool = False) -> MemoryNeed:
    """What ``model`` (a meta-device build will do: only the shapes are read) needs placed on
    ``device`` with ``memory``, generating at ``size`` (``fuse_qkv``: an unfused model, such as a meta
    build, that will get the fused projections of ``leffa.speed``). Under ``balanced`` the peak
    assumes no reference acceleration (both UNets on the device while denoising)."""
    if vae_dtype is None:
        vae_dtype = torch.float32 if model.vae_upcast else dtype
    storage = FLOAT8 if memory.float8 else dtype
    vae = module_bytes(model.vae, vae_dtype)
    unets = [module_bytes(getattr(model, n), storage)
             + (qkv_projection_numel(getattr(model, n)) * storage.itemsize if fuse_qkv else 0) for n in UNET_NAMES]
    act_vae, act_unet = activation_bytes(model.is_sdxl, dtype, vae_dtype, size)
    weights = vae + sum(unets)
    if torch.device(device).type == "cpu" or memory is MemoryPreset.FAST:
        return MemoryNeed(weights, weights + max(act_vae, act_unet))
    if memory is MemoryPreset.BALANCED:
        return MemoryNeed(0, max(vae + act_vae, sum(unets) + act_unet), weights)
    on_device = max(group_offload_peak(getattr(model, n), storage) for n in UNET_NAMES)
    pinning = max(unets)  # group offloading pins a copy of a UNet's weights before freeing the first
    return MemoryNeed(0, max(vae + act_vae, on_device + act_unet), weights + pinning)


@lru_cache(maxsize=4)
def meta_model(base: BaseModel) -> LeffaModel:
    """The model's structure without weights (for ``estimate_memory``; built once per base)."""
    from leffa.model import LeffaModel

    return LeffaModel.from_config_dir(base, device="meta")
