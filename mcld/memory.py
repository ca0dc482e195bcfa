"""MCLD's modules and phases for ``runtime.placement``, and its memory estimate.

=============  =================================================================
phase          modules it runs
=============  =================================================================
``encode``     VAE (the texture's latents), CLIP encoder, face projector, pose guider
``reference``  reference UNet (one pass, at timestep 0)
``denoise``    denoising UNet
``decode``     VAE
=============  =================================================================

Under ``low``/``low-fp8`` both UNets are offloaded block by block; the reference UNet always runs to
its end (it has no early exit), so the group hooks run in full.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from runtime.memory import FLOAT8, GiB, MemoryNeed, group_offload_peak, module_bytes, normalized_device
from runtime.placement import Phase, Placement, place_modules
from runtime.presets import MemoryPreset

if TYPE_CHECKING:  # pragma: no cover
    from mcld.model import MCLDModel

UNET_NAMES = ("reference_unet", "denoising_unet")
ENCODERS = ("vae", "image_encoder", "image_projector", "pose_guider")
PHASES = {Phase.ENCODE: frozenset(ENCODERS), Phase.REFERENCE: frozenset({"reference_unet"}),
          Phase.DENOISE: frozenset({"denoising_unet"}), Phase.DECODE: frozenset({"vae"}), Phase.IDLE: frozenset()}


def phase_modules(phase: Phase) -> frozenset[str]:
    return PHASES[phase]


def mcld_placement(device: torch.device | str, dtype: torch.dtype,
                   memory: MemoryPreset = MemoryPreset.FAST) -> Placement:
    return Placement(normalized_device(device), dtype, phase_modules, MemoryPreset(memory))


def place_model(model: MCLDModel, placement: Placement) -> Placement:
    """Cast and move the parts, then the preset's hooks (``runtime.placement.place_modules``)."""
    model.placement = None
    return place_modules(model.modules_by_name(), placement, grouped=UNET_NAMES)


# Working memory of one 512×512 generation in a 2-byte dtype beside the weights, with a margin. Not
# measured for MCLD: Leffa's SD1.5 figures (leffa.memory, measured at 768×1024) scaled to a third of
# the pixels, rounded up; the denoising step runs CFG's two rows and attends over the reference features.
ACTIVATIONS_512 = {"vae": int(0.75 * GiB), "unet": int(0.6 * GiB)}


def estimate_memory(model: MCLDModel, memory: MemoryPreset, device: torch.device | str,
                    dtype: torch.dtype, size: int = 512) -> MemoryNeed:
    """What ``model`` (a meta build will do) needs on ``device`` under ``memory`` at ``size``²."""
    scale = size * size / 512**2 * dtype.itemsize / 2
    act_vae, act_unet = int(ACTIVATIONS_512["vae"] * scale), int(ACTIVATIONS_512["unet"] * scale)
    storage = FLOAT8 if memory.float8 else dtype
    encoders = sum(module_bytes(getattr(model, n), dtype) for n in ENCODERS)
    unets = {n: module_bytes(getattr(model, n), storage) for n in UNET_NAMES}
    weights = encoders + sum(unets.values())
    if torch.device(device).type == "cpu" or memory is MemoryPreset.FAST:
        return MemoryNeed(weights, weights + max(act_vae, act_unet))
    if memory is MemoryPreset.BALANCED:
        return MemoryNeed(0, max(encoders + act_vae, max(unets.values()) + act_unet), weights)
    on_device = max(group_offload_peak(getattr(model, n), storage) for n in UNET_NAMES)
    return MemoryNeed(0, max(encoders + act_vae, on_device + act_unet), weights + max(unets.values()))


@lru_cache(maxsize=1)
def published_meta_model() -> MCLDModel:
    """The published architecture without weights (``mcld.configs.published_config``), for
    ``estimate_memory`` before any file is downloaded; built once."""
    from mcld.configs import published_config
    from mcld.model import MCLDModel

    return MCLDModel.from_config(published_config(), device="meta")
