"""DensePose R-CNN R50-FPN s1x in plain PyTorch (detectron2's ``densepose_rcnn_R_50_FPN_s1x``).

The modules mirror detectron2's, so the state-dict names are those of the published
``densepose/model_final_162be9.pkl`` (``backbone.bottom_up.res2.0.conv1.norm.running_var``,
``roi_heads.densepose_predictor.u_lowres.weight``, ...). Inference, for one image:

1. resize (shortest edge 800, longest ≤ 1333, PIL bilinear on uint8), BGR, minus pixel mean,
   pad to a multiple of 32;
2. ResNet-50 (frozen batch norm, stride in the 1×1 conv) -> FPN P2–P6;
3. RPN: 3 anchors per position and level, top 1000 per level, NMS 0.7 per level, top 1000;
4. box head: ROIAlign 7×7 from P2–P5 (level by box size), two FC layers, class score > 0.5,
   NMS 0.5, at most 100, by decreasing score;
5. DensePose head: the FPN decoder merges P2–P5 at stride 4, ROIAlign 28×28, eight 3×3 convs,
   deconvolution + ×2 bilinear upsampling into coarse/fine segmentation and U/V (112×112);
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


@dataclass(frozen=True)
class RCNNConfig:
    """The settings of ``densepose_rcnn_R_50_FPN_s1x.yaml`` (with detectron2's defaults) that
    inference uses; ``score_threshold`` is the original demo's 0.5."""

    min_size: int = 800
    max_size: int = 1333
    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)  # BGR
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size_divisibility: int = 32
    res_blocks: tuple[int, int, int, int] = (3, 4, 6, 3)  # ResNet-50
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
    dp_pooler_size: int = 28
    dp_head_dim: int = 512
    dp_head_convs: int = 8
    dp_decoder_dim: int = 256
    num_parts: int = 24
    num_coarse: int = 2

    @property
    def strides(self) -> tuple[int, ...]:  # of P2..P6
        return tuple(2 ** (i + 2) for i in range(len(self.anchor_sizes)))


# -- layers -------------------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers, eps 1e-5)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), fill))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Conv2d(nn.Conv2d):
    """A convolution with an optional frozen batch norm (``.norm``) and ReLU after it."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, *, norm: bool = False,
                 relu: bool = False):
        super().__init__(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=not norm)
        self.norm = FrozenBatchNorm2d(cout) if norm else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.shortcut = Conv2d(cin, cout, 1, stride, norm=True) if cin != cout else None
        self.conv1 = Conv2d(cin, mid, 1, stride, norm=True, relu=True)  # stride in the 1×1 (MSRA)
        self.conv2 = Conv2d(mid, mid, 3, norm=True, relu=True)
        self.conv3 = Conv2d(mid, cout, 1, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(self.conv3(self.conv2(self.conv1(x))) + skip)


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = Conv2d(3, 64, 7, 2, norm=True, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """ResNet-50 body: stem, then res2..res5 (strides 4..32, 256..2048 channels)."""

    def __init__(self, blocks: tuple[int, int, int, int]):
        super().__init__()
        self.stem = Stem()
        cin, mid = 64, 64
        for i, n in enumerate(blocks):
            cout = mid * 4
            stage = [Bottleneck(cin if b == 0 else cout, mid, cout, 2 if (b == 0 and i > 0) else 1) for b in range(n)]
            self.add_module(f"res{i + 2}", nn.Sequential(*stage))
            cin, mid = cout, mid * 2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i in range(2, 6):
            x = getattr(self, f"res{i}")(x)
            out.append(x)
        return out


class FPN(nn.Module):
    """Feature pyramid over res2..res5 -> P2..P5 (nearest ×2 top-down, sum), P6 = P5 subsampled."""

    def __init__(self, blocks: tuple[int, int, int, int], channels: int):
        super().__init__()
        self.bottom_up = ResNet(blocks)
        for level, cin in zip(range(2, 6), (256, 512, 1024, 2048)):
            self.add_module(f"fpn_lateral{level}", Conv2d(cin, channels, 1))
            self.add_module(f"fpn_output{level}", Conv2d(channels, channels, 3))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        res = self.bottom_up(x)
        prev = self.fpn_lateral5(res[3])
        outs = [self.fpn_output5(prev)]
        for level in (4, 3, 2):
            prev = getattr(self, f"fpn_lateral{level}")(res[level - 2]) + F.interpolate(prev, scale_factor=2.0,
                                                                                      mode="nearest")
            outs.insert(0, getattr(self, f"fpn_output{level}")(prev))
        return outs + [F.max_pool2d(outs[-1], kernel_size=1, stride=2)]  # P2..P6


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


class Decoder(nn.Module):
    """Panoptic-FPN style merge of P2..P5 at stride 4 (3×3 conv + ReLU, ×2 bilinear per level)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        for level in range(2, 6):
            ops_ = []
            for k in range(max(1, level - 2)):
                ops_.append(Conv2d(channels if k == 0 else dim, dim, 3, relu=True))
                if level > 2:
                    ops_.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.add_module(f"p{level}", nn.Sequential(*ops_))
        self.predictor = Conv2d(dim, dim, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.p2(features[0])
        for level, f in zip(range(3, 6), features[1:4]):
            x = x + getattr(self, f"p{level}")(f)
        return self.predictor(x)


class DensePoseHead(nn.Module):
    def __init__(self, cin: int, dim: int, n: int):
        super().__init__()
        for i in range(n):
            self.add_module(f"body_conv_fcn{i + 1}", Conv2d(cin if i == 0 else dim, dim, 3, relu=True))
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n):
            x = getattr(self, f"body_conv_fcn{i + 1}")(x)
        return x


