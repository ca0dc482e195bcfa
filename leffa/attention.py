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
reference features, an optional ``AttentionRecorder``, the K/V cache used when the
reference features are reused across steps (reference acceleration), and an optional
``AttentionFocus`` (experimental: sharper reference attention at inference, issue 15).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from errors import OptionError

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DConditionModel

    from leffa.recording import AttentionRecorder, FlowRecorder


@dataclass(frozen=True)
class AttentionFocus:
    """Training-free focus of the generative-over-reference attention (experimental; issue 15).

    In the focused layers and steps, the logits of the reference keys are divided by a
    temperature τ, the paper's τ (Eq. 2, there only for the Leffa loss's attention map) applied
    to the attention the model uses: ``softmax([q·k_x·s, q·k_r·s / τ])`` with ``s = 1/√d``.
    τ < 1 sharpens the attention over the reference, τ = 1 changes nothing, τ > 1 flattens it.
    As only the reference logits are scaled, the share of attention the reference gets
    against the generative tokens' own keys changes too; ``own_keys`` divides those logits by
    τ as well (then the whole softmax has temperature τ).

    Args:
        temperature: τ > 0.
        levels: how many token-grid resolutions are focused, counted from the finest layers
            with attention: 1 = only the finest (the latent-resolution layers of SD1.5, half
            the latent resolution for SDXL), 2 = also the next coarser one, ...; more than the
            model has = every layer.
        steps: ``(start, end)``, fractions of the denoising run: step i of n is focused when
            ``start <= i / n < end``. ``(0, 1)``: every step; ``(0, 0.5)``: the noisier half.
        own_keys: also divide the logits of the generative tokens' own keys by τ.
    """

    temperature: float
    levels: int = 1
    steps: tuple[float, float] = (0.0, 1.0)
    own_keys: bool = False

    def __post_init__(self) -> None:
        t, levels = self.temperature, self.levels
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0:
            raise OptionError(f"the attention focus temperature must be a finite number > 0, got {t!r}")
        if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 1:
            raise OptionError(f"the attention focus levels must be a whole number >= 1 (1 = the finest "
                              f"token grid only), got {levels!r}")
        try:
            start, end = (float(v) for v in self.steps)
        except (TypeError, ValueError):
            raise OptionError(f"the attention focus steps must be (start, end) fractions, "
                              f"got {self.steps!r}") from None
        if not 0.0 <= start < end <= 1.0:  # False for NaN too
            raise OptionError(f"the attention focus steps must be (start, end) with 0 <= start < end <= 1, "
                              f"got {self.steps!r}")
        for name, value in (("temperature", float(t)), ("levels", int(levels)), ("steps", (start, end))):
            object.__setattr__(self, name, value)

    def covers(self, level: int, step: int, num_steps: int) -> bool:
        """Whether a layer at resolution rank ``level`` (0 = finest) is focused at step ``step``
        of ``num_steps``."""
        start, end = self.steps
        return level < self.levels and start <= step / num_steps < end


