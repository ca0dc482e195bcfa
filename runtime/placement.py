"""Memory presets applied to a model's modules: where its weights live while it generates.

A model family declares what it is made of, and this module knows no module name:

* ``modules``: its modules by name (Leffa: ``vae``, ``unet``, ``reference_unet``);
* ``phase_modules(phase, *options)``: the modules each ``Phase`` of a generation runs, ``options``
  being what its pipeline passes to ``enter_phase`` (Leffa: whether reference acceleration is on);
* ``grouped``: the modules offloaded block by block under ``low`` (diffusers UNets: their
  ``down_blocks`` and ``up_blocks``).

``place_modules`` applies a preset; each is a documented trade-off built on library features:

=============  ==============================================================  =====================
preset         on the accelerator                                              library feature
=============  ==============================================================  =====================
``fast``       every module, all the time (the default)                        ``Module.to``
``balanced``   the modules the current phase runs: a module comes when         accelerate's
               called, and leaves when a phase that does not run it begins     ``cpu_offload_with_hook``
``low``        one block of a grouped module at a time (the next one           diffusers'
               prefetched on a CUDA stream); the other modules as ``balanced``  ``enable_group_offload``
``low-fp8``    as ``low``, the grouped modules' weights stored in float8       + ``enable_layerwise_casting``
               (e4m3) and cast layer by layer to the compute dtype
=============  ==============================================================  =====================

``fast``, ``balanced`` and ``low`` compute exactly the same thing (the same images in the same dtype);
``low-fp8`` rounds the weights to float8 (about 2 significant digits), so its images differ a little.
A grouped module must run every block's hooks to its end: a forward cut short (by an exception)
skips the group hooks' ``post_forward``, which leaves its last block on the accelerator (and the
CUDA stream prefetch, set up at the end of the first forward, would never be).

The offloading presets keep the weights in CPU memory and move them each generation: on an
accelerator they trade speed for memory; on the CPU (onload device = offload device) they run the
same hooks and save nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from runtime.memory import FLOAT8, stores_float8
from runtime.presets import MemoryPreset

if TYPE_CHECKING:  # pragma: no cover
    from accelerate.hooks import UserCpuOffloadHook


class Phase(str, Enum):
    """The phases of a generation; a model declares the modules each runs (``PhaseModules``)."""

    ENCODE = "encode"  # encode the inputs (a VAE's encoder)
    REFERENCE = "reference"  # a single pass over the reference (Leffa: its reference UNet)
    DENOISE = "denoise"  # the denoising loop
    DECODE = "decode"  # decode the result (a VAE's decoder)
    IDLE = "idle"  # between generations: nothing runs


PhaseModules = Callable[..., Collection[str]]
"""``phase_modules(phase, *options) -> names``: the modules ``phase`` runs (module docstring)."""


@dataclass
class Placement:
    """Where a model was put: the device it computes on, its compute dtype (``dtypes``: the modules
    computing in another, e.g. a VAE kept in float32), the modules each phase runs and the memory
    preset. ``phase_hooks`` are the accelerate hooks of the modules moved per phase (every module
    under ``balanced``, those not grouped under ``low``)."""

    device: torch.device
    dtype: torch.dtype
    phase_modules: PhaseModules
    memory: MemoryPreset = MemoryPreset.FAST
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    phase_hooks: dict[str, UserCpuOffloadHook] = field(default_factory=dict, repr=False)

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype module ``name`` computes in."""
        return self.dtypes.get(name, self.dtype)

    def enter(self, phase: Phase, *options) -> None:
        """Send back to the CPU every phase-moved module that ``phase`` does not run; a module
        that it runs comes onto the device by its hook when called."""
        keep = self.phase_modules(phase, *options)
        for name, hook in self.phase_hooks.items():
            if name not in keep and _device_of(hook.model).type != "cpu":
                hook.offload()


class Placed(Protocol):
    """A model with a ``placement`` (``None`` until placed)."""

    placement: Placement | None


def compute_device(placement: Placement | None, weight: torch.Tensor) -> torch.device:
    """Where a placed model computes: its ``weight``'s device, or the placement's under a preset whose
    weights rest on the CPU between uses."""
    if placement is not None and placement.memory is not MemoryPreset.FAST:
        return placement.device
    return weight.device


