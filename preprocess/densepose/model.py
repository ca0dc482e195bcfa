"""DensePose R-CNN in plain PyTorch: detectron2's ``densepose_rcnn_R_50_FPN_s1x`` (Leffa) and
``densepose_rcnn_R_101_FPN_DL_s1x`` (MCLD); ``RCNNConfig`` (``depth``, ``dp_head``) picks one,
and ``DensePoseRCNN.from_checkpoint`` reads it off the weights file.

The modules mirror detectron2's, so the state-dict names are those of the published
``densepose/model_final_162be9.pkl`` / ``model_final_844d15.pkl``
(``backbone.bottom_up.res2.0.conv1.norm.running_var``, ``roi_heads.densepose_predictor.u_lowres.weight``,
...). Inference, for one image:

1. resize (shortest edge 800, longest ≤ 1333, PIL bilinear on uint8), BGR, minus pixel mean,
   pad to a multiple of 32;
2. ResNet-50/101 (frozen batch norm, stride in the 1×1 conv) -> FPN P2–P6 (``backbone.py``);
3. RPN: 3 anchors per position and level, top 1000 per level, NMS 0.7 per level, top 1000;
4. box head: ROIAlign 7×7 from P2–P5 (level by box size), two FC layers, class score > 0.5,
   NMS 0.5, at most 100, by decreasing score;
5. DensePose head (``heads.py``): the FPN decoder merges P2–P5 at stride 4, ROIAlign 28×28,
   eight 3×3 convs (R50) or ASPP + eight 3×3 GroupNorm convs (DeepLab), deconvolution + ×2
   bilinear upsampling into coarse/fine segmentation and U/V (112×112);
6. boxes back to image pixels, and per-box part labels and U/V (``extract.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from preprocess.densepose import ops
from preprocess.densepose.backbone import FPN, RESNET_BLOCKS, Conv2d
from preprocess.densepose.heads import ChartOutput, Decoder, DensePoseHeadKind, DensePosePredictor, build_head

__all__ = [
    "R50_FPN_S1X",
    "R101_FPN_DL_S1X",
    "ChartOutput",
    "DensePoseHeadKind",
    "DensePoseRCNN",
    "Detections",
    "RCNNConfig",
    "resized_shape",
]


@dataclass(frozen=True)
class RCNNConfig:
    """The settings of detectron2's DensePose chart configs that inference uses: the defaults are
    ``densepose_rcnn_R_50_FPN_s1x.yaml`` (``R50_FPN_S1X``); ``depth=101`` with the DeepLab head
    is ``densepose_rcnn_R_101_FPN_DL_s1x.yaml`` (``R101_FPN_DL_S1X``, which changes nothing
    else: same RPN, box head, decoder, 28×28 "ROIAlign" pooler with sampling ratio 2, predictor).
    ``score_threshold`` is the original demo's 0.5 (detectron2's default, which MCLD keeps, is
    0.05: ``iuv.mcld_densepose``)."""

    min_size: int = 800
    max_size: int = 1333
    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)  # BGR
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size_divisibility: int = 32
    depth: int = 50  # ResNet-50 or -101 (MODEL.RESNETS.DEPTH)
    res_width: int = 64  # stem and res2 bottleneck channels (smaller only in tests)
    fpn_channels: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per level P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_topk: int = 1000
    rpn_post_nms_topk: int = 1000
    rpn_nms: float = 0.7
    box_pooler_size: int = 7
    box_fc_dim: int = 1024
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    score_threshold: float = 0.5
    box_nms: float = 0.5
    max_detections: int = 100
    pooler_sampling_ratio: int = 2
    pooler_aligned: bool = False  # POOLER_TYPE "ROIAlign" (not "ROIAlignV2") for both heads
    dp_head: DensePoseHeadKind = DensePoseHeadKind.CONV_X  # MODEL.ROI_DENSEPOSE_HEAD.NAME
    dp_pooler_size: int = 28
    dp_head_dim: int = 512
    dp_head_convs: int = 8
    dp_decoder_dim: int = 256
    num_parts: int = 24
    num_coarse: int = 2

    def __post_init__(self):
        if self.depth not in RESNET_BLOCKS:
            raise ValueError(f"ResNet depth {self.depth}: only {sorted(RESNET_BLOCKS)} are DensePose models")
        if not isinstance(self.dp_head, DensePoseHeadKind):
            raise TypeError(f"dp_head must be a DensePoseHeadKind, got {self.dp_head!r}")

    @property
    def res_blocks(self) -> tuple[int, int, int, int]:
        return RESNET_BLOCKS[self.depth]

    @property
    def name(self) -> str:
        """detectron2's name of the architecture, e.g. "R_101_FPN_DL"."""
        return f"R_{self.depth}_FPN" + ("_DL" if self.dp_head is DensePoseHeadKind.DEEPLAB else "")

    @property
    def strides(self) -> tuple[int, ...]:  # of P2..P6
        return tuple(2 ** (i + 2) for i in range(len(self.anchor_sizes)))