def focus_keys(focus: AttentionFocus, k_x: torch.Tensor,
               k_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide the reference keys (and with ``own_keys`` the own keys) by τ. The logits q·k·s are
    linear in k, so this divides exactly those logits by τ, at the cost of one multiply, and
    scaled dot-product attention runs unchanged on the concatenated keys."""
    k_r = k_r / focus.temperature
    return (k_x / focus.temperature if focus.own_keys else k_x), k_r


@dataclass
class LeffaAttentionState:
    """State shared by the processors of one model (never by two models)."""

    # layer name (e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1") -> (B, n, c)
    ref_features: dict[str, torch.Tensor] = field(default_factory=dict)
    # when True, the generative processors keep to_k(r)/to_v(r) until the next reference pass,
    # which clears them (no pass counter is compared inside the UNet: a compiled UNet would
    # recompile for every new value)
    cache_reference_kv: bool = False
    kv_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    recorder: AttentionRecorder | FlowRecorder | None = None
    # number of attn1 layers; inside run_reference_unet (stop_when_complete) the reference
    # pass stops once that many features are captured
    num_layers: int = 0
    stop_when_complete: bool = False
    # whether run_reference_unet stops there; off under group offloading (leffa.memory), whose
    # hooks need every block's forward to end
    reference_early_exit: bool = True
    attention_focus: AttentionFocus | None = None
    # the denoising step (0-based) of num_steps, set by the pipeline's loop for the focus's steps
    step: int | None = None
    num_steps: int = 0
    # the rows of the reference features the generative batch uses: None all, or the conditional
    # half at a step outside the guidance interval when the features are reused (leffa.sampling)
    reference_rows: slice | None = None

    def set_step(self, step: int | None, num_steps: int = 0) -> None:
        self.step, self.num_steps = step, num_steps

    def focus_at(self, level: int) -> AttentionFocus | None:
        """The focus for a layer at resolution rank ``level`` now: None when off, or not for
        this layer or step."""
        focus = self.attention_focus
        if focus is None or level >= focus.levels:
            return None
        if self.step is None:
            raise RuntimeError("an attention focus needs the denoising step: set_step(step, num_steps) first")
        return focus if focus.covers(level, self.step, self.num_steps) else None

    def new_reference_pass(self) -> None:
        self.ref_features.clear()
        self.kv_cache.clear()

    def clear(self) -> None:
        """Free every tensor held (after a generation)."""
        self.ref_features.clear()
        self.kv_cache.clear()
        self.recorder = None
        self.cache_reference_kv = False
        self.attention_focus = None
        self.reference_rows = None
        self.set_step(None)


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    # (B, n, heads*d) -> (B, heads, n, d)
    b, n, inner = x.shape
    return x.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)


def merge_heads_and_project(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    # (B, heads, n, d) -> (B, n, c)
    b, h, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * d)
    return attn.to_out[1](attn.to_out[0](out))


def qkv_heads(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v of ``x``, (B, heads, n, d) each: one product with the fused ``to_qkv`` once
    ``attn.fuse_projections()`` made it (``leffa.speed``), else three."""
    if attn.fused_projections:
        return tuple(_heads(attn, t) for t in attn.to_qkv(x).chunk(3, dim=-1))
    return tuple(_heads(attn, proj(x)) for proj in (attn.to_q, attn.to_k, attn.to_v))


def self_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Plain self-attention with ``attn``'s weights, as diffusers' ``AttnProcessor2_0``."""
    q, k, v = qkv_heads(attn, x)
    return merge_heads_and_project(attn, F.scaled_dot_product_attention(q, k, v))


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
    """Run the reference UNet until every layer's reference feature is in ``state`` (to its end
    when ``state.reference_early_exit`` is off)."""
    state.new_reference_pass()
    state.stop_when_complete = state.reference_early_exit
    try:
        reference_unet(latents, timestep, encoder_hidden_states=None, return_dict=False)
    except ReferenceComplete:
        return
    finally:
        state.stop_when_complete = False
    if not state.reference_early_exit and len(state.ref_features) == state.num_layers:
        return
    raise RuntimeError(f"the reference UNet captured {len(state.ref_features)} of "
                       f"{state.num_layers} reference features")


class ReferenceAttnProcessor:
    """Generative UNet ``attn1``: queries from ``x``, keys/values from ``[x; r]`` (spec §3).

    ``level``: the rank of the layer's token grid from the finest (0), for an ``AttentionFocus``."""

    def __init__(self, name: str, state: LeffaAttentionState, level: int = 0):
        self.name, self.state, self.level = name, state, level

    def _reference_kv(self, attn: Attention, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        if state.cache_reference_kv:
            hit = state.kv_cache.get(self.name)
            if hit is not None:
                return hit
        k_r, v_r = _heads(attn, attn.to_k(r)), _heads(attn, attn.to_v(r))
        if state.cache_reference_kv:
            state.kv_cache[self.name] = (k_r, v_r)
        return k_r, v_r

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None) -> torch.Tensor:
        x = hidden_states  # (B, n, c)
        r = self.state.ref_features.get(self.name)
        if r is None:
            raise RuntimeError(f"no reference feature for layer {self.name}: run the reference UNet first")
        rows = self.state.reference_rows
        used = r.shape[0] if rows is None else len(range(r.shape[0])[rows])
        if used != x.shape[0] or r.shape[2] != x.shape[2]:
            raise RuntimeError(f"{self.name}: reference feature {tuple(r.shape)} (rows {rows}) does not fit "
                               f"{tuple(x.shape)}")
        q, k_x, v_x = qkv_heads(attn, x)  # (B, h, n, d) each
        k_r, v_r = self._reference_kv(attn, r.to(x.dtype))  # (B, h, n_r, d)
        if rows is not None:  # the whole batch's K/V stay cached for the steps that guide
            k_r, v_r = k_r[rows], v_r[rows]
        focus = self.state.focus_at(self.level)
        if focus is not None:
            k_x, k_r = focus_keys(focus, k_x, k_r)
        k = torch.cat([k_x, k_r], dim=2)  # (B, h, n + n_r, d)
        v = torch.cat([v_x, v_r], dim=2)
        recorder = self.state.recorder
        if recorder is not None and recorder.wants(self.name):
            recorder.record(self.name, q, k_r, attn.scale)
        return merge_heads_and_project(attn, F.scaled_dot_product_attention(q, k, v))


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


