"""MCLD's prepared DeepFashion folder (their ``prepare_dataset.py`` output), read for ``leffa infer``::

    {split}/NAME.jpg                 people (DeepFashion In-shop, img_highres)
    {split}_densepose/NAME.png       DensePose R101 IUV of each person (written by OpenCV: B = I, G = U, R = V)
    {split}_texture/NAME.png         the person's texture map in SMPL UV space, 512×512
    {split}_face/NAME.npy            the raw ArcFace embedding of the person's largest face (absent: no face)

and the pairs: their ``data/{split}.csv`` (header ``from,to``; pass it with ``--pairs``) or
``{split}_pairs.txt`` ("source target" per line). Each sample is the model's tensors
(``mcld.inputs.sample_tensors``): the source photo, its texture map, the target's IUV image as PIL
reads it, the source's face embedding (zeros when its file is absent, as their dataset does).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mcld.inputs import sample_tensors
from preprocess.appearance import no_face
from preprocess.face import EMBEDDING_SIZE
from preprocess.images import load_image
from training.datasets import DatasetError, _read_pairs


@dataclass(frozen=True)
class PairSample:
    source: Path  # the person to keep
    target: Path  # the person whose pose is taken (its photo is the ground truth)
    pose: Path  # the target's IUV image
    texture: Path  # the source's texture map
    face: Path  # the source's face embedding (.npy; may be absent)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Their CSV (``from,to`` header) or a whitespace pairs file."""
    if path.suffix.lower() != ".csv":
        return _read_pairs(path)
    if not path.is_file():
        raise DatasetError(f"missing pairs file {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"from", "to"} <= set(rows[0]):
        raise DatasetError(f"{path}: expected the columns 'from,to' (MCLD's data/test.csv), got {sorted(rows[0])}")
    return [(r["from"], r["to"]) for r in rows]


def mcld_samples(root: Path, split: str, pairs_file: Path | None = None) -> list[PairSample]:
    folders = {kind: root / (split if kind == "images" else f"{split}_{kind}")
               for kind in ("images", "densepose", "texture", "face")}
    missing = [str(d) for d in folders.values() if not d.is_dir()]
    if missing:
        raise DatasetError(f"missing folder(s): {', '.join(missing)} (MCLD's prepared layout: training/mcld_data.py)")
    png = lambda name: f"{Path(name).stem}.png"  # noqa: E731 - their files change the suffix
    return [PairSample(folders["images"] / source, folders["images"] / target, folders["densepose"] / png(target),
                       folders["texture"] / png(source), folders["face"] / f"{Path(source).stem}.npy")
            for source, target in read_pairs(pairs_file or root / f"{split}_pairs.txt")]


def read_face(path: Path) -> np.ndarray:
    """A face embedding file, or zeros when it is absent (their data preparation writes none for a
    photo without a face)."""
    if not path.is_file():
        return no_face()
    try:
        embedding = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is not a readable .npy face embedding: {e}") from None
    if embedding.size != EMBEDDING_SIZE or not np.isfinite(embedding).all():
        raise DatasetError(f"{path}: a face embedding has {EMBEDDING_SIZE} finite values, this one {embedding.shape}")
    return embedding.reshape(-1).astype(np.float32)


class MCLDPairs(Dataset):
    """The samples of MCLD's prepared folder, as the model's tensors."""

    def __init__(self, root: str | Path, split: str = "test", pairs_file: str | Path | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset folder not found: {root}")
        self.samples = mcld_samples(root, split, None if pairs_file is None else Path(pairs_file))
        if not self.samples:
            raise DatasetError(f"no pairs listed for {root} (split {split!r})")
        absent = [p for s in self.samples for p in (s.source, s.target, s.pose, s.texture) if not p.is_file()]
        if absent:
            more = f" (+{len(absent) - 3} more)" if len(absent) > 3 else ""
            raise DatasetError(f"missing file(s): {', '.join(map(str, absent[:3]))}{more}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        images = [load_image(p, name=str(p)) for p in (s.source, s.texture, s.pose)]
        return sample_tensors(*images, read_face(s.face))

