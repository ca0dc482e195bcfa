"""Finding the published weights: a local folder laid out like the Hub repo, else the Hub.

Nothing here runs at import time. ``resolve_files`` looks in the checkpoint folder
(argument, else ``$LEFFA_CHECKPOINT_DIR``, else ``./ckpts``) and downloads only what is
missing from ``franciszzj/Leffa`` (revision pinnable with ``$LEFFA_HUB_REVISION``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from errors import UserError

HUB_REPO_ID = "franciszzj/Leffa"
ENV_CHECKPOINT_DIR = "LEFFA_CHECKPOINT_DIR"
ENV_REVISION = "LEFFA_HUB_REVISION"
DEFAULT_CHECKPOINT_DIR = "ckpts"


class MissingWeightsError(UserError, RuntimeError):
    """Weights are not in the checkpoint folder and could not be downloaded."""


def checkpoint_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get(ENV_CHECKPOINT_DIR) or DEFAULT_CHECKPOINT_DIR)


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or flag in {"1", "ON", "YES", "TRUE"}


def _how_to_get(missing: Sequence[str], root: Path, reason: str) -> str:
    files = " ".join(missing)
    return (f"missing Leffa weights in {root}: {', '.join(missing)} ({reason}). Download them with\n"
            f"    hf download {HUB_REPO_ID} {files} --local-dir {root}\n"
            f"on a machine with network access, or copy them there from https://huggingface.co/"
            f"{HUB_REPO_ID}, or point --checkpoint-dir / ${ENV_CHECKPOINT_DIR} at a folder that "
            "has them.")


def resolve_files(files: Sequence[str], root: str | Path | None = None,
                  revision: str | None = None, tqdm_class=None) -> list[Path]:
    """Local paths of ``files`` (paths inside the Hub repo), downloading the missing ones."""
    root = checkpoint_dir(root)
    missing = [f for f in files if not (root / f).is_file()]
    if missing and _offline():
        raise MissingWeightsError(_how_to_get(missing, root, "HF_HUB_OFFLINE is set"))
    if missing:
        from huggingface_hub import hf_hub_download

        revision = revision or os.environ.get(ENV_REVISION) or None
        for i, name in enumerate(missing):
            try:  # downloads to a temporary file and renames it: never a half-written file
                hf_hub_download(HUB_REPO_ID, name, revision=revision, local_dir=root,
                                tqdm_class=tqdm_class)
            except Exception as e:  # noqa: BLE001 - no network, 404, disk full: same remedy
                raise MissingWeightsError(_how_to_get(
                    missing[i:], root, f"download failed: {type(e).__name__}: {e}")) from e
    return [root / f for f in files]
