"""The DensePose branch of the ROI heads: the FPN decoder, one of the two heads the published
chart models use, and the predictor of part segmentation and U/V.

- ``DensePoseHeadKind.CONV_X`` (detectron2's ``DensePoseV1ConvXHead``, the R50-FPN s1x model):
  eight 3×3 convolutions (512 channels, bias, ReLU);
- ``DensePoseHeadKind.DEEPLAB`` (``DensePoseDeepLabHead``, the "_DL_" models such as
  R101-FPN-DL s1x): atrous spatial pyramid pooling (1×1, 3×3 at dilations 6, 12 and 56, image
  pooling; 32-group GroupNorm and ReLU in each branch; a 1×1 projection with ReLU) on the
  256-channel pooled features, then eight 3×3 convolutions (512 channels, no bias, 32-group
  GroupNorm, ReLU). The non-local block of that head is off in every published config
  (``DEEPLAB.NONLOCAL_ON: 0``), so it is not built.

Both take the (R, 256, 28, 28) ROI features of the decoder's stride-4 map and give
(R, 512, 28, 28) to the predictor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from preprocess.densepose.backbone import Conv2d

ASPP_DILATIONS = (6, 12, 56)


class DensePoseHeadKind(enum.Enum):
    """The DensePose head, by detectron2's ``MODEL.ROI_DENSEPOSE_HEAD.NAME``."""

    CONV_X = "DensePoseV1ConvXHead"
    DEEPLAB = "DensePoseDeepLabHead"


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


class ConvXHead(nn.Module):
    """``n`` 3×3 convolutions with bias and ReLU."""

    def __init__(self, cin: int, dim: int, n: int):
        super().__init__()
        for i in range(n):
            self.add_module(f"body_conv_fcn{i + 1}", Conv2d(cin if i == 0 else dim, dim, 3, relu=True))
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n):
            x = getattr(self, f"body_conv_fcn{i + 1}")(x)
        return x


def _gn_relu_branch(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    """conv (no bias) -> GroupNorm(32) -> ReLU; state names ``0.weight``, ``1.weight``, ``1.bias``."""
    pad = dilation if kernel == 3 else 0
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.GroupNorm(32, cout), nn.ReLU())


class ImagePoolingBranch(nn.Sequential):
    """Global average -> 1×1 conv -> GroupNorm -> ReLU, spread back over the map (bilinear);
    state names ``1.weight``, ``2.weight``, ``2.bias``."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(32, cout),
                         nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Five parallel branches (1×1; 3×3 at each dilation; image pooling) concatenated, then a
    1×1 projection (no bias) and ReLU: (R, C, h, w) -> (R, ``cout``, h, w)."""

    def __init__(self, cin: int, cout: int, dilations: tuple[int, ...] = ASPP_DILATIONS):
        super().__init__()
        branches = [_gn_relu_branch(cin, cout, 1)] + [_gn_relu_branch(cin, cout, 3, d) for d in dilations]
        self.convs = nn.ModuleList(branches + [ImagePoolingBranch(cin, cout)])
        self.project = nn.Sequential(nn.Conv2d(len(self.convs) * cout, cout, 1, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Module):
    """ASPP (keeping the channel count), then ``n`` 3×3 convolutions with GroupNorm and ReLU."""

    def __init__(self, cin: int, dim: int, n: int):
        super().__init__()
        self.ASPP = ASPP(cin, cin)
        for i in range(n):
            self.add_module(f"body_conv_fcn{i + 1}", Conv2d(cin if i == 0 else dim, dim, 3, norm="gn", relu=True))
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ASPP(x)
        for i in range(self.n):
            x = getattr(self, f"body_conv_fcn{i + 1}")(x)
        return x


def build_head(kind: DensePoseHeadKind, cin: int, dim: int, n: int) -> nn.Module:
    if kind is DensePoseHeadKind.CONV_X:
        return ConvXHead(cin, dim, n)
    if kind is DensePoseHeadKind.DEEPLAB:
        return DeepLabHead(cin, dim, n)
    raise ValueError(f"unknown DensePose head {kind!r}")


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
    """4×4 stride-2 deconvolutions (28 -> 56), then ×2 bilinear (-> 112)."""

    def __init__(self, dim: int, num_parts: int, num_coarse: int):
        super().__init__()
        deconv = lambda cout: nn.ConvTranspose2d(dim, cout, 4, stride=2, padding=1)
        self.ann_index_lowres = deconv(num_coarse)
        self.index_uv_lowres = deconv(num_parts + 1)
        self.u_lowres = deconv(num_parts + 1)
        self.v_lowres = deconv(num_parts + 1)

    def forward(self, x: torch.Tensor) -> ChartOutput:
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
        return ChartOutput(up(self.ann_index_lowres(x)), up(self.index_uv_lowres(x)), up(self.u_lowres(x)),
                           up(self.v_lowres(x)))
