"""Face identity of generated people, as MCLD's ``evaluate.py`` scores it: the cosine similarity
of the ArcFace embedding of the generated image's face and of its ground truth's (and here also
of the pose-transfer source's), averaged over the pairs where both images show a face.

Their procedure: the real image resized to the generated one's size (OpenCV bilinear), each
image's largest face embedded (insightface's raw ``embedding``, not the normalised one), pairs
where either has no face left out, then the mean cosine (and of the Euclidean distance). The
embedding itself is the caller's (``FaceEmbed``; ``leffa eval`` passes ``preprocess.face``'s
``FaceEmbedder``): this library stays free of the face models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from evaluation.folders import Pair, read_rgb, source_name

# an (H, W, 3) uint8 RGB image -> its largest face's embedding (D,), or None when it shows no face
FaceEmbed = Callable[[np.ndarray], "np.ndarray | None"]


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def resized(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``image`` at (H, W) ``size_hw``, OpenCV bilinear (MCLD's ``cv2.resize``), or as it is."""
    h, w = size_hw
    return image if image.shape[:2] == (h, w) else cv2.resize(image, (w, h))


def compare(e_generated: np.ndarray, e_other: np.ndarray) -> tuple[float, float]:
    """(cosine, Euclidean distance) of two raw embeddings (MCLD's ``compute_similarity``)."""
    distance = float(np.linalg.norm(np.asarray(e_generated, np.float64) - np.asarray(e_other, np.float64)))
    return cosine_similarity(e_generated, e_other), distance


def face_similarity(generated: np.ndarray, other: np.ndarray,
                    embed: FaceEmbed) -> tuple[float, float] | None:
    """(cosine, Euclidean distance) of the face embeddings of ``generated`` and ``other`` (both
    (H, W, 3) uint8 RGB; ``other`` is resized to ``generated``'s size first), or ``None`` when
    either shows no face (MCLD's ``face_computing``)."""
    e_other, e_generated = embed(resized(other, generated.shape[:2])), embed(generated)
    return None if e_other is None or e_generated is None else compare(e_generated, e_other)


@dataclass(frozen=True)
class FaceScores:
    face_sim_target: float | None  # mean cosine with the ground truth (MCLD's "face cosine similarity")
    face_dist_target: float | None  # mean Euclidean distance of the raw embeddings (MCLD's second number)
    face_pairs_target: int  # the pairs with a face in both images, of all pairs
    face_sim_source: float | None  # mean cosine with the pose-transfer source ({source}___{target} names)
    face_pairs_source: int


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def face_scores(pairs: Sequence[Pair], real: Sequence[Path], embed: FaceEmbed,
                progress: bool = True) -> FaceScores:
    """Face similarity of each generated image with its ground truth and, for pose-transfer
    names, with its source when ``real`` holds it."""
    by_stem = {p.stem: p for p in real}
    target_sims, target_dists, source_sims = [], [], []
    for pair in tqdm(pairs, desc="faces", unit="img", disable=not progress):
        generated = read_rgb(pair.fake)
        e_generated = embed(generated)  # once for both comparisons
        if e_generated is None:
            continue
        e_target = embed(resized(read_rgb(pair.real), generated.shape[:2]))
        if e_target is not None:
            cosine, distance = compare(e_generated, e_target)
            target_sims.append(cosine)
            target_dists.append(distance)
        source = by_stem.get(source_name(pair.fake) or "")
        e_source = None if source is None else embed(resized(read_rgb(source), generated.shape[:2]))
        if e_source is not None:
            source_sims.append(compare(e_generated, e_source)[0])
    return FaceScores(_mean(target_sims), _mean(target_dists), len(target_sims),
                      _mean(source_sims), len(source_sims))
