"""Stand-in preprocessors for offline demos and tests (``python app.py --tiny``).

They need no weights: the "person" is whatever is not near-white on the canvas, and the
parsing, keypoints and DensePose are laid out from its bounding box by body proportions.
The results have the right types, sizes and label sets, so every later stage (masks,
renderings, the pipeline, the UI) runs for real, but they know nothing about bodies.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from preprocess.densepose import DensePoseInstance
from preprocess.face import EMBEDDING_SIZE, FaceResult
from preprocess.masks import (BACKGROUND, HAIR, HEAD, LEFT_ARM, LEFT_SHOE, NECK, PANTS, RIGHT_ARM, RIGHT_SHOE,
                              UPPER_CLOTHES)
from preprocess.openpose import NoPersonError
from preprocess.parsing import Parsing, colorize


def person_box(rgb: np.ndarray, min_fraction: float = 0.02) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the non-white pixels; ``NoPersonError`` when there are too few."""
    fg = (rgb.astype(np.int16).min(axis=2) < 235)
    if fg.mean() < min_fraction:
        raise NoPersonError("no person detected in the photo: use a photo of one person on a plain background")
    ys, xs = np.nonzero(fg)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# fractions of the box height at which body parts end, top to bottom
BANDS = [(0.05, HAIR), (0.16, HEAD), (0.19, NECK), (0.52, UPPER_CLOTHES), (0.93, PANTS), (1.0, LEFT_SHOE)]


class StandInParser:
    def __call__(self, person: Image.Image) -> Parsing:
        rgb = np.asarray(person.convert("RGB"))
        x0, y0, x1, y1 = person_box(rgb)
        h, w = rgb.shape[:2]
        labels = np.full((h, w), BACKGROUND, np.uint8)
        top = y0
        bh, bw = y1 - y0, x1 - x0
        for end, label in BANDS:
            bottom = y0 + int(end * bh)
            cx0, cx1 = x0 + int(0.2 * bw), x1 - int(0.2 * bw)
            if label in (HAIR, HEAD, NECK):
                cx0, cx1 = x0 + int(0.38 * bw), x1 - int(0.38 * bw)
            labels[top:bottom, cx0:cx1] = label
            if label == LEFT_SHOE:  # right shoe on the image's left
                labels[top:bottom, cx0:(cx0 + cx1) // 2] = RIGHT_SHOE
            top = bottom
        arm_bottom = y0 + int(0.55 * bh)
        labels[y0 + int(0.19 * bh):arm_bottom, x0:x0 + int(0.2 * bw)] = RIGHT_ARM
        labels[y0 + int(0.19 * bh):arm_bottom, x1 - int(0.2 * bw):x1] = LEFT_ARM
        return Parsing(labels, colorize(labels))


class StandInPose:
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = person_box(rgb)
        bw, bh = x1 - x0, y1 - y0
        at = lambda fx, fy: (x0 + fx * bw, y0 + fy * bh)
        return np.array([at(0.5, 0.1), at(0.5, 0.19), at(0.25, 0.21), at(0.1, 0.37), at(0.1, 0.52),
                         at(0.75, 0.21), at(0.9, 0.37), at(0.9, 0.52), at(0.38, 0.52), at(0.38, 0.74),
                         at(0.38, 0.95), at(0.62, 0.52), at(0.62, 0.74), at(0.62, 0.95), at(0.46, 0.08),
                         at(0.54, 0.08), at(0.42, 0.09), at(0.58, 0.09)], np.float64)


class StandInDensePose:
    def __call__(self, rgb: np.ndarray) -> list[DensePoseInstance]:
        x0, y0, x1, y1 = person_box(rgb)
        h, w = y1 - y0, x1 - x0
        rows = np.linspace(0, 1, h, endpoint=False)[:, None]
        cols = np.linspace(0, 1, w, endpoint=False)[None, :]
        labels = (1 + (rows * 6).astype(np.uint8) * 4 + (cols * 4).astype(np.uint8)).astype(np.uint8)
        labels = np.broadcast_to(np.minimum(labels, 24), (h, w)).copy()
        labels[(np.asarray(rgb[y0:y1, x0:x1]).min(axis=2) >= 235)] = 0
        uv = np.stack(np.broadcast_arrays((cols * 4) % 1, (rows * 6) % 1)).astype(np.float32)
        return [DensePoseInstance((x0, y0, w, h), labels, uv, 1.0)]


class StandInFace:
    """A "face" at the top of the person's box, its embedding a fixed function of the pixels there
    (so different people differ); no face on a blank photo."""

    def embed(self, rgb: np.ndarray) -> FaceResult:
        try:
            x0, y0, x1, y1 = person_box(rgb)
        except NoPersonError:
            return FaceResult(np.zeros(EMBEDDING_SIZE, np.float32))
        h, w = y1 - y0, x1 - x0
        box = (x0 + 0.38 * w, y0 + 0.05 * h, x1 - 0.38 * w, y0 + 0.16 * h)
        patch = rgb[int(box[1]):max(int(box[3]), int(box[1]) + 1), int(box[0]):max(int(box[2]), int(box[0]) + 1)]
        mean = patch.reshape(-1, 3).mean(axis=0) / 255.0
        embedding = np.cos(np.arange(EMBEDDING_SIZE)[:, None] * (1.0 + mean[None, :])).sum(axis=1)
        return FaceResult(embedding.astype(np.float32), box)


def standin_preprocessor():
    """A ``Preprocessor`` built from the stand-ins (the R101 DensePose of MCLD: the same stand-in)."""
    from preprocess.inputs import Preprocessor

    return Preprocessor(StandInParser, StandInPose, StandInDensePose, densepose_r101=StandInDensePose,
                        texture_regions=standin_regions, face=StandInFace)


def standin_regions() -> np.ndarray:
    """MCLD's atlas regions stood in for by a disc in every tile (the real file is fetched)."""
    yy, xx = np.mgrid[:200, :200]
    return np.broadcast_to(((yy - 100) ** 2 + (xx - 100) ** 2 < 95 ** 2), (24, 200, 200)).copy()
