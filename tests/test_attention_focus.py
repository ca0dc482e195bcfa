"""The training-free attention focus (issue 15): off is today's path, τ = 1 changes nothing,
the focused logits are q·k·s / τ for the reference keys (and, asked, the own keys), and only
the chosen layers and steps are touched."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

import leffa.attention
from errors import OptionError
from leffa import AttentionFocus, LeffaPipeline
from leffa.attention import (LeffaAttentionState, ReferenceAttnProcessor, resolution_levels,
                             run_reference_unet, self_attention_layers)
from leffa.recording import AttentionRecorder
from tests.conftest import make_inputs

STEPS = 4


def _run(pipe, **kw):
    return pipe(**make_inputs(), num_inference_steps=STEPS, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kw).images


def test_off_and_temperature_one_give_identical_images(model):
    pipe = LeffaPipeline(model)
    today = _run(pipe)
    assert torch.equal(_run(pipe, attention_focus=None), today)
    assert torch.equal(_run(pipe, attention_focus=AttentionFocus(1.0, levels=9)), today)
    assert torch.equal(_run(pipe, attention_focus=AttentionFocus(1.0, levels=9, own_keys=True)), today)
    # a focus on steps that a 4-step run does not have
    assert torch.equal(_run(pipe, attention_focus=AttentionFocus(0.1, steps=(0.8, 0.9))), today)
    assert not torch.equal(_run(pipe, attention_focus=AttentionFocus(0.1)), today)
    assert model.attn_state.attention_focus is None and model.attn_state.step is None


# -- the processor on hand-made tokens ------------------------------------------------------------
N, N_REF, D = 3, 4, 4  # generative tokens, reference tokens, query/key width
C = N + N_REF + D  # a token = [one-hot id (N + N_REF); content (D)]


def _identity_attention() -> Attention:
    """One head; q and k read the content, v the id, so the output is the attention weights."""
    attn = Attention(query_dim=C, heads=1, dim_head=C, bias=False, out_bias=False)
    content, ids = torch.zeros(C, C), torch.zeros(C, C)
    content[N + N_REF:, N + N_REF:] = torch.eye(D)
    ids[:N + N_REF, :N + N_REF] = torch.eye(N + N_REF)
    with torch.no_grad():
        attn.to_q.weight.copy_(content)
        attn.to_k.weight.copy_(content)
        attn.to_v.weight.copy_(ids)
        attn.to_out[0].weight.copy_(torch.eye(C))
    return attn


def _tokens(ids: range, content: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.one_hot(torch.tensor(list(ids)), N + N_REF).float(), content], dim=1)[None]


@pytest.mark.parametrize("own_keys", [False, True])
def test_processor_divides_the_chosen_logits_by_the_temperature(own_keys):
    g = torch.Generator().manual_seed(0)
    x = _tokens(range(N), torch.randn(N, D, generator=g))
    r = _tokens(range(N, N + N_REF), torch.randn(N_REF, D, generator=g))
    r[0, 1, N + N_REF:] = 3 * x[0, 0, N + N_REF:]  # reference token 1 matches query 0: a peak
    attn, state = _identity_attention(), LeffaAttentionState()
    state.ref_features["layer"] = r
    state.set_step(0, 1)
    proc = ReferenceAttnProcessor("layer", state)

    def weights(tau: float | None) -> torch.Tensor:
        state.attention_focus = None if tau is None else AttentionFocus(tau, own_keys=own_keys)
        with torch.no_grad():
            return proc(attn, x)[0, :, :N + N_REF]  # (queries, own + reference keys)

    plain, sharp = weights(None), weights(0.5)
    assert torch.equal(weights(1.0), plain)
    logits = x[0, :, N + N_REF:] @ torch.cat([x, r], 1)[0, :, N + N_REF:].T / math.sqrt(C)
    logits[:, N if not own_keys else 0:] /= 0.5
    torch.testing.assert_close(sharp, logits.softmax(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(plain.sum(-1), torch.ones(N))
    ref_share = lambda w: w[:, N:] / w[:, N:].sum(-1, keepdim=True)  # noqa: E731
    assert ref_share(sharp)[0, 1] > ref_share(plain)[0, 1] > 0.5  # the peak grows
    assert ref_share(sharp)[0, 1] == ref_share(sharp)[0].max()
    # sharper and sharper: the peak grows towards one-hot, the reference's share of the whole too
    peaks = [ref_share(weights(tau))[0, 1].item() for tau in (4.0, 2.0, 1.0, 0.5, 0.25, 0.1)]
    assert peaks == sorted(peaks) and len(set(peaks[:4])) == 4 and peaks[-1] > 0.999


def test_processor_without_a_focus_is_plain_attention_over_own_and_reference_keys():
    """Off, and on for another layer or step, the processor is today's: softmax over [x; r],
    bit for bit."""
    g = torch.Generator().manual_seed(1)
    x = _tokens(range(N), torch.randn(N, D, generator=g))
    r = _tokens(range(N, N + N_REF), torch.randn(N_REF, D, generator=g))
    attn, state = _identity_attention(), LeffaAttentionState()
    state.ref_features["layer"] = r
    proc = ReferenceAttnProcessor("layer", state, level=1)
    with torch.no_grad():
        both = lambda proj: torch.cat([proj(x), proj(r)], 1)[:, None]  # noqa: E731  (one head)
        plain = attn.to_out[0](F.scaled_dot_product_attention(attn.to_q(x)[:, None], both(attn.to_k),
                                                              both(attn.to_v))[:, 0])
        assert torch.equal(proc(attn, x), plain)
        for focus, step in ((AttentionFocus(0.1, levels=1), 0),  # a layer it does not cover
                            (AttentionFocus(0.1, levels=2, steps=(0.5, 1.0)), 0)):  # nor a step
            state.attention_focus = focus
            state.set_step(step, 10)
            assert torch.equal(proc(attn, x), plain)
        state.attention_focus = AttentionFocus(0.1, levels=2)
        assert not torch.equal(proc(attn, x), plain)


# -- which layers and steps -----------------------------------------------------------------------
def _focused_calls(monkeypatch, model) -> list[tuple[int, int]]:
    """(step, reference tokens) of every call that focuses keys."""
    calls, focus_keys = [], leffa.attention.focus_keys

    def counting(focus, k_x, k_r):
        calls.append((model.attn_state.step, k_r.shape[2]))
        return focus_keys(focus, k_x, k_r)

    monkeypatch.setattr(leffa.attention, "focus_keys", counting)
    return calls


def _layer_tokens(model) -> dict[str, int]:
    """Tokens of each generative attn1 layer for the 64×48 test images (an 8×6 latent)."""
    tokens = {}

    def hook(name: str):
        return lambda module, args: tokens.update({name: args[0].shape[1]})

    attn1 = [(n, m) for n, m in model.unet.named_modules() if n.endswith("attn1")]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in attn1]
    _run(LeffaPipeline(model))
    for handle in handles:
        handle.remove()
    return tokens


def test_levels_rank_the_token_grids(model):
    tokens = _layer_tokens(model)
    procs = model.unet.attn_processors.values()
    levels = {p.name: p.level for p in procs if isinstance(p, ReferenceAttnProcessor)}
    assert set(levels) == set(tokens) == set(self_attention_layers(model.unet))
    by_size = sorted(set(tokens.values()), reverse=True)
    assert levels == {name: by_size.index(n) for name, n in tokens.items()}


@pytest.mark.parametrize(("levels", "steps", "expected_steps"), [
    (1, (0.5, 1.0), [2, 3]),
    (2, (0.0, 0.5), [0, 1]),
    (1, (0.25, 0.5), [1]),
])
def test_only_the_chosen_layers_and_steps(monkeypatch, model, levels, steps, expected_steps):
    tokens = _layer_tokens(model)
    calls = _focused_calls(monkeypatch, model)
    _run(LeffaPipeline(model), attention_focus=AttentionFocus(0.5, levels=levels, steps=steps))
    grids = sorted(set(tokens.values()), reverse=True)[:levels]
    layers = [name for name, n in tokens.items() if n in grids]
    assert sorted(calls) == sorted((s, tokens[name]) for s in expected_steps for name in layers)


def test_levels_beyond_the_model_focus_every_layer(monkeypatch, model):
    calls = _focused_calls(monkeypatch, model)
    _run(LeffaPipeline(model), attention_focus=AttentionFocus(0.5, levels=99, steps=(0.0, 0.25)))
    assert len(calls) == len(self_attention_layers(model.unet))


def test_resolution_levels_from_block_names():
    names = [f"{block}.attentions.0.transformer_blocks.0.attn1"
             for block in ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1", "up_blocks.2")]
    assert list(resolution_levels(names, num_blocks=3).values()) == [0, 1, 2, 1, 0]


def test_recorder_records_the_focused_attention(base_dirs):
    """At the first step the first layer's queries and keys do not depend on the focus yet: the
    focused recording is the plain one at temperature τ."""
    from tests.conftest import tiny_model

    model = tiny_model(base_dirs["sd15"])
    first = self_attention_layers(model.unet)[0]
    plain, focused = (AttentionRecorder(layers=[first], steps=[0]) for _ in range(2))
    pipe = LeffaPipeline(model)
    _run(pipe, attention_recorder=plain)
    _run(pipe, attention_recorder=focused, attention_focus=AttentionFocus(0.25))
    sharp = focused.attention(0, first)
    torch.testing.assert_close(sharp, plain.attention(0, first, tau=0.25), atol=1e-5, rtol=0)
    assert sharp.max() > plain.attention(0, first).max()


def test_a_focus_needs_the_step(model):
    with model.attention_session(attention_focus=AttentionFocus(0.5)) as state, torch.no_grad():
        run_reference_unet(model.reference_unet, state, torch.zeros(1, 4, 8, 6), torch.tensor(10))
        with pytest.raises(RuntimeError, match="set_step"):
            model.unet(torch.zeros(1, 12, 8, 6), torch.tensor(10), encoder_hidden_states=None)


@pytest.mark.parametrize("kw", [
    {"temperature": 0}, {"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"temperature": True}, {"temperature": "0.5"},
    {"temperature": 0.5, "levels": 0}, {"temperature": 0.5, "levels": 1.5},
    {"temperature": 0.5, "levels": None},
    {"temperature": 0.5, "steps": (0.5, 0.5)}, {"temperature": 0.5, "steps": (0.6, 0.2)},
    {"temperature": 0.5, "steps": (-0.1, 1.0)}, {"temperature": 0.5, "steps": (0.0, 1.5)},
    {"temperature": 0.5, "steps": (float("nan"), 1.0)}, {"temperature": 0.5, "steps": (0.0,)},
    {"temperature": 0.5, "steps": "early"},
])
def test_bad_settings(kw):
    with pytest.raises(OptionError, match="attention focus") as err:
        AttentionFocus(**kw)
    assert isinstance(err.value, ValueError)


def test_settings_are_normalised_and_frozen():
    focus = AttentionFocus(1, steps=[0, 0.5])
    assert (focus.temperature, focus.steps) == (1.0, (0.0, 0.5))
    with pytest.raises(AttributeError):
        focus.temperature = 2.0


# -- the experiment (experiments/attention_focus.py) ---------------------------------------------
def test_experiment_shares_the_passes_a_focus_does_not_change():
    from experiments.attention_focus import active

    early, late = AttentionFocus(0.5, steps=(0.0, 0.5)), AttentionFocus(0.5, steps=(0.5, 1.0), own_keys=True)
    assert active(None, 950) is None
    # early steps: the noisier half, t >= 500
    assert active(early, 950) == AttentionFocus(0.5) and active(early, 450) is None
    assert active(late, 950) is None and active(late, 450) == AttentionFocus(0.5, own_keys=True)


def test_experiment_recorder_computes_each_map_once_and_the_same_flow():
    from experiments.attention_focus import MapRecorder

    g = torch.Generator().manual_seed(0)
    plain, cached = AttentionRecorder(), MapRecorder()
    for rec in (plain, cached):
        rec.begin((16, 12))
        rec.set_step(0)
        for name, n in (("fine", 192), ("coarse", 48)):
            rec.record(name, torch.randn(2, 4, n, 8, generator=g), torch.randn(2, 4, n, 8, generator=g), 0.35)
    cached.records = {key: plain.records[key] for key in plain.records}
    for name in ("fine", "coarse"):
        assert torch.equal(cached.flow(0, name), plain.flow(0, name))
        assert torch.equal(cached.attention(0, name), plain.attention(0, name))
        assert cached.attention(0, name) is cached.attention(0, name)


def test_compact_json_reads_back():
    import json

    from experiments.attention_focus import compact_json

    data = {"settings": {"seeds": [0, 1], "out": "x", "t": (50, 150)},
            "mean_over_seeds": {"run": {"τ = 0.5": {"epe": 1.5, "near": 0.03}, "off": {"epe": 2.0}}}, "n": 3}
    text = compact_json(data)
    assert json.loads(text) == json.loads(json.dumps(data))
    assert '"τ = 0.5": {"epe": 1.5, "near": 0.03}' in text  # one line per innermost object
    assert len(text.splitlines()) == 14


TINY_EXPERIMENT = ["--steps", "2", "--seeds", "0", "--train-size", "8", "--test-size", "3", "--batch", "2"]


def test_experiment_runs_end_to_end(tmp_path):
    import json

    from PIL import Image

    from experiments import attention_focus

    threads = torch.get_num_threads()
    report = attention_focus.main([*TINY_EXPERIMENT, "--workers", "1", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # --threads is undone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention_focus.json", "attention_focus.png"]
    saved = json.loads((tmp_path / "attention_focus.json").read_text())
    assert saved == json.loads(json.dumps({k: v for k, v in report.items() if k != "per_timestep"}))
    assert saved["settings"]["steps"] == 2 and saved["settings"]["threads"] == 1
    grid = [attention_focus.label(f) for f in attention_focus.focus_grid()]
    runs = saved["per_seed"]["0"]
    assert list(runs) == list(saved["mean_over_seeds"]) == ["diffusion loss only", "+ Leffa loss (λ = 1)"]
    for results in (*runs.values(), *saved["mean_over_seeds"].values()):
        assert list(results) == grid
        for metrics in results.values():
            assert set(metrics) == {"end_point_error_px", "attention_near_source", "diffusion_loss"}
            assert all(math.isfinite(v) for v in metrics.values())
    # the per-timestep metrics stay out of the file; a focus on the early (noisy) steps leaves
    # the passes at t < 500 as they are without it
    off, early = (report["per_timestep"][0]["diffusion loss only"][name]
                  for name in ("off", "τ = 0.1, 16×12, early steps"))
    assert list(off) == list(attention_focus.TIMESTEPS)
    assert all(early[t] == off[t] for t in (100, 300))
    assert all(early[t] != off[t] for t in (500, 700, 900))
    assert saved["off_per_timestep"]["diffusion loss only"]["300"] == off[300]  # one seed: its own
    with Image.open(tmp_path / "attention_focus.png") as img:
        img.verify()
    assert 10_000 < (tmp_path / "attention_focus.png").stat().st_size < 400_000


@pytest.mark.slow
def test_experiment_trains_the_same_models_in_worker_processes(tmp_path):
    """The default trains in two spawned processes (~10 s to start them): same numbers."""
    from experiments import attention_focus

    pool, here = (attention_focus.main([*TINY_EXPERIMENT, "--steps", "3", "--workers", w,
                                        "--out", str(tmp_path / w)]) for w in ("2", "1"))
    assert pool["per_timestep"] == here["per_timestep"]
    assert pool["mean_over_seeds"] == here["mean_over_seeds"]
