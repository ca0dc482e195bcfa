"""The detector's backbone: ResNet-50 or -101 (frozen batch norm, stride in the 1×1 conv, as
detectron2's MSRA models) and the FPN over it (P2–P6, 256 channels).

Module names follow detectron2's, so that the published state dicts load as they are
(``backbone.bottom_up.res4.22.conv2.norm.running_var``, ``backbone.fpn_lateral3.weight``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# residual blocks per stage res2..res5
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


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
    """A convolution with an optional norm (``.norm``) and ReLU after it.

    ``norm``: "" none (the conv has a bias), "frozen_bn" (``FrozenBatchNorm2d``) or "gn"
    (``nn.GroupNorm`` with 32 groups, eps 1e-5); with a norm the conv has no bias.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, *, norm: str = "",
                 relu: bool = False):
        super().__init__(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=not norm)
        if norm == "frozen_bn":
            self.norm = FrozenBatchNorm2d(cout)
        elif norm == "gn":
            self.norm = nn.GroupNorm(32, cout)
        elif norm == "":
            self.norm = None
        else:
            raise ValueError(f"unknown norm {norm!r}")
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        bn = "frozen_bn"
        self.shortcut = Conv2d(cin, cout, 1, stride, norm=bn) if cin != cout else None
        self.conv1 = Conv2d(cin, mid, 1, stride, norm=bn, relu=True)  # stride in the 1×1 (MSRA)
        self.conv2 = Conv2d(mid, mid, 3, norm=bn, relu=True)
        self.conv3 = Conv2d(mid, cout, 1, norm=bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(self.conv3(self.conv2(self.conv1(x))) + skip)


class Stem(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.conv1 = Conv2d(3, width, 7, 2, norm="frozen_bn", relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """ResNet body: stem, then res2..res5 (strides 4..32, 4·width..32·width channels; the
    published models: width 64, 256..2048 channels)."""

    def __init__(self, blocks: tuple[int, int, int, int], width: int = 64):
        super().__init__()
        self.stem = Stem(width)
        cin, mid = width, width
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

    def __init__(self, blocks: tuple[int, int, int, int], channels: int, width: int = 64):
        super().__init__()
        self.bottom_up = ResNet(blocks, width)
        for level, cin in zip(range(2, 6), (4 * width, 8 * width, 16 * width, 32 * width)):
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
