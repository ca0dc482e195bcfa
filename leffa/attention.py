"""Leffa's attention processors (spec §3), installed on stock diffusers UNets.

Three processors change the behaviour of the stock ``UNet2DConditionModel``:

* ``ReferenceCaptureProcessor`` on every ``attn1`` of the reference UNet: plain
  self-attention that also stores its (already normalised) input as that layer's
  reference feature, keyed by the layer's name.
* ``ReferenceAttnProcessor`` on every ``attn1`` of the generative UNet: queries from the
  generative tokens ``x`` only, keys/values from ``[x; r]``, where ``r`` is the reference
  feature of the *same-named* reference layer. This equals the original's "concatenate
  before attn1, keep the first n outputs" but does half the query work.
* ``SkipAttnProcessor`` on every ``attn2`` of both UNets: returns its input, so the
  block computes ``h = h + norm2(h)`` as the published weights were trained with.

All processors of one ``LeffaModel`` share a ``LeffaAttentionState`` that holds the
reference features, an optional ``AttentionRecorder`` and the K/V cache used when the
reference features are reused across steps (reference acceleration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DConditionModel

    from leffa.recording import AttentionRecorder, FlowRecorder


@dataclass
class LeffaAttentionState:
    """State shared by the processors of one model (never by two models)."""

    # layer name (e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1") -> (B, n, c)
    ref_features: dict[str, torch.Tensor] = field(default_factory=dict)
    # bumped each time the reference UNet runs, so cached K/V know they are stale
    version: int = 0
    # when True, the generative processors keep to_k(r)/to_v(r) until `version` changes
    cache_reference_kv: bool = False
    kv_cache: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    recorder: AttentionRecorder | FlowRecorder | None = None
    # number of attn1 layers; inside run_reference_unet (stop_when_complete) the reference
    # pass stops once that many features are captured
    num_layers: int = 0
    stop_when_complete: bool = False

    def new_reference_pass(self) -> None:
        self.ref_features.clear()
        self.kv_cache.clear()
        self.version += 1

    def clear(self) -> None:
        """Free every tensor held (after a generation)."""
        self.ref_features.clear()
        self.kv_cache.clear()
        self.recorder = None
        self.cache_reference_kv = False


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    # (B, n, heads*d) -> (B, heads, n, d)
    b, n, inner = x.shape
    return x.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)


def _merge_heads_and_project(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    # (B, heads, n, d) -> (B, n, c)
    b, h, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * d)
    return attn.to_out[1](attn.to_out[0](out))


def self_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Plain self-attention with ``attn``'s weights, as diffusers' ``AttnProcessor2_0``."""
    q, k, v = (_heads(attn, proj(x)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    return _merge_heads_and_project(attn, F.scaled_dot_product_attention(q, k, v))


def check_supported(name: str, attn: Attention) -> None:
    """Our processors implement the plain attention path of SD/SDXL transformer blocks."""
    unsupported = {
        "group_norm": attn.group_norm is not None,
        "spatial_norm": attn.spatial_norm is not None,
        "norm_q/norm_k": attn.norm_q is not None or attn.norm_k is not None,
        "residual_connection": bool(attn.residual_connection),
        "rescale_output_factor": attn.rescale_output_factor != 1.0,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise NotImplementedError(f"{name}: Leffa attention does not support {', '.join(bad)}")


class ReferenceComplete(Exception):
    """Raised inside the reference UNet once every reference feature is captured: the rest of
    its forward pass (the last block's attention and FF, the output convs) is never used."""


class ReferenceCaptureProcessor:
    """Reference UNet ``attn1``: self-attention that stores its input as the reference feature."""

    def __init__(self, name: str, state: LeffaAttentionState):
        self.name, self.state = name, state

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None) -> torch.Tensor:
        features = self.state.ref_features
        features[self.name] = hidden_states  # (B, n, c), = norm1(h)
        if self.state.stop_when_complete and len(features) == self.state.num_layers:
            raise ReferenceComplete
        return self_attention(attn, hidden_states)


def run_reference_unet(reference_unet: UNet2DConditionModel, state: LeffaAttentionState,
                       latents: torch.Tensor, timestep: torch.Tensor) -> None:
    """Run the reference UNet until every layer's reference feature is in ``state``."""
    state.new_reference_pass()
    state.stop_when_complete = True
    try:
        reference_unet(latents, timestep, encoder_hidden_states=None, return_dict=False)
    except ReferenceComplete:
        return
    finally:
        state.stop_when_complete = False
    raise RuntimeError(f"the reference UNet captured {len(state.ref_features)} of "
                       f"{state.num_layers} reference features")


class ReferenceAttnProcessor:
    """Generative UNet ``attn1``: queries from ``x``, keys/values from ``[x; r]`` (spec §3)."""

    def __init__(self, name: str, state: LeffaAttentionState):
        self.name, self.state = name, state

    def _reference_kv(self, attn: Attention, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        if state.cache_reference_kv:
            hit = state.kv_cache.get(self.name)
            if hit is not None and hit[0] == state.version:
                return hit[1], hit[2]
        k_r, v_r = _heads(attn, attn.to_k(r)), _heads(attn, attn.to_v(r))
        if state.cache_reference_kv:
            state.kv_cache[self.name] = (state.version, k_r, v_r)
        return k_r, v_r

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None) -> torch.Tensor:
        x = hidden_states  # (B, n, c)
        r = self.state.ref_features.get(self.name)
        if r is None:
            raise RuntimeError(f"no reference feature for layer {self.name}: run the reference UNet first")
        if r.shape[0] != x.shape[0] or r.shape[2] != x.shape[2]:
            raise RuntimeError(f"{self.name}: reference feature {tuple(r.shape)} does not fit {tuple(x.shape)}")
        q = _heads(attn, attn.to_q(x))  # (B, h, n, d)
        k_r, v_r = self._reference_kv(attn, r.to(x.dtype))  # (B, h, n_r, d)
        k = torch.cat([_heads(attn, attn.to_k(x)), k_r], dim=2)  # (B, h, n + n_r, d)
        v = torch.cat([_heads(attn, attn.to_v(x)), v_r], dim=2)
        recorder = self.state.recorder
        if recorder is not None and recorder.wants(self.name):
            recorder.record(self.name, q, k_r, attn.scale)
        return _merge_heads_and_project(attn, F.scaled_dot_product_attention(q, k, v))


class SkipAttnProcessor:
    """``attn2`` of both UNets: returns its input (there is no text encoder)."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None) -> torch.Tensor:
        return hidden_states


def _layer_names(unet: UNet2DConditionModel) -> list[str]:
    names = [key.removesuffix(".processor") for key in unet.attn_processors]
    odd = [n for n in names if not n.endswith((".attn1", ".attn2"))]
    if odd:
        raise NotImplementedError(f"unexpected attention layers in the UNet: {odd[:3]}")
    return names


def install_processors(unet: UNet2DConditionModel, reference_unet: UNet2DConditionModel,
                       state: LeffaAttentionState) -> None:
    """Install Leffa's processors on the generative ``unet`` and the ``reference_unet``."""
    gen_names, ref_names = _layer_names(unet), _layer_names(reference_unet)
    if gen_names != ref_names:
        raise ValueError("the generative and reference UNets have different attention layers")
    modules = dict(unet.named_modules())
    for name in gen_names:
        check_supported(name, modules[name])
    state.num_layers = sum(n.endswith("attn1") for n in gen_names)
    skip = SkipAttnProcessor()
    unet.set_attn_processor({
        f"{n}.processor": ReferenceAttnProcessor(n, state) if n.endswith("attn1") else skip
        for n in gen_names
    })
    reference_unet.set_attn_processor({
        f"{n}.processor": ReferenceCaptureProcessor(n, state) if n.endswith("attn1") else skip
        for n in ref_names
    })


def self_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    """Names of the ``attn1`` layers, in module order."""
    return [n for n in _layer_names(unet) if n.endswith("attn1")]
