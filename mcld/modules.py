"""MCLD's two small networks: the pose guider (DensePose image -> a residual on the denoising UNet's
``conv_in`` output) and the face projector (a Perceiver resampler: one ArcFace embedding -> 16
cross-attention tokens). Parameter names are those of the published checkpoints."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# -- pose guider ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoseGuiderConfig:
    out_channels: int = 320  # the denoising UNet's block_out_channels[0]
    in_channels: int = 3  # the DensePose image: R = V·255, G = U·255, B = part index, /255
    widths: tuple[int, ...] = (16, 32, 96, 256)  # each step after the first halves the size


PUBLISHED_POSE_GUIDER = PoseGuiderConfig()


class PoseGuider(nn.Module):
    """conv -> silu, then per width step (conv, silu, stride-2 conv, silu), then a conv to the UNet's
    width: (B, 3, H, W) -> (B, out_channels, H / 2**(len(widths) - 1), ...)."""

    def __init__(self, config: PoseGuiderConfig = PUBLISHED_POSE_GUIDER):
        super().__init__()
        w = config.widths
        self.conv_in = nn.Conv2d(config.in_channels, w[0], 3, padding=1)
        layers = []
        for a, b in itertools.pairwise(w):
            layers += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(layers)
        self.conv_out = nn.Conv2d(w[-1], config.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(pose))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


# -- face projector -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectorConfig:
    dim: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = 16  # the face tokens (the IP-Adapter branch's tokens)
    embedding_dim: int = 512  # ArcFace
    output_dim: int = 768  # the UNets' cross_attention_dim
    ff_mult: int = 4


PUBLISHED_PROJECTOR = ProjectorConfig()


class PerceiverAttention(nn.Module):
    """The learned queries attend to [input tokens; queries]."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, inner = heads, dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)  # (B, n, dim), (B, q, dim)
        b, q, _ = latents.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, n, dim_head)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        query, key, value = split(self.to_q(latents)), split(k), split(v)
        # the scale split over both factors (as the published model computes it: steadier in float16)
        s = 1 / math.sqrt(math.sqrt(query.shape[-1]))
        weight = ((query * s) @ (key * s).transpose(-2, -1)).float().softmax(dim=-1).to(query.dtype)
        out = (weight @ value).transpose(1, 2).reshape(b, q, -1)
        return self.to_out(out)


class Resampler(nn.Module):
    """(B, n, embedding_dim) -> (B, num_queries, output_dim); ``layers.i`` = [attention, feed-forward]."""

    def __init__(self, config: ProjectorConfig = PUBLISHED_PROJECTOR):
        super().__init__()
        c = config
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim**0.5)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)
        ff = lambda: nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, c.dim * c.ff_mult, bias=False), nn.GELU(),
                                   nn.Linear(c.dim * c.ff_mult, c.dim, bias=False))
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads), ff()])
                                    for _ in range(c.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
