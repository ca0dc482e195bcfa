"""Opt-in recording of where the generative tokens look in the reference.

For each chosen (step, layer) the recorder keeps the per-head queries of the generative
tokens and the per-head keys of the reference tokens, O(n·d) memory, never the n×n map.
Everything derived — the head-averaged attention ``Â = mean_heads softmax(QKᵀ·s / τ)``
over the reference keys (the paper's A), the flow field and per-point heatmaps — is
computed on demand, in chunks of queries, so a 128×96 layer never needs a 12288² map.

    recorder = AttentionRecorder(layers=lambda name: "up_blocks.3" in name, steps=[20])
    out = pipe(..., attention_recorder=recorder)
    flow = recorder.flow(20, recorder.layers()[0])        # (B, h, w, 2)
    heat = recorder.heatmap(20, name, [(0.5, 0.3)])       # (B, 1, h, w)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from leffa.flow import coordinate_grid, token_grid

LayerFilter = Callable[[str], bool]


def every_layer(name: str) -> bool:
    return True


def layer_filter(layers: Sequence[str] | LayerFilter | None) -> LayerFilter:
    """Names, a predicate, or None (every layer) -> a predicate (a module-level one for None, so
    that a recorder can be pickled: the app sends it back from a ZeroGPU worker)."""
    if layers is None:
        return every_layer
    if callable(layers):
        return layers
    return set(layers).__contains__


def head_averaged_attention(q: torch.Tensor, k: torch.Tensor, factor: float) -> torch.Tensor:
    """``mean_heads softmax(q kᵀ · factor)`` in float32: (B, heads, r, d), (B, heads, n, d) -> (B, r, n)."""
    return (q.float() @ k.float().transpose(-1, -2) * factor).softmax(dim=-1).mean(dim=1)


@dataclass
class AttentionRecord:
    q: torch.Tensor  # (B, heads, n, d), generative queries
    k: torch.Tensor  # (B, heads, n_ref, d), reference keys
    scale: float  # attention scale, 1/sqrt(d)
    grid: tuple[int, int]  # (h, w) of the token grid

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.k.numel() * self.k.element_size()


class AttentionRecorder:
    """Records generative-over-reference attention for chosen layers and steps.

    Args:
        layers: layer names (e.g. ``"up_blocks.3.attentions.2.transformer_blocks.0.attn1"``),
            a predicate on the name, or None for every self-attention layer.
        steps: denoising step indices (0-based) to record, or None for every step.
        device, dtype: where and how the recorded queries/keys are kept (CPU float32 by
            default, so recording costs no GPU memory; float16 halves it). Results are
            always computed in float32.
    """

    def __init__(self, layers: Sequence[str] | LayerFilter | None = None,
                 steps: Sequence[int] | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self._layer_ok = layer_filter(layers)
        self._steps = None if steps is None else set(steps)
        self.device, self.dtype = torch.device(device), dtype
        self.records: dict[tuple[int, str], AttentionRecord] = {}
        self.step: int | None = None
        self._batch = slice(None)
        self._latent_hw: tuple[int, int] | None = None

    # -- called by the pipeline -------------------------------------------------------
    def begin(self, latent_hw: tuple[int, int], batch: slice = slice(None)) -> None:
        """Start a generation: latent size, and which rows of the UNet batch to keep (all by
        default, as in a single forward pass of ``training.trainer.LeffaTrainingModule``)."""
        self.records.clear()
        self._latent_hw, self._batch = latent_hw, batch

    def set_step(self, step: int | None) -> None:
        self.step = step

    def keep_rows(self, batch: slice) -> None:
        """Which rows of the UNet batch to keep from now on (the pipeline's steps outside the guidance
        interval run the conditional rows alone)."""
        self._batch = batch

    def wants(self, name: str) -> bool:
        if self.step is None or self._latent_hw is None:
            return False
        return (self._steps is None or self.step in self._steps) and self._layer_ok(name)

    def record(self, name: str, q: torch.Tensor, k_ref: torch.Tensor, scale: float) -> None:
        if self.step is None or self._latent_hw is None:
            raise RuntimeError("record() before begin() and set_step(): the processors ask wants() first")
        keep = lambda t: t[self._batch].detach().to(self.device, self.dtype, copy=True)
        grid = token_grid(q.shape[2], self._latent_hw)
        self.records[(self.step, name)] = AttentionRecord(keep(q), keep(k_ref), float(scale), grid)

    # -- queries ------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted({s for s, _ in self.records})

    def layers(self) -> list[str]:
        return list(dict.fromkeys(name for _, name in self.records))

    def grid(self, name: str) -> tuple[int, int]:
        return next(r.grid for (_, n), r in self.records.items() if n == name)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.records.values())

    def _get(self, step: int, name: str) -> AttentionRecord:
        try:
            return self.records[(step, name)]
        except KeyError:
            raise KeyError(f"nothing recorded for step {step}, layer {name!r}; "
                           f"recorded steps {self.steps()}, layers {self.layers()}") from None

    def _probs(self, rec: AttentionRecord, rows: torch.Tensor | slice, tau: float) -> torch.Tensor:
        return head_averaged_attention(rec.q[:, :, rows], rec.k, rec.scale / tau)  # (B, rows, n_ref)

    def iter_attention(self, step: int, name: str, chunk: int = 1024,
                       tau: float = 1.0) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (query rows, head-averaged attention (B, rows, n_ref)) chunk by chunk."""
        rec = self._get(step, name)
        n = rec.q.shape[2]
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            yield rows, self._probs(rec, rows, tau)

    def attention(self, step: int, name: str, tau: float = 1.0) -> torch.Tensor:
        """The whole head-averaged map (B, n, n_ref). Only sensible for small layers."""
        return torch.cat([p for _, p in self.iter_attention(step, name, tau=tau)], dim=1)

    def flow(self, step: int, name: str, chunk: int = 1024, tau: float = 1.0) -> torch.Tensor:
        """Flow field (B, h, w, 2) in ``grid_sample`` convention, computed in query chunks."""
        rec = self._get(step, name)
        h, w = rec.grid
        coords = coordinate_grid(h, w, device=rec.q.device)
        parts = [p @ coords for _, p in self.iter_attention(step, name, chunk, tau)]
        return torch.cat(parts, dim=1).view(rec.q.shape[0], h, w, 2)

    def heatmap(self, step: int, name: str, points: Sequence[tuple[float, float]],
                tau: float = 1.0) -> torch.Tensor:
        """Attention over the reference of the query tokens under ``points``.

        Args:
            points: (x, y) positions in the generated image, as fractions of its width and
                height in [0, 1].
        Returns:
            (B, len(points), h, w) maps, each summing to 1.
        """
        rec = self._get(step, name)
        h, w = rec.grid
        rows = []
        for x, y in points:
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                raise ValueError(f"point {(x, y)} is outside the image; use fractions in [0, 1]")
            rows.append(min(int(y * h), h - 1) * w + min(int(x * w), w - 1))
        probs = self._probs(rec, torch.tensor(rows, device=rec.q.device), tau)
        return probs.view(rec.q.shape[0], len(rows), h, w)


