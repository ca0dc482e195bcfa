"""Attention recording, flow fields and heatmaps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leffa import AttentionRecorder, LeffaPipeline
from leffa.attention import self_attention_layers
from leffa.flow import attention_flow, coordinate_grid, token_grid
from tests.conftest import make_inputs


def _pipe_run(pipe, recorder=None, steps=3):
    return pipe(**make_inputs(), num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="pt", attention_recorder=recorder).images


# -- flow field ---------------------------------------------------------------------------
def test_token_grid():
    assert token_grid(128 * 96, (128, 96)) == (128, 96)
    assert token_grid(16 * 12, (128, 96)) == (16, 12)
    assert token_grid(12, (7, 5)) == (4, 3)  # ceil halving: 7x5 -> 4x3 -> 2x2
    assert token_grid(4, (7, 5)) == (2, 2)
    with pytest.raises(ValueError, match="do not form a UNet level"):
        token_grid(50, (8, 6))


def test_coordinate_grid_corners():
    c = coordinate_grid(3, 4).view(3, 4, 2)
    assert c[0, 0].tolist() == [-1, -1] and c[2, 3].tolist() == [1, 1]
    assert c[0, 3].tolist() == [1, -1] and c[2, 0].tolist() == [-1, 1]  # (x, y) order


def test_flow_of_a_one_hot_shift_is_that_shift():
    h, w, dx = 4, 6, 2
    n = h * w
    attn = torch.zeros(1, n, n)
    for y in range(h):
        for x in range(w):
            attn[0, y * w + x, y * w + (x + dx) % w] = 1  # each query reads dx tokens to its right
    flow = attention_flow(attn, h, w)
    coords = coordinate_grid(h, w).view(h, w, 2)
    torch.testing.assert_close(flow[0], coords.roll(-dx, dims=1))
    ref = torch.rand(1, 3, h, w)
    warped = F.grid_sample(ref, flow, mode="bilinear", align_corners=True)
    torch.testing.assert_close(warped, ref.roll(-dx, dims=3))


def test_uniform_attention_points_at_the_centre():
    flow = attention_flow(torch.full((2, 12, 12), 1 / 12), 3, 4)
    torch.testing.assert_close(flow, torch.zeros(2, 3, 4, 2), atol=1e-6, rtol=0)


def test_flow_rejects_wrong_shape():
    with pytest.raises(ValueError, match="does not match a 3x3 grid"):
        attention_flow(torch.zeros(1, 12, 12), 3, 3)


# -- recording ----------------------------------------------------------------------------
def test_off_by_default(model):
    pipe = LeffaPipeline(model)
    plain = _pipe_run(pipe)
    assert model.attn_state.recorder is None
    rec = AttentionRecorder()
    recorded = _pipe_run(pipe, rec)
    assert torch.equal(plain, recorded)  # recording never changes the result
    assert model.attn_state.recorder is None  # and is detached afterwards
    assert rec.steps() == [0, 1, 2]
    assert sorted(rec.layers()) == sorted(self_attention_layers(model.unet))


def test_chosen_layers_and_steps_only(model):
    first = self_attention_layers(model.unet)[0]
    rec = AttentionRecorder(layers=[first], steps=[1])
    _pipe_run(LeffaPipeline(model), rec)
    assert list(rec.records) == [(1, first)]
    rec = AttentionRecorder(layers=lambda name: name.startswith("up_blocks"), steps=[0, 2])
    _pipe_run(LeffaPipeline(model), rec)
    assert rec.steps() == [0, 2] and all(n.startswith("up_blocks") for n in rec.layers())


def test_memory_is_linear_in_tokens(model):
    """Only queries and keys are kept: O(n·d), never an n×n map."""
    rec = AttentionRecorder(steps=[0])
    _pipe_run(LeffaPipeline(model), rec)
    for (_, name), r in rec.records.items():
        attn = model.unet.get_submodule(name)
        n = r.grid[0] * r.grid[1]
        inner = attn.to_q.out_features
        assert r.q.shape == (1, attn.heads, n, inner // attn.heads)  # conditional half only
        assert r.nbytes == 2 * n * inner * 4


def _expected_attention(model, name, step, inputs, tau=1.0):
    """Head-averaged softmax(QK_refᵀ/√d/τ) of the conditional half, from hooks on the projections."""
    attn = model.unet.get_submodule(name)
    calls = {"q": [], "k": []}  # (input, output) of each projection call
    hq = attn.to_q.register_forward_hook(lambda m, a, o: calls["q"].append((a[0], o)))
    hk = attn.to_k.register_forward_hook(lambda m, a, o: calls["k"].append((a[0], o)))
    LeffaPipeline(model)(**inputs, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                         output_type="pt")
    hq.remove(), hk.remove()
    x, q = calls["q"][step]
    # the step's two to_k calls: one on x (generative keys), one on r (reference keys)
    (k_ref,) = [o for a, o in calls["k"][2 * step: 2 * step + 2] if not torch.equal(a, x)]
    q, k_ref = q[1:], k_ref[1:]  # (1, n, inner): the conditional half
    heads = attn.heads
    split = lambda t: t.view(1, t.shape[1], heads, -1).transpose(1, 2)
    logits = split(q) @ split(k_ref).transpose(-1, -2) * attn.scale / tau
    return logits.softmax(-1).mean(1)  # (1, n, n)


def test_flow_and_heatmap_match_direct_computation(model):
    name = self_attention_layers(model.unet)[0]
    inputs = make_inputs()
    expected = _expected_attention(model, name, 1, inputs)
    rec = AttentionRecorder(layers=[name], steps=[1])
    LeffaPipeline(model)(**inputs, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                         output_type="pt", attention_recorder=rec)
    h, w = rec.grid(name)
    assert (h, w) == (8, 6)
    torch.testing.assert_close(rec.attention(1, name), expected, atol=1e-5, rtol=1e-4)
    full = attention_flow(expected, h, w)
    torch.testing.assert_close(rec.flow(1, name), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rec.flow(1, name, chunk=5), full, atol=1e-5, rtol=1e-4)  # chunked
    heat = rec.heatmap(1, name, [(0.0, 0.0), (0.99, 0.99), (0.5, 0.5)])
    assert heat.shape == (1, 3, h, w)
    torch.testing.assert_close(heat.sum(dim=(2, 3)), torch.ones(1, 3))
    rows = [0, h * w - 1, (h // 2) * w + w // 2]
    torch.testing.assert_close(heat.view(1, 3, -1), expected[:, rows], atol=1e-5, rtol=1e-4)
    sharp = rec.attention(1, name, tau=0.5)  # τ divides the logits before the softmax
    torch.testing.assert_close(sharp, _expected_attention(model, name, 1, inputs, tau=0.5), atol=1e-5, rtol=1e-4)


def test_recorder_errors(model):
    rec = AttentionRecorder(steps=[0])
    _pipe_run(LeffaPipeline(model), rec)
    name = rec.layers()[0]
    with pytest.raises(KeyError, match="nothing recorded for step 5"):
        rec.flow(5, name)
    with pytest.raises(ValueError, match="outside the image"):
        rec.heatmap(0, name, [(1.5, 0.2)])
