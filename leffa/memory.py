"""Memory presets: where a ``LeffaModel``'s weights live while it generates, and how much memory
that takes.

``LeffaModel.place(device, dtype, memory=MemoryPreset.BALANCED)`` (or ``load_model(..., memory=...)``)
applies a preset; each is a documented trade-off built on library features:

=============  ==============================================================  =====================
preset         on the accelerator                                              library feature
=============  ==============================================================  =====================
``fast``       everything, all the time (the default)                          ``Module.to``
``balanced``   what the current phase uses: the VAE to encode and decode; the  accelerate's
               reference UNet while it runs (with reference acceleration it    ``cpu_offload_with_hook``
               runs once, then leaves; without, it stays beside the
               generative UNet); the generative UNet while denoising
``low``        one block of a UNet at a time (the next one prefetched on a     diffusers'
               CUDA stream); the VAE as ``balanced``                           ``enable_group_offload``
``low-fp8``    as ``low``, the UNets' weights stored in float8 (e4m3) and      + ``enable_layerwise_casting``
               cast layer by layer to the model dtype to compute
=============  ==============================================================  =====================

``fast``, ``balanced`` and ``low`` compute exactly the same thing (the same images in the same dtype);
``low-fp8`` rounds the weights to float8 (about 2 significant digits), so its images differ a little.
Under ``low`` and ``low-fp8`` the reference UNet runs to its end instead of stopping after its last
captured feature (``leffa.attention.run_reference_unet``): the early exit would skip the group hooks'
``post_forward`` (its last block and the top-level group would stay on the accelerator, and the CUDA
stream prefetch, set up at the end of the first forward, would never be).

The offloading presets keep the weights in CPU memory and move them each generation: on an
accelerator they trade speed for memory; on the CPU (onload device = offload device) they run the
same hooks and save nothing. ``estimate_memory`` says what a model needs under a preset, and
``free_memory`` what a device has, so that a caller can refuse a model before loading it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn

from errors import UserError
from leffa.presets import MemoryPreset
from weightfiles.manifest import human_size

if TYPE_CHECKING:  # pragma: no cover
    from accelerate.hooks import UserCpuOffloadHook

    from leffa.model import BaseModel, LeffaModel
    from leffa.speed import SpeedOptions

GiB = 2**30
FLOAT8 = torch.float8_e4m3fn  # weight storage of ``low-fp8``; enough range (±448) for the UNets' weights
UNET_NAMES = ("unet", "reference_unet")
MODULE_NAMES = ("vae", *UNET_NAMES)


class Phase(str, Enum):
    """The pipeline's phases, each with the modules it runs (``phase_modules``)."""

    ENCODE = "encode"  # VAE-encode the person and the reference
    REFERENCE = "reference"  # the reference UNet's single pass (reference acceleration)
    DENOISE = "denoise"  # the denoising loop
    DECODE = "decode"  # VAE-decode
    IDLE = "idle"  # between generations


def phase_modules(phase: Phase, ref_acceleration: bool = False) -> frozenset[str]:
    """The modules ``phase`` runs: with reference acceleration, the denoising loop no longer runs
    the reference UNet (its features and K/V are cached)."""
    if phase is Phase.DENOISE:
        return frozenset({"unet"} if ref_acceleration else UNET_NAMES)
    return frozenset({Phase.ENCODE: {"vae"}, Phase.REFERENCE: {"reference_unet"}, Phase.DECODE: {"vae"},
                      Phase.IDLE: set()}[phase])


@dataclass
class Placement:
    """Where ``LeffaModel.place`` put a model: the device it computes on, the UNets' compute dtype,
    the VAE's dtype and the memory preset; ``phase_hooks`` are the accelerate hooks of the modules
    moved per phase (all three under ``balanced``, the VAE under ``low``)."""

    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    memory: MemoryPreset = MemoryPreset.FAST
    phase_hooks: dict[str, UserCpuOffloadHook] = field(default_factory=dict, repr=False)

    def enter(self, phase: Phase, ref_acceleration: bool = False) -> None:
        """Send back to the CPU every phase-moved module that ``phase`` does not run; a module
        that it runs comes onto the device by its hook when called."""
        keep = phase_modules(phase, ref_acceleration)
        for name, hook in self.phase_hooks.items():
            if name not in keep and _device_of(hook.model).type != "cpu":
                hook.offload()


