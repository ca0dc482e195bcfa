"""Samplers, guidance in an interval and the feature cache (issue 24) on tiny models."""

from __future__ import annotations

import pytest
import torch

from errors import OptionError
from leffa import LeffaPipeline
from leffa.pipeline import rescale_guidance
from leffa.recording import AttentionRecorder
from leffa.sampling import FeatureCache, GuidanceInterval, Sampler, make_scheduler
from runtime.presets import MemoryPreset
from runtime.sampling import check_cache_interval
from tests.conftest import make_inputs, tiny_model

STEPS = 4


def _run(model, seed=0, inputs=None, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return LeffaPipeline(model)(**(inputs or make_inputs()), generator=torch.Generator().manual_seed(seed),
                                output_type="pt", **kw).images


def _published_loop(model, inputs, seed, steps, guidance, ref_acceleration):
    """Spec §4's loop written out by hand: DDPM, CFG with the zero reference at every step, rescaled by
    the guidance scale, the reference UNet at every step (or once at timesteps[n // 2])."""
    pipe = LeffaPipeline(model)
    g = torch.Generator().manual_seed(seed)
    with model.attention_session(cache_reference_kv=ref_acceleration):
        prepared = pipe.prepare_inputs(**inputs)
        ref_latents, cond = pipe.prepare_conditioning(prepared, g)
        timesteps, latents = pipe.prepare_latents(prepared, steps, g, None)
        scheduler = pipe.scheduler
        if ref_acceleration:
            pipe.run_reference(ref_latents, timesteps[len(timesteps) // 2])
        for i, t in enumerate(timesteps):
            model.attn_state.set_step(i, len(timesteps))
            if not ref_acceleration:
                pipe.run_reference(ref_latents, t)
            eps_uncond, eps_cond = model.unet(torch.cat([torch.cat([latents] * 2), cond], 1), t,
                                              encoder_hidden_states=None, return_dict=False)[0].chunk(2)
            eps = rescale_guidance(eps_uncond + guidance * (eps_cond - eps_uncond), eps_cond, guidance)
            latents = scheduler.step(eps, t, latents, generator=g, return_dict=False)[0]
        return pipe._decode(latents).cpu()


@pytest.mark.parametrize("accel", [False, True])
def test_default_is_the_published_loop_bit_for_bit(model, accel):
    assert isinstance(LeffaPipeline(model).scheduler, type(make_scheduler({}, Sampler.DDPM)))
    inputs = make_inputs()
    ours = _run(model, 3, inputs, ref_acceleration=accel, guidance_scale=2.5)
    assert torch.equal(ours, _published_loop(model, inputs, 3, STEPS, 2.5, accel))


@pytest.mark.parametrize("sampler", list(Sampler))
def test_each_sampler_is_reproducible_and_its_own(model, sampler):
    a, b = _run(model, 1, sampler=sampler), _run(model, 1, sampler=sampler)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    if not sampler.published:
        assert (a - _run(model, 1)).abs().max() > 1e-3  # not the DDPM image
        assert LeffaPipeline(model).model.make_scheduler(sampler).__class__.__name__ != "DDPMScheduler"


def test_schedulers_read_the_base_config_and_sdxls_zero_snr(base_dirs):
    sdxl = tiny_model(base_dirs["sdxl"])
    for sampler in Sampler:
        s = sdxl.make_scheduler(sampler)
        assert s.config.beta_schedule == "scaled_linear" and s.config.rescale_betas_zero_snr
        assert s.alphas_cumprod[0] == sdxl.make_scheduler().alphas_cumprod[0]
    s = make_scheduler({"beta_start": 0.001, "beta_end": 0.02, "beta_schedule": "linear"}, Sampler.DPM_SOLVER)
    assert s.config.algorithm_type == "dpmsolver++" and s.config.solver_order == 2
    assert s.betas[0].item() == pytest.approx(0.001)


@pytest.mark.parametrize("preset", [MemoryPreset.BALANCED, MemoryPreset.LOW])
@pytest.mark.parametrize("sampler", list(Sampler))
def test_each_sampler_under_the_memory_presets(base_dirs, variant, preset, sampler):
    plain = tiny_model(base_dirs[variant])
    placed = tiny_model(base_dirs[variant]).place("cpu", memory=preset)
    for accel in (False, True):
        kw = {"sampler": sampler, "ref_acceleration": accel, "guidance_interval": (0.2, 0.8)}
        assert torch.equal(_run(placed, 2, **kw), _run(plain, 2, **kw))


def test_full_guidance_interval_equals_plain_cfg(model):
    # 0.9999 makes every step go through the comparison (timesteps are at most 999 of 1000)
    for accel in (False, True):
        plain = _run(model, 4, ref_acceleration=accel)
        assert torch.equal(_run(model, 4, ref_acceleration=accel, guidance_interval=(0.0, 0.9999)), plain)
        assert torch.equal(_run(model, 4, ref_acceleration=accel, guidance_interval=GuidanceInterval(0, 1)), plain)


@pytest.mark.parametrize("accel", [False, True])
def test_outside_the_interval_the_conditional_rows_alone(model, accel):
    """An empty interval is guidance scale 1 (eps_u + 1·(eps_c − eps_u) = eps_c) computed with half
    the rows: the reference rows used must be the conditional ones."""
    inputs = make_inputs(batch=2)
    unguided = _run(model, 5, inputs, ref_acceleration=accel, guidance_interval=(0.0, 0.0))
    scale_one = _run(model, 5, inputs, ref_acceleration=accel, guidance_scale=1.0)
    torch.testing.assert_close(unguided, scale_one, atol=2e-5, rtol=0)
    assert (unguided - _run(model, 5, inputs, ref_acceleration=accel)).abs().max() > 1e-3


def test_interval_guides_only_its_steps(model):
    rows = {"unet": [], "reference_unet": []}
    hooks = [getattr(model, name).register_forward_pre_hook(lambda m, a, name=name: rows[name].append(a[0].shape[0]))
             for name in rows]
    try:
        pipe = LeffaPipeline(model)
        pipe(**make_inputs(batch=3), num_inference_steps=STEPS, guidance_interval=(0.3, 0.8), output_type="pt")
    finally:
        for h in hooks:
            h.remove()
    guided = [0.3 <= int(t) / 1000 <= 0.8 for t in pipe.scheduler.timesteps]
    assert 0 < sum(guided) < STEPS
    assert rows["unet"] == [6 if g else 3 for g in guided] == rows["reference_unet"]


def test_recording_keeps_the_conditional_rows_at_every_step(model):
    rec = AttentionRecorder()
    _run(model, 0, make_inputs(batch=2), guidance_interval=(0.4, 1.0), attention_recorder=rec)
    assert rec.steps() == list(range(STEPS))
    for (step, _name), record in rec.records.items():
        assert record.q.shape[0] == 2


# -- the feature cache -----------------------------------------------------------------------------
def test_shallow_path_with_this_steps_deep_features_is_the_whole_unet(model):
    unet = model.reference_unet  # 4 input channels; SDXL's tiny UNet has attention in its shallow blocks
    cache = FeatureCache(unet, 3)
    x, t = torch.randn(2, 4, 8, 6), torch.tensor(500)
    with torch.no_grad():
        whole = cache.full(x, t)
        torch.testing.assert_close(cache.shallow(x, t, cache.deep), whole, atol=1e-5, rtol=0)
        assert (cache.shallow(x, torch.tensor(100), cache.deep) - whole).abs().max() > 1e-4


def test_cache_interval_one_is_no_cache_and_more_skips_the_deep_blocks(model):
    deep_calls = []
    hook = model.unet.mid_block.register_forward_pre_hook(lambda m, a: deep_calls.append(1))
    try:
        plain = _run(model, 6)
        assert len(deep_calls) == STEPS
        assert torch.equal(_run(model, 6, cache_interval=1), plain)
        deep_calls.clear()
        cached = _run(model, 6, cache_interval=2)
        assert len(deep_calls) == STEPS // 2  # steps 0 and 2
    finally:
        hook.remove()
    assert torch.equal(cached, _run(model, 6, cache_interval=2))  # reproducible
    assert 0 < (cached - plain).abs().max() < 0.5


def test_cache_composes_with_the_interval_acceleration_and_balanced(base_dirs, variant):
    plain = tiny_model(base_dirs[variant])
    placed = tiny_model(base_dirs[variant]).place("cpu", memory=MemoryPreset.BALANCED)
    for accel in (False, True):
        kw = {"sampler": Sampler.DPM_SOLVER, "ref_acceleration": accel, "guidance_interval": (0.3, 0.8),
              "cache_interval": 2}
        image = _run(plain, 7, **kw)
        assert torch.isfinite(image).all() and torch.equal(_run(placed, 7, **kw), image)


def test_cache_is_refused_under_block_offloading(base_dirs):
    model = tiny_model(base_dirs["sd15"]).place("cpu", memory=MemoryPreset.LOW)
    with pytest.raises(OptionError, match="feature cache cannot run under the 'low' memory preset.*balanced"):
        _run(model, cache_interval=3)


# -- option checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"sampler": "euler"}, "'euler' is not a valid Sampler"),
    ({"guidance_interval": (0.8, 0.2)}, r"0 ≤ start ≤ end ≤ 1.*\(0.8, 0.2\)"),
    ({"guidance_interval": (float("nan"), 1.0)}, "guidance interval"),
    ({"guidance_interval": (0.0, 1.5)}, "guidance interval"),
    ({"cache_interval": 0}, "whole number >= 1.*got 0"),
    ({"cache_interval": True}, "cache interval"),
    ({"cache_interval": 2.5}, "cache interval"),
])
def test_bad_sampling_options_are_refused(model, bad, message):
    with pytest.raises((OptionError, ValueError), match=message):
        _run(model, **bad)


def test_checks_accept_what_they_should():
    assert check_cache_interval(3.0) == 3 and GuidanceInterval(0, 1).everywhere
    assert GuidanceInterval(0.25, 0.25).guides(250, 1000) and not GuidanceInterval(0.3, 0.5).guides(999, 1000)


# -- the applications' options ------------------------------------------------------------------------
def test_limits_allow_fewer_steps_with_fast_sampling_and_say_so():
    from engine.options import MODEL_LIMITS, GenerateOptions

    assert MODEL_LIMITS.check(GenerateOptions(steps=8, sampler="unipc")).sampler is Sampler.UNIPC
    assert MODEL_LIMITS.check(GenerateOptions(steps=10, guidance_interval=(0.07, 0.81))).steps == 10
    assert MODEL_LIMITS.check(GenerateOptions(steps=10, sampler="ddpm")).sampler is Sampler.DDPM
    with pytest.raises(OptionError, match="between 30 and 100, got 12 with the published sampling .from 4 with a "
                                          "fast-sampling option: sampler, guidance_start and guidance_end or "
                                          "cache_interval"):
        MODEL_LIMITS.check(GenerateOptions(steps=12))
    with pytest.raises(OptionError, match="between 4 and 100, got 3"):
        MODEL_LIMITS.check(GenerateOptions(steps=3, sampler="dpm++2m"))


def test_cli_preset_then_the_flags_given(tmp_path):
    from cli.main import build_parser
    from cli.run import options
    from engine.options import MODEL_LIMITS, OptionCheck, SamplingPreset

    def parsed(*flags):
        args = build_parser().parse_args(["tryon", "--person", "p.png", "--garment", "g.png", "--out", "o.png", *flags])
        with OptionCheck() as check:
            return options(args, check, MODEL_LIMITS)

    assert parsed().steps == 30 and not parsed().fast_sampling
    fast = SamplingPreset.FAST.setting
    assert (parsed("--sampling", "fast").steps, parsed("--sampling", "fast").sampler) == (fast.steps, fast.sampler)
    given = parsed("--sampling", "fast", "--steps", "16", "--sampler", "ddim", "--guidance-interval", "0.2:0.9",
                   "--cache-interval", "3")
    assert (given.steps, given.sampler, given.guidance_interval, given.cache_interval) == (16, "ddim", (0.2, 0.9), 3)
    with pytest.raises(SystemExit):
        parsed("--sampler", "euler")


def _tiny_cli(tmp_path, *args):
    from cli.main import main
    from tests.conftest import ROOT
    from tests.test_outfits import _photo

    _photo().save(tmp_path / "person.png")
    return main(["tryon", "--tiny", "--person", str(tmp_path / "person.png"), "--garment",
                 str(ROOT / "examples/garment/striped_tee.png"), "--result", "canvas", *args])


def test_cli_runs_a_fast_preset(tmp_path):
    import numpy as np
    from PIL import Image

    fast, plain = tmp_path / "fast.png", tmp_path / "plain.png"
    assert _tiny_cli(tmp_path, "--sampling", "preview", "--steps", "3", "--out", str(fast)) == 0
    assert _tiny_cli(tmp_path, "--steps", "3", "--out", str(plain)) == 0
    assert not np.array_equal(np.asarray(Image.open(fast)), np.asarray(Image.open(plain)))


@pytest.mark.parametrize("args, message", [
    (["--cache-interval", "2", "--memory", "low"], "--cache-interval: the feature cache cannot run under the 'low'"),
    (["--guidance-interval", "0.9:0.1"], "--guidance-interval: the guidance interval must be (start, end)"),
    (["--cache-interval", "0"], "--cache-interval must be a whole number between 1 and 10, got 0"),
])
def test_cli_refuses_sampling_options_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    import cli.run as cli_module

    monkeypatch.setattr(cli_module, "_read_images", lambda *a: pytest.fail("read the inputs before the checks"))
    assert _tiny_cli(tmp_path, *args, "--out", str(tmp_path / "o.png")) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o.png").exists()


def test_dataset_inference_takes_the_sampling_options(tmp_path):
    from engine.options import SamplingPreset
    from training.inference import InferenceConfig

    config = InferenceConfig(tmp_path, "viton_hd", tmp_path / "out", sampling="fast", cache_interval=4)
    options = config.options
    fast = SamplingPreset.FAST.setting
    assert (options.steps, options.sampler, options.cache_interval) == (fast.steps, fast.sampler, 4)
    assert InferenceConfig(tmp_path, "viton_hd", tmp_path / "out").options.sampler is None


def test_the_speed_benchmark_replays_the_steps_the_pipeline_runs(model):
    """``benchmarks.bench_sampling`` composes each setting's time from its steps' kinds: they must be
    the kinds the pipeline runs (rows through the UNet, whole or shallow)."""
    from benchmarks.bench_sampling import step_kinds
    from engine.options import SamplingSetting

    seen = []
    hooks = [model.unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append([a[0].shape[0], "shallow"])),
             model.unet.mid_block.register_forward_pre_hook(lambda m, a: seen[-1].__setitem__(1, "whole"))]
    try:
        for setting in (SamplingSetting(6, Sampler.DPM_SOLVER, (0.3, 0.8), 2),
                        SamplingSetting(5, Sampler.DDPM, cache_interval=3),
                        SamplingSetting(5, Sampler.UNIPC, (0.0, 0.5), 2)):
            seen.clear()
            _run(model, 0, make_inputs(batch=1), num_inference_steps=setting.steps, sampler=setting.sampler,
                 guidance_interval=setting.guidance_interval, cache_interval=setting.cache_interval)
            ran = [f"{'guided' if rows == 2 else 'unguided'} {kind}" for rows, kind in seen]
            assert ran == step_kinds(setting, model.scheduler_config, model.is_sdxl)
            assert len(set(ran)) > 1
    finally:
        for h in hooks:
            h.remove()


