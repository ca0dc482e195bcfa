"""The web app: gradio_client against ``python app.py --tiny`` on localhost, and its parts."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leffa import ModelKind
from engine.cache import ModelCache
from engine.options import MODEL_LIMITS, GenerateOptions, SamplingPreset
from engine.service import loader
from engine.setup import ModelSetup, WeightSource
from webapp.settings import parse_args
from webapp.tryon_tab import editor_value, mask_from_editor

TINY_MODELS = loader(ModelSetup(), WeightSource(tiny=True))  # the tiny models, for ModelCache

ROOT = Path(__file__).resolve().parent.parent
PERSON = str(ROOT / "examples/person/astronaut.png")
GARMENT = str(ROOT / "examples/garment/striped_tee.png")
FOCUS_OFF = [1.0, 1, 0.0, 1.0]  # the experimental attention focus's parameters, off
STEPS = 2


def LIMITS_OF(entry):  # noqa: N802 - the published models' limits, as a PoseRequest looks them up
    return entry.limits


@pytest.fixture(scope="session")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def tryon(client, person=PERSON, garment=GARMENT, editor=None, seed=42, record=False, result="canvas"):
    """A ``/tryon`` call; the 768x1024 canvas result unless ``result`` asks for another."""
    from gradio_client import handle_file

    return client.predict(handle_file(person), handle_file(garment), editor, None, None, "viton_hd", "upper_body",
                          STEPS, 2.5, seed, False, False, False, False, False, record, result=result, api_name="/tryon")


def submit_tryon(client, steps=STEPS, **overrides):
    """A ``/tryon`` job, its values by parameter name (``overrides`` replace the defaults)."""
    from gradio_client import handle_file

    from webapp.tryon_tab import TRYON_PARAMETERS

    values = dict(zip(TRYON_PARAMETERS, [handle_file(PERSON), handle_file(GARMENT), None, None, None, "viton_hd",
                                         "upper_body", steps, 2.5, 42, False, False, False, False, False, False, *FOCUS_OFF,
                                         "canvas", 1, None, "lower_body", "model", 0.0, 1.0, 1]))
    values.update(overrides)
    return client.submit(*values.values(), api_name="/tryon")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_tryon_endpoint(client):
    out = tryon(client)
    assert Image.open(out[0]).size == (768, 1024) and out[1] == 42
    mask = np.asarray(Image.open(out[4]))
    assert mask.shape[:2] == (1024, 768) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    assert Image.open(out[5]).size == (768, 1024)  # DensePose from the stand-in backend


def test_tryon_answers_with_the_photo_by_default(client, tmp_path):
    """The default result: the person's own photo at its size (here landscape), changed only around
    the garment; the framed picture on request; the box the model saw among the intermediates."""
    from gradio_client import handle_file

    from tests.test_framing import figure

    photo = figure((1500, 1000), (900, 150, 1150, 950))
    photo.save(tmp_path / "landscape.png")
    out = client.predict(handle_file(str(tmp_path / "landscape.png")), handle_file(GARMENT), None, None, None,
                         "viton_hd", "upper_body", STEPS, 2.5, 42, False, False, False, False, False, False,
                         api_name="/tryon")
    result = pixels(out[0])
    assert result.shape == (1000, 1500, 3)
    assert np.array_equal(result[:, :600], np.asarray(photo)[:, :600])  # far from the person: the photo itself
    assert Image.open(out[8]).size[0] > Image.open(out[8]).size[1]  # the framing preview: the landscape photo
    framed = tryon(client, person=str(tmp_path / "landscape.png"), result="framed")
    assert Image.open(framed[0]).size == (768, 1024)


def test_same_seed_same_image(client):
    assert np.array_equal(pixels(tryon(client, seed=3)[0]), pixels(tryon(client, seed=3)[0]))
    assert not np.array_equal(pixels(tryon(client, seed=3)[0]), pixels(tryon(client, seed=4)[0]))


def test_edited_mask_is_what_the_model_uses(client, tmp_path):
    from gradio_client import handle_file

    layer = np.zeros((1024, 768, 4), np.uint8)
    layer[300:600, 200:500] = (255, 0, 255, 255)  # a painted rectangle
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    editor = {"background": handle_file(PERSON), "layers": [handle_file(str(tmp_path / "layer.png"))],
              "composite": None}
    edited = tryon(client, editor=editor)
    used = np.asarray(Image.open(edited[4])) > 0
    expected = np.zeros((1024, 768), bool)
    expected[300:600, 200:500] = True
    assert np.array_equal(used, expected)
    assert not np.array_equal(pixels(edited[0]), pixels(tryon(client)[0]))


def test_bad_upload_then_next_request_succeeds(client, tmp_path):
    from gradio_client.exceptions import AppError

    bad = tmp_path / "person.png"
    bad.write_text("this is not an image")
    with pytest.raises(AppError, match="not a readable image|truncated"):
        tryon(client, person=str(bad))
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 400), "white").save(blank)
    with pytest.raises(AppError, match="no person detected"):
        tryon(client, person=str(blank))
    assert Image.open(tryon(client)[0]).size == (768, 1024)


def test_pose_endpoint(client):
    from gradio_client import handle_file

    out = client.predict(handle_file(PERSON), handle_file(str(ROOT / "examples/pose/astronaut_mirrored.png")), None,
                         STEPS, 2.5, 7, False, True, False, api_name="/pose_transfer")
    assert Image.open(out[0]).size == (768, 1024) and out[1] == 7
    assert Image.open(out[2]).size == (768, 1024)


def test_pose_endpoint_runs_mcld_and_shows_its_texture_map_and_face(client):
    """The model choice is the endpoint's last parameter (older callers leave it out: Leffa)."""
    from gradio_client import handle_file

    out = client.predict(handle_file(PERSON), handle_file(str(ROOT / "examples/pose/astronaut_mirrored.png")), None,
                         STEPS, 3.5, 7, False, False, False, *FOCUS_OFF, "framed", "mcld", api_name="/pose_transfer")
    assert Image.open(out[0]).size == (352, 512) and out[1] == 7
    texture, face = out[-3:-1]  # before the gallery, the last output
    assert Image.open(texture).size == (512, 512) and Image.open(face).size[1] > 0


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=101), "steps must be a whole number between 1 and 100, got 101"),
    (dict(steps=2.5), "steps must be a whole number between 1 and 100, got 2.5"),
    (dict(steps="abc"), "steps must be a whole number between 1 and 100, got 'abc'"),
    (dict(steps=None), "steps must be a whole number between 1 and 100, got None"),
    (dict(guidance=-100), "guidance must be a number between 0.1 and 5.0, got -100"),
    (dict(seed=-1), "seed must be a whole number between 0 and 2147483647, got -1"),
    (dict(seed=2**70), "seed must be a whole number between 0 and 2147483647, got 1180591620717411303424"),
    (dict(model_type="hd"), "model_type must be one of viton_hd, dress_code; got 'hd'"),
    (dict(garment_type=3), "garment_type must be one of upper_body, lower_body, dresses; got 3"),
    (dict(random_seed="no"), "random_seed must be true or false, got 'no'"),
    (dict(record=1), "record must be true or false, got 1"),
    (dict(sampler="euler"), "sampler must be one of ddpm, ddim, dpm++2m, unipc; got 'euler'"),
    (dict(guidance_start=0.9, guidance_end=0.1), "guidance_start and guidance_end: the guidance interval must be "
                                                  "(start, end) with 0 ≤ start ≤ end ≤ 1"),
    (dict(cache_interval=0), "cache_interval must be a whole number between 1 and 10, got 0"),
])
def test_api_refuses_bad_options_with_a_message(client, overrides, message):
    """The server checks every option itself (the events skip Gradio's preprocessing): a readable
    message naming the option and what it allows, before any work; the app keeps serving."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=re.escape(message)):
        submit_tryon(client, **overrides).result()


def test_fast_sampling_through_the_api(client):
    """The sampling options reach the pipeline: another sampler, an interval and the cache give another
    image of the same seed, the same one twice; MCLD refuses them by name."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    fast = dict(sampler="dpm++2m", guidance_start=0.07, guidance_end=0.81, cache_interval=2)
    first, again = (pixels(submit_tryon(client, **fast).result()[0]) for _ in range(2))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, pixels(submit_tryon(client).result()[0]))
    with pytest.raises(AppError, match=re.escape("sampler, guidance_start and guidance_end, cache_interval: the mcld "
                                                 "model does not support it")):
        client.predict(handle_file(PERSON), handle_file(str(ROOT / "examples/pose/astronaut_mirrored.png")), None,
                       STEPS, 3.5, 7, False, False, False, *FOCUS_OFF, "framed", "mcld", 1, "unipc",
                       api_name="/pose_transfer")


