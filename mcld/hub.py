"""Loading the published MCLD model (``mcld.weights`` names its files; ``weightfiles.hub`` finds or
downloads them), and the tiny untrained one."""

from __future__ import annotations

from pathlib import Path

import torch

from mcld.configs import tiny_config
from mcld.model import MCLDModel
from mcld.weights import MCLD_FILES, MCLDFiles
from runtime.presets import MemoryPreset
from weightfiles.hub import Suggest, resolve_files


def load_model(root: str | Path | None = None, *, revision: str | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               memory: MemoryPreset = MemoryPreset.FAST, tqdm_class=None,
               suggest: Suggest | None = None) -> MCLDModel:
    """The published model from the checkpoint folder (``root``; default ``$LEFFA_CHECKPOINT_DIR`` or
    ``./ckpts``), downloading what is missing, placed on ``device`` in ``dtype`` with ``memory``.
    ``suggest``: our command that fetches missing files, for the error message."""
    paths = resolve_files(list(MCLD_FILES), root, revision, tqdm_class, suggest)
    return MCLDModel.from_files(MCLDFiles.from_tuple(paths), device=device, dtype=dtype, memory=memory)


def tiny_model(seed: int = 0) -> MCLDModel:
    """A tiny untrained model (64×64 images): the same code paths, noise for pictures, no files. Its
    weights depend on ``seed`` only; drawn in a forked CPU random state (the caller's is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MCLDModel.from_config(tiny_config())
    return model.eval().place("cpu")
