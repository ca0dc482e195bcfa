"""LeffaPipeline on tiny models: determinism, reference acceleration, repaint, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from leffa import LeffaPipeline
from leffa.pipeline import rescale_guidance
from runtime.image_tensors import repaint_blend
from tests.conftest import make_inputs

STEPS = 3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _run(pipe, inputs=None, seed=0, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "pt")
    return pipe(**(inputs or make_inputs()), generator=_gen(seed), **kw).images


def test_output_types(model):
    pipe = LeffaPipeline(model)
    pt = _run(pipe, make_inputs(batch=2))
    assert pt.shape == (2, 3, 64, 48) and pt.dtype == torch.float32
    assert 0 <= pt.min() and pt.max() <= 1
    pil = _run(pipe, output_type="pil")
    assert isinstance(pil[0], Image.Image) and pil[0].size == (48, 64)
    arr = _run(pipe, output_type="np")
    assert arr.shape == (1, 64, 48, 3)
    np.testing.assert_allclose(np.asarray(pil[0]) / 255.0, arr[0], atol=1 / 255)


def test_same_seed_same_image_different_seed_different(model):
    pipe = LeffaPipeline(model)
    a, b, c = _run(pipe, seed=7), _run(pipe, seed=7), _run(pipe, seed=8)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_global_rng_is_not_used(model):
    pipe = LeffaPipeline(model)
    torch.manual_seed(1)
    a = _run(pipe, seed=3)
    torch.manual_seed(2)
    assert torch.equal(a, _run(pipe, seed=3))


def test_latents_are_honoured(model):
    pipe = LeffaPipeline(model)
    lat = torch.randn(1, 4, 8, 6, generator=_gen(100))
    a = _run(pipe, latents=lat)
    assert torch.equal(a, _run(pipe, latents=lat.clone()))
    assert (a - _run(pipe, latents=-lat)).abs().max() > 1e-3
    assert (a - _run(pipe)).abs().max() > 1e-3  # drawn noise differs from the given one
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 8, 6\)"):
        _run(pipe, latents=torch.randn(1, 4, 8, 8))


def _count_reference_calls(model):
    calls = []
    model.reference_unet.register_forward_pre_hook(lambda mod, args: calls.append(int(args[1])))
    return calls


def test_reference_unet_once_per_step(model):
    pipe = LeffaPipeline(model)
    calls = _count_reference_calls(model)
    _run(pipe, num_inference_steps=4)
    pipe.scheduler.set_timesteps(4)
    assert calls == pipe.scheduler.timesteps.tolist()


def test_ref_acceleration_runs_reference_once_at_middle_timestep(model):
    pipe = LeffaPipeline(model)
    calls = _count_reference_calls(model)
    out = _run(pipe, num_inference_steps=4, ref_acceleration=True)
    pipe.scheduler.set_timesteps(4)
    assert calls == [int(pipe.scheduler.timesteps[2])]
    assert (out - _run(pipe, num_inference_steps=4)).abs().max() > 0  # it is an approximation
    assert not model.attn_state.kv_cache and not model.attn_state.ref_features  # freed


def test_repaint_keeps_unmasked_pixels(base_dirs):
    from tests.conftest import tiny_model

    pipe = LeffaPipeline(tiny_model(base_dirs["sd15"]))
    inputs = make_inputs(height=256, width=192)  # blur radius k = 256 // 100 -> 3
    out = _run(pipe, inputs, repaint=True)
    plain = _run(pipe, inputs)
    person = (inputs["src_image"] + 1) / 2
    mask = inputs["mask"][0, 0]
    far = torch.ones_like(mask, dtype=torch.bool)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    band = 12  # well past the blur's reach
    far[max(0, ys.min() - band): ys.max() + band + 1, max(0, xs.min() - band): xs.max() + band + 1] = False
    q = lambda t: (t * 255).round() / 255  # noqa: E731 -- repaint works in uint8, as the original
    torch.testing.assert_close(out[0][:, far], q(person)[0][:, far], atol=1e-6, rtol=0)
    inside = mask.bool().clone()
    inside[: ys.min() + band] = False
    inside[ys.max() - band:] = False
    inside[:, : xs.min() + band] = False
    inside[:, xs.max() - band:] = False
    torch.testing.assert_close(out[0][:, inside], q(plain)[0][:, inside], atol=1e-6, rtol=0)


def test_repaint_blur_radius_at_1024():
    seen = {}
    from PIL import ImageFilter

    real = ImageFilter.GaussianBlur

    class Spy(real):
        def __init__(self, radius):
            seen["radius"] = radius
            super().__init__(radius)

    ImageFilter.GaussianBlur, saved = Spy, real
    try:
        repaint_blend(torch.zeros(1, 3, 1024, 8), torch.ones(1, 3, 1024, 8), torch.ones(1, 1, 1024, 8))
    finally:
        ImageFilter.GaussianBlur = saved
    assert seen["radius"] == 11


def test_guidance_rescale_defaults_to_guidance_scale(model):
    pipe = LeffaPipeline(model)
    default = _run(pipe, guidance_scale=2.0)
    assert torch.equal(default, _run(pipe, guidance_scale=2.0, guidance_rescale=2.0))
    assert (default - _run(pipe, guidance_scale=2.0, guidance_rescale=0.0)).abs().max() > 1e-4


def test_rescale_guidance_formula():
    g = torch.Generator().manual_seed(0)
    eps, eps_c = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g) * 3
    out = rescale_guidance(eps, eps_c, 2.5)
    for i in range(2):
        ratio = eps_c[i].std() / eps[i].std()
        torch.testing.assert_close(out[i], 2.5 * eps[i] * ratio + (1 - 2.5) * eps[i])
    assert torch.equal(rescale_guidance(eps, eps_c, 0.0), eps)


def test_callback_reports_progress(model):
    seen = []
    _run(LeffaPipeline(model), callback=lambda step, total: seen.append((step, total)))
    assert seen == [(i, STEPS) for i in range(1, STEPS + 1)]


def test_pil_inputs(model):
    t = make_inputs()
    to_pil = lambda x: Image.fromarray(((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    mask = Image.fromarray((t["mask"][0, 0].numpy() * 255).astype(np.uint8))
    out = LeffaPipeline(model)(to_pil(t["src_image"]), to_pil(t["ref_image"]), mask,
                               to_pil(t["densepose"]), num_inference_steps=2, generator=_gen(0))
    assert out.images[0].size == (48, 64)


def test_sdxl_scheduler_has_zero_terminal_snr(base_dirs):
    from tests.conftest import tiny_model

    sched = LeffaPipeline(tiny_model(base_dirs["sdxl"])).scheduler
    assert sched.alphas_cumprod[-1] < 1e-6
    assert LeffaPipeline(tiny_model(base_dirs["sd15"])).scheduler.alphas_cumprod[-1] > 1e-3


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(src_image=d["src_image"][..., :60, :]), "src_image is .* batch size, height and width must match"),
    (lambda d: {k: d.__setitem__(k, v[..., :60, :44]) for k, v in list(d.items())}, "multiples of 8, got 60x44"),
    (lambda d: d.update(densepose=d["densepose"][:, :1]), r"densepose: expected shape \(B, 3, H, W\)"),
    (lambda d: d.update(mask=d["mask"].repeat(1, 3, 1, 1)), r"mask: expected shape \(B, 1, H, W\)"),
    (lambda d: d.update(mask=d["mask"] * 255), r"mask: values must lie in \[0, 1\]"),
    (lambda d: d.update(ref_image=(d["ref_image"] + 1) * 127.5), r"ref_image: values must lie in \[-1, 1\]"),
    (lambda d: d.update(ref_image=d["ref_image"].repeat(2, 1, 1, 1)), "ref_image is .* batch size"),
    (lambda d: d.update(src_image="person.png"), "src_image: expected a PIL image"),
    (lambda d: d.update(src_image=(d["src_image"] > 0).to(torch.uint8)), "src_image: expected a float tensor"),
])
def test_bad_inputs(model, edit, message):
    inputs = make_inputs()
    edit(inputs)
    with pytest.raises((ValueError, TypeError), match=message):
        _run(LeffaPipeline(model), inputs)


def test_bad_options(model):
    pipe = LeffaPipeline(model)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        _run(pipe, num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type"):
        _run(pipe, output_type="jpeg")


def test_state_is_clean_after_an_error(model):
    pipe = LeffaPipeline(model)
    with pytest.raises(RuntimeError):
        _run(pipe, callback=lambda *_: (_ for _ in ()).throw(RuntimeError("stop")))
    assert not model.attn_state.ref_features and model.attn_state.recorder is None
    assert _run(pipe).shape == (1, 3, 64, 48)  # and the next call works


def test_callback_can_stop_the_run(model):
    from leffa.pipeline import GenerationStopped

    pipe = LeffaPipeline(model)
    seen = []

    def stop_after_two(step, total):
        seen.append(step)
        return step < 2

    with pytest.raises(GenerationStopped, match="after step 2 of 4"):
        _run(pipe, callback=stop_after_two, num_inference_steps=4)
    assert seen == [1, 2]
    assert model.attn_state.recorder is None and not model.attn_state.ref_features  # state cleared
    assert _run(pipe, callback=lambda step, total: None, num_inference_steps=2) is not None  # None = go on


def test_bfloat16_matches_float32(base_dirs, variant):
    """Half precision (bfloat16 runs on the CPU) against float32, same seed: the images agree
    to within 0.01 on average and 0.05 at worst on a [0, 1] scale (measured: about 0.002 and
    0.013 on the tiny random models)."""
    from tests.conftest import tiny_model

    full = _run(LeffaPipeline(tiny_model(base_dirs[variant])))
    half_model = tiny_model(base_dirs[variant]).place("cpu", torch.bfloat16)
    assert half_model.unet.dtype == torch.bfloat16
    half = _run(LeffaPipeline(half_model))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    diff = (half - full).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.05


def test_two_pipelines_on_one_model_take_turns(model):
    """The attention session is the model's: a second pipeline on the same model waits."""
    import threading

    first, second = LeffaPipeline(model), LeffaPipeline(model)
    inside, release, order = threading.Event(), threading.Event(), []

    def hold(step, total):
        order.append(("first", step))
        if step == 1:
            inside.set()
            release.wait(timeout=60)

    t = threading.Thread(target=lambda: _run(first, callback=hold, num_inference_steps=2))
    t.start()
    assert inside.wait(timeout=60)
    u = threading.Thread(target=lambda: _run(second, callback=lambda s, n: order.append(("second", s)),
                                             num_inference_steps=2))
    u.start()
    u.join(timeout=2)
    assert u.is_alive() and ("second", 1) not in order  # waiting for the model
    release.set()
    t.join(timeout=120)
    u.join(timeout=120)
    assert order == [("first", 1), ("first", 2), ("second", 1), ("second", 2)]
    assert model.attn_state.recorder is None and not model.attn_state.ref_features
    assert model._lock.acquire(blocking=False)  # the session ended: the model is free
    model._lock.release()
