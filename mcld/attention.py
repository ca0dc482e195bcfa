"""MCLD's attention processors on stock diffusers UNets, and the state they share.

* Reference features: the reference UNet runs once, on the texture map's latents at timestep 0. Its
  ``ReferenceWriter`` processors (every self-attention) keep their input (the transformer block's
  ``norm1`` output) in float16, as the published pipeline's feature bank does. In the denoising UNet
  each ``ReferenceReader`` (the self-attention of the same block) attends to ``[x; feature]``; under
  classifier-free guidance the unconditional rows (the first half of the batch) run plain
  self-attention, without reference features. So the reference pass runs on the conditional rows
  only (the published pipeline also runs the unconditional ones, whose features it never reads).
* Multi-focal cross-attention (``MultiFocalCrossAttention``, the denoising UNet's cross-attention):
  the prompt is ``[clip(source), clip(texture), face_1..face_n]``; down blocks attend to the source
  token, the mid block to both, up blocks to the texture token (the published pipeline's stage-wise
  prompts), and a decoupled IP-Adapter branch (``to_k_ip``/``to_v_ip``) to the n face tokens, added
  with ``ip_scale`` (0.5).
* The pose guider's features are added to the denoising UNet's ``conv_in`` output (a forward hook).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

FEATURE_DTYPE = torch.float16  # the published pipeline's bank dtype, whatever the model's


@dataclass
class MCLDAttentionState:
    """What the processors share during one generation (``MCLDModel.session`` clears it)."""

    features: dict[str, torch.Tensor] = field(default_factory=dict)  # block name -> (B, L, C) float16
    recording: bool = False  # the reference pass: writers keep their input
    uncond_rows: int = 0  # leading rows of the denoising batch without reference features (CFG)
    pose: torch.Tensor | None = None  # (rows, C0, h, w): added to the denoising UNet's conv_in output

    def clear(self) -> None:
        self.features.clear()
        self.recording, self.uncond_rows, self.pose = False, 0, None


class Stage(str, Enum):
    """Where a cross-attention layer sits, which decides its CLIP tokens (prompt ``[source, texture]``)."""

    DOWN = "down"
    MID = "mid"
    UP = "up"

    @property
    def clip_tokens(self) -> slice:
        return {Stage.DOWN: slice(0, 1), Stage.MID: slice(0, 2), Stage.UP: slice(1, 2)}[self]

    @classmethod
    def of(cls, name: str) -> Stage:
        return cls(name.split("_", 1)[0])  # "down_blocks.0..." -> DOWN, "mid_block..." -> MID


CLIP_TOKENS = 2  # prompt = [clip(source), clip(texture), face tokens]


def attend(attn: Attention, x: torch.Tensor, context: torch.Tensor,
           to_k: nn.Module | None = None, to_v: nn.Module | None = None) -> torch.Tensor:
    """Multi-head attention of ``x`` (B, L, C) over ``context`` (B, M, D), before ``to_out``."""
    b = x.shape[0]
    split = lambda t: t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
    q = split(attn.to_q(x))
    k, v = split((to_k or attn.to_k)(context)), split((to_v or attn.to_v)(context))
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, d)
    return out.transpose(1, 2).reshape(b, -1, attn.heads * out.shape[-1]).to(q.dtype)


def project_out(attn: Attention, h: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](h)) / attn.rescale_output_factor


def _check_plain(attn: Attention, name: str) -> None:
    """The processors implement SD1.5's attention layers only (no norms or residual inside)."""
    if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_cross or attn.residual_connection:
        raise ValueError(f"{name}: unsupported attention layer (group/spatial/cross norm or residual)")


class ReferenceWriter:
    """Reference UNet self-attention: keeps its input while recording, then attends as usual."""

    def __init__(self, state: MCLDAttentionState, name: str):
        self.state, self.name = state, name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None) -> torch.Tensor:
        if self.state.recording:
            self.state.features[self.name] = hidden_states.detach().to(FEATURE_DTYPE)
        return project_out(attn, attend(attn, hidden_states, hidden_states))


