"""From DensePose head outputs to per-person part labels and U/V in image pixels, as
detectron2's ``DensePoseResultExtractor`` (chart results) computes them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from preprocess.densepose.model import ChartOutput, Detections
from preprocess.densepose.render import DensePoseInstance


def int_box(box: torch.Tensor) -> tuple[int, int, int, int]:
    """x1 y1 x2 y2 -> integer x, y, width, height: x1, y1, x2−x1, y2−y1 (in float32) truncated."""
    x, y, w, h = torch.cat([box[:2], box[2:] - box[:2]]).long().tolist()
    return x, y, w, h


def chart_to_box(chart: ChartOutput, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One box's outputs (1, C, 112, 112) resampled to ``height`` × ``width`` (both ≥ 1).

    Labels (height, width): the fine segmentation's best part where the coarse segmentation says
    foreground, else 0. U, V (2, height, width): each pixel's value in the channel of its part.
    """
    size = (height, width)
    resample = lambda t: F.interpolate(t, size, mode="bilinear", align_corners=False)[0]  # noqa: E731
    foreground = resample(chart.coarse_segm).argmax(dim=0) > 0
    labels = resample(chart.fine_segm).argmax(dim=0) * foreground
    uv = torch.stack([resample(chart.u), resample(chart.v)])  # (2, 25, h, w)
    uv = uv.gather(1, labels[None, None].expand(2, 1, -1, -1))[:, 0] * (labels > 0)
    return labels, uv


def extract_instances(found: Detections) -> list[DensePoseInstance]:
    """One ``DensePoseInstance`` per detected person, best score first."""
    out = []
    for i in range(len(found.boxes)):
        x, y, w, h = int_box(found.boxes[i])
        w, h = max(w, 1), max(h, 1)
        labels, uv = chart_to_box(found.charts[i:i + 1], w, h)
        out.append(DensePoseInstance((x, y, w, h), labels.to(torch.uint8).cpu().numpy(),
                                     uv.float().cpu().numpy().astype(np.float32), float(found.scores[i])))
    return out