def test_pose_api_refuses_bad_options_with_a_message(client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as bad:
        client.predict(handle_file(PERSON), handle_file(PERSON), None, 0, "high", 42, False, "yes", False,
                       api_name="/pose_transfer")
    assert str(bad.value).splitlines() == ["steps must be a whole number between 1 and 100, got 0",
                                           "guidance must be a number between 0.1 and 5.0, got 'high'",
                                           "ref_acceleration must be true or false, got 'yes'"]


def test_api_refuses_nan_sent_as_raw_json(app_url):
    """JSON from other clients may carry NaN (Python's json writes it; gradio_client refuses to)."""
    import httpx

    api = app_url + "gradio_api"
    with open(PERSON, "rb") as f:
        (path,) = httpx.post(f"{api}/upload", files={"files": ("person.png", f, "image/png")}).json()
    photo = f'{{"path": "{path}", "meta": {{"_type": "gradio.FileData"}}}}'
    body = f'{{"data": [{photo}, {photo}, null, 30, NaN, 42, false, false, false, 1.0, 1, 0.0, 1.0, "framed", "pose_transfer", 1, "model", 0.0, 1.0, 1]}}'
    event = httpx.post(f"{api}/call/pose_transfer", content=body, headers={"content-type": "application/json"})
    answer = httpx.get(f"{api}/call/pose_transfer/{event.json()['event_id']}", timeout=60).text
    assert "event: error" in answer and "guidance must be a number between 0.1 and 5.0, got nan" in answer


def test_what_gradio_itself_refuses_reaches_a_raw_client_with_a_message(app_url):
    """Too few parameters, or a file path that was not uploaded: a message, not ``{"error": null}``."""
    import httpx

    api = app_url + "gradio_api"
    for data, message in (("[null, null, null, 30]", "didn't receive enough input values (needed: 20, got: 4)"),
                          ('[{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, null, null, 30, 2.5, 42, '
                           'false, false, false, 1.0, 1, 0.0, 1.0, "framed", "pose_transfer", 1, "model", 0.0, 1.0, 1]',
                           "/etc/hostname")):
        event = httpx.post(f"{api}/call/pose_transfer", content=f'{{"data": {data}}}',
                           headers={"content-type": "application/json"})
        answer = httpx.get(f"{api}/call/pose_transfer/{event.json()['event_id']}", timeout=60).text
        assert "event: error" in answer and '"error": null' not in answer and message in answer, answer


LONG_STEPS = 100  # the --tiny maximum: more than a minute on this CPU, unless it stops


def wait_until_denoising(job, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((unit.desc or "").startswith("Denoising step") for unit in job.status().progress_data or []):
            return
        time.sleep(0.1)
    pytest.fail("the long request never started denoising")


def assert_slot_free(client, seconds: float = 45) -> None:
    """A short request finishes soon: the long one before it stopped at its next step (had it gone
    on, this would wait for its other 90-odd steps, a second or more each here)."""
    start = time.monotonic()
    result = submit_tryon(client).result(timeout=120)
    assert Image.open(result[0]).size == (768, 1024)
    assert time.monotonic() - start < seconds


def test_cancelled_request_stops_and_frees_the_slot(client):
    """Stop (an API client's cancel is the same /cancel call) ends the generation at its next
    denoising step, not at its end."""
    job = submit_tryon(client, steps=LONG_STEPS)
    wait_until_denoising(job)
    job.cancel()
    assert_slot_free(client)


def test_disconnected_client_stops_and_frees_the_slot(client, app_url):
    """A client that goes away mid-generation (killed) stops its generation too."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from gradio_client import Client
from tests.test_app import LONG_STEPS, submit_tryon, wait_until_denoising
job = submit_tryon(Client({app_url!r}, verbose=False), steps=LONG_STEPS)
wait_until_denoising(job)
print("denoising", flush=True)
time.sleep(600)
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "denoising"
    finally:
        child.kill()
        child.wait()
    assert_slot_free(client)


def test_endpoint_parameters_are_the_documented_ones(client):
    """The README's API: parameter names and order of both endpoints."""
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = {name: [p["parameter_name"] for p in info["parameters"]] for name, info in api.items()}
    focus = ["focus", "focus_levels", "focus_start", "focus_end"]
    sampling = ["sampler", "guidance_start", "guidance_end", "cache_interval"]
    assert names["/tryon"] == ["person", "garment", "editor", "mask_upload", "densepose_upload", "model_type",
                               "garment_type", "steps", "guidance", "seed", "random_seed", "ref_acceleration",
                               "repaint", "preprocess_garment", "keep_fixed", "record", *focus, "result",
                               "samples", "garment2", "garment2_type", *sampling]
    assert names["/pose_transfer"] == ["person", "target", "densepose_upload", "steps", "guidance", "seed",
                                       "random_seed", "ref_acceleration", "record", *focus, "result", "model",
                                       "samples", *sampling]
    # what came after the first release may be left out by a client written before it
    for endpoint, later in (("/tryon", {"samples", "garment2", "garment2_type", *sampling}),
                            ("/pose_transfer", {"model", "samples", *sampling})):
        assert later <= {p["parameter_name"] for p in api[endpoint]["parameters"] if p["parameter_has_default"]}


def test_attention_recording_reports_groups_and_steps(client):
    out = tryon(client, record=True)
    group, step = out[6], out[7]  # dropdown updates (the gr.State output is not part of the API)
    assert "×" in group["value"] and len(group["choices"]) >= 1  # a token grid, e.g. "64×48"
    # listed 1-based as the progress counts ("2/2": after the last step), the recorder's 0-based steps as values
    assert step["value"] == STEPS - 1 and [c[1] for c in step["choices"]] == sorted({STEPS // 2, STEPS - 1})
    assert [c[0] for c in step["choices"]] == [f"{s + 1}/{STEPS}" for s in sorted({STEPS // 2, STEPS - 1})]


# -- parts ------------------------------------------------------------------------------------------
def test_editor_round_trip():
    person = Image.new("RGB", (768, 1024), "white")
    mask = np.zeros((1024, 768), np.uint8)
    mask[100:200, 50:150] = 255
    value = editor_value(person, Image.fromarray(mask))
    assert np.array_equal(np.asarray(mask_from_editor(value)), mask)
    assert mask_from_editor(None) is None and mask_from_editor({"background": person, "layers": []}) is None
    from errors import UserError

    with pytest.raises(UserError, match="mask is empty"):
        mask_from_editor({"background": person, "layers": [Image.new("RGBA", (768, 1024))]})


def test_tryon_request_from_values():
    from errors import OptionError, UserError
    from preprocess.masks import GarmentType, TryOnModel
    from engine.options import TINY_LIMITS
    from webapp.tryon_tab import TRYON_PARAMETERS, TryOnRequest

    values = dict(zip(TRYON_PARAMETERS, [{"path": PERSON}, GARMENT, None, None, None, "dress_code", "lower_body",
                                         5, 1.5, 7.0, False, True, True, True, False, False, *FOCUS_OFF]))
    r = TryOnRequest.from_values(values, TINY_LIMITS)
    assert (r.person, r.garment, r.mask_upload, r.model_type) == (PERSON, GARMENT, None, TryOnModel.DRESS_CODE)
    assert (r.model_type, r.garment_type) == (TryOnModel.DRESS_CODE, GarmentType.LOWER_BODY)  # enums, not strings
    assert (r.preprocess_garment, r.keep_fixed) == (True, False)
    o = r.options
    assert (o.steps, o.guidance_scale, o.seed, o.ref_acceleration, o.repaint, o.record_attention) == (
        5, 1.5, 7, True, True, False)
    assert type(o.seed) is int  # a whole float (7.0) is the whole number
    assert TryOnRequest.from_values({**values, "random_seed": True}, TINY_LIMITS).options.seed is None  # drawn
    with pytest.raises(UserError, match="Upload a garment photo first"):
        TryOnRequest.from_values({**values, "garment": None}, TINY_LIMITS)
    # every bad value at once, each named with what it allows, one per line
    with pytest.raises(OptionError) as bad:
        TryOnRequest.from_values({**values, "model_type": "hd", "garment_type": None, "steps": "5", "seed": 7.5,
                                  "keep_fixed": 1, "repaint": "no"}, TINY_LIMITS)
    assert str(bad.value).splitlines() == [
        "model_type must be one of viton_hd, dress_code; got 'hd'",
        "garment_type must be one of upper_body, lower_body, dresses; got None",
        "keep_fixed must be true or false, got 1",
        "steps must be a whole number between 1 and 100, got '5'",
        "seed must be a whole number between 0 and 2147483647, got 7.5",
        "repaint must be true or false, got 'no'"]


def test_attention_focus_options():
    """The experimental focus (issue 15): τ = 1 is off (no focus at all), another τ a checked
    ``AttentionFocus``; bad values are listed with what they allow."""
    from errors import OptionError
    from leffa import AttentionFocus
    from webapp.pose_tab import POSE_PARAMETERS, PoseRequest

    values = dict(zip(POSE_PARAMETERS, [PERSON, PERSON, None, 30, 2.5, 42, False, False, False, *FOCUS_OFF]))
    assert PoseRequest.from_values(values, LIMITS_OF).options.attention_focus is None
    focused = {**values, "focus": 0.25, "focus_levels": 2.0, "focus_start": 0, "focus_end": 0.5}
    assert PoseRequest.from_values(focused, LIMITS_OF).options.attention_focus == AttentionFocus(0.25, 2, (0, 0.5))
    with pytest.raises(OptionError) as bad:
        PoseRequest.from_values({**values, "focus": 0.0, "focus_levels": 9, "focus_start": "a"}, LIMITS_OF)
    assert str(bad.value).splitlines() == ["focus must be a number between 0.1 and 2.0, got 0.0",
                                           "focus_levels must be a whole number between 1 and 4, got 9",
                                           "focus_start must be a number between 0.0 and 1.0, got 'a'"]
    with pytest.raises(OptionError, match="focus_start and focus_end must be"):
        PoseRequest.from_values({**focused, "focus_start": 0.6}, LIMITS_OF)


def test_attention_focus_through_the_api(client):
    """A focused generation differs from the default one; τ = 1 gives the default picture."""
    images = {name: pixels(submit_tryon(client, **focus).result()[0])
              for name, focus in (("off", {}), ("one", {"focus": 1.0, "focus_levels": 3}), ("sharp", {"focus": 0.1}))}
    assert np.array_equal(images["off"], images["one"]) and not np.array_equal(images["off"], images["sharp"])


def test_pose_request_needs_a_target():
    from errors import UserError
    from webapp.pose_tab import POSE_PARAMETERS, PoseRequest

    values = dict(zip(POSE_PARAMETERS, [PERSON, None, None, 30, 2.5, 42, False, False, True, *FOCUS_OFF]))
    with pytest.raises(UserError, match="target pose"):
        PoseRequest.from_values(values, LIMITS_OF)
    r = PoseRequest.from_values({**values, "densepose_upload": {"path": PERSON}}, LIMITS_OF)
    assert (r.target, r.densepose_upload, r.options.repaint, r.options.record_attention) == (None, PERSON, False, True)
    with pytest.raises(UserError, match="random_seed must be true or false, got 'yes'"):
        PoseRequest.from_values({**values, "densepose_upload": PERSON, "random_seed": "yes"}, LIMITS_OF)
    # the chosen model's own limits: MCLD takes guidance 7 (Leffa's stop at 5) and 20 steps (Leffa's start at 30)
    mcld = {**values, "densepose_upload": PERSON, "steps": 20, "guidance": 7.0, "record": False, "model": "mcld"}
    assert PoseRequest.from_values(mcld, LIMITS_OF).model.name == "mcld"
    with pytest.raises(UserError, match="guidance must be a number between 0.1 and 5.0, got 7.0"):
        PoseRequest.from_values({**mcld, "model": "pose_transfer"}, LIMITS_OF)
    with pytest.raises(UserError, match="virtual_tryon is a tryon model"):
        PoseRequest.from_values({**mcld, "model": "virtual_tryon"}, LIMITS_OF)


def test_sliders_follow_the_engines_limits():
    """The UI reads the option ranges from the engine (data), for both tabs."""
    import gradio as gr

    from engine.options import MODEL_LIMITS, TINY_LIMITS, OptionLimits
    from engine.service import Engine
    from webapp.ui import create_demo

    assert (MODEL_LIMITS.steps_min, MODEL_LIMITS.steps_max, MODEL_LIMITS.steps_default) == (30, 100, 30)
    assert (TINY_LIMITS.steps_min, TINY_LIMITS.steps_max, TINY_LIMITS.steps_default) == (1, 100, 4)
    limits = OptionLimits(steps_min=3, steps_max=9, steps_default=5, guidance_min=1.0, guidance_max=4.0,
                          guidance_default=3.0, seed_default=11)
    demo = create_demo(Engine(ModelCache(TINY_MODELS), preprocessor=None, limits=limits))
    blocks = list(demo.blocks.values())
    steps = [b for b in blocks if isinstance(b, gr.Slider) and b.label == "Steps"]
    guidance = [b for b in blocks if isinstance(b, gr.Slider) and b.label == "Guidance scale"]
    seeds = [b for b in blocks if isinstance(b, gr.Number) and b.label == "Seed"]
    assert len(steps) == len(guidance) == len(seeds) == 2  # try-on and pose transfer
    assert all((s.minimum, s.maximum, s.value) == (3, 9, 5) for s in steps)
    assert all((g.minimum, g.maximum, g.value) == (1.0, 4.0, 3.0) for g in guidance)
    assert all(n.value == 11 and n.maximum == limits.seed_max for n in seeds)
    assert not any(getattr(b, "elem_id", None) == "tiny-banner" for b in blocks)  # not the --tiny engine


def test_tiny_model_leaves_the_global_rng_alone():
    from leffa.hub import tiny_model

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = tiny_model(ModelKind.VITON_HD)
    assert torch.equal(torch.get_rng_state(), state)
    again = tiny_model(ModelKind.VITON_HD)  # the same weights on every load of a kind
    other = tiny_model(ModelKind.DRESS_CODE)
    assert torch.equal(torch.get_rng_state(), state)
    fingerprint = lambda m: [p.detach().sum().item() for p in m.unet.parameters()]  # noqa: E731
    assert fingerprint(first) == fingerprint(again) != fingerprint(other)


def test_model_cache_drops_least_recently_used():
    loads = []

    def loader(entry):  # the cache passes the registry entry
        kind = ModelKind(entry.name)
        loads.append(kind)
        from leffa.hub import tiny_model

        return tiny_model(kind)

    cache = ModelCache(loader, max_models=2)
    cache.get(ModelKind.VITON_HD)
    cache.get(ModelKind.DRESS_CODE)
    cache.get(ModelKind.VITON_HD)  # cached, now most recent
    cache.get(ModelKind.POSE_TRANSFER)  # drops DRESS_CODE
    assert cache.loaded() == [ModelKind.VITON_HD, ModelKind.POSE_TRANSFER]
    assert loads == [ModelKind.VITON_HD, ModelKind.DRESS_CODE, ModelKind.POSE_TRANSFER]


def test_model_cache_makes_room_when_out_of_memory():
    from leffa.hub import tiny_model

    calls = []

    def loader(entry):
        kind = ModelKind(entry.name)
        calls.append(kind)
        if kind is ModelKind.POSE_TRANSFER and len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return tiny_model(kind)

    cache = ModelCache(loader, max_models=3)
    cache.get(ModelKind.VITON_HD)
    cache.get(ModelKind.POSE_TRANSFER)  # OOM once: VITON_HD dropped, retried
    assert cache.loaded() == [ModelKind.POSE_TRANSFER]


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("LEFFA_PORT", "9000")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("LEFFA_MAX_MODELS", "1")
    s = parse_args([])
    assert (s.port, s.host, s.max_models, s.share, s.tiny) == (9000, "0.0.0.0", 1, False, False)
    s = parse_args(["--port", "9001", "--host", "127.0.0.1", "--tiny"])
    assert (s.port, s.host, s.tiny) == (9001, "127.0.0.1", True)
    with pytest.raises(SystemExit):
        parse_args(["--queue-size", "0"])


def test_warped_reference_follows_the_attention():
    """One-hot attention: on itself, the warp is the reference unchanged; on the mirrored
    token, it is the reference mirrored left-right (up to token-grid resolution)."""
    from leffa import AttentionRecorder
    from leffa.recording import AttentionRecord
    from webapp.attention_view import warped_reference

    h, w = 8, 6
    rng = np.random.default_rng(0)
    reference = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # one pixel per token
    mirrored = torch.arange(h * w).view(h, w).flip(1).reshape(-1)
    rec = AttentionRecorder()
    for name, target in (("same", torch.arange(h * w)), ("mirror", mirrored)):
        q = 100 * torch.nn.functional.one_hot(target, h * w).float()[None, None]  # (1, 1 head, n, n)
        rec.records[(0, name)] = AttentionRecord(q, torch.eye(h * w)[None, None], 1.0, (h, w))
    assert np.array_equal(np.asarray(warped_reference(rec, 0, ["same"], reference)), np.asarray(reference))
    assert np.array_equal(np.asarray(warped_reference(rec, 0, ["mirror"], reference)),
                          np.asarray(reference)[:, ::-1])


@pytest.mark.parametrize("options, message", [
    (dict(steps=101), "steps must be a whole number between 30 and 100, got 101"),
    (dict(steps=1000), "steps must be a whole number between 30 and 100"),
    (dict(steps=30.5), "steps must be a whole number between 30 and 100, got 30.5"),
    (dict(steps="abc"), "steps must be a whole number between 30 and 100, got 'abc'"),
    (dict(steps=None), "steps must be a whole number between 30 and 100, got None"),
    (dict(steps=True), "steps must be a whole number"),
    (dict(guidance_scale=-100.0), "guidance must be a number between 0.1 and 5.0, got -100.0"),
    (dict(guidance_scale=float("nan")), "guidance must be a number between 0.1 and 5.0, got nan"),
    (dict(guidance_scale=float("inf")), "guidance must be a number between 0.1 and 5.0, got inf"),
    (dict(guidance_scale="2.5"), "guidance must be a number between 0.1 and 5.0, got '2.5'"),
    (dict(seed=-1), "seed must be a whole number between 0 and 2147483647, got -1"),
    (dict(seed=2**70), r"seed must be a whole number between 0 and 2147483647, got 1180591620717411303424"),
    (dict(seed="x" * 100), r"got 'x{36}\.\.\.$"),  # long values cut short
    (dict(ref_acceleration="true"), "ref_acceleration must be true or false, got 'true'"),
    (dict(record_attention=None), "record must be true or false, got None"),
])
def test_server_checks_options_against_its_limits(options, message):
    from errors import OptionError
    from engine.options import MODEL_LIMITS, GenerateOptions

    assert MODEL_LIMITS.check(GenerateOptions()) == GenerateOptions()  # the defaults pass
    assert MODEL_LIMITS.check(GenerateOptions(seed=None)).seed is None  # "random seed"
    assert MODEL_LIMITS.check(GenerateOptions(steps=40.0, guidance_scale=2)) == GenerateOptions(40, 2.0)
    with pytest.raises(OptionError, match=message):
        MODEL_LIMITS.check(GenerateOptions(**options))


def test_all_model_work_shares_one_slot_and_uploads_expire():
    """Try-on, pose transfer and the mask computation wait for each other (one model at a time on
    the machine, not one per endpoint); Gradio's upload cache is cleaned."""
    from engine.service import Engine
    from webapp.components import MODEL_SLOT
    from webapp.ui import create_demo

    demo = create_demo(Engine(ModelCache(TINY_MODELS), preprocessor=None))
    fns = list(demo.fns.values()) if isinstance(demo.fns, dict) else list(demo.fns)
    slots = {f.api_name: f.concurrency_id for f in fns if f.api_name in ("tryon", "pose_transfer", "compute_mask")}
    assert set(slots) == {"tryon", "pose_transfer", "compute_mask"}
    assert set(slots.values()) == {MODEL_SLOT}
    assert demo.delete_cache == (3600, 86400)


# -- stopping, progress phases, messages, page parts ------------------------------------------------
def _small_inputs():
    rng = np.random.default_rng(0)
    picture = lambda: Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))  # noqa: E731
    return picture(), picture(), Image.new("L", (48, 64), 255), picture()


def test_generate_reports_its_phases_and_stops_when_asked():
    """Progress names each phase (loading, denoising i/n, decoding) with the request's share done;
    ``should_stop`` is asked after every step and stops the run there."""
    from engine.options import TINY_LIMITS, GenerateOptions
    from engine.service import Engine
    from errors import GenerationStopped

    engine = Engine(ModelCache(TINY_MODELS), preprocessor=None, limits=TINY_LIMITS)
    reports = []
    (gen,) = engine.generate(ModelKind.VITON_HD, *_small_inputs(), GenerateOptions(steps=3),
                             progress=lambda fraction, desc: reports.append((fraction, desc)))
    assert gen.steps == 3 and gen.image.size == (48, 64)
    descs = [desc for _, desc in reports]
    assert descs[0].startswith("Loading the virtual_tryon model")
    assert descs[1:] == ["Denoising step 0/3", "Denoising step 1/3", "Denoising step 2/3", "Decoding the image"]
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] < 1

    asked = []

    def stop_after_two() -> bool:
        asked.append(True)
        return len(asked) > 2  # asked before loading, then after each step: stop after the second step

    with pytest.raises(GenerationStopped, match="stopped after step 2 of 50"):
        engine.generate(ModelKind.VITON_HD, *_small_inputs(), GenerateOptions(steps=50),
                           should_stop=stop_after_two)
    assert len(asked) == 3
    with pytest.raises(GenerationStopped):  # cancelled while preprocessing: nothing is loaded or run
        Engine(ModelCache(lambda kind: pytest.fail("loaded")), preprocessor=None).generate(
            ModelKind.VITON_HD, *_small_inputs(), GenerateOptions(), should_stop=lambda: True)


def test_nothing_asks_a_direct_call_to_stop():
    from engine.progress import never_stop
    from webapp.components import stop_requested

    assert stop_requested() is never_stop  # outside a queued Gradio event


def test_stopped_generation_is_no_error_toast():
    """A generation stopped because no one waits for it leaves no traceback in the server log."""
    import gradio as gr

    from errors import GenerationStopped
    from webapp.components import user_errors

    @user_errors
    def stopped():
        raise GenerationStopped("stopped after step 3 of 100")

    with pytest.raises(gr.Error) as e:
        stopped()
    assert e.value.print_exception is False


def test_toasts_keep_their_layout_and_long_ones_stay():
    from webapp.components import SHORT_MESSAGE, TOAST_SECONDS, toast
    from webapp.ui import PAGE_CSS

    short = toast("Upload a person photo first.")
    assert (short.message, short.duration) == ("Upload a person photo first.", TOAST_SECONDS)
    assert short.print_exception is False  # a user's mistake: no traceback in the server log
    two_commands = "missing: a.pth, b.onnx. Download them with\n    hf download a.pth\n    hf download b.onnx"
    kept = toast(two_commands)
    assert kept.duration is None and kept.message == two_commands  # stays until closed, lines as written
    assert toast("x" * (SHORT_MESSAGE + 1)).duration is None
    assert toast("a <b> & c").message == "a &lt;b&gt; &amp; c"  # the page renders HTML: shown as typed
    assert ".toast-message-text { white-space: pre-wrap; }" in PAGE_CSS  # line breaks kept (see the browser test)


def test_user_errors_become_toasts():
    import gradio as gr

    from errors import OptionError
    from webapp.components import user_errors

    @user_errors
    def bad():
        raise OptionError("steps must be a whole number between 1 and 100, got 'abc'\nseed must be ...")

    with pytest.raises(gr.Error) as e:
        bad()
    assert e.value.duration is None and e.value.message.count("\n") == 1


def test_a_bug_reaches_the_page_as_a_short_message_and_the_log_with_its_traceback(caplog):
    import gradio as gr

    from webapp.components import BUG_MESSAGE, user_errors

    @user_errors
    def broken():
        raise KeyError("/srv/secret/path")

    with pytest.raises(gr.Error) as e:
        broken()
    assert e.value.message == BUG_MESSAGE and "secret" not in e.value.message
    assert "KeyError: '/srv/secret/path'" in caplog.text  # the traceback, in the server's log


def _blocks(demo, cls):
    import gradio as gr

    return [b for b in demo.blocks.values() if isinstance(b, getattr(gr, cls))]


def _demo(tiny: bool):
    from engine.service import Engine
    from webapp.ui import create_demo

    return create_demo(Engine(ModelCache(TINY_MODELS), preprocessor=None, source=WeightSource(tiny=tiny)))


def test_header_is_general_and_each_tab_has_its_instructions():
    """The header speaks of both tasks and claims the published weights only when they are used;
    each tab explains its own task."""
    from webapp.pose_tab import POSE_HELP
    from webapp.tryon_tab import TRYON_HELP

    for tiny in (False, True):
        texts = [m.value for m in _blocks(_demo(tiny), "Markdown")]
        header = texts[0]
        assert header.startswith("# Leffa: virtual try-on and pose transfer") and "garment" not in header
        assert ("published weights" in header) is not tiny
        assert TRYON_HELP in texts and POSE_HELP in texts
        if tiny:
            assert "not the published weights" in next(t for t in texts if "Offline demo mode" in t)


def test_stop_buttons_cancel_the_generations_and_seed_shows_after_one():
    demo = _demo(tiny=False)
    fns = list(demo.fns.values())
    by_name = {f.api_name: f for f in fns if f.api_name in ("tryon", "pose_transfer")}
    stops = {b.elem_id: b for b in _blocks(demo, "Button") if b.value == "Stop"}
    assert set(stops) == {"tryon-stop", "pose-stop"}
    for prefix, name in (("tryon", "tryon"), ("pose", "pose_transfer")):
        stop = (stops[f"{prefix}-stop"]._id, "click")
        (cancel,) = [f for f in fns if f.is_cancel_function and stop in f.targets]
        assert cancel.cancels == [by_name[name]._id]
    seeds = [n for n in _blocks(demo, "Number") if n.label == "Seed used"]
    assert len(seeds) == 2 and not any(n.visible for n in seeds)  # nothing to show before a generation


def test_clearing_the_mask_keeps_the_photo():
    """'Clear mask' puts the photo back in the editor with an empty layer to paint on (the editor's
    own 'Clear canvas', which drops the photo too, is hidden: checked in the browser test)."""
    from webapp.tryon_tab import photo_without_strokes
    from webapp.ui import PAGE_CSS

    demo = _demo(tiny=False)
    (button,) = [b for b in _blocks(demo, "Button") if b.elem_id == "tryon-clear-mask"]
    (clear,) = [f for f in demo.fns.values() if (button._id, "click") in f.targets]
    editor = _blocks(demo, "ImageEditor")[0]
    assert clear.fn is photo_without_strokes and [b._id for b in clear.outputs] == [editor._id]
    assert f"#{editor.elem_id} .top-panel > button:last-of-type {{ display: none; }}" in PAGE_CSS
    value = photo_without_strokes({"path": PERSON})
    assert value["background"].size == (768, 1024)
    assert np.asarray(value["background"]).std() > 10  # the photo, not a blank canvas
    (layer,) = value["layers"]
    assert layer.size == (768, 1024) and not np.asarray(layer)[:, :, 3].any()  # nothing painted
    assert mask_from_editor({**value, "layers": []}) is None and photo_without_strokes(None) is None


def test_heatmap_legend_and_clicked_point():
    from webapp.attention_view import colourize, mark_point, with_colour_legend

    picture = Image.new("RGB", (768, 1024), (128, 128, 128))
    legend = np.asarray(with_colour_legend(picture)).astype(int)
    assert legend.shape == (1024 + 64, 768, 3) and (legend[:1024] == 128).all()
    bar = legend[1024 + 32, 96:768 - 96]  # the colour scale, low (left) to high (right)
    assert np.abs(bar[0] - colourize(np.array([[0]], np.uint8))[0, 0]).max() <= 1
    assert np.abs(bar[-1] - colourize(np.array([[255]], np.uint8))[0, 0]).max() <= 1
    assert bar[0, 2] > bar[0, 0] and bar[-1, 0] > bar[-1, 2]  # blue to red
    marked = mark_point(picture, (0.25, 0.5))
    assert (np.asarray(picture) == 128).all()  # the stored result stays unmarked
    changed = np.argwhere((np.asarray(marked) != 128).any(axis=2))
    assert abs(changed[:, 1].mean() - 192) < 2 and abs(changed[:, 0].mean() - 512) < 2  # around the point


def test_attention_and_intermediate_pictures_have_bounded_height():
    from webapp.components import ATTENTION_HEIGHT, INTERMEDIATE_HEIGHT

    images = _blocks(_demo(tiny=False), "Image")
    intermediates = [b for b in images if b.label in ("Human parsing", "Keypoints", "Mask used", "DensePose",
                                                       "DensePose IUV of the target")]
    assert len(intermediates) == 5 and all(b.height == INTERMEDIATE_HEIGHT for b in intermediates)
    attention = [b for b in images
                 if b.label.startswith(("The point", "Where the point", "The garment w", "The person w"))]
    assert len(attention) == 6 and all(b.height == ATTENTION_HEIGHT for b in attention)  # three per tab


@pytest.mark.slow  # a whole try-on at 768×1024 on the CPU
def test_tryon_progress_names_every_phase_in_order():
    """Preprocessing first, not 'Denoising 0 %' (the handler called directly: no queue, never stopped)."""
    from preprocess.standins import standin_preprocessor
    from engine.options import TINY_LIMITS
    from engine.service import Engine
    from webapp.tryon_tab import TRYON_PARAMETERS, tryon

    reports = []

    def progress(fraction, desc):
        reports.append((fraction, desc))

    values = dict(zip(TRYON_PARAMETERS, [PERSON, GARMENT, None, None, None, "viton_hd", "upper_body",
                                         1, 2.5, 42, False, False, False, False, False, False, *FOCUS_OFF, "canvas"]))
    engine = Engine(ModelCache(TINY_MODELS), standin_preprocessor(), source=WeightSource(tiny=True), limits=TINY_LIMITS)
    out = tryon(engine, progress, **values)
    assert out[0].size == (768, 1024) and out[1] == 42
    descs = [desc for _, desc in reports]
    assert descs[0] == "Preprocessing the photos" and descs[1].startswith("Loading the virtual_tryon model")
    assert descs[2:] == ["Denoising step 0/1", "Decoding the image"]
    assert [fraction for fraction, _ in reports] == sorted(fraction for fraction, _ in reports)


# -- weights: every missing file before any work; notices; the start-up report ----------------------
ALL_TRYON_DC_FILES = ["humanparsing/parsing_atr.onnx", "humanparsing/parsing_lip.onnx", "openpose/body_pose_model.pth",
                      "densepose/model_final_162be9.pkl", "virtual_tryon_dc.pth"]


@pytest.fixture
def offline_engine(tmp_path, monkeypatch):
    """The real app's engine on an empty checkpoint folder, offline; its preprocessor fails the
    test if anything reaches it."""
    from webapp.backend import build_engine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = build_engine(parse_args(["--checkpoint-dir", str(tmp_path), "--device", "cpu"]))

    class Untouchable:
        def __getattr__(self, name):
            pytest.fail(f"preprocessing ({name}) started before the weights were there")

    engine.preprocessor = Untouchable()
    return engine


def _missing_in(error) -> list[str]:
    return str(error.value).split(": ", 1)[1].split(" (about")[0].split(", ")


def test_a_request_names_every_missing_file_before_any_work(offline_engine):
    from preprocess.masks import GarmentType, TryOnModel
    from weightfiles.hub import MissingWeightsError

    with pytest.raises(MissingWeightsError) as info:
        offline_engine.tryon_inputs(PERSON, GARMENT, TryOnModel.DRESS_CODE, GarmentType.DRESSES)
    assert _missing_in(info) == ALL_TRYON_DC_FILES and "leffa download tryon-dc" in str(info.value)
    with pytest.raises(MissingWeightsError) as info:
        offline_engine.pose_inputs(PERSON, PERSON)
    assert _missing_in(info) == ["densepose/model_final_162be9.pkl", "pose_transfer.pth"]
    with pytest.raises(MissingWeightsError) as info:  # an uploaded DensePose image: no DensePose model needed
        offline_engine.pose_inputs(PERSON, PERSON, densepose=PERSON)
    assert _missing_in(info) == ["pose_transfer.pth"]
    with pytest.raises(MissingWeightsError) as info:  # the mask alone: the parsers and OpenPose
        offline_engine.person_mask(PERSON, TryOnModel.VITON_HD, GarmentType.UPPER_BODY)
    assert _missing_in(info) == ALL_TRYON_DC_FILES[:3]


def test_tabs_say_which_weights_will_be_downloaded(offline_engine, tmp_path):
    from engine.registry import WeightSet
    from webapp.components import weights_notice

    notice = weights_notice(offline_engine, WeightSet.POSE)
    assert "`densepose/model_final_162be9.pkl`, `pose_transfer.pth` (about 21.2 GB)" in notice
    assert "downloaded on first use" in notice
    tryon_notice = weights_notice(offline_engine, WeightSet.TRYON, WeightSet.TRYON_DC)
    assert "`virtual_tryon.pth` (about 8.2 GB)" in tryon_notice
    assert "The tryon-dc model (`virtual_tryon_dc.pth`, about 7.2 GB) is downloaded when first chosen" in tryon_notice
    for name in ("densepose/model_final_162be9.pkl", "pose_transfer.pth"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert weights_notice(offline_engine, WeightSet.POSE) == ""
    offline_engine.source = WeightSource(tiny=True)
    assert weights_notice(offline_engine, WeightSet.TRYON, WeightSet.TRYON_DC) == ""


def test_app_reports_its_weights_at_start(tmp_path, monkeypatch, capsys):
    import app
    import webapp.ui

    launched = []
    monkeypatch.setattr(webapp.ui, "launch", lambda demo, settings: launched.append(settings))
    app.main(["--checkpoint-dir", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert launched and f"Leffa weights in {tmp_path.resolve()}:" in out
    assert "pose      missing densepose/model_final_162be9.pkl, pose_transfer.pth (about 21.2 GB" in out
    app.main(["--tiny"])  # no weights are used: nothing to report
    assert "Leffa weights" not in capsys.readouterr().out


def test_real_models_are_counted_in_memory_under_the_chosen_preset(tmp_path):
    """The app's cache holds the real models by memory (engine.cache.estimated_budget), under --memory."""
    from leffa import MemoryPreset
    from webapp.backend import build_engine

    engine = build_engine(parse_args(["--checkpoint-dir", str(tmp_path), "--device", "cpu", "--memory", "low"]))
    budget = engine.models.budget
    assert budget.preset is MemoryPreset.LOW and budget.device == "cpu" and engine.gpu is None
    assert budget.need(ModelKind.VITON_HD, MemoryPreset.FAST).resident > 7 * 10**9  # float32 on the CPU


def test_sampling_presets_set_the_steps_and_options():
    from webapp.components import preset_chosen

    assert preset_chosen(30, "published") == (30, "model", 0.0, 1.0, 1)
    for preset in ("fast", "preview"):
        setting = SamplingPreset(preset).setting
        assert preset_chosen(30, preset) == (setting.steps, setting.sampler.value, *setting.guidance_interval,
                                             setting.cache_interval)
        assert MODEL_LIMITS.check(setting.applied(GenerateOptions())).steps < 30  # the check accepts them


def test_choosing_mcld_sets_its_ranges_and_shows_its_intermediates(tmp_path):
    from engine.service import Engine
    from webapp.pose_tab import model_changed

    engine = Engine.create(ModelSetup(), WeightSource(checkpoint_dir=tmp_path))  # loads nothing
    steps, guidance, accel, record, focus_group, focus, appearance, sampling, *values = model_changed(engine, "mcld")
    assert (steps["minimum"], steps["maximum"], steps["value"]) == (10, 100, 20)
    assert (guidance["minimum"], guidance["maximum"], guidance["value"]) == (1.0, 10.0, 3.5)
    assert not accel["interactive"] and not record["interactive"] and not focus_group["visible"]
    assert focus["value"] == 1.0 and appearance["visible"]
    assert not sampling["visible"] and values == ["model", 0.0, 1.0, 1]  # its own sampling, refused otherwise
    steps, guidance, accel, *_, appearance, sampling, sampler, start, end, cache = model_changed(engine, "pose_transfer")
    # 30 DDPM steps by default; a multistep sampler from 4 (the check says so for DDPM below 30)
    assert (steps["minimum"], steps["value"], guidance["maximum"]) == (4, 30, 5.0)
    assert accel["interactive"] and not appearance["visible"] and sampling["visible"] and sampler == {"__type__": "update"}
