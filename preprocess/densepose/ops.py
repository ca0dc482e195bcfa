"""Box operations of the R-CNN detector, in plain PyTorch: anchors, box decoding, NMS, ROIAlign.

Each follows detectron2's (and torchvision's) definition exactly; no Python loop runs over boxes.
Boxes are (N, 4) float tensors ``x1, y1, x2, y2`` in pixels, with no "+1" (detectron2 ≥ 0.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALE_CLAMP = math.log(1000.0 / 16)  # largest decoded log-scale of a box (detectron2's default)


# -- anchors and box coding ---------------------------------------------------------------------
def cell_anchors(size: float, aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """(A, 4) anchors centred on 0 of area ``size²``; ``aspect_ratio`` = height / width."""
    out = []
    for ratio in aspect_ratios:
        w = math.sqrt(size * size / ratio)
        h = ratio * w
        out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out, dtype=torch.float32, device="cpu")  # real values even under a meta device


def grid_anchors(cell: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """(height · width · A, 4) anchors of a feature map: position-major, then the cell's anchors."""
    xs = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=cell.device)
    ys = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=cell.device)
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    sx, sy = sx.reshape(-1), sy.reshape(-1)
    shifts = torch.stack([sx, sy, sx, sy], dim=1)  # (HW, 4)
    return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, float, float, float],
                 scale_clamp: float = SCALE_CLAMP) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) ``deltas`` (N, 4k) to ``boxes`` (N, 4) -> (N, 4k), in float32."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=scale_clamp)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w, pred_h = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    out = torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                       pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=-1)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clamp x to [0, width] and y to [0, height]."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], -1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Mask of boxes whose width and height both exceed ``threshold``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) intersection over union, as torchvision's NMS computes it."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


# -- non-maximum suppression --------------------------------------------------------------------
def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of the kept boxes, highest score first (torchvision's ``nms``).

    Greedy suppression keeps box j iff no *kept* box before it (in score order) overlaps it by
    more than the threshold. That is a triangular system ``keep = ¬(Sᵀ·keep > 0)``, solved here
    by iterating from "keep all": after k rounds the first k decisions are final, so it ends
    after at most (longest suppression chain + 1) rounds of one matrix-vector product each.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].float()
    suppresses = (box_iou(b, b) > iou_threshold).triu(diagonal=1).float()  # [i, j]: i before j
    keep = torch.ones(len(b), dtype=torch.float32, device=b.device)
    while True:
        new = ((keep @ suppresses) == 0).float()
        if torch.equal(new, keep):
            return order[keep.bool()]
        keep = new


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """NMS within each group (class or level) separately; kept indices by decreasing score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    kept = []
    for g in torch.unique(groups).tolist():  # a handful of groups, never one per box
        idx = torch.nonzero(groups == g).squeeze(1)
        kept.append(idx[nms(boxes[idx], scores[idx], iou_threshold)])
    keep = torch.cat(kept)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


# -- ROIAlign -----------------------------------------------------------------------------------
def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool, chunk: int = 256) -> torch.Tensor:
    """torchvision's ``roi_align`` for a fixed ``sampling_ratio`` > 0.

    ``features`` (B, C, H, W); ``rois`` (R, 5) rows ``batch_index, x1, y1, x2, y2`` in image
    pixels -> (R, C, output_size, output_size). Each bin averages ``sampling_ratio²`` bilinear
    samples at regular points; a sample further than one pixel outside the map counts as 0 and
    one within that pixel takes the border value. ``aligned=False`` is detectron2's "ROIAlign"
    (no half-pixel shift, boxes at least 1 feature pixel wide), ``aligned=True`` its "ROIAlignV2".
    """
    if sampling_ratio <= 0:
        raise ValueError("roi_align here needs a fixed sampling_ratio > 0")
    B, C, H, W = features.shape
    R, n, s = rois.shape[0], output_size, sampling_ratio
    out = features.new_zeros((R, C, n, n))
    if R == 0:
        return out
    offset = 0.5 if aligned else 0.0
    boxes = rois[:, 1:].float() * spatial_scale - offset
    size = boxes[:, 2:] - boxes[:, :2]  # (R, 2) width, height
    if not aligned:
        size = size.clamp(min=1.0)
    # sample positions along each axis: start + (bin + (k + 0.5) / s) · size / n, (R, n·s)
    steps = (torch.arange(n * s, device=rois.device, dtype=torch.float32) + 0.5) / s
    xs = boxes[:, 0:1] + steps[None] * (size[:, 0:1] / n)
    ys = boxes[:, 1:2] + steps[None] * (size[:, 1:2] / n)
    inside = (((xs >= -1.0) & (xs <= W))[:, None, :] & ((ys >= -1.0) & (ys <= H))[:, :, None])  # (R, n·s, n·s)
    all_inside = bool(inside.all())  # always, for boxes clipped to the image
    # grid_sample's border padding clamps to [0, size-1] exactly as roi_align's bilinear rule does
    gx = (2.0 * xs + 1.0) / W - 1.0
    gy = (2.0 * ys + 1.0) / H - 1.0
    batch = rois[:, 0].long()
    for b in torch.unique(batch).tolist():
        for idx in torch.nonzero(batch == b).squeeze(1).split(chunk):
            k = len(idx)
            grid = torch.stack(torch.broadcast_tensors(gx[idx][:, None, :], gy[idx][:, :, None]), dim=-1)
            sampled = F.grid_sample(features[b:b + 1], grid.reshape(1, k * n * s, n * s, 2).to(features.dtype),
                                    mode="bilinear", padding_mode="border", align_corners=False)  # (1, C, k·n·s, n·s)
            if not all_inside:
                sampled = sampled * inside[idx].reshape(1, 1, k * n * s, n * s).to(sampled.dtype)
            pooled = F.avg_pool2d(sampled, s)  # (1, C, k·n, n): s×s blocks never straddle two boxes
            out[idx] = pooled.reshape(C, k, n, n).transpose(0, 1)
    return out
