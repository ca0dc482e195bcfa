"""DensePose results and the three renderings the published models were fed (spec §5 "DensePose").

A backend (``DensePoseRCNN``, or a stand-in) returns ``DensePoseInstance``s (box, part labels I,
surface coordinates U, V); ``render_*`` turn them into the images each model expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

NUM_PARTS = 24


@dataclass
class DensePoseInstance:
    box: tuple[int, int, int, int]  # x, y, width, height in image pixels
    labels: np.ndarray  # (height, width) uint8 part labels I, 0 = background, 1..24 parts
    uv: np.ndarray  # (2, height, width) float32 surface coordinates U, V in [0, 1]
    score: float = 1.0

    def __post_init__(self):
        h, w = self.box[3], self.box[2]
        if self.labels.shape != (h, w) or self.uv.shape != (2, h, w):
            raise ValueError(f"labels {self.labels.shape} / uv {self.uv.shape} do not fit box {self.box}")


class DensePoseBackend(Protocol):
    def __call__(self, rgb: np.ndarray) -> list[DensePoseInstance]:
        """Instances in an RGB image, best score first."""


def _paste(canvas: np.ndarray, inst: DensePoseInstance, pixels: np.ndarray, where: np.ndarray) -> None:
    """Copy ``pixels[where]`` into ``canvas`` at the instance's box, clipped to the canvas."""
    x, y, w, h = inst.box
    H, W = canvas.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 <= x0 or y1 <= y0:
        return
    sub = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
    region = canvas[y0:y1, x0:x1]
    m = where[sub]
    region[m] = pixels[sub][m]


def part_colours() -> np.ndarray:
    """(25, 3) RGB colours of the fine-segmentation rendering: floor(0.7·PARULA(l·255/24))."""
    values = (np.arange(NUM_PARTS + 1, dtype=np.float32) * 255.0 / NUM_PARTS).clip(0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(values.reshape(-1, 1), cv2.COLORMAP_PARULA).reshape(-1, 3)
    # float64, as the original's alpha blend (uint8 * 0.7): 0.7 * 170 -> 118.99.. -> 118
    colours = np.floor(bgr.astype(np.float64) * 0.7).astype(np.uint8)[:, ::-1]
    colours[0] = 0
    return colours


def render_segmentation(instances: list[DensePoseInstance], size: tuple[int, int]) -> Image.Image:
    """VITON-HD model input: every person's parts in PARULA colours on black. ``size`` = (W, H)."""
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    colours = part_colours()
    for inst in instances:
        _paste(canvas, inst, colours[inst.labels], inst.labels > 0)
    return Image.fromarray(canvas)


def render_labels(instances: list[DensePoseInstance], size: tuple[int, int]) -> Image.Image:
    """DressCode model input: the top person's part label I (0..24) in all three channels."""
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    if instances:
        inst = instances[0]
        _paste(canvas, inst, np.repeat(inst.labels[:, :, None], 3, axis=2), np.ones_like(inst.labels, bool))
    return Image.fromarray(canvas)


def render_iuv(instances: list[DensePoseInstance], size: tuple[int, int]) -> Image.Image:
    """Pose-transfer input: the top person's [U, V, I], U and V jointly min-max scaled to 0..255."""
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    if instances:
        inst = instances[0]
        lo, hi = float(inst.uv.min()), float(inst.uv.max())
        uv = (inst.uv - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(inst.uv)
        iuv = np.stack([uv[0], uv[1], inst.labels.astype(np.float32)], axis=2).astype(np.uint8)
        _paste(canvas, inst, iuv, np.ones_like(inst.labels, bool))
    return Image.fromarray(canvas)
