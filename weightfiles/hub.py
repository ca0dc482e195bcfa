"""Finding published weight files: a local folder laid out like the Hub repos, else the Hub.

Nothing here runs at import time. ``resolve_files`` looks in the checkpoint folder (argument,
else ``$LEFFA_CHECKPOINT_DIR``, else ``./ckpts``) and downloads only what is missing, each file
from its own repo (``HubFile.repo``; revision pinnable with ``$LEFFA_HUB_REVISION``). When files
are missing it first asks the Hub about one of them, once, without retries: with no network the
answer (every missing file, and the commands that fetch them) comes at once instead of after
huggingface_hub's retries. Which files a task needs is the caller's knowledge (``engine/``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from errors import UserError
from weightfiles.manifest import HubFile, download_size, paths

ENV_CHECKPOINT_DIR = "LEFFA_CHECKPOINT_DIR"
ENV_REVISION = "LEFFA_HUB_REVISION"
DEFAULT_CHECKPOINT_DIR = "ckpts"
PROBE_TIMEOUT_S = 5.0  # one metadata request, no retries: is the Hub reachable at all?

# our own command that fetches ``missing`` into ``root`` (or None): a hint for error messages
Suggest = Callable[[Sequence[HubFile], Path], "str | None"]


class MissingWeightsError(UserError, RuntimeError):
    """Weights are not in the checkpoint folder and could not be downloaded."""


def checkpoint_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get(ENV_CHECKPOINT_DIR) or DEFAULT_CHECKPOINT_DIR)


def local_path(root: Path, file: HubFile) -> Path:
    """Where ``file`` is in the checkpoint folder: its local conversion if there is one, else the
    published file."""
    base = root / file.folder if file.folder else root
    if file.conversion is not None and (base / file.conversion).is_file():
        return base / file.conversion
    return base / file.path


def missing_files(files: Sequence[HubFile], root: str | Path | None = None) -> list[HubFile]:
    """Those of ``files`` that the checkpoint folder lacks."""
    root = checkpoint_dir(root)
    return [f for f in files if not local_path(root, f).is_file()]


def offline() -> bool:
    """Whether downloads are off (``HF_HUB_OFFLINE``): every weight download asks this first."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or flag in {"1", "ON", "YES", "TRUE"}


def _revision(revision: str | None) -> str | None:
    return revision or os.environ.get(ENV_REVISION) or None


def download_hint(missing: Sequence[HubFile], root: Path, ours: str | None = None) -> str:
    """How to get ``missing``: ``ours`` (our own command, when the caller has one), else
    ``hf download``, one command per repo, and ``curl`` for files published at a URL."""
    hub = [f for f in missing if f.on_hub]
    places = dict.fromkeys((f.repo, f.folder) for f in hub)
    theirs = "\n    ".join([f"hf download {repo} {' '.join(f.path for f in hub if (f.repo, f.folder) == (repo, folder))} "
                            f"--local-dir {root / folder if folder else root}" for repo, folder in places]
                           + [f"curl -L --create-dirs -o {root / f.local} {f.url}" for f in missing if not f.on_hub])
    repos = dict.fromkeys(repo for repo, _ in places)
    sites = ", ".join([f"https://huggingface.co/{repo}" for repo in repos] + [f.url for f in missing if not f.on_hub])
    return (f"Download them on a machine with network access with\n    {ours or theirs}\n"
            + (f"(or: {theirs})\n" if ours else "")
            + f"or copy them there from {sites}, or point --checkpoint-dir / "
              f"${ENV_CHECKPOINT_DIR} at a folder that has them.")


def _missing_message(missing: Sequence[HubFile], root: Path, reason: str, suggest: Suggest | None) -> str:
    ours = suggest(missing, root) if suggest is not None else None
    return (f"missing Leffa weights in {root}: {', '.join(paths(missing))} (about {download_size(missing)}; "
            f"{reason}). " + download_hint(missing, root, ours))


def _probe(file: HubFile, revision: str | None) -> None:
    """One quick request about ``file`` (on the Hub, or at its URL); raises what the network raised."""
    if not file.on_hub:
        import urllib.request

        request = urllib.request.Request(file.url, method="HEAD", headers={"User-Agent": "leffa"})
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
        return
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    get_hf_file_metadata(hf_hub_url(file.repo, file.path, revision=revision), timeout=PROBE_TIMEOUT_S)


def _download(file: HubFile, root: Path, revision: str | None, tqdm_class) -> None:
    """One file into ``root``, through a temporary file renamed at the end: never a half-written file."""
    if file.on_hub:
        from huggingface_hub import hf_hub_download

        hf_hub_download(file.repo, file.path, revision=revision, local_dir=root / file.folder if file.folder else root,
                        tqdm_class=tqdm_class)
    else:
        from weightfiles.urls import fetch_checked

        fetch_checked(file.url, root / file.local, file.sha256)


def resolve_files(files: Sequence[HubFile], root: str | Path | None = None, revision: str | None = None,
                  tqdm_class=None, suggest: Suggest | None = None) -> list[Path]:
    """Local paths of ``files``, downloading the missing ones.

    Raises ``MissingWeightsError`` listing every missing file when they cannot be downloaded, with
    ``suggest``'s command (if any) beside ``hf download``."""
    root = checkpoint_dir(root)
    missing = missing_files(files, root)
    if missing and offline():
        raise MissingWeightsError(_missing_message(missing, root, "HF_HUB_OFFLINE is set", suggest))
    if missing:
        revision = _revision(revision)
        try:
            _probe(missing[0], revision)
        except Exception as e:  # noqa: BLE001 - no network, proxy, DNS, 404: the same remedy
            raise MissingWeightsError(_missing_message(
                missing, root, f"{'the Hub' if missing[0].on_hub else missing[0].url} did not answer: {type(e).__name__}: {e}", suggest)) from e
        for i, file in enumerate(missing):
            try:
                _download(file, root, revision, tqdm_class)
            except Exception as e:  # noqa: BLE001 - no network, 404, disk full, checksum: same remedy
                raise MissingWeightsError(_missing_message(
                    missing[i:], root, f"download failed: {type(e).__name__}: {e}", suggest)) from e
    return [local_path(root, f) for f in files]
