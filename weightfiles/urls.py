"""Weight files published at plain URLs (the evaluation networks): a local folder first, else a
download with progress, checked against the published SHA-256, written atomically, cached.

The folder is the argument, else ``$LEFFA_METRICS_DIR``, else torch's own download cache
(``$TORCH_HOME/hub/checkpoints``, where torchvision and pytorch-fid keep the same files, so
copies fetched by those tools are used as they are). A file found in the folder is used without
a checksum (the strict loader still checks its names and shapes); a downloaded one must match
its SHA-256 or is deleted. With ``HF_HUB_OFFLINE`` set, or no network, the error lists every
missing file and its URL at once.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from weightfiles.hub import MissingWeightsError, offline
from weightfiles.manifest import human_size

ENV_METRICS_DIR = "LEFFA_METRICS_DIR"
TIMEOUT_S = 30.0  # per network read: a dead connection fails instead of hanging
CHUNK = 1 << 20


@dataclass(frozen=True)
class UrlFile:
    """One published file: its name (also its name in the folder), URL and SHA-256."""

    name: str
    url: str
    sha256: str
    size: int  # bytes as published, for messages


def metrics_dir(path: str | Path | None = None) -> Path:
    if path or os.environ.get(ENV_METRICS_DIR):
        return Path(path or os.environ[ENV_METRICS_DIR])
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _fetch(url: str, dst: Path, progress: bool) -> None:
    """Write the bytes at ``url`` to ``dst`` (the raw transfer; no checks)."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "leffa-eval"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(dst, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dst.name.removesuffix(".partial"),
                  disable=not progress) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ChecksumError(ValueError):
    """A download whose bytes are not the published file's."""


def fetch_checked(url: str, final: Path, sha256: str | None, progress: bool = True) -> Path:
    """Download ``url`` to ``final``: to ``NAME.partial``, checked against ``sha256`` (when the
    publisher gives one), then renamed. Raises ``ChecksumError`` on a mismatch; in every failure
    nothing is left behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    try:
        _fetch(url, partial, progress)
        digest = sha256_of(partial) if sha256 is not None else None
        if digest != sha256:
            raise ChecksumError(f"the download of {final.name} from {url} has SHA-256 {digest}, not the published "
                                f"{sha256} (a proxy page, a truncated transfer or a changed file); nothing was kept.")
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def download(file: UrlFile, root: Path, progress: bool = True) -> Path:
    """Download ``file`` into ``root`` (``fetch_checked``). Raises ``MissingWeightsError`` (and
    leaves nothing behind) on a checksum mismatch."""
    try:
        return fetch_checked(file.url, root / file.name, file.sha256, progress)
    except ChecksumError as e:
        raise MissingWeightsError(f"{e} " + _hint([file], root)) from e


def _hint(missing: Sequence[UrlFile], root: Path) -> str:
    urls = "\n".join(f"    {f.url}" for f in missing)
    return (f"On a machine with network access, download\n{urls}\ninto {root} (keeping the file names), or "
            f"point --weights-dir / ${ENV_METRICS_DIR} at a folder that has the files.")


def _missing_message(missing: Sequence[UrlFile], root: Path, reason: str) -> str:
    size = human_size(sum(f.size for f in missing))
    return (f"missing evaluation weights in {root}: {', '.join(f.name for f in missing)} (about {size}; "
            f"{reason}). " + _hint(missing, root))


def resolve_urls(files: Sequence[UrlFile], root: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Local paths of ``files``, downloading the missing ones into the folder (``metrics_dir``).

    Raises ``MissingWeightsError`` listing every missing file when they cannot be downloaded."""
    root = metrics_dir(root)
    missing = [f for f in files if not (root / f.name).is_file()]
    if missing and offline():
        raise MissingWeightsError(_missing_message(missing, root, "HF_HUB_OFFLINE is set"))
    for i, file in enumerate(missing):
        try:
            download(file, root, progress)
        except MissingWeightsError:
            raise
        except Exception as e:  # noqa: BLE001 - no network, proxy, DNS, 404, disk full: the same remedy
            raise MissingWeightsError(_missing_message(
                missing[i:], root, f"download failed: {type(e).__name__}: {e}")) from e
    return [root / f.name for f in files]
