"""The Leffa loss: flow fields, warping, gating and gradients."""

from __future__ import annotations

import torch

from leffa.flow import attention_flow, coordinate_grid
from leffa.flow import warp_with_flow
from leffa.loss import diffusion_loss, flow_loss, leffa_loss
from leffa.recording import FlowRecorder


def shift_attention(h: int, w: int, dx: int, batch: int = 1) -> torch.Tensor:
    """One-hot attention: each query reads the token dx columns to its right (wrapping)."""
    n = h * w
    attn = torch.zeros(batch, n, n)
    for y in range(h):
        for x in range(w):
            attn[:, y * w + x, y * w + (x + dx) % w] = 1
    return attn


def test_identity_attention_warps_to_the_reference():
    h, w = 8, 6
    flow = attention_flow(torch.eye(h * w)[None], h, w)
    ref = torch.rand(1, 3, 64, 48)
    torch.testing.assert_close(warp_with_flow(ref, flow), ref, atol=1e-5, rtol=0)


def test_loss_is_zero_when_target_is_the_warped_reference():
    h, w = 8, 6
    attn = shift_attention(h, w, dx=2, batch=2)
    ref = torch.rand(2, 3, 64, 48)
    target = warp_with_flow(ref, attention_flow(attn, h, w))
    mask = torch.ones(2, 1, 64, 48)
    assert leffa_loss([attn], ref, target, mask).item() < 1e-10
    assert leffa_loss([attn], ref, torch.rand(2, 3, 64, 48), mask).item() > 1e-3
    # the mask limits where the loss looks
    assert leffa_loss([attn], ref, torch.rand(2, 3, 64, 48), torch.zeros(2, 1, 64, 48)).item() == 0


def test_shift_flow_matches_the_shift_exactly():
    h, w, dx = 8, 6, 1
    flow = attention_flow(shift_attention(h, w, dx), h, w)[0]
    coords = coordinate_grid(h, w).view(h, w, 2)
    step = 2 / (w - 1)
    torch.testing.assert_close(flow[:, : w - dx, 0] - coords[:, : w - dx, 0], torch.full((h, w - dx), step * dx))


def test_uniform_attention_gives_the_grid_centre():
    flow = attention_flow(torch.full((1, 48, 48), 1 / 48), 8, 6)
    torch.testing.assert_close(flow, torch.zeros(1, 8, 6, 2), atol=1e-6, rtol=0)


def test_leffa_loss_equals_flow_loss_of_its_flows():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, n, n, generator=g).softmax(-1) for n in (48, 12)]
    ref, tgt = torch.rand(2, 3, 64, 48, generator=g), torch.rand(2, 3, 64, 48, generator=g)
    mask = (torch.rand(2, 1, 64, 48, generator=g) > 0.5).float()
    flows = [attention_flow(maps[0], 8, 6), attention_flow(maps[1], 4, 3)]
    torch.testing.assert_close(leffa_loss(maps, ref, tgt, mask), flow_loss(flows, ref, tgt, mask))


def test_low_resolution_layers_contribute_nothing():
    g = torch.Generator().manual_seed(1)
    ref, tgt, mask = torch.rand(1, 3, 64, 48, generator=g), torch.rand(1, 3, 64, 48, generator=g), torch.ones(1, 1, 64, 48)
    fine = torch.rand(1, 48, 48, generator=g).softmax(-1)  # 8x6: 8/64 = 1/8 > 1/32
    coarse = torch.rand(1, 4, 4, generator=g).softmax(-1)  # 2x2 -> 2/64 = 1/32: not above
    alone = leffa_loss([fine], ref, tgt, mask)
    torch.testing.assert_close(leffa_loss([fine, coarse], ref, tgt, mask), alone)
    assert leffa_loss([coarse], ref, tgt, mask).item() == 0
    assert leffa_loss([coarse], ref, tgt, mask, theta_resolution=1 / 64).item() > 0


def test_late_timesteps_contribute_nothing():
    g = torch.Generator().manual_seed(2)
    attn = torch.rand(2, 48, 48, generator=g).softmax(-1)
    ref, tgt, mask = torch.rand(2, 3, 64, 48, generator=g), torch.rand(2, 3, 64, 48, generator=g), torch.ones(2, 1, 64, 48)
    per_sample = [leffa_loss([attn[i:i + 1]], ref[i:i + 1], tgt[i:i + 1], mask[i:i + 1]) for i in range(2)]
    gated = leffa_loss([attn], ref, tgt, mask, torch.tensor([100, 600]))
    torch.testing.assert_close(gated, per_sample[0] / 2)  # mean over the batch, sample 2 gated out
    assert leffa_loss([attn], ref, tgt, mask, torch.tensor([500, 999])).item() == 0
    torch.testing.assert_close(leffa_loss([attn], ref, tgt, mask, None), (per_sample[0] + per_sample[1]) / 2)


def test_gradients_reach_the_attention_logits():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 48, 48, generator=g, requires_grad=True)
    loss = leffa_loss([(logits / 2.0).softmax(-1)], torch.rand(1, 3, 64, 48, generator=g),
                      torch.rand(1, 3, 64, 48, generator=g), torch.ones(1, 1, 64, 48))
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_flow_recorder_applies_tau_and_matches_direct_computation():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 48, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 4, 48, 8, generator=g, requires_grad=True)
    rec = FlowRecorder(tau=2.0, chunk=7)  # several chunks, checkpointed
    rec.begin((8, 6))
    rec.record("layer", q, k, scale=8 ** -0.5)
    direct = attention_flow((q @ k.transpose(-1, -2) * 8 ** -0.5 / 2.0).softmax(-1).mean(1), 8, 6)
    torch.testing.assert_close(rec.flows["layer"], direct, atol=1e-6, rtol=1e-5)
    target = torch.randn(2, 8, 6, 2, generator=g)
    grads_chunked = torch.autograd.grad(((rec.flows["layer"] - target) ** 2).sum(), (q, k))
    grads_direct = torch.autograd.grad(((direct - target) ** 2).sum(), (q, k))
    for a, b in zip(grads_chunked, grads_direct):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_diffusion_loss():
    x = torch.randn(2, 4, 8, 6)
    assert diffusion_loss(x, x).item() == 0
    torch.testing.assert_close(diffusion_loss(x, torch.zeros_like(x)), (x ** 2).mean())
