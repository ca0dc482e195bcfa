"""Loading a published Leffa model (``leffa.weights`` names them and their files; ``weightfiles.hub``
finds or downloads the files)."""

from __future__ import annotations

from pathlib import Path

import torch

from leffa.model import CONFIG_ROOT, LeffaModel
from leffa.weights import ModelKind
from runtime.presets import MemoryPreset
from runtime.speed import SpeedOptions
from weightfiles.hub import Suggest, resolve_files


def load_model(kind: ModelKind, root: str | Path | None = None, *, revision: str | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               tqdm_class=None, memory: MemoryPreset = MemoryPreset.FAST,
               speed: SpeedOptions | None = None, suggest: Suggest | None = None) -> LeffaModel:
    """The published model ``kind``, from the checkpoint folder or the Hub, placed on ``device``
    with the ``memory`` preset and ``speed`` options (``LeffaModel.place``). ``suggest``: our command
    that fetches a missing file, for the error message (``weightfiles.hub.resolve_files``)."""
    (path,) = resolve_files([kind.file], root, revision, tqdm_class, suggest)
    return LeffaModel.from_pretrained(kind.base, path, device=device, dtype=dtype, memory=memory, speed=speed)


def tiny_model(kind: ModelKind) -> LeffaModel:
    """A tiny untrained model (``--tiny`` in the app and the CLI): the same code paths, noise for
    pictures, no downloads. The weights are the same for a kind on every load (seeded by the kind)
    and drawn in a forked CPU random state, so the caller's global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(list(ModelKind).index(kind))
        return LeffaModel.from_config_dir(CONFIG_ROOT / "tiny").eval()