class ReferenceReader:
    """Denoising UNet self-attention over [x; the same block's reference feature] (module docstring)."""

    def __init__(self, state: MCLDAttentionState, name: str):
        self.state, self.name = state, name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None) -> torch.Tensor:
        x, u = hidden_states, self.state.uncond_rows  # (rows, L, C)
        feature = self.state.features.get(self.name)
        if feature is None:
            raise RuntimeError(f"no reference feature for {self.name}: run the reference UNet first")
        cond = x[u:]
        out = attend(attn, cond, torch.cat([cond, feature.to(x.dtype)], dim=1))  # (B, L, C)
        if u:
            out = torch.cat([attend(attn, x[:u], x[:u]), out])
        return project_out(attn, out)


class MultiFocalCrossAttention(nn.Module):
    """Cross-attention to the stage's CLIP tokens plus ``scale`` × the IP-Adapter branch over the last
    ``num_tokens`` tokens. Its projections are parameters of the denoising UNet (published names
    ``...attn2.processor.to_k_ip.weight`` / ``to_v_ip.weight``)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, stage: Stage, num_tokens: int, scale: float):
        super().__init__()
        self.stage, self.num_tokens, self.scale = stage, num_tokens, scale
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def forward(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                attention_mask=None, temb=None) -> torch.Tensor:
        prompt = encoder_hidden_states  # (rows, CLIP_TOKENS + num_tokens, D)
        if prompt is None or prompt.shape[1] != CLIP_TOKENS + self.num_tokens:
            got = None if prompt is None else tuple(prompt.shape)
            raise ValueError(f"the prompt must have {CLIP_TOKENS} + {self.num_tokens} tokens, got {got}")
        clip, face = prompt[:, self.stage.clip_tokens], prompt[:, CLIP_TOKENS:]
        h = attend(attn, hidden_states, clip)
        h = h + self.scale * attend(attn, hidden_states, face, self.to_k_ip, self.to_v_ip)
        return project_out(attn, h)


def _attention_layers(unet: nn.Module, which: str) -> Iterator[tuple[str, Attention]]:
    """(block name, layer) for every transformer block's ``attn1`` or ``attn2``."""
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("." + which):
            yield name[: -len(which) - 1], module


def install_processors(denoising_unet: nn.Module, reference_unet: nn.Module, state: MCLDAttentionState,
                       num_tokens: int, ip_scale: float) -> None:
    """Writers on the reference UNet's self-attention, readers on the denoising UNet's, multi-focal
    cross-attention on the denoising UNet's (new ``to_k_ip``/``to_v_ip``, on the UNet's device and
    dtype), and the pose hook on its ``conv_in``. The reference UNet keeps its cross-attention."""
    writers = dict(_attention_layers(reference_unet, "attn1"))
    readers = dict(_attention_layers(denoising_unet, "attn1"))
    if writers.keys() != readers.keys():
        raise ValueError("the reference and denoising UNets must have the same transformer blocks")
    for name, attn in writers.items():
        _check_plain(attn, name)
        attn.set_processor(ReferenceWriter(state, name))
    for name, attn in readers.items():
        _check_plain(attn, name)
        attn.set_processor(ReferenceReader(state, name))
    weight = denoising_unet.conv_in.weight
    for name, attn in _attention_layers(denoising_unet, "attn2"):
        _check_plain(attn, name)
        processor = MultiFocalCrossAttention(attn.to_q.out_features, attn.to_k.in_features, Stage.of(name),
                                             num_tokens, ip_scale)
        attn.set_processor(processor.to(weight.device, weight.dtype))
    denoising_unet.conv_in.register_forward_hook(lambda module, args, out: _add_pose(state, out))


def _add_pose(state: MCLDAttentionState, out: torch.Tensor) -> torch.Tensor:
    if state.pose is None:
        raise RuntimeError("the denoising UNet runs with the pose guider's features: none were set")
    return out + state.pose.to(out.dtype)
