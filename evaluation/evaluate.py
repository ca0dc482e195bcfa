"""``evaluate``: a folder of generated images against the real ones, with the numbers of the
Leffa authors' evaluation script (franciszzj/VtonEval ``eval.py``): PyTorch-FID, Clean-FID and
Clean-KID (×1000 in their tables) always; SSIM, LPIPS and PSNR when the images are paired; with a
face embedder, MCLD's face similarity (ArcFace cosine) to the ground truth and to the source.

FID and KID use every image of each folder (as pytorch-fid and clean-fid do with two folders);
SSIM and LPIPS use the pairs (each generated image with the real image of the same name), on
[0, 1] RGB tensors at the generated images' size, averaged over pairs; PSNR the same pairs as
uint8 RGB (``metrics.psnr``, MCLD's per-image PSNR, averaged). Face similarity: ``faces.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from evaluation.faces import FaceEmbed, face_scores
from evaluation.folders import EvalInputError, Pair, common_size, list_images, pair_by_name, read_rgb
from evaluation.inception import FeatureMode, FIDInceptionV3, network_input
from evaluation.lpips import LPIPS, LpipsNet
from evaluation.metrics import frechet_distance, kid, psnr
from evaluation.ssim import SsimBorder, smallest_side, ssim
from evaluation.weights import INCEPTION
from weightfiles.urls import resolve_urls


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 16  # the authors' script's; the numbers do not depend on it
    lpips_net: LpipsNet = LpipsNet.SQUEEZE  # the authors' torchmetrics LPIPS(net_type='squeeze')
    ssim_border: SsimBorder = SsimBorder.REFLECT  # torchmetrics ≥ 1.4.2
    kid_subsets: int = 100  # clean-fid's
    kid_subset_size: int = 1000  # clean-fid's
    seed: int = 0  # of the KID subsets


@dataclass(frozen=True)
class EvalResult:
    real_dir: str
    fake_dir: str
    paired: bool
    n_real: int
    n_fake: int
    pytorch_fid: float
    clean_fid: float
    clean_kid: float  # as clean-fid returns it; the tables print clean_kid × 1000
    ssim: float | None = None  # paired only
    lpips: float | None = None  # paired only
    psnr: float | None = None  # paired only; dB, per-image mean (+inf if a pair is identical)
    face_sim_target: float | None = None  # with a face embedder: mean ArcFace cosine with the ground truth
    face_dist_target: float | None = None  # ... and mean Euclidean distance of the raw embeddings
    face_pairs_target: int | None = None  # the pairs with a face in both images
    face_sim_source: float | None = None  # ... with the pose-transfer source ({source}___{target} names)
    face_pairs_source: int | None = None
    config: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clean_kid_x1000"] = self.clean_kid * 1000
        d["config"] = {k: v.value if isinstance(v, Enum) else v for k, v in d["config"].items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save_json(self, path: str | Path) -> None:
        """Write ``to_json()`` to ``path`` via a temporary file: a failure never leaves half a file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(self.to_json() + "\n")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    @property
    def has_faces(self) -> bool:
        return self.face_pairs_target is not None

    def to_markdown(self) -> str:
        columns = {"PyTorch-FID": self.pytorch_fid, "Clean-FID": self.clean_fid,
                   "Clean-KID ×10³": self.clean_kid * 1000}
        if self.paired:
            columns.update({"SSIM": self.ssim, "LPIPS": self.lpips, "PSNR": self.psnr})
        if self.has_faces:
            columns.update({"Face sim. (target)": self.face_sim_target,
                            "Face sim. (source)": self.face_sim_source})
        c = self.config
        distance = "n/a" if self.face_dist_target is None else f"{self.face_dist_target:.4f}"
        faces = (f" Face similarity: ArcFace cosine, over the {self.face_pairs_target} of {self.n_fake} "
                 f"pairs with a face in both images ({self.face_pairs_source} with their source); "
                 f"Euclidean distance to the target {distance}." if self.has_faces else "")
        return "\n".join([
            "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            "| " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in columns.values()) + " |", "",
            f"{self.n_fake} generated images ({self.fake_dir}) against {self.n_real} real ({self.real_dir}), "
            f"{'paired' if self.paired else 'unpaired'}. KID: {c.kid_subsets} subsets of up to "
            f"{c.kid_subset_size}, seed {c.seed}"
            + (f"; SSIM: {c.ssim_border.value} borders; LPIPS: {c.lpips_net.value}." if self.paired else ".")
            + faces,
        ])


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not progress)


