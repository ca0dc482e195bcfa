"""How much memory a model needs and a device has, and refusing a model that would not fit.

A model family estimates its need under each preset (``MemoryNeed``; ``leffa.memory.estimate_memory``)
from the byte helpers here, which read only shapes (a meta-device build will do) and work on any
diffusers UNet. ``free_memory`` says what a device has now and ``fits`` whether a need fits beside
the models already loaded, so that a caller can refuse a model (``not_enough_memory``) before
loading it.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
from torch import nn

from errors import UserError
from runtime.presets import MemoryPreset
from runtime.speed import self_attention_layers
from weightfiles.manifest import human_size

GiB = 2**30
FLOAT8 = torch.float8_e4m3fn  # weight storage of ``low-fp8``; enough range (±448) for the UNets' weights


def normalized_device(device: torch.device | str) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current device), so that comparisons with a tensor's device hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def stores_float8(module: nn.Module) -> bool:
    """Whether ``module``'s weights are stored in float8 (``low-fp8``'s layerwise casting)."""
    return any(p.dtype == FLOAT8 for p in module.parameters())


# -- what a model needs ------------------------------------------------------------------------------
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


def module_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module``'s parameters stored in ``dtype``."""
    return sum(p.numel() for p in module.parameters()) * dtype.itemsize


def block_groups(unet: nn.Module) -> tuple[int, list[int]]:
    """(parameters outside the down/up blocks, parameters of each block in execution order)."""
    blocks = [*unet.down_blocks, *unet.up_blocks]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    return sum(p.numel() for p in unet.parameters()) - sum(sizes), sizes


def group_offload_peak(unet: nn.Module, dtype: torch.dtype) -> int:
    """Weights on the device under block-level group offloading with prefetch: the top-level group
    (mid block included), the running block and the next one."""
    rest, sizes = block_groups(unet)
    pairs = [a + b for a, b in zip(sizes, sizes[1:])] or sizes
    return (rest + max(pairs)) * dtype.itemsize


def qkv_projection_numel(unet: nn.Module) -> int:
    """Parameters of the self-attention layers' q/k/v projections: what fusing them
    (``runtime.speed.fuse_qkv``) copies into ``to_qkv`` (the projections stay beside it)."""
    return sum(p.numel() for attn in self_attention_layers(unet)
               for proj in (attn.to_q, attn.to_k, attn.to_v) for p in proj.parameters())


# -- what a device has -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FreeMemory:
    """Bytes free now: on the model's device, and in CPU memory (the same figure on the CPU)."""

    device: int
    host: int


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


def samples_that_fit(working: int, free: int, samples: int) -> int:
    """How many of ``samples`` to generate in one batch when each needs ``working`` bytes beyond the
    loaded weights and ``free`` bytes are free (at least one: one alone is what a request needs)."""
    return samples if working <= 0 else max(1, min(samples, free // working))


def free_accelerator_memory() -> None:
    """Give memory back after dropping models or an out-of-memory error: collect the garbage
    (the dropped tensors) and return the CUDA caching allocator's free blocks to the device, so
    that the next load or generation can use them. Safe to call on CPU-only machines."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- refusing what does not fit ----------------------------------------------------------------------
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