@dataclass
class ChartOutput:
    """DensePose head outputs per box: (R, 2, 112, 112) coarse and (R, 25, 112, 112) fine
    segmentation logits, U and V (one channel per part, 0 = background)."""

    coarse_segm: torch.Tensor
    fine_segm: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    def __getitem__(self, idx) -> ChartOutput:
        return ChartOutput(self.coarse_segm[idx], self.fine_segm[idx], self.u[idx], self.v[idx])


class DensePosePredictor(nn.Module):
    def __init__(self, dim: int, num_parts: int, num_coarse: int):
        super().__init__()
        deconv = lambda cout: nn.ConvTranspose2d(dim, cout, 4, stride=2, padding=1)  # noqa: E731
        self.ann_index_lowres = deconv(num_coarse)
        self.index_uv_lowres = deconv(num_parts + 1)
        self.u_lowres = deconv(num_parts + 1)
        self.v_lowres = deconv(num_parts + 1)

    def forward(self, x: torch.Tensor) -> ChartOutput:
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
        return ChartOutput(up(self.ann_index_lowres(x)), up(self.index_uv_lowres(x)), up(self.u_lowres(x)),
                           up(self.v_lowres(x)))


class ROIHeads(nn.Module):
    def __init__(self, cfg: RCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.box_head = BoxHead(cfg)
        self.box_predictor = BoxPredictor(cfg.box_fc_dim)
        self.decoder = Decoder(cfg.fpn_channels, cfg.dp_decoder_dim)
        self.densepose_head = DensePoseHead(cfg.dp_decoder_dim, cfg.dp_head_dim, cfg.dp_head_convs)
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
    """DensePose R-CNN R50-FPN. ``model(rgb)`` -> ``list[DensePoseInstance]``, best first.

    Build it from the published weights with ``DensePoseRCNN.from_checkpoint(path)``
    (``weights.py``); ``DensePoseRCNN()`` has random weights.
    """

    def __init__(self, cfg: RCNNConfig = RCNNConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = FPN(cfg.res_blocks, cfg.fpn_channels)
        self.proposal_generator = RPN(cfg)
        self.roi_heads = ROIHeads(cfg)
        self.eval()

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu",
                        score_threshold: float = RCNNConfig.score_threshold) -> DensePoseRCNN:
        """The published ``model_final_162be9.pkl`` (or its ``.safetensors`` conversion), strictly."""
        from dataclasses import replace

        from preprocess.densepose.weights import load_weights

        with torch.device("meta"):
            model = cls(replace(RCNNConfig(), score_threshold=score_threshold))
        model.load_state_dict(load_weights(path, model), strict=True, assign=True)
        # channels-last convolutions: about 20 % faster per photo on CPU, same detections
        return model.to(device, memory_format=torch.channels_last).eval()

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
        return x[None].contiguous(memory_format=torch.channels_last), (newh, neww)

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