def downsampling(name: str, num_blocks: int) -> int:
    """How often the latent grid is halved at layer ``name`` of a diffusers
    ``UNet2DConditionModel`` with ``num_blocks`` down and up blocks: every block but the last
    ends with its down- or upsampler, so down block i runs at 2^i, the mid block at 2^(n−1)
    and up block j at 2^(n−1−j)."""
    block, _, rest = name.partition(".")
    if block == "mid_block":
        return 2 ** (num_blocks - 1)
    index = int(rest.partition(".")[0])
    if block == "down_blocks":
        return 2 ** index
    if block == "up_blocks":
        return 2 ** (num_blocks - 1 - index)
    raise NotImplementedError(f"unexpected attention layer {name}")


def resolution_levels(names: list[str], num_blocks: int) -> dict[str, int]:
    """Per layer, the rank of its token grid among the layers' grids: 0 = the finest."""
    factors = {n: downsampling(n, num_blocks) for n in names}
    rank = {f: i for i, f in enumerate(sorted(set(factors.values())))}
    return {n: rank[f] for n, f in factors.items()}


def install_processors(unet: UNet2DConditionModel, reference_unet: UNet2DConditionModel,
                       state: LeffaAttentionState) -> None:
    """Install Leffa's processors on the generative ``unet`` and the ``reference_unet``."""
    gen_names, ref_names = _layer_names(unet), _layer_names(reference_unet)
    if gen_names != ref_names:
        raise ValueError("the generative and reference UNets have different attention layers")
    modules = dict(unet.named_modules())
    for name in gen_names:
        check_supported(name, modules[name])
    attn1 = [n for n in gen_names if n.endswith("attn1")]
    state.num_layers = len(attn1)
    levels = resolution_levels(attn1, len(unet.config.block_out_channels))
    skip = SkipAttnProcessor()
    unet.set_attn_processor({
        f"{n}.processor": ReferenceAttnProcessor(n, state, levels[n]) if n.endswith("attn1") else skip
        for n in gen_names
    })
    reference_unet.set_attn_processor({
        f"{n}.processor": ReferenceCaptureProcessor(n, state) if n.endswith("attn1") else skip
        for n in ref_names
    })


def self_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    """Names of the ``attn1`` layers, in module order."""
    return [n for n in _layer_names(unet) if n.endswith("attn1")]