R50_FPN_S1X = RCNNConfig()  # densepose_rcnn_R_50_FPN_s1x, model_final_162be9.pkl
R101_FPN_DL_S1X = RCNNConfig(depth=101, dp_head=DensePoseHeadKind.DEEPLAB)  # ..._R_101_FPN_DL_s1x, model_final_844d15.pkl


# -- region proposals ---------------------------------------------------------------------------
class RPNHead(nn.Module):
    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, relu=True)
        self.objectness_logits = nn.Conv2d(channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * 4, 1)


class RPN(nn.Module):
    def __init__(self, cfg: RCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.rpn_head = RPNHead(cfg.fpn_channels, len(cfg.aspect_ratios))
        self._cells = [ops.cell_anchors(size, cfg.aspect_ratios) for size in cfg.anchor_sizes]

    def forward(self, features: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """Proposals (P, 4) in the resized image, by decreasing objectness."""
        cfg = self.cfg
        boxes, scores, levels = [], [], []
        for level, (x, cell, stride) in enumerate(zip(features, self._cells, cfg.strides)):
            t = self.rpn_head.conv(x)
            logits = self.rpn_head.objectness_logits(t)[0].permute(1, 2, 0).reshape(-1)  # (H·W·A,)
            deltas = self.rpn_head.anchor_deltas(t)[0]  # (A·4, H, W)
            deltas = deltas.view(-1, 4, *deltas.shape[-2:]).permute(2, 3, 0, 1).reshape(-1, 4)
            anchors = ops.grid_anchors(cell.to(x.device), stride, *x.shape[-2:])
            k = min(cfg.rpn_pre_nms_topk, logits.numel())
            top_scores, top = logits.topk(k)
            boxes.append(ops.decode_boxes(deltas[top], anchors[top], (1.0, 1.0, 1.0, 1.0)))
            scores.append(top_scores)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=x.device))
        boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes = ops.clip_boxes(boxes[finite], *image_size)
        scores, levels = scores[finite], levels[finite]
        keep = ops.nonempty(boxes)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = ops.batched_nms(boxes, scores, levels, cfg.rpn_nms)[:cfg.rpn_post_nms_topk]
        return boxes[keep]


# -- ROI heads ----------------------------------------------------------------------------------
def pool_levels(features: list[torch.Tensor], boxes: torch.Tensor, cfg: RCNNConfig, size: int) -> torch.Tensor:
    """Multi-level ROIAlign: each box from the level k = ⌊4 + log2(√area / 224)⌋ in 2..5."""
    k = torch.floor(4 + torch.log2(torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) / 224 + 1e-8))
    level = k.clamp(2, 1 + len(features)).long() - 2
    rois = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], dim=1)
    out = features[0].new_zeros((len(boxes), features[0].shape[1], size, size))
    for i, (x, stride) in enumerate(zip(features, cfg.strides)):
        idx = torch.nonzero(level == i).squeeze(1)
        if len(idx):
            out[idx] = ops.roi_align(x, rois[idx], size, 1.0 / stride, cfg.pooler_sampling_ratio, cfg.pooler_aligned)
    return out