class FlowRecorder:
    """Training-time recording (the Leffa loss): per chosen layer, the flow field ``F = Â·C``
    of ``Â = mean_heads softmax(Q K_refᵀ·s / τ)``, with gradients.

    It is computed in chunks of queries under activation checkpointing, so no (n × n) map is
    kept for the backward pass either: memory O(chunk · n) per layer.

    Args:
        layers: layer names, a predicate, or None for every self-attention layer.
        tau: temperature τ (paper: 2.0), dividing the logits before the softmax.
        chunk: queries per chunk.
    """

    def __init__(self, layers: Sequence[str] | LayerFilter | None = None, tau: float = 2.0, chunk: int = 2048):
        self._layer_ok = layer_filter(layers)
        self.tau, self.chunk = tau, chunk
        self.flows: dict[str, torch.Tensor] = {}
        self._latent_hw: tuple[int, int] | None = None

    def begin(self, latent_hw: tuple[int, int]) -> None:
        self.flows.clear()
        self._latent_hw = latent_hw

    def wants(self, name: str) -> bool:
        return self._latent_hw is not None and self._layer_ok(name)

    def record(self, name: str, q: torch.Tensor, k_ref: torch.Tensor, scale: float) -> None:
        if self._latent_hw is None:
            raise RuntimeError("record() before begin(): the processors ask wants() first")
        h, w = token_grid(q.shape[2], self._latent_hw)
        coords = coordinate_grid(h, w, device=q.device, dtype=torch.float32)
        factor = scale / self.tau

        def chunk_flow(q_rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return head_averaged_attention(q_rows, k, factor) @ coords  # (B, rows, 2)

        n = q.shape[2]
        parts = []
        for start in range(0, n, self.chunk):
            rows = q[:, :, start:start + self.chunk]
            if torch.is_grad_enabled() and (rows.requires_grad or k_ref.requires_grad):
                parts.append(checkpoint(chunk_flow, rows, k_ref, use_reentrant=False))
            else:
                parts.append(chunk_flow(rows, k_ref))
        self.flows[name] = torch.cat(parts, dim=1).view(q.shape[0], h, w, 2)
