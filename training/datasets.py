"""Training data: VITON-HD, DressCode and DeepFashion folder layouts, paired or unpaired.

Every sample goes through the inference transforms (``preprocess.images``: fitted onto a
white canvas; masks and DensePose with nearest resampling on black) and comes out as the
pipeline's tensors: ``src_image`` (the target person), ``ref_image`` (garment / source
person), ``mask`` (1 = generate) and ``densepose``, images in [-1, 1].

Expected layouts (``root`` is what you pass):

VITON-HD::

    {split}/image/00000_00.jpg               person
    {split}/cloth/00000_00.jpg               garment
    {split}/agnostic-mask/00000_00_mask.png  agnostic mask (white = generate)
    {split}/image-densepose/00000_00.jpg     DensePose rendering
    {split}_pairs.txt                        "person garment" per line (unpaired)

DressCode::

    {category}/images/013563_0.jpg           person   (category: upper_body, lower_body, dresses)
    {category}/images/013563_1.jpg           garment
    {category}/masks/013563_0.png            agnostic mask
    {category}/dense/013563_5.png            DensePose label image
    {split}_pairs.txt                        "person garment" per line (unpaired; test_pairs_unpaired.txt style)

DeepFashion (pose transfer)::

    {split}/images/ID.jpg                    people
    {split}/densepose/ID.png                 DensePose IUV of each person
    {split}_pairs.txt                        "source target" per line

``pairs_file`` replaces ``{split}_pairs.txt`` (e.g. DressCode's ``test_pairs_paired.txt``, or one
category's pairs file); with ``paired`` each person then wears its own garment (the listed one is
ignored), as the try-on papers' paired test sets are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from errors import UserError
from preprocess.images import fit_to_canvas, load_image, load_label_image
from runtime.image_tensors import image_to_tensor, mask_to_tensor
from training.layouts import DatasetLayout

DRESS_CODE_CATEGORIES = ("upper_body", "lower_body", "dresses")


class DatasetError(UserError, ValueError):
    """The dataset folder does not have the expected layout; the message names the path."""


@dataclass(frozen=True)
class Sample:
    target: Path  # the image to generate (src_image)
    reference: Path  # garment, or the source person for pose transfer
    mask: Path | None  # None: generate everything (pose transfer)
    densepose: Path


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise DatasetError(f"missing pairs file {path}")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DatasetError(f"{path}:{n}: expected 'first second', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _need_dirs(*dirs: Path) -> None:
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise DatasetError(f"missing folder(s): {', '.join(missing)} (see training/datasets.py for the layout)")


def viton_hd_samples(root: Path, split: str, paired: bool, pairs_file: Path | None = None) -> list[Sample]:
    d = root / split
    image, cloth, masks, dense = d / "image", d / "cloth", d / "agnostic-mask", d / "image-densepose"
    _need_dirs(image, cloth, masks, dense)
    if pairs_file is not None:
        pairs = [(p, p if paired else c) for p, c in _read_pairs(pairs_file)]
    elif paired:
        pairs = [(p.name, p.name) for p in sorted(image.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    else:
        pairs = _read_pairs(root / f"{split}_pairs.txt")
    return [Sample(image / p, cloth / c, masks / f"{Path(p).stem}_mask.png", dense / p) for p, c in pairs]


def dress_code_samples(root: Path, split: str, paired: bool, pairs_file: Path | None = None) -> list[Sample]:
    categories = [c for c in DRESS_CODE_CATEGORIES if (root / c).is_dir()]
    if not categories:
        raise DatasetError(f"{root} has none of the DressCode folders {', '.join(DRESS_CODE_CATEGORIES)}")
    where = {}
    for c in categories:
        _need_dirs(root / c / "images", root / c / "masks", root / c / "dense")
        where.update({p.name: c for p in (root / c / "images").glob("*_0.*")})
    if pairs_file is not None:
        pairs = [(p, p.replace("_0.", "_1.") if paired else g) for p, g in _read_pairs(pairs_file)]
    elif paired:
        pairs = [(name, name.replace("_0.", "_1.")) for name in sorted(where)]
    else:
        pairs = _read_pairs(root / f"{split}_pairs.txt")
    samples = []
    for person, garment in pairs:
        if person not in where:
            raise DatasetError(f"{person} (from the pairs file) is in no category's images/ folder")
        cat, stem = root / where[person], person.rsplit("_", 1)[0]
        g_cat = root / where.get(garment.replace("_1.", "_0."), where[person])
        samples.append(Sample(cat / "images" / person, g_cat / "images" / garment,
                              cat / "masks" / f"{Path(person).stem}.png", cat / "dense" / f"{stem}_5.png"))
    return samples


def deepfashion_samples(root: Path, split: str, pairs_file: Path | None = None) -> list[Sample]:
    images, dense = root / split / "images", root / split / "densepose"
    _need_dirs(images, dense)
    return [Sample(images / target, images / source, None, dense / f"{Path(target).stem}.png")
            for source, target in _read_pairs(pairs_file or root / f"{split}_pairs.txt")]


class LeffaDataset(Dataset):
    """Samples of one layout at a given (width, height); ``size`` may change between stages."""

    def __init__(self, layout: str | DatasetLayout, root: str | Path, split: str = "train", paired: bool = True,
                 size: tuple[int, int] = (768, 1024), pairs_file: str | Path | None = None):
        layout, root = DatasetLayout(layout), Path(root)
        pairs_file = None if pairs_file is None else Path(pairs_file)
        if not root.is_dir():
            raise DatasetError(f"dataset folder not found: {root}")
        if layout is DatasetLayout.VITON_HD:
            self.samples = viton_hd_samples(root, split, paired, pairs_file)
        elif layout is DatasetLayout.DRESS_CODE:
            self.samples = dress_code_samples(root, split, paired, pairs_file)
        else:
            self.samples = deepfashion_samples(root, split, pairs_file)
        if not self.samples:
            raise DatasetError(f"no samples found under {root} ({layout.value}, split {split!r})")
        missing = [p for s in self.samples for p in (s.target, s.reference, s.mask, s.densepose)
                   if p is not None and not p.is_file()]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise DatasetError(f"missing file(s): {', '.join(map(str, missing[:3]))}{more}")
        self.layout, self.size = layout, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, size = self.samples[i], self.size
        target = fit_to_canvas(load_image(s.target, name=str(s.target)), size)
        reference = fit_to_canvas(load_image(s.reference, name=str(s.reference)), size)
        mask = load_label_image(s.mask, str(s.mask), size, binary=True) if s.mask else Image.new("L", size, 255)
        return {"src_image": image_to_tensor(target, "src_image")[0],
                "ref_image": image_to_tensor(reference, "ref_image")[0],
                "mask": mask_to_tensor(mask)[0],
                "densepose": image_to_tensor(load_label_image(s.densepose, str(s.densepose), size), "densepose")[0]}