def enter_phase(model: LeffaModel, phase: Phase, ref_acceleration: bool = False) -> None:
    """What the pipeline calls at the start of each phase (nothing unless a preset moves modules)."""
    if model.placement is not None:
        model.placement.enter(phase, ref_acceleration)


@contextmanager
def idle_after(model: LeffaModel) -> Iterator[None]:
    """Offload what the last phase left on the device when a generation ends, however it ends."""
    try:
        yield
    finally:
        enter_phase(model, Phase.IDLE)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def normalized_device(device: torch.device | str) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current device), so that comparisons with a tensor's device hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# -- applying a preset ---------------------------------------------------------------------------
def stores_float8(module: nn.Module) -> bool:
    """Whether ``module``'s weights are stored in float8 (``low-fp8``'s layerwise casting)."""
    return any(p.dtype == FLOAT8 for p in module.parameters())


def remove_offloading(model: LeffaModel) -> None:
    """Take off the hooks of an earlier placement (accelerate's and diffusers' group offloading);
    the float8 layerwise casting stays (the weights are already rounded)."""
    from accelerate.hooks import remove_hook_from_module
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, \
        _LAZY_PREFETCH_GROUP_OFFLOADING

    for name in MODULE_NAMES:
        module = getattr(model, name)
        remove_hook_from_module(module, recurse=True)
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for hook in (_LAZY_PREFETCH_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _GROUP_OFFLOADING):
                registry.remove_hook(hook, recurse=True)
    model.placement = None


def place_model(model: LeffaModel, placement: Placement, speed: SpeedOptions | None = None) -> Placement:
    """Apply ``placement`` (see ``LeffaModel.place``): cast and move the modules, apply the speed
    options, then the preset's hooks. A model placed before is re-placed (its hooks removed first)."""
    from leffa.speed import apply_speed_options, compile_unet

    memory = placement.memory
    remove_offloading(model)
    float8 = stores_float8(model.unet)
    if float8 and (not memory.float8 or model.unet.dtype != placement.dtype):
        raise ValueError(f"this model's weights are stored in float8 (memory preset {MemoryPreset.LOW_FP8.value}, "
                         f"computing in {model.unet.dtype}): load it again for {memory.value} "
                         f"in {placement.dtype}")
    at_rest = placement.device if memory is MemoryPreset.FAST else torch.device("cpu")
    for name in MODULE_NAMES:
        module = getattr(model, name)
        dtype = placement.vae_dtype if name == "vae" else None if float8 else placement.dtype
        # torch's own ``to`` (see LeffaModel.place); float8 weights keep their storage dtype
        torch.nn.Module.to(module, device=at_rest, dtype=dtype)
    if speed is not None:
        apply_speed_options(model, speed)
    if memory is MemoryPreset.BALANCED:
        placement.phase_hooks = _phase_hooks(model, MODULE_NAMES, placement.device)
    elif memory.group_offload:
        placement.phase_hooks = _phase_hooks(model, ("vae",), placement.device)
        for name in UNET_NAMES:
            _group_offload(getattr(model, name), placement)
    # the early exit skips the group hooks' post_forward (module docstring)
    model.attn_state.reference_early_exit = not memory.group_offload
    if speed is not None and speed.compile:
        compile_unet(model)
    return placement


def _phase_hooks(model: LeffaModel, names: tuple[str, ...],
                 device: torch.device) -> dict[str, UserCpuOffloadHook]:
    """accelerate's ``cpu_offload_with_hook`` (as diffusers' ``enable_model_cpu_offload``): the module
    moves to ``device`` when called (the VAE's ``encode``/``decode`` too) and stays there until
    ``Placement.enter`` sends it back."""
    from accelerate import cpu_offload_with_hook

    return {name: cpu_offload_with_hook(getattr(model, name), device)[1] for name in names}


