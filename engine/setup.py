"""Where and how models run (``ModelSetup``: device, dtype, memory preset, speed options) and where
their weights come from (``WeightSource``: the published files, the tiny untrained models, or an
own checkpoint): what an application decides once, from its settings or arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.options import CHECKPOINT_LIMITS, TINY_LIMITS, OptionLimits
from engine.registry import ModelEntry
from runtime.devices import resolve_device, resolve_dtype
from runtime.presets import MemoryPreset
from runtime.speed import SpeedOptions


@dataclass(frozen=True)
class ModelSetup:
    """Where the models compute (``device``, ``dtype``), where their weights live while generating
    (``memory``, ``runtime.presets``) and the speed options (``runtime.speed``)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    memory: MemoryPreset = MemoryPreset.FAST
    speed: SpeedOptions = field(default_factory=SpeedOptions)

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str | None = "auto", memory: MemoryPreset | str = MemoryPreset.FAST,
                speed: SpeedOptions | None = None, auto_device: torch.device | str | None = None,
                check_available: bool = True) -> ModelSetup:
        """From the applications' names (``--device``, ``--dtype``, ``--memory``): see
        ``runtime.devices``."""
        resolved = resolve_device(device, auto_device, check_available)
        return cls(str(resolved), resolve_dtype(dtype, resolved), MemoryPreset(memory), speed or SpeedOptions())


@dataclass(frozen=True)
class WeightSource:
    """Where the weights come from: the published files in ``checkpoint_dir`` (downloaded from the
    Hub when missing, at ``revision``), the ``tiny`` untrained models (no files at all), or an own
    ``checkpoint`` file of a registry entry's architecture (``base_config``: its config folder,
    default the shipped one)."""

    checkpoint_dir: Path | str | None = None
    revision: str | None = None
    tiny: bool = False
    checkpoint: Path | None = None
    base_config: Path | None = None

    @property
    def published(self) -> bool:
        """Whether the published model files are used (and so must be fetched)."""
        return not self.tiny and self.checkpoint is None

    def limits(self, entry: ModelEntry) -> OptionLimits:
        """The option limits of ``entry`` from this source: the entry's own for the published
        weights; a few steps for the tiny models; any number of steps for an own checkpoint."""
        if self.tiny:
            return TINY_LIMITS
        return CHECKPOINT_LIMITS if self.checkpoint is not None else entry.limits