@torch.no_grad()
def inception_features(files: list[Path], model: FIDInceptionV3, size: tuple[int, int], batch_size: int,
                       desc: str = "features", progress: bool = True) -> dict[FeatureMode, np.ndarray]:
    """(N, 2048) float64 features of ``files`` (read at ``size``) for each ``FeatureMode``."""
    device = next(model.parameters()).device
    out = {mode: [] for mode in FeatureMode}
    with _bar(len(files), desc, progress) as bar:
        for batch in _batches(files, batch_size):
            images = [read_rgb(p, size) for p in batch]
            for mode in FeatureMode:
                x = torch.stack([network_input(im, mode) for im in images])  # (B, 3, 299, 299)
                x = x.to(device, memory_format=torch.channels_last)
                out[mode].append(model(x).double().cpu().numpy())
            bar.update(len(batch))
    return {mode: np.concatenate(f) for mode, f in out.items()}


@torch.no_grad()
def paired_scores(pairs: list[Pair], model: LPIPS, size: tuple[int, int], batch_size: int,
                  border: SsimBorder, progress: bool = True) -> tuple[float, float, float]:
    """Mean SSIM, LPIPS and PSNR over ``pairs``."""
    device = next(model.parameters()).device
    ssims, lpipss, psnrs = [], [], []
    with _bar(len(pairs), "SSIM, LPIPS, PSNR", progress) as bar:
        for batch in _batches(pairs, batch_size):
            real, fake = ([read_rgb(getattr(p, side), size) for p in batch] for side in ("real", "fake"))
            psnrs.extend(psnr(r, f) for r, f in zip(real, fake))
            real, fake = ([torch.from_numpy(im).permute(2, 0, 1) for im in side] for side in (real, fake))
            real, fake = (torch.stack(t).to(device).float().div(255) for t in (real, fake))  # (B, 3, H, W)
            ssims.append(ssim(fake, real, border=border).double().cpu())
            real, fake = (t.contiguous(memory_format=torch.channels_last) * 2 - 1 for t in (real, fake))
            lpipss.append(model(real, fake).double().cpu())
            bar.update(len(batch))
    return float(torch.cat(ssims).mean()), float(torch.cat(lpipss).mean()), float(np.mean(psnrs))


def evaluate(real_dir: str | Path, fake_dir: str | Path, paired: bool, config: EvalConfig = EvalConfig(), *,
             weights_dir: str | Path | None = None, device: str | torch.device = "cpu",
             progress: bool = True, face_embed: FaceEmbed | None = None) -> EvalResult:
    """Score the generated images in ``fake_dir`` against the real ones in ``real_dir``; with
    ``face_embed`` (paired only), also the face similarity to the ground truth and the source.

    Raises ``EvalInputError`` (folders, names, images), ``MissingWeightsError`` and
    ``CheckpointError`` (weights): all ``UserError``s."""
    real, fake = list_images(real_dir, "real"), list_images(fake_dir, "generated")
    if min(len(real), len(fake)) < 2:
        raise EvalInputError(f"FID and KID need at least 2 images in each folder; found {len(real)} real "
                             f"and {len(fake)} generated")
    size = common_size(fake, "generated")
    if paired and min(size) < smallest_side(config.ssim_border):
        side = smallest_side(config.ssim_border)
        raise EvalInputError(f"SSIM needs images of at least {side}×{side} pixels; the generated are {size}")
    if face_embed is not None and not paired:
        raise EvalInputError("face similarity compares each generated image with its ground truth: it needs "
                             "paired images (--paired)")
    pairs = pair_by_name(real, fake) if paired else None
    files = [INCEPTION, *(config.lpips_net.files if paired else ())]
    paths = resolve_urls(files, weights_dir, progress)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        inception = FIDInceptionV3.from_file(paths[0], device)
        real_f = inception_features(real, inception, size, config.batch_size, "real images", progress)
        fake_f = inception_features(fake, inception, size, config.batch_size, "generated images", progress)
        del inception
        scores = {}
        if paired:
            lpips = LPIPS.from_files(config.lpips_net, paths[1], paths[2], device)
            scores = dict(zip(("ssim", "lpips", "psnr"), paired_scores(pairs, lpips, size, config.batch_size,
                                                              config.ssim_border, progress)))
    if face_embed is not None:
        scores.update(asdict(face_scores(pairs, real, face_embed, progress)))
    fid = {mode: frechet_distance(real_f[mode], fake_f[mode]) for mode in FeatureMode}
    clean_kid = kid(real_f[FeatureMode.CLEAN_FID], fake_f[FeatureMode.CLEAN_FID],
                    config.kid_subsets, config.kid_subset_size, config.seed)
    return EvalResult(str(real_dir), str(fake_dir), paired, len(real), len(fake), fid[FeatureMode.PYTORCH_FID],
                      fid[FeatureMode.CLEAN_FID], clean_kid, config=config, **scores)
