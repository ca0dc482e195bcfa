"""The weight files a request needs, fetched at once (every missing one named in one message with
the ``leffa download`` command that fetches it), and the report of what is on this machine
(``leffa check``, the app's start-up and its tabs' notices). Torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.registry import WeightSet
from weightfiles import hub
from weightfiles.manifest import HubFile, download_size, paths


def download_command(missing: Sequence[HubFile], root: Path) -> str | None:
    """``leffa download SET`` for the first weight set that holds all of ``missing`` (None if none does)."""
    wanted = set(missing)
    found = next((s for s in WeightSet if wanted <= set(s.files)), None)
    return f"leffa download {found.value} --checkpoint-dir {root}" if found else None


def fetch(files: Sequence[HubFile], root: str | Path | None = None, revision: str | None = None,
          tqdm_class=None) -> list[Path]:
    """Local paths of ``files``, downloading the missing ones (``MissingWeightsError`` names every
    one that cannot be, and the ``leffa download`` command)."""
    return hub.resolve_files(files, root, revision, tqdm_class, suggest=download_command)


def missing(weight_set: WeightSet, root: str | Path | None = None) -> list[HubFile]:
    """The files of ``weight_set`` not in the checkpoint folder."""
    return hub.missing_files(weight_set.files, root)


def presence_report(root: str | Path | None = None) -> str:
    """For each weight set, whether its files are in the checkpoint folder (start-up report,
    ``leffa check``)."""
    root = hub.checkpoint_dir(root)
    lines = [f"Leffa weights in {root.resolve()}:"]
    for weight_set in WeightSet:
        if weight_set is WeightSet.ALL:
            continue
        absent = missing(weight_set, root)
        state = ("ready" if not absent else
                 f"missing {', '.join(paths(absent))} (about {download_size(absent)}, downloaded on first use)")
        lines.append(f"  {weight_set.value:9s} {state}")
        if absent:
            lines.append(f"  {'':9s} fetch now: leffa download {weight_set.value} --checkpoint-dir {root}")
    return "\n".join(lines)


def download(weight_set: WeightSet, root: str | Path | None = None, revision: str | None = None) -> list[Path]:
    """Fetch the files of ``weight_set`` that the checkpoint folder lacks (``leffa download``), with
    huggingface_hub's progress bars."""
    return fetch(weight_set.files, root, revision)
