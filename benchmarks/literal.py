"""The original's literal formulation: the baseline of ``bench_pipeline`` and of the
equivalence tests (tests/test_attention.py).

Their fork concatenates the reference feature to the generative tokens *before* ``attn1``
(queries, keys and values all from ``[x; r]``, 2n tokens) and keeps the first n outputs; and it
runs the whole reference UNet on every pass.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from leffa.attention import LeffaAttentionState, SkipAttnProcessor
from leffa.model import LeffaModel
from leffa.pipeline import LeffaPipeline


class ConcatThenSliceProcessor:
    def __init__(self, name: str, state: LeffaAttentionState):
        self.name, self.state, self.stock = name, state, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        n = hidden_states.shape[1]
        both = torch.cat([hidden_states, self.state.ref_features[self.name]], dim=1)  # (B, 2n, c)
        return self.stock(attn, both)[:, :n]


def install_literal(model: LeffaModel) -> None:
    """Replace the generative UNet's processors by the literal formulation."""
    procs = {}
    for key in model.unet.attn_processors:
        name = key.removesuffix(".processor")
        procs[key] = (ConcatThenSliceProcessor(name, model.attn_state) if name.endswith("attn1")
                      else SkipAttnProcessor())
    model.unet.set_attn_processor(procs)


class LiteralPipeline(LeffaPipeline):
    """``LeffaPipeline`` as the original runs: literal attention, the whole reference UNet."""

    def __init__(self, model: LeffaModel):
        super().__init__(model)
        install_literal(model)

    def run_reference(self, ref_latents: torch.Tensor, t: torch.Tensor) -> None:
        self.model.attn_state.new_reference_pass()
        self.model.reference_unet(ref_latents, t, encoder_hidden_states=None, return_dict=False)
