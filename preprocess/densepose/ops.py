"""Box operations of the R-CNN detector, in plain PyTorch: anchors, box decoding, NMS, ROIAlign.

Each follows detectron2's (and torchvision's) definition exactly; no Python loop runs over boxes.
Boxes are (N, 4) float tensors ``x1, y1, x2, y2`` in pixels, with no "+1" (detectron2 ≥ 0.1).
"""

from __future__ import annotations

import math

import torch

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
    """NMS within each group (class or level) separately; kept indices by decreasing score.

    As torchvision's ``batched_nms`` (which detectron2 calls): with at most ``batched_nms_limit``
    boxes it does not run group by group but once, on boxes moved apart by group index ×
    (largest coordinate + 1). Those shifted float32 coordinates are rounded (e.g. at 5000 px to
    1/2048 px), so IoUs near the threshold can fall on the other side than those of the boxes
    as they are; the same shift is applied here. In the RPN (one group per FPN level) that
    decides which proposals survive: on CUDA always, on the CPU for images with at most 1000
    proposal candidates.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if len(boxes) <= batched_nms_limit(boxes.device):
        boxes = boxes + (groups.to(boxes) * (boxes.max() + torch.ones((), dtype=boxes.dtype,
                                                                     device=boxes.device)))[:, None]
    kept = []
    for g in torch.unique(groups).tolist():  # a handful of groups, never one per box
        idx = torch.nonzero(groups == g).squeeze(1)
        kept.append(idx[nms(boxes[idx], scores[idx], iou_threshold)])
    keep = torch.cat(kept).sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def batched_nms_limit(device: torch.device) -> int:
    """Up to how many boxes torchvision's ``batched_nms`` shifts groups apart instead of looping
    over them (it tests ``boxes.numel() > 4000`` on the CPU, ``> 100_000`` elsewhere)."""
    return 1000 if device.type == "cpu" else 25_000


# -- ROIAlign -----------------------------------------------------------------------------------
def _axis_samples(start: torch.Tensor, bin_size: torch.Tensor, n: int, s: int, size: int):
    """One axis of torchvision's bilinear sampling, in its float32 order of operations.

    ``start``, ``bin_size`` (R,) -> for the (R, n·s) sample positions start + p·bin +
    ((i + 0.5)·bin) / s: low and high pixel indices, the weights of the low (1 − l) and high
    (l) pixel, and whether the position is within one pixel of the map (else the sample is 0).
    """
    dev = start.device
    p = torch.arange(n, device=dev, dtype=torch.float32).repeat_interleave(s)  # (n·s,) bin index
    i = torch.arange(s, device=dev, dtype=torch.float32).repeat(n) + 0.5  # (n·s,) sample within the bin
    pos = (start[:, None] + p[None] * bin_size[:, None]) + (i[None] * bin_size[:, None]) / s
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.long()
    last = low >= size - 1
    low = torch.where(last, size - 1, low)
    high = torch.where(last, low, low + 1)
    pos = torch.where(last, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    return low, high, 1.0 - frac, frac, valid


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool, chunk: int = 256) -> torch.Tensor:
    """torchvision's ``roi_align`` for a fixed ``sampling_ratio`` > 0, to the bit on the CPU.

    ``features`` (B, C, H, W) float32; ``rois`` (R, 5) rows ``batch_index, x1, y1, x2, y2`` in
    image pixels -> (R, C, output_size, output_size). Each bin averages ``sampling_ratio²``
    bilinear samples at regular points; a sample further than one pixel outside the map counts
    as 0 and one within that pixel takes the border value. ``aligned=False`` is detectron2's
    "ROIAlign" (no half-pixel shift, boxes at least 1 feature pixel wide), ``aligned=True`` its
    "ROIAlignV2". Every step is torchvision's float32 arithmetic in its order (positions, the
    four weights hy·hx, hy·lx, ly·hx, ly·lx, the sum w1·v1 + w2·v2 + w3·v3 + w4·v4 added sample
    by sample, row-major, then divided by the sample count), so the outputs equal its CPU
    kernel's exactly.
    """
    if sampling_ratio <= 0:
        raise ValueError("roi_align here needs a fixed sampling_ratio > 0")
    _, C, H, W = features.shape
    R, n, s = rois.shape[0], output_size, sampling_ratio
    out = features.new_zeros((R, C, n, n))
    if R == 0:
        return out
    f32 = torch.float32
    boxes = rois[:, 1:].to(f32) * torch.tensor(spatial_scale, dtype=f32) - (0.5 if aligned else 0.0)
    size = boxes[:, 2:] - boxes[:, :2]  # (R, 2) width, height
    if not aligned:
        size = size.clamp(min=1.0)
    bins = size / n
    ys = _axis_samples(boxes[:, 1], bins[:, 1], n, s, H)  # each (R, n·s)
    xs = _axis_samples(boxes[:, 0], bins[:, 0], n, s, W)
    batch = rois[:, 0].long()
    for b in torch.unique(batch).tolist():
        pixels = features[b].reshape(C, H * W).t().contiguous()  # (H·W, C): a gather reads whole rows
        for idx in torch.nonzero(batch == b).squeeze(1).split(chunk):
            k = len(idx)
            acc = None
            for iy in range(s):
                rows = [t[idx][:, iy::s] for t in ys]  # (k, n): this sample of every row bin
                for ix in range(s):
                    cols = [t[idx][:, ix::s] for t in xs]
                    valid = (rows[4][:, :, None] & cols[4][:, None, :]).to(f32)  # (k, n, n)
                    term = None
                    for yi, wy in ((0, 2), (1, 3)):  # low / high row, its weight
                        for xi, wx in ((0, 2), (1, 3)):
                            w = (rows[wy][:, :, None] * cols[wx][:, None, :] * valid)[..., None]  # (k, n, n, 1)
                            pos = rows[yi][:, :, None] * W + cols[xi][:, None, :]
                            v = pixels.index_select(0, pos.reshape(-1)).view(k, n, n, C)
                            term = w * v if term is None else term + w * v
                    acc = term if acc is None else acc + term
            out[idx] = (acc / float(s * s)).permute(0, 3, 1, 2)
    return out