def _group_offload(unet: nn.Module, placement: Placement) -> None:
    """diffusers' group offloading, one down/up block per group (the rest of the UNet, mid block
    included, is one group held for the whole forward). On CUDA the next block is copied on a
    side stream while the current one computes, from pinned CPU memory."""
    if placement.memory.float8 and not stores_float8(unet):
        unet.enable_layerwise_casting(storage_dtype=FLOAT8, compute_dtype=placement.dtype)
    stream = placement.device.type == "cuda"
    unet.enable_group_offload(onload_device=placement.device, offload_device=torch.device("cpu"),
                              offload_type="block_level", num_blocks_per_group=1, use_stream=stream,
                              record_stream=stream)


# -- how much memory ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a model needs under a preset. ``resident``: held on its device between generations;
    ``peak``: on its device while generating (``resident`` included); ``host``: held in CPU memory
    besides (the offloaded weights, on an accelerator; 0 when the device is the CPU)."""

    resident: int
    peak: int
    host: int = 0

    @property
    def working(self) -> int:
        """What a generation needs on the device beyond the resident weights."""
        return self.peak - self.resident


@dataclass(frozen=True)
class FreeMemory:
    """Bytes free now: on the model's device, and in CPU memory (the same figure on the CPU)."""

    device: int
    host: int


# Working memory of one generation at 768x1024 in a 2-byte dtype, beside the weights, with a margin:
# the VAE's (its decode is the largest: +2.9 GiB in float32 on the CPU; the H100 runs of
# benchmarks/bench_pipeline.py peaked 1.86 GiB above the weights for SD1.5 with a float16 VAE and
# 3.8 GiB for SDXL with a float32 one) and one denoising step's, with CFG, the reference features
# and their K/V (SD1.5: +1.9 GiB in float32 on the CPU). Scaled by the number of pixels and the
# dtype's size; benchmarks/bench_gpu.py prints these estimates beside the measured peaks.
ACTIVATIONS_768X1024 = {"vae": 2.0 * GiB, "sd15": 1.25 * GiB, "sdxl": 1.5 * GiB}
MODEL_SIZE = (768, 1024)


def _bytes(module: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in module.parameters()) * dtype.itemsize


def _block_groups(unet: nn.Module) -> tuple[int, list[int]]:
    """(parameters outside the down/up blocks, parameters of each block in execution order)."""
    blocks = [*unet.down_blocks, *unet.up_blocks]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    return sum(p.numel() for p in unet.parameters()) - sum(sizes), sizes


def _group_offload_peak(unet: nn.Module, dtype: torch.dtype) -> int:
    """Weights on the device under block-level group offloading with prefetch: the top-level group
    (mid block included), the running block and the next one."""
    rest, sizes = _block_groups(unet)
    pairs = [a + b for a, b in zip(sizes, sizes[1:])] or sizes
    return (rest + max(pairs)) * dtype.itemsize


def activation_bytes(is_sdxl: bool, dtype: torch.dtype, vae_dtype: torch.dtype,
                     size: tuple[int, int] = MODEL_SIZE) -> tuple[int, int]:
    """(VAE, UNet) working memory of one generation at ``size`` (width, height)."""
    scale = size[0] * size[1] / (MODEL_SIZE[0] * MODEL_SIZE[1])
    vae = ACTIVATIONS_768X1024["vae"] * scale * vae_dtype.itemsize / 2
    unet = ACTIVATIONS_768X1024["sdxl" if is_sdxl else "sd15"] * scale * dtype.itemsize / 2
    return int(vae), int(unet)


def _unfused_qkv_numel(unet: nn.Module) -> int:
    """Parameters of the self-attention layers' q/k/v projections: what ``fuse_qkv``'s ``to_qkv``
    copies (the projections stay beside it)."""
    return sum(p.numel() for name, module in unet.named_modules() if name.endswith(".attn1")
               for proj in (module.to_q, module.to_k, module.to_v) for p in proj.parameters())