def compute_dtype(placement: Placement | None, weight: torch.Tensor) -> torch.dtype:
    """A placed model's compute dtype: its ``weight``'s, or the placement's where the weights are stored
    in float8 (``low-fp8``)."""
    return placement.dtype if placement is not None and placement.memory.float8 else weight.dtype


def enter_phase(model: Placed, phase: Phase, *options) -> None:
    """What a pipeline calls at the start of each phase (nothing unless a preset moves modules)."""
    if model.placement is not None:
        model.placement.enter(phase, *options)


@contextmanager
def idle_after(model: Placed) -> Iterator[None]:
    """Offload what the last phase left on the device when a generation ends, however it ends."""
    try:
        yield
    finally:
        enter_phase(model, Phase.IDLE)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# -- applying a preset ---------------------------------------------------------------------------
def remove_offloading(modules: Iterable[nn.Module]) -> None:
    """Take off the hooks of an earlier placement (accelerate's and diffusers' group offloading);
    the float8 layerwise casting stays (the weights are already rounded)."""
    from accelerate.hooks import remove_hook_from_module
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, \
        _LAZY_PREFETCH_GROUP_OFFLOADING

    for module in modules:
        remove_hook_from_module(module, recurse=True)
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for hook in (_LAZY_PREFETCH_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _GROUP_OFFLOADING):
                registry.remove_hook(hook, recurse=True)


def place_modules(modules: Mapping[str, nn.Module], placement: Placement, grouped: Collection[str] = (),
                  prepare: Callable[[], None] | None = None) -> Placement:
    """Apply ``placement`` to a model's ``modules``: take off an earlier placement's hooks, cast each
    module to its dtype and move it where it rests (the device under ``fast``, else the CPU), run
    ``prepare`` (layout changes, such as ``runtime.speed``'s, which must come before a hook copies
    the weights), then add the preset's hooks (module docstring). Float8 weights keep their storage
    dtype, and only a ``low-fp8`` placement in the same compute dtype may place them again."""
    memory = placement.memory
    remove_offloading(modules.values())
    for name, module in modules.items():
        if stores_float8(module) and (not memory.float8 or module.dtype != placement.dtype_of(name)):
            raise ValueError(f"this model's weights are stored in float8 (memory preset "
                             f"{MemoryPreset.LOW_FP8.value}, computing in {module.dtype}): load it again "
                             f"for {memory.value} in {placement.dtype_of(name)}")
    at_rest = placement.device if memory is MemoryPreset.FAST else torch.device("cpu")
    for name, module in modules.items():
        dtype = None if stores_float8(module) else placement.dtype_of(name)
        # torch's own ``to``: diffusers' override warns about float32-only modules on every dtype cast
        torch.nn.Module.to(module, device=at_rest, dtype=dtype)
    if prepare is not None:
        prepare()
    if memory is MemoryPreset.BALANCED:
        placement.phase_hooks = _phase_hooks(modules, placement.device)
    elif memory.group_offload:
        placement.phase_hooks = _phase_hooks({n: m for n, m in modules.items() if n not in grouped},
                                             placement.device)
        for name in grouped:
            _group_offload(modules[name], placement, placement.dtype_of(name))
    return placement


def _phase_hooks(modules: Mapping[str, nn.Module], device: torch.device) -> dict[str, UserCpuOffloadHook]:
    """accelerate's ``cpu_offload_with_hook`` (as diffusers' ``enable_model_cpu_offload``): the module
    moves to ``device`` when called (a VAE's ``encode``/``decode`` too) and stays there until
    ``Placement.enter`` sends it back."""
    from accelerate import cpu_offload_with_hook

    return {name: cpu_offload_with_hook(module, device)[1] for name, module in modules.items()}


def _group_offload(unet: nn.Module, placement: Placement, dtype: torch.dtype) -> None:
    """diffusers' group offloading, one down/up block per group (the rest of the UNet, mid block
    included, is one group held for the whole forward). On CUDA the next block is copied on a
    side stream while the current one computes, from pinned CPU memory."""
    if placement.memory.float8 and not stores_float8(unet):
        unet.enable_layerwise_casting(storage_dtype=FLOAT8, compute_dtype=dtype)
    stream = placement.device.type == "cuda"
    unet.enable_group_offload(onload_device=placement.device, offload_device=torch.device("cpu"),
                              offload_type="block_level", num_blocks_per_group=1, use_stream=stream,
                              record_stream=stream)
