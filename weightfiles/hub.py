"""Finding the published weights: a local folder laid out like the Hub repo, else the Hub.

Nothing here runs at import time. ``resolve_files`` looks in the checkpoint folder
(argument, else ``$LEFFA_CHECKPOINT_DIR``, else ``./ckpts``) and downloads only what is
missing from ``franciszzj/Leffa`` (revision pinnable with ``$LEFFA_HUB_REVISION``). When
files are missing it first asks the Hub about one of them, once, without retries: with no
network the answer (every missing file, and the command that fetches them) comes at once
instead of after huggingface_hub's retries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from errors import UserError
from weightfiles.manifest import CONVERSIONS, WeightSet, download_size, files_of

HUB_REPO_ID = "franciszzj/Leffa"
ENV_CHECKPOINT_DIR = "LEFFA_CHECKPOINT_DIR"
ENV_REVISION = "LEFFA_HUB_REVISION"
DEFAULT_CHECKPOINT_DIR = "ckpts"
PROBE_TIMEOUT_S = 5.0  # one metadata request, no retries: is the Hub reachable at all?


class MissingWeightsError(UserError, RuntimeError):
    """Weights are not in the checkpoint folder and could not be downloaded."""


def checkpoint_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get(ENV_CHECKPOINT_DIR) or DEFAULT_CHECKPOINT_DIR)


def _local(root: Path, name: str) -> Path:
    """Where ``name`` is in the checkpoint folder: its local conversion (``CONVERSIONS``) if
    there is one, else the published file."""
    converted = root / CONVERSIONS.get(name, name)
    return converted if converted.is_file() else root / name


def missing_files(files: Sequence[str], root: str | Path | None = None) -> list[str]:
    """Those of ``files`` (paths inside the Hub repo) that the checkpoint folder lacks."""
    root = checkpoint_dir(root)
    return [f for f in files if not _local(root, f).is_file()]


def offline() -> bool:
    """Whether downloads are off (``HF_HUB_OFFLINE``): every weight download asks this first."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or flag in {"1", "ON", "YES", "TRUE"}


def _revision(revision: str | None) -> str | None:
    return revision or os.environ.get(ENV_REVISION) or None


def download_hint(missing: Sequence[str], root: Path) -> str:
    """How to get ``missing``: our command when they make up a weight set, else ``hf download``."""
    sets = [s for s in WeightSet if set(missing) <= set(files_of(s.components))]
    ours = f"leffa download {sets[0].value} --checkpoint-dir {root}" if sets else None
    theirs = f"hf download {HUB_REPO_ID} {' '.join(missing)} --local-dir {root}"
    return (f"Download them on a machine with network access with\n    {ours or theirs}\n"
            + (f"(or: {theirs})\n" if ours else "")
            + f"or copy them there from https://huggingface.co/{HUB_REPO_ID}, or point --checkpoint-dir / "
              f"${ENV_CHECKPOINT_DIR} at a folder that has them.")


def _missing_message(missing: Sequence[str], root: Path, reason: str) -> str:
    size = download_size(missing)
    return (f"missing Leffa weights in {root}: {', '.join(missing)} (about {size}; {reason}). "
            + download_hint(missing, root))


def _probe(name: str, revision: str | None) -> None:
    """One quick request about ``name`` on the Hub; raises what the network raised."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    get_hf_file_metadata(hf_hub_url(HUB_REPO_ID, name, revision=revision), timeout=PROBE_TIMEOUT_S)


def resolve_files(files: Sequence[str], root: str | Path | None = None,
                  revision: str | None = None, tqdm_class=None) -> list[Path]:
    """Local paths of ``files`` (paths inside the Hub repo), downloading the missing ones.

    Raises ``MissingWeightsError`` listing every missing file when they cannot be downloaded."""
    root = checkpoint_dir(root)
    missing = missing_files(files, root)
    if missing and offline():
        raise MissingWeightsError(_missing_message(missing, root, "HF_HUB_OFFLINE is set"))
    if missing:
        from huggingface_hub import hf_hub_download

        revision = _revision(revision)
        try:
            _probe(missing[0], revision)
        except Exception as e:  # noqa: BLE001 - no network, proxy, DNS, 404: the same remedy
            raise MissingWeightsError(_missing_message(
                missing, root, f"the Hub did not answer: {type(e).__name__}: {e}")) from e
        for i, name in enumerate(missing):
            try:  # downloads to a temporary file and renames it: never a half-written file
                hf_hub_download(HUB_REPO_ID, name, revision=revision, local_dir=root,
                                tqdm_class=tqdm_class)
            except Exception as e:  # noqa: BLE001 - no network, 404, disk full: same remedy
                raise MissingWeightsError(_missing_message(
                    missing[i:], root, f"download failed: {type(e).__name__}: {e}")) from e
    return [_local(root, f) for f in files]


def presence_report(root: str | Path | None = None) -> str:
    """For each weight set, whether its files are in the checkpoint folder (start-up report,
    ``leffa check``)."""
    root = checkpoint_dir(root)
    lines = [f"Leffa weights in {root.resolve()}:"]
    for weight_set in WeightSet:
        if weight_set is WeightSet.ALL:
            continue
        missing = missing_files(files_of(weight_set.components), root)
        size = download_size(missing)
        state = "ready" if not missing else f"missing {', '.join(missing)} (about {size}, downloaded on first use)"
        lines.append(f"  {weight_set.value:9s} {state}")
        if missing:
            lines.append(f"  {'':9s} fetch now: leffa download {weight_set.value} --checkpoint-dir {root}")
    return "\n".join(lines)


def download(weight_set: WeightSet, root: str | Path | None = None, revision: str | None = None) -> list[Path]:
    """Fetch the files of ``weight_set`` that the checkpoint folder lacks (``leffa download``),
    with huggingface_hub's progress bars."""
    return resolve_files(files_of(weight_set.components), root, revision)
