"""LPIPS v0.1 (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", CVPR 2018) in plain PyTorch, as torchmetrics' ``LearnedPerceptualImagePatchSimilarity``
computes it: the Leffa authors' evaluation uses ``net_type='squeeze'``; ``alex`` is lpips' default.

For images x0, x1 in [-1, 1]: scale each with lpips' shift/scale, take the backbone's ReLU
outputs at L taps, unit-normalise each feature vector over channels (``x / sqrt(1e-8 + |x|²)``,
torchmetrics' form), square the difference, weight the channels with the layer's 1×1 linear
weights (no bias), average over space and sum over layers.

Backbones are torchvision's ``features`` stacks with the same indices, so the published
``squeezenet1_1-b8a52dc0.pth`` / ``alexnet-owt-7be5be79.pth`` load as they are (their classifier
is checked but not run); the linear layers load from lpips' ``squeeze.pth`` / ``alex.pth``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from evaluation.weights import ALEXNET, LPIPS_ALEX, LPIPS_SQUEEZE, SQUEEZENET, load_published
from weightfiles.urls import UrlFile

SHIFT = (-0.030, -0.088, -0.188)  # lpips' ScalingLayer: ImageNet statistics in [-1, 1] units
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-8


class LpipsNet(str, Enum):
    SQUEEZE = "squeeze"  # the Leffa authors' (torchmetrics, net_type='squeeze')
    ALEX = "alex"  # lpips' default

    @property
    def files(self) -> tuple[UrlFile, UrlFile]:
        """(backbone, linear layers)."""
        return (SQUEEZENET, LPIPS_SQUEEZE) if self is LpipsNet.SQUEEZE else (ALEXNET, LPIPS_ALEX)


class Fire(nn.Module):
    """SqueezeNet's fire module: 1×1 squeeze, then 1×1 and 3×3 expands side by side."""

    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(3, stride=2, ceil_mode=True)


def _squeezenet() -> list[nn.Module]:
    return [nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), _pool(), Fire(64, 16, 64), Fire(128, 16, 64), _pool(),
            Fire(128, 32, 128), Fire(256, 32, 128), _pool(), Fire(256, 48, 192), Fire(384, 48, 192),
            Fire(384, 64, 256), Fire(512, 64, 256)]


def _alexnet() -> list[nn.Module]:  # without the last max pool (index 12), which follows the last tap
    return [nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]


@dataclass(frozen=True)
class BackboneSpec:
    layers: Callable[[], list[nn.Module]]  # torchvision's ``features``, same indices
    taps: tuple[int, ...]  # the ReLUs after which lpips' slices end
    channels: tuple[int, ...]  # at the taps
    unused: Mapping[str, tuple[int, ...]]  # the classifier of the published file


SPECS = {
    LpipsNet.SQUEEZE: BackboneSpec(_squeezenet, (1, 4, 7, 9, 10, 11, 12), (64, 128, 256, 384, 384, 512, 512),
                                   {"classifier.1.weight": (1000, 512, 1, 1), "classifier.1.bias": (1000,)}),
    LpipsNet.ALEX: BackboneSpec(_alexnet, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256),
                                {"classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
                                 "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,),
                                 "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)}),
}


class Backbone(nn.Module):
    """SqueezeNet 1.1's or AlexNet's ``features``; returns the ReLU outputs that LPIPS compares."""

    def __init__(self, net: LpipsNet):
        super().__init__()
        self.spec = SPECS[net]
        self.features = nn.Sequential(*self.spec.layers())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.spec.taps:
                out.append(x)  # (B, C_l, H_l, W_l)
        return out


class LinearLayers(nn.Module):
    """lpips' ``lin0 ... linL``: one 1×1 conv per tap, ``linK.model.1.weight`` (1, C_l, 1, 1)
    (index 0 is lpips' dropout, a no-op at inference)."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        for k, c in enumerate(channels):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))
            self.add_module(f"lin{k}", lin)

    def forward(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"lin{k}").model(x)


class LPIPS(nn.Module):
    """(B, 3, H, W) × 2 in [-1, 1] -> (B,) distances."""

    def __init__(self, net: LpipsNet = LpipsNet.SQUEEZE):
        super().__init__()
        self.net = net
        self.backbone = Backbone(net)
        self.linear = LinearLayers(SPECS[net].channels)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_files(cls, net: LpipsNet, backbone: str | Path, linear: str | Path,
                   device: str | torch.device = "cpu") -> LPIPS:
        model = cls(net)
        load_published(model.backbone, backbone, SPECS[net].unused)
        load_published(model.linear, linear)
        return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The unit-normalised backbone features of x in [-1, 1]."""
        return [f / torch.sqrt(EPS + (f * f).sum(1, keepdim=True))
                for f in self.backbone((x - self.shift) / self.scale)]

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        f0, f1 = self.features(x0), self.features(x1)
        return sum(self.linear(k, (a - b) ** 2).mean((1, 2, 3)) for k, (a, b) in enumerate(zip(f0, f1)))