class BoxHead(nn.Module):
    def __init__(self, cfg: RCNNConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.fpn_channels * cfg.box_pooler_size ** 2, cfg.box_fc_dim)
        self.fc2 = nn.Linear(cfg.box_fc_dim, cfg.box_fc_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))


class BoxPredictor(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, 2)  # person, background
        self.bbox_pred = nn.Linear(dim, 4)


class ROIHeads(nn.Module):
    def __init__(self, cfg: RCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.box_head = BoxHead(cfg)
        self.box_predictor = BoxPredictor(cfg.box_fc_dim)
        self.decoder = Decoder(cfg.fpn_channels, cfg.dp_decoder_dim)
        self.densepose_head = build_head(cfg.dp_head, cfg.dp_decoder_dim, cfg.dp_head_dim, cfg.dp_head_convs)
        self.densepose_predictor = DensePosePredictor(cfg.dp_head_dim, cfg.num_parts, cfg.num_coarse)

    def detect(self, features: list[torch.Tensor], proposals: torch.Tensor,
               image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Person boxes (D, 4) in the resized image and their scores (D,), best first."""
        cfg = self.cfg
        x = self.box_head(pool_levels(features[:4], proposals, cfg, cfg.box_pooler_size))
        scores = F.softmax(self.box_predictor.cls_score(x), dim=-1)
        boxes = ops.decode_boxes(self.box_predictor.bbox_pred(x), proposals, cfg.box_weights)
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
        boxes, scores = ops.clip_boxes(boxes[valid], *image_size), scores[valid, 0]
        keep = scores > cfg.score_threshold
        boxes, scores = boxes[keep], scores[keep]
        keep = ops.nms(boxes, scores, cfg.box_nms)[:cfg.max_detections]
        return boxes[keep], scores[keep]

    def densepose(self, features: list[torch.Tensor], boxes: torch.Tensor) -> ChartOutput:
        cfg = self.cfg
        merged = self.decoder(features[:4])
        rois = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], dim=1)
        x = ops.roi_align(merged, rois, cfg.dp_pooler_size, 1.0 / cfg.strides[0], cfg.pooler_sampling_ratio,
                          cfg.pooler_aligned, chunk=16)
        return self.densepose_predictor(self.densepose_head(x))


# -- the detector -------------------------------------------------------------------------------
def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge``: (new height, new width)."""
    scale = min_size / min(height, width)
    newh, neww = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


@contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """No TF32 in cuDNN convolutions and CUDA matmuls while inside (PyTorch enables it for
    convolutions by default). Detection scores and part labels hinge on small logit margins: in
    the random-weight parity run on an H100, TF32 changed 15–40 % of the rendered pixels against
    CPU float32, full float32 under 0.3 %. The previous settings are restored on exit."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class Detections:
    """What the network found in one image: boxes (D, 4) x1 y1 x2 y2 in image pixels, scores
    (D,) best first, and the DensePose head outputs of each box."""

    boxes: torch.Tensor
    scores: torch.Tensor
    charts: ChartOutput


class DensePoseRCNN(nn.Module):
    """DensePose R-CNN. ``model(rgb)`` -> ``list[DensePoseInstance]``, best first.

    Build it from the published weights with ``DensePoseRCNN.from_checkpoint(path)``
    (``weights.py``); ``DensePoseRCNN()`` has random weights.
    """

    def __init__(self, cfg: RCNNConfig = RCNNConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = FPN(cfg.res_blocks, cfg.fpn_channels, cfg.res_width)
        self.proposal_generator = RPN(cfg)
        self.roi_heads = ROIHeads(cfg)
        self.eval()

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu",
                        score_threshold: float | None = None,
                        channels_last: bool = False, config: RCNNConfig | None = None) -> DensePoseRCNN:
        """A published model (``model_final_162be9.pkl``: R50-FPN; ``model_final_844d15.pkl``:
        R101-FPN-DL) or its ``.safetensors`` conversion, strictly. The architecture (ResNet depth,
        DensePose head) is read off the file's parameter names; a file that is neither raises
        ``CheckpointError`` naming it. ``config``: build that instead of the published sizes
        (its depth and head must be the file's, else ``CheckpointError``); ``score_threshold``,
        when given, replaces the config's (0.5).

        ``channels_last``: NHWC convolutions, about 20 % faster per photo on the CPU, but not
        detectron2's arithmetic: its features differ by ~1e-4 (against bit-equal ones in NCHW),
        scores by ~1e-4, enough to reorder or swap detections whose scores or overlaps are that
        close (``benchmarks/parity_densepose.py``)."""
        from dataclasses import replace

        from preprocess.densepose.weights import (
            CheckpointError,
            checked_state,
            config_from_state,
            read_weights,
        )

        state = read_weights(path)
        found = config_from_state(state, path)
        if config is not None and (config.depth, config.dp_head) != (found.depth, found.dp_head):
            raise CheckpointError(f"{path}: holds DensePose {found.name}, not {config.name}")
        cfg = config or found
        if score_threshold is not None:
            cfg = replace(cfg, score_threshold=score_threshold)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(checked_state(state, model, path), strict=True, assign=True)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return model.to(device, memory_format=fmt).eval()

    @property
    def device(self) -> torch.device:
        return self.roi_heads.box_predictor.cls_score.weight.device

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(1, 3, H', W') normalised BGR padded to the size divisibility, and the resized (H, W)."""
        cfg = self.cfg
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
                and min(rgb.shape[:2]) > 0):
            shape = getattr(rgb, "shape", None)
            raise ValueError(f"DensePose needs an RGB uint8 image of shape (H, W, 3), got {type(rgb).__name__} {shape}")
        h, w = rgb.shape[:2]
        newh, neww = resized_shape(h, w, cfg.min_size, cfg.max_size)
        bgr = Image.fromarray(np.ascontiguousarray(rgb[:, :, ::-1]))
        resized = np.asarray(bgr.resize((neww, newh), Image.Resampling.BILINEAR))
        x = torch.from_numpy(resized.copy()).to(self.device).permute(2, 0, 1).float()
        mean = torch.tensor(cfg.pixel_mean, device=x.device)[:, None, None]
        std = torch.tensor(cfg.pixel_std, device=x.device)[:, None, None]
        x = (x - mean) / std
        d = cfg.size_divisibility
        x = F.pad(x, (0, math.ceil(neww / d) * d - neww, 0, math.ceil(newh / d) * d - newh))
        stem = self.backbone.bottom_up.stem.conv1.weight
        nhwc = stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
        return x[None].contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format), (newh, neww)

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray) -> Detections:
        """Steps 1–5 and the boxes mapped back to the image (detectron2's ``detector_postprocess``)."""
        x, size = self.preprocess(rgb)
        with full_float32(x.device):
            features = self.backbone(x)
            proposals = self.proposal_generator(features, size)
            boxes, scores = self.roi_heads.detect(features, proposals, size)
            charts = self.roi_heads.densepose(features, boxes)
        h, w = rgb.shape[:2]
        scale = torch.tensor([w / size[1], h / size[0]] * 2, device=boxes.device)
        boxes = ops.clip_boxes(boxes * scale, h, w)
        keep = ops.nonempty(boxes)
        return Detections(boxes[keep], scores[keep], charts[keep])

    def forward(self, rgb: np.ndarray):
        from preprocess.densepose.extract import extract_instances

        return extract_instances(self.detect(rgb))
