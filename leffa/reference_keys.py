"""Recording the Leffa loss's attention in any diffusers UNet: where a self-attention layer's
reference keys are (``ReferenceKeys``), and plain self-attention processors that hand a recorder
the target's queries and the reference's keys (``install_recording``).

The Leffa loss (``leffa.loss``) needs, per layer, the target queries' attention over the
reference keys. Models reach the reference through self-attention in one of two ways:

* a reference network's features appended to the target's tokens, ``[x; r]`` (Leffa's own
  processors, ``leffa.attention``; IDM-VTON concatenates its garment UNet's features the same
  way before ``attn1``): ``ReferenceKeys.APPENDED``;
* one latent holding the person and the garment side by side or one above the other (CatVTON):
  ``ReferenceKeys.WIDTH`` or ``ReferenceKeys.HEIGHT``, the target first (left or top).

The reference is as large as the target in every case (a same-sized reference image, or the
two halves of one latent), so a layer of N tokens holds N/2 of each, on a grid found from the
target latent's size (``leffa.flow.token_grid``). Memory stays O(n·d): the recorder keeps
queries and keys (``AttentionRecorder``) or computes the flow field in chunks
(``FlowRecorder``), never an n×n map.

    session = install_recording(unet, ReferenceKeys.HEIGHT)   # person over garment
    recorder = FlowRecorder(tau=TAU)
    with session.recording(recorder, target_hw=(h, w)):       # the person half's latent size
        pred = unet(torch.cat([noisy, cond], 1), t, encoder_hidden_states=None).sample
    loss = diffusion_loss(pred, noise) + LAMBDA_LEFFA * flow_loss(recorder.flows, garment, person, mask, t)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from leffa.attention import SkipAttnProcessor, check_supported, merge_heads_and_project, qkv_heads
from leffa.flow import token_grid

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DConditionModel

    from leffa.recording import AttentionRecorder, FlowRecorder


class ReferenceKeys(str, Enum):
    """Where the reference's tokens are among a self-attention layer's N tokens (the target's
    first, then the reference's, N/2 each)."""

    APPENDED = "appended"  # [target tokens; reference tokens]: a reference network's features
    WIDTH = "width"  # one latent, [target | reference] side by side
    HEIGHT = "height"  # one latent, the target above the reference (CatVTON)

    def latent(self, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """The two halves as one latent (B, C, h, 2w) or (B, C, 2h, w) (WIDTH, HEIGHT)."""
        if self is ReferenceKeys.APPENDED:
            raise ValueError("appended reference tokens come from a separate network, not from one latent")
        return torch.cat([target, reference], dim=-1 if self is ReferenceKeys.WIDTH else -2)

    def target_half(self, latent: torch.Tensor) -> torch.Tensor:
        """The target half of a latent made by ``latent``."""
        if self is ReferenceKeys.APPENDED:
            raise ValueError("appended reference tokens come from a separate network, not from one latent")
        dim = -1 if self is ReferenceKeys.WIDTH else -2
        return latent.narrow(dim, 0, latent.shape[dim] // 2)

    def split(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, heads, N, d) over both -> the target's and the reference's tokens, (B, heads, h·w, d)
        each, row-major on their h×w ``grid``."""
        b, heads, n, d = tokens.shape
        h, w = grid
        if n != 2 * h * w:
            raise ValueError(f"{n} tokens are not two {h}x{w} grids")
        if self is ReferenceKeys.WIDTH:  # rows of [target | reference]
            rows = tokens.view(b, heads, h, 2 * w, d)
            return rows[:, :, :, :w].reshape(b, heads, h * w, d), rows[:, :, :, w:].reshape(b, heads, h * w, d)
        return tokens[:, :, :h * w], tokens[:, :, h * w:]  # APPENDED, and HEIGHT's top half first


@dataclass
class RecordingSession:
    """What the recording processors of one UNet share: the layout and, while recording, the
    recorder and the target latent's size."""

    keys: ReferenceKeys
    recorder: AttentionRecorder | FlowRecorder | None = None
    target_hw: tuple[int, int] | None = None

    def attach(self, recorder: AttentionRecorder | FlowRecorder | None, target_hw: tuple[int, int]) -> None:
        """Record the next forward passes with ``recorder`` (None: stop). ``target_hw``: the target
        half's latent (h, w). A recorder stays attached through the backward pass, where
        gradient checkpointing recomputes (and records) the blocks again; ``detach`` after it."""
        self.recorder, self.target_hw = recorder, target_hw
        if recorder is not None:
            recorder.begin(target_hw)

    def detach(self) -> None:
        self.recorder, self.target_hw = None, None

    @contextmanager
    def recording(self, recorder: AttentionRecorder | FlowRecorder,
                  target_hw: tuple[int, int]) -> Iterator[AttentionRecorder | FlowRecorder]:
        self.attach(recorder, target_hw)
        try:
            yield recorder
        finally:
            self.detach()


class RecordingAttnProcessor:
    """Plain self-attention (diffusers' ``AttnProcessor2_0`` on a transformer block's ``attn1``)
    that also gives the session's recorder the target queries and the reference keys."""

    def __init__(self, name: str, session: RecordingSession):
        self.name, self.session = name, session

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError(f"{self.name}: a self-attention mask is not supported")
        q, k, v = qkv_heads(attn, hidden_states)  # (B, heads, N, d)
        session = self.session
        recorder = session.recorder
        if recorder is not None and recorder.wants(self.name):
            grid = token_grid(q.shape[2] // 2, session.target_hw)
            q_target, _ = session.keys.split(q, grid)
            _, k_ref = session.keys.split(k, grid)
            recorder.record(self.name, q_target, k_ref, attn.scale)
        return merge_heads_and_project(attn, F.scaled_dot_product_attention(q, k, v))


def install_recording(unet: UNet2DConditionModel, keys: ReferenceKeys,
                      skip_cross_attention: bool = False) -> RecordingSession:
    """Give every self-attention layer (``attn1``) of a stock diffusers UNet a recording processor
    (plain attention: the UNet computes what it did); ``skip_cross_attention``: every ``attn2``
    returns its input (no text encoder, as CatVTON and Leffa). The layers keep their names, which
    the recorders' layer filters and ``leffa.loss`` see."""
    session = RecordingSession(ReferenceKeys(keys))
    modules, current = dict(unet.named_modules()), unet.attn_processors
    processors = {}
    for key, processor in current.items():
        name = key.removesuffix(".processor")
        if name.endswith(".attn1"):
            check_supported(name, modules[name])
            processors[key] = RecordingAttnProcessor(name, session)
        elif name.endswith(".attn2") and skip_cross_attention:
            processors[key] = SkipAttnProcessor()
        else:
            processors[key] = processor
    unet.set_attn_processor(processors)
    return session
