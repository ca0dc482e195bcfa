"""What a published weight file is, for finding, downloading and reporting it: ``HubFile``
(its Hub repo, its path there, its published size). The libraries declare their own files
beside their loaders (``leffa/weights.py``, ``preprocess/weights.py``); this layer knows no
model names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MB, GB = 1000**2, 1000**3


@dataclass(frozen=True)
class HubFile:
    """One published weight file: of a Hugging Face Hub repo, or, with ``url``, at a plain URL (then
    ``repo`` names the publisher, for messages). ``path`` is its path in the Hub repo and in the
    local checkpoint folder; ``conversion``, if set, is a local conversion of it (e.g. a
    ``.safetensors`` made from a pickle) that is used instead when the folder has it; ``sha256``,
    if the publisher gives one, is checked after a download from ``url``. ``folder``: where in the
    checkpoint folder the repo's files go, keeping its layout beneath (so that two repos' root
    files of one name do not meet); empty: the checkpoint folder itself."""

    repo: str  # "owner/name", or the publisher of a URL file
    path: str
    size: int  # bytes as published, for messages only
    conversion: str | None = None
    url: str | None = None  # published outside the Hub
    sha256: str | None = None
    folder: str = ""

    @property
    def on_hub(self) -> bool:
        return self.url is None

    @property
    def local(self) -> str:
        """Its path in the checkpoint folder."""
        return f"{self.folder}/{self.path}" if self.folder else self.path

    def __str__(self) -> str:
        return self.local


def human_size(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / MB:.0f} MB"


def download_size(files: Iterable[HubFile]) -> str:
    """About how much downloading ``files`` takes, for messages."""
    return human_size(sum(f.size for f in files))


def paths(files: Iterable[HubFile]) -> list[str]:
    """The files' paths, in order, each once (the names that messages list)."""
    return list(dict.fromkeys(f.local for f in files))
