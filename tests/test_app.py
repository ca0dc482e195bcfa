"""The web app: gradio_client against ``python app.py --tiny`` on localhost, and its parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leffa import ModelKind
from webapp.predict import ModelCache
from webapp.settings import parse_args
from webapp.ui import editor_value, mask_from_editor

ROOT = Path(__file__).resolve().parent.parent
PERSON = str(ROOT / "examples/person/astronaut.png")
GARMENT = str(ROOT / "examples/garment/striped_tee.png")
STEPS = 2


@pytest.fixture(scope="session")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def tryon(client, person=PERSON, garment=GARMENT, editor=None, seed=42, record=False):
    from gradio_client import handle_file

    return client.predict(handle_file(person), handle_file(garment), editor, None, None, "viton_hd", "upper_body",
                          STEPS, 2.5, seed, False, False, False, False, False, record, api_name="/tryon")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_tryon_endpoint(client):
    out = tryon(client)
    assert Image.open(out[0]).size == (768, 1024) and out[1] == 42
    mask = np.asarray(Image.open(out[4]))
    assert mask.shape[:2] == (1024, 768) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    assert Image.open(out[5]).size == (768, 1024)  # DensePose from the stand-in backend


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


def test_endpoint_parameters_are_the_documented_ones(client):
    """The README's API: parameter names and order of both endpoints."""
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = {name: [p["parameter_name"] for p in info["parameters"]] for name, info in api.items()}
    assert names["/tryon"] == ["person", "garment", "editor", "mask_upload", "densepose_upload", "model_type",
                               "garment_type", "steps", "guidance", "seed", "random_seed", "ref_acceleration",
                               "repaint", "preprocess_garment", "keep_fixed", "record"]
    assert names["/pose_transfer"] == ["person", "target", "densepose_upload", "steps", "guidance", "seed",
                                       "random_seed", "ref_acceleration", "record"]


