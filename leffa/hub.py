"""The published Leffa models and loading one of them (files found by ``weightfiles.hub``)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import torch

from leffa.presets import MemoryPreset
from leffa.model import CONFIG_ROOT, BaseModel, LeffaModel
from leffa.speed import SpeedOptions
from weightfiles.hub import resolve_files
from weightfiles.manifest import Component


class ModelKind(str, Enum):
    """The three published Leffa models (values: their checkpoint file stems on the Hub)."""

    VITON_HD = "virtual_tryon"  # try-on, VITON-HD (upper body)
    DRESS_CODE = "virtual_tryon_dc"  # try-on, DressCode (upper, lower, dresses)
    POSE_TRANSFER = "pose_transfer"  # DeepFashion, SDXL-sized

    @property
    def component(self) -> Component:
        """Its published weights (``Component`` has the same names)."""
        return Component[self.name]

    @property
    def checkpoint(self) -> str:
        (name,) = self.component.files
        return name

    @property
    def base(self) -> BaseModel:
        return BaseModel.SDXL_INPAINTING if self is ModelKind.POSE_TRANSFER else BaseModel.SD15_INPAINTING


def load_model(kind: ModelKind, root: str | Path | None = None, *, revision: str | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               tqdm_class=None, memory: MemoryPreset = MemoryPreset.FAST,
               speed: SpeedOptions | None = None) -> LeffaModel:
    """The published model ``kind``, from the checkpoint folder or the Hub, placed on ``device``
    with the ``memory`` preset and ``speed`` options (``LeffaModel.place``)."""
    (path,) = resolve_files([kind.checkpoint], root, revision, tqdm_class)
    return LeffaModel.from_pretrained(kind.base, path, device=device, dtype=dtype, memory=memory, speed=speed)


def tiny_model(kind: ModelKind) -> LeffaModel:
    """A tiny untrained model (``--tiny`` in the app and the CLI): the same code paths, noise for
    pictures, no downloads. The weights are the same for a kind on every load (seeded by the kind)
    and drawn in a forked CPU random state, so the caller's global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(list(ModelKind).index(kind))
        return LeffaModel.from_config_dir(CONFIG_ROOT / "tiny").eval()
