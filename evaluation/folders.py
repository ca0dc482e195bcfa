"""The two image folders: listing, pairing by file name, reading.

A folder's images are its files (not sub-folders) with an image extension, sorted by name. Real
and generated images pair by file name without extension (``00006_00.jpg`` ↔ ``00006_00.png``);
a pose-transfer result named ``{source}___{target}`` (``leffa infer``'s names, after PATN's)
pairs with the real ``{target}``.
Real images whose size differs from the generated ones' are resized to it with Pillow's Lanczos
filter, as the Leffa authors' script does (it saves the resized copy; we resize in memory).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from errors import UserError

EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # pytorch-fid's
SHOW = 5  # how many file names a message lists
POSE_SEPARATOR = "___"  # "{source}___{target}": a pose-transfer result, whose ground truth is the target
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)  # Pillow's


class EvalInputError(UserError, ValueError):
    """A folder, a file name or an image that evaluation cannot use."""


def _names(items) -> str:
    items = sorted(items)
    more = f" (+{len(items) - SHOW} more)" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


def list_images(folder: str | Path, role: str) -> list[Path]:
    """The images of ``folder``, sorted; ``EvalInputError`` for a missing or empty folder, or two
    images with the same name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalInputError(f"the {role} folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise EvalInputError(f"the {role} folder {folder} has no images ({', '.join(sorted(EXTENSIONS))})")
    twice = [stem for stem, n in Counter(p.stem for p in files).items() if n > 1]
    if twice:
        raise EvalInputError(f"the {role} folder {folder} has several images named {_names(twice)} "
                             "(images pair by name without extension)")
    return files


@dataclass(frozen=True)
class Pair:
    real: Path
    fake: Path


def pair_by_name(real: list[Path], fake: list[Path]) -> list[Pair]:
    """One pair per generated image, with the real image of the same name (extra real images
    are allowed: a paired test set may be scored on part of its images)."""
    by_stem = {p.stem: p for p in real}
    unmatched = [p.name for p in fake if ground_truth_name(p) not in by_stem]
    if unmatched:
        raise EvalInputError(f"{len(unmatched)} generated images have no real image of the same name "
                             f"in {real[0].parent}: {_names(unmatched)}")
    return [Pair(by_stem[ground_truth_name(p)], p) for p in fake]


def ground_truth_name(fake: Path) -> str:
    """The name (without extension) of the real image a generated one is compared with."""
    return fake.stem.rsplit(POSE_SEPARATOR, 1)[-1]


def source_name(fake: Path) -> str | None:
    """The name (without extension) of the source photo of a pose-transfer result
    (``{source}___{target}``), or ``None`` for other names."""
    return fake.stem.rsplit(POSE_SEPARATOR, 1)[0] if POSE_SEPARATOR in fake.stem else None


def read_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The image at ``path`` as RGB uint8 (H, W, 3), resized to ``size`` (W, H) with Lanczos
    if it has another size; ``EvalInputError`` naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except DECODE_ERRORS as e:
        raise EvalInputError(f"cannot read the image {path} ({type(e).__name__}: {e})") from None
    if size is not None and image.size != tuple(size):
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.array(image)  # writable, for torch.from_numpy


def common_size(files: list[Path], role: str) -> tuple[int, int]:
    """The (W, H) that all ``files`` share (read from their headers)."""
    sizes = {}
    for path in files:
        try:
            with Image.open(path) as image:
                sizes.setdefault(image.size, path.name)
        except DECODE_ERRORS as e:
            raise EvalInputError(f"cannot read the image {path} ({type(e).__name__}: {e})") from None
    if len(sizes) > 1:
        found = ", ".join(f"{w}×{h} ({name})" for (w, h), name in list(sizes.items())[:SHOW])
        raise EvalInputError(f"the {role} images must all have one size; found {found}")
    return next(iter(sizes))