def test_recorded_steps_are_whole_ones_under_the_cache(model):
    """The app records the middle and the last step; with the cache, the last whole steps before them,
    where every layer ran (a shallow step records the outer layers only)."""
    from engine.adapters.leffa import recorded_steps

    assert recorded_steps(30) == [15, 29] and recorded_steps(10, 2) == [4, 8] and recorded_steps(5, 3) == [0, 3]
    rec = AttentionRecorder()
    _run(model, 0, cache_interval=2, attention_recorder=rec)  # steps 0 and 2 whole, 1 and 3 shallow
    layers = {step: {name for s, name in rec.records if s == step} for step in range(STEPS)}
    assert layers[0] == layers[2] == set(rec.layers()) and layers[1] < layers[0] and layers[3] == layers[1]
    assert all(s % 2 == 0 for s in recorded_steps(STEPS, 2))


def test_sampling_options_compose_with_the_speed_options(base_dirs, variant):
    """Fused q/k/v, channels-last and the compiled generative UNet (dynamo's eager backend: the tracing)
    keep each fast setting's images; with compile, the whole steps run the compiled UNet and the
    shallow ones its eager blocks."""
    from leffa.speed import compile_unet
    from runtime.speed import SpeedOptions

    torch._dynamo.reset()
    kw = {"sampler": Sampler.UNIPC, "guidance_interval": (0.3, 0.8), "cache_interval": 2}
    plain = _run(tiny_model(base_dirs[variant]), 8, **kw)
    fast = tiny_model(base_dirs[variant]).place("cpu", speed=SpeedOptions(fuse_qkv=True, channels_last=True))
    assert (_run(fast, 8, **kw) - plain).abs().max() < 1e-5
    compiled = tiny_model(base_dirs[variant])
    compile_unet(compiled, backend="eager")
    for accel in (False, True):
        expected = plain if not accel else _run(tiny_model(base_dirs[variant]), 8, ref_acceleration=True, **kw)
        assert (_run(compiled, 8, ref_acceleration=accel, **kw) - expected).abs().max() < 1e-5


def test_fast_sampling_with_the_attention_focus(model):
    """The focus reads the step the loop sets, whole or shallow, guided or not: it still changes the
    image, reproducibly."""
    from leffa.attention import AttentionFocus

    kw = {"sampler": Sampler.DPM_SOLVER, "guidance_interval": (0.3, 0.8), "cache_interval": 2}
    focused = _run(model, 9, attention_focus=AttentionFocus(0.5, levels=4), **kw)
    assert torch.equal(focused, _run(model, 9, attention_focus=AttentionFocus(0.5, levels=4), **kw))
    assert (focused - _run(model, 9, **kw)).abs().max() > 1e-4
    assert torch.equal(_run(model, 9, attention_focus=AttentionFocus(1.0), **kw), _run(model, 9, **kw))