def estimate_memory(model: LeffaModel, memory: MemoryPreset, device: torch.device | str,
                    dtype: torch.dtype, vae_dtype: torch.dtype | None = None,
                    size: tuple[int, int] = MODEL_SIZE, fuse_qkv: bool = False) -> MemoryNeed:
    """What ``model`` (a meta-device build will do: only the shapes are read) needs placed on
    ``device`` with ``memory``, generating at ``size`` (``fuse_qkv``: an unfused model, such as a meta
    build, that will get the fused projections of ``leffa.speed``). Under ``balanced`` the peak assumes no reference acceleration (both UNets on
    the device while denoising)."""
    if vae_dtype is None:
        vae_dtype = torch.float32 if model.vae_upcast else dtype
    storage = FLOAT8 if memory.float8 else dtype
    vae = _bytes(model.vae, vae_dtype)
    unets = [_bytes(getattr(model, n), storage) + (_unfused_qkv_numel(getattr(model, n)) * storage.itemsize
                                                  if fuse_qkv else 0) for n in UNET_NAMES]
    act_vae, act_unet = activation_bytes(model.is_sdxl, dtype, vae_dtype, size)
    weights = vae + sum(unets)
    if torch.device(device).type == "cpu" or memory is MemoryPreset.FAST:
        return MemoryNeed(weights, weights + max(act_vae, act_unet))
    if memory is MemoryPreset.BALANCED:
        return MemoryNeed(0, max(vae + act_vae, sum(unets) + act_unet), weights)
    on_device = max(_group_offload_peak(getattr(model, n), storage) for n in UNET_NAMES)
    pinning = max(unets)  # group offloading pins a copy of a UNet's weights before freeing the first
    return MemoryNeed(0, max(vae + act_vae, on_device + act_unet), weights + pinning)


@lru_cache(maxsize=4)
def meta_model(base: BaseModel) -> LeffaModel:
    """The model's structure without weights (for ``estimate_memory``; built once per base)."""
    from leffa.model import LeffaModel

    return LeffaModel.from_config_dir(base, device="meta")


# -- free memory ----------------------------------------------------------------------------------
def available_host_memory() -> int:
    """Bytes of CPU memory available to a new allocation without swapping: ``MemAvailable`` of
    /proc/meminfo (Linux), else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_memory(device: torch.device | str) -> FreeMemory:
    """Free memory now on ``device`` (on CUDA also the blocks PyTorch's caching allocator holds
    unused, which it gives to the next allocation) and in CPU memory."""
    device = torch.device(device)
    host = available_host_memory()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return FreeMemory(free + cached, host)
    return FreeMemory(host, host)


# -- refusing what does not fit ---------------------------------------------------------------------
class NotEnoughMemoryError(UserError):
    """A model refused before loading: it would not fit in the free memory."""


def fits(need: MemoryNeed, free: FreeMemory, others_working: int = 0) -> bool:
    """Whether a model needing ``need`` fits in ``free`` beside models already loaded (their weights
    are no longer free; ``others_working``: the most any of them needs while generating). One
    generation runs at a time, so the device must hold the new model's resident weights plus the
    largest working memory of all."""
    return (need.resident + max(need.working, others_working) <= free.device
            and need.host <= free.host)


def not_enough_memory(what: str, memory: MemoryPreset, needs: dict[MemoryPreset, MemoryNeed],
                      free: FreeMemory, device: torch.device | str, others_working: int = 0,
                      others_dropped: bool = False) -> NotEnoughMemoryError:
    """The refusal of ``what`` under ``memory``: what it needs, what is free (``others_dropped``:
    counting what the models loaded now hold), and the presets (``needs``: the need under each)
    that would fit."""
    need = needs[memory]
    on_device = torch.device(device).type != "cpu"
    where = f"{torch.device(device).type.upper()} memory" if on_device else "memory"
    dropped = " once the other models are dropped" if others_dropped else ""
    lines = [f"Not enough memory for {what} with --memory {memory.value}: it needs about "
             f"{human_size(need.resident + max(need.working, others_working))} of {where} "
             f"and {human_size(free.device)} are free{dropped}."]
    if need.host:
        lines[0] += (f" It also keeps {human_size(need.host)} of weights in CPU memory "
                     f"({human_size(free.host)} available).")
    better = [p for p, n in needs.items() if p is not memory and fits(n, free, others_working)]
    if better:
        lines.append("It would fit with " + " or ".join(
            f"--memory {p.value} (about {human_size(needs[p].peak)})" for p in better) + ".")
    elif on_device:
        lines.append("No memory preset fits it next to what else runs on this device: free some memory, "
                     "or run on a larger device.")
    else:
        lines.append("Free some memory (close other programs), or run on a machine with more memory.")
    return NotEnoughMemoryError("\n".join(lines))