def test_attention_recording_reports_groups_and_steps(client):
    out = tryon(client, record=True)
    group, step = out[6], out[7]  # dropdown updates (the gr.State output is not part of the API)
    assert "×" in group["value"] and len(group["choices"]) >= 1  # a token grid, e.g. "64×48"
    assert step["value"] == STEPS - 1 and [c[1] for c in step["choices"]] == sorted({STEPS // 2, STEPS - 1})


# -- parts ------------------------------------------------------------------------------------------
def test_editor_round_trip():
    person = Image.new("RGB", (768, 1024), "white")
    mask = np.zeros((1024, 768), np.uint8)
    mask[100:200, 50:150] = 255
    value = editor_value(person, Image.fromarray(mask))
    assert np.array_equal(np.asarray(mask_from_editor(value)), mask)
    assert mask_from_editor(None) is None and mask_from_editor({"background": person, "layers": []}) is None
    import gradio as gr

    with pytest.raises(gr.Error, match="mask is empty"):
        mask_from_editor({"background": person, "layers": [Image.new("RGBA", (768, 1024))]})


def test_tryon_request_from_values():
    import gradio as gr

    from webapp.ui import TRYON_PARAMETERS, TryOnRequest

    values = dict(zip(TRYON_PARAMETERS, [{"path": PERSON}, GARMENT, None, None, None, "dress_code", "lower_body",
                                         "5", 1.5, 7.0, False, True, True, 1, 0, False]))
    r = TryOnRequest.from_values(values)
    assert (r.person, r.garment, r.mask_upload, r.kind, r.garment_type) == (PERSON, GARMENT, None,
                                                                            ModelKind.DRESS_CODE, "lower_body")
    assert (r.preprocess_garment, r.keep_fixed) == (True, False)
    o = r.options
    assert (o.steps, o.guidance_scale, o.seed, o.ref_acceleration, o.repaint, o.record_attention) == (
        5, 1.5, 7, True, True, False)
    assert TryOnRequest.from_values({**values, "random_seed": True}).options.seed is None  # drawn, then reported
    with pytest.raises(gr.Error, match="Upload a garment photo first"):
        TryOnRequest.from_values({**values, "garment": None})


def test_pose_request_needs_a_target():
    import gradio as gr

    from webapp.ui import POSE_PARAMETERS, PoseRequest

    values = dict(zip(POSE_PARAMETERS, [PERSON, None, None, 30, 2.5, 42, False, False, True]))
    with pytest.raises(gr.Error, match="target pose"):
        PoseRequest.from_values(values)
    r = PoseRequest.from_values({**values, "densepose_upload": {"path": PERSON}})
    assert (r.target, r.densepose_upload, r.options.repaint, r.options.record_attention) == (None, PERSON, False, True)


def test_sliders_follow_the_predictors_limits():
    """The UI reads the option ranges from the predictor (data), for both tabs."""
    import gradio as gr

    from leffa.hub import tiny_model
    from webapp.predict import MODEL_LIMITS, TINY_LIMITS, OptionLimits, Predictor
    from webapp.ui import create_demo

    assert (MODEL_LIMITS.steps_min, MODEL_LIMITS.steps_max, MODEL_LIMITS.steps_default) == (30, 100, 30)
    assert (TINY_LIMITS.steps_min, TINY_LIMITS.steps_max, TINY_LIMITS.steps_default) == (1, 100, 4)
    limits = OptionLimits(steps_min=3, steps_max=9, steps_default=5, guidance_min=1.0, guidance_max=4.0,
                          guidance_default=3.0, seed_default=11)
    demo = create_demo(Predictor(ModelCache(tiny_model), preprocessor=None, limits=limits))
    blocks = list(demo.blocks.values())
    steps = [b for b in blocks if isinstance(b, gr.Slider) and b.label == "Steps"]
    guidance = [b for b in blocks if isinstance(b, gr.Slider) and b.label == "Guidance scale"]
    seeds = [b for b in blocks if isinstance(b, gr.Number) and b.label == "Seed"]
    assert len(steps) == len(guidance) == len(seeds) == 2  # try-on and pose transfer
    assert all((s.minimum, s.maximum, s.value) == (3, 9, 5) for s in steps)
    assert all((g.minimum, g.maximum, g.value) == (1.0, 4.0, 3.0) for g in guidance)
    assert all(n.value == 11 and n.maximum == limits.seed_max for n in seeds)
    assert not any(getattr(b, "elem_id", None) == "tiny-banner" for b in blocks)  # not the --tiny predictor


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

    def loader(kind):
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

    def loader(kind):
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
    (dict(steps=101), "steps must be between 30 and 100, got 101"),
    (dict(steps=1000), "steps must be between 30 and 100"),
    (dict(guidance_scale=-100.0), "guidance must be between 0.1 and 5.0, got -100.0"),
    (dict(seed=-1), "seed must be between 0 and"),
    (dict(seed=2**70), "seed must be between 0 and"),
])
def test_server_checks_options_against_its_limits(options, message):
    from errors import OptionError
    from webapp.predict import MODEL_LIMITS, GenerateOptions

    MODEL_LIMITS.check(GenerateOptions())  # the defaults pass
    MODEL_LIMITS.check(GenerateOptions(seed=None))  # "random seed"
    with pytest.raises(OptionError, match=message):
        MODEL_LIMITS.check(GenerateOptions(**options))


def test_all_model_work_shares_one_slot_and_uploads_expire():
    """Try-on, pose transfer and the mask computation wait for each other (one model at a time on
    the machine, not one per endpoint); Gradio's upload cache is cleaned."""
    from leffa.hub import tiny_model
    from webapp.predict import Predictor
    from webapp.ui import MODEL_SLOT, create_demo

    demo = create_demo(Predictor(ModelCache(tiny_model), preprocessor=None))
    fns = list(demo.fns.values()) if isinstance(demo.fns, dict) else list(demo.fns)
    slots = {f.api_name: f.concurrency_id for f in fns if f.api_name in ("tryon", "pose_transfer", "compute_mask")}
    assert set(slots) == {"tryon", "pose_transfer", "compute_mask"}
    assert set(slots.values()) == {MODEL_SLOT}
    assert demo.delete_cache == (3600, 86400)
