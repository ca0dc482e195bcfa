"""Leffa's processors against the literal "concatenate before attn1, slice after" formulation."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from leffa.attention import (ReferenceAttnProcessor, ReferenceCaptureProcessor, SkipAttnProcessor,
                             run_reference_unet, self_attention_layers)
from tests.conftest import tiny_model
from benchmarks.literal import install_literal


def _run_unets(model, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(batch, 4, 8, 6, generator=g)
    gen = torch.randn(batch, 12, 8, 6, generator=g)
    t = torch.tensor(500)
    with torch.no_grad():
        run_reference_unet(model.reference_unet, model.attn_state, ref, t)
        return model.unet(gen, t, encoder_hidden_states=None).sample


def test_processors_installed_by_name(model):
    names = self_attention_layers(model.unet)
    assert names and names == self_attention_layers(model.reference_unet)
    for unet, cls in ((model.unet, ReferenceAttnProcessor), (model.reference_unet, ReferenceCaptureProcessor)):
        procs = unet.attn_processors
        for key, proc in procs.items():
            if key.endswith("attn1.processor"):
                assert isinstance(proc, cls) and proc.name == key.removesuffix(".processor")
            else:
                assert isinstance(proc, SkipAttnProcessor)
    _run_unets(model)
    assert set(model.attn_state.ref_features) == set(names)


def test_matches_literal_concat_then_slice(model):
    ours = _run_unets(model)
    install_literal(model)
    literal = _run_unets(model)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, literal, atol=1e-5, rtol=0)


def test_pipeline_equals_the_originals_end_to_end(base_dirs, variant):
    """Whole generations: ours against the literal formulation with the whole reference UNet."""
    from benchmarks.literal import LiteralPipeline
    from leffa import LeffaPipeline
    from tests.conftest import make_inputs, tiny_model

    run = lambda pipe: pipe(**make_inputs(), num_inference_steps=2, output_type="pt",  # noqa: E731
                            generator=torch.Generator().manual_seed(0)).images
    ours = run(LeffaPipeline(tiny_model(base_dirs[variant])))
    literal = run(LiteralPipeline(tiny_model(base_dirs[variant])))
    torch.testing.assert_close(ours, literal, atol=1e-5, rtol=0)


def test_kv_cache_gives_same_result(model):
    plain = _run_unets(model)
    model.attn_state.cache_reference_kv = True
    first = _run_unets(model)
    # a second generative pass with the same reference features reads the cache
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        torch.randn(2, 4, 8, 6, generator=g)
        gen = torch.randn(2, 12, 8, 6, generator=g)
        cached = model.unet(gen, torch.tensor(500), encoder_hidden_states=None).sample
    assert model.attn_state.kv_cache
    torch.testing.assert_close(first, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached, plain, atol=1e-6, rtol=0)


def test_cache_invalidated_by_new_reference_pass(model):
    model.attn_state.cache_reference_kv = True
    a = _run_unets(model, seed=0)
    b = _run_unets(model, seed=1)  # new reference pass -> new K/V
    model.attn_state.cache_reference_kv = False
    expected_b = _run_unets(model, seed=1)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, expected_b, atol=1e-6, rtol=0)


def test_reference_pass_stops_after_last_feature(model):
    """run_reference_unet captures every feature but skips the unused tail (conv_out)."""
    ran_conv_out = []
    model.reference_unet.conv_out.register_forward_hook(lambda *a: ran_conv_out.append(1))
    _run_unets(model)
    assert len(model.attn_state.ref_features) == model.attn_state.num_layers > 0
    assert not ran_conv_out and not model.attn_state.stop_when_complete
    with torch.no_grad():  # a direct call is an ordinary full forward pass
        model.reference_unet(torch.randn(1, 4, 8, 6), torch.tensor(3), encoder_hidden_states=None)
    assert ran_conv_out


def test_reference_unet_is_plain_self_attention(model):
    """Capturing does not change the reference UNet: it equals stock processors with attn2 skipped."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 4, 8, 6, generator=g)
    with torch.no_grad():
        ours = model.reference_unet(ref, torch.tensor(10), encoder_hidden_states=None).sample
        model.reference_unet.set_attn_processor({
            k: AttnProcessor2_0() if k.endswith("attn1.processor") else SkipAttnProcessor()
            for k in model.reference_unet.attn_processors})
        stock = model.reference_unet(ref, torch.tensor(10), encoder_hidden_states=None).sample
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=0)


def test_captured_feature_is_norm1_input(model):
    """The stored reference feature is exactly norm1(h) of that block."""
    name = self_attention_layers(model.reference_unet)[0]
    block = model.reference_unet.get_submodule(name.removesuffix(".attn1"))
    seen = {}
    block.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    _run_unets(model)
    torch.testing.assert_close(model.attn_state.ref_features[name], block.norm1(seen["h"]))


def test_attn2_noop_keeps_residual(base_dirs):
    """With attn2 skipped the block computes h + attn1(n1(h)), then h + norm2(h), then FF."""
    model = tiny_model(base_dirs["sd15"])
    name = self_attention_layers(model.reference_unet)[0]
    block = model.reference_unet.get_submodule(name.removesuffix(".attn1"))
    h = torch.randn(2, 48, block.norm1.normalized_shape[0])
    with torch.no_grad():
        out = block(h)
        h1 = h + AttnProcessor2_0()(block.attn1, block.norm1(h))
        h2 = h1 + block.norm2(h1)
        expected = h2 + block.ff(block.norm3(h2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_missing_reference_feature_names_the_layer(model):
    _run_unets(model)
    name = self_attention_layers(model.unet)[-1]
    del model.attn_state.ref_features[name]
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"no reference feature for layer {name}"):
        model.unet(torch.randn(2, 12, 8, 6), torch.tensor(1), encoder_hidden_states=None)


def test_reference_batch_must_match(model):
    _run_unets(model, batch=1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not fit"):
        model.unet(torch.randn(2, 12, 8, 6), torch.tensor(1), encoder_hidden_states=None)
