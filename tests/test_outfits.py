"""Outfits, variations and chains (engine/outfit.py, Engine.tryon, the samples of Engine.generate): two
garments put on in turn, each by the model trained on its type and masked on the previous result;
samples drawn with seed + k, each equal to its seed's run alone; the CLI's files and refusals; the
API's samples and seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from engine import registry
from engine.options import MAX_SEED, GenerateOptions, OptionLimits, ResultView
from engine.outfit import Garment, check_outfit, outfit_models, union_mask
from engine.service import Engine
from engine.setup import ModelSetup, WeightSource
from errors import OptionError
from preprocess.framing import blend_mask
from preprocess.masks import GarmentType as G
from preprocess.masks import TryOnModel
from runtime.memory import samples_that_fit
from tests.conftest import ROOT
from tests.test_engine import _same_picture
from tests.test_framing import figure

TEE = ROOT / "examples/garment/striped_tee.png"
OTHER = ROOT / "examples/garment/logo_tee.png"


@pytest.fixture(scope="module")
def engine():
    return Engine.create(ModelSetup(), WeightSource(tiny=True))


def _photo() -> Image.Image:
    return figure((1500, 1000), (600, 100, 900, 980))


def _outfit(cut_out: bool = False) -> list[Garment]:
    return [Garment(TEE, G.UPPER_BODY, cut_out), Garment(OTHER, G.LOWER_BODY, cut_out)]


# -- what an outfit may be, checked before any work ---------------------------------------------------
@pytest.mark.parametrize("types, message", [
    ((G.UPPER_BODY, G.UPPER_BODY), "got two upper_body garments: make the second garment a lower_body one"),
    ((G.LOWER_BODY, G.LOWER_BODY), "make the second garment a upper_body one"),
    ((G.DRESSES, G.UPPER_BODY), "a dress covers the upper and the lower body"),
    ((G.UPPER_BODY, G.LOWER_BODY, G.DRESSES), "an outfit is 1 or 2 garments"),
    ((), "an outfit is 1 or 2 garments"),
])
def test_an_outfit_is_an_upper_and_a_lower_garment_or_one(types, message):
    with pytest.raises(OptionError, match=message):
        check_outfit(types)


def test_each_garment_goes_to_the_model_trained_on_its_type():
    names = lambda variant, *types: [e.name for e in outfit_models(variant, types)]  # noqa: E731
    assert names(TryOnModel.VITON_HD, G.UPPER_BODY, G.LOWER_BODY) == ["virtual_tryon", "virtual_tryon_dc"]
    assert names(TryOnModel.DRESS_CODE, G.UPPER_BODY, G.LOWER_BODY) == ["virtual_tryon_dc"] * 2
    assert names(TryOnModel.VITON_HD, G.DRESSES) == ["virtual_tryon_dc"]  # VITON-HD knows no dresses
    assert check_outfit(["lower_body", "upper_body"]) == (G.LOWER_BODY, G.UPPER_BODY)  # the order given


@pytest.mark.parametrize("samples, seed, message", [
    (0, 42, "samples must be a whole number between 1 and 4, got 0"),
    (5, 42, "samples must be a whole number between 1 and 4, got 5"),
    (2.5, 42, "samples must be a whole number between 1 and 4, got 2.5"),
    (4, MAX_SEED - 1, f"seed must be a whole number between 0 and {MAX_SEED - 3}"),  # the last seed is seed + 3
])
def test_samples_are_checked_with_the_other_options(samples, seed, message):
    with pytest.raises(OptionError, match=message):
        OptionLimits().check(GenerateOptions(samples=samples, seed=seed))
    assert OptionLimits().check(GenerateOptions(samples=4, seed=MAX_SEED - 3)).samples == 4


def test_nothing_runs_before_every_check_passed(engine, monkeypatch):
    monkeypatch.setattr(engine, "preprocessor", None)  # any preprocessing would fail on None
    monkeypatch.setattr(engine.models, "get", lambda *a, **k: pytest.fail("loaded a model"))
    two_upper = [Garment(TEE, G.UPPER_BODY), Garment(OTHER, G.UPPER_BODY)]
    with pytest.raises(OptionError, match="two upper_body garments"):
        engine.tryon(_photo(), two_upper, TryOnModel.VITON_HD, GenerateOptions(steps=1))
    with pytest.raises(OptionError, match="samples must be"):
        engine.tryon(_photo(), _outfit(), TryOnModel.VITON_HD, GenerateOptions(steps=1, samples=5))
    with pytest.raises(OptionError, match="drop --size"):
        engine.tryon(_photo(), _outfit(), TryOnModel.VITON_HD, GenerateOptions(steps=1), size=(48, 64))


# -- an outfit through the tiny models ----------------------------------------------------------------
def test_an_outfit_changes_both_regions_the_second_masked_on_the_first_result(engine):
    photo = _photo()
    options = GenerateOptions(steps=2, seed=7, samples=2)
    result = engine.tryon(photo, _outfit(), TryOnModel.VITON_HD, options, view=ResultView.PHOTO)
    assert [s.seed for s in result.samples] == [7, 8]
    first_pass = result.samples[0].passes[0].inputs
    for k, sample in enumerate(result.samples):
        upper, lower = sample.passes
        assert (upper.entry.name, upper.garment_type) == ("virtual_tryon", G.UPPER_BODY)
        assert (lower.entry.name, lower.garment_type) == ("virtual_tryon_dc", G.LOWER_BODY)
        assert upper.inputs is first_pass  # the first garment's inputs: the same for every sample
        # the second pass saw the sample's own first-pass picture, and its mask was computed from that
        (alone,) = engine.generate("virtual_tryon", first_pass.person, first_pass.garment, first_pass.mask,
                                   first_pass.densepose, dataclasses.replace(options, seed=7 + k, samples=1))
        assert _same_picture(lower.inputs.person, alone.image)
        recomputed = engine.preprocessor.person_mask(lower.inputs.person, TryOnModel.DRESS_CODE, G.LOWER_BODY)
        assert np.array_equal(np.asarray(lower.inputs.mask), np.asarray(recomputed.mask))
    masks = [np.asarray(p.inputs.mask) > 127 for p in result.samples[0].passes]
    assert (masks[0] & ~masks[1]).any() and (masks[1] & ~masks[0]).any()  # two regions, not one
    assert not _same_picture(result.samples[0].passes[1].inputs.person, result.samples[1].passes[1].inputs.person)

    # the answer: the photo at its size, changed in both garments' regions and nowhere else
    sample, box = result.samples[0], result.framing.box
    answer, before = np.asarray(sample.answer).astype(int), np.asarray(photo).astype(int)
    assert sample.answer.size == photo.size
    part = box.inside(photo.size)
    for mask, name in ((masks[0] & ~masks[1], "upper only"), (masks[1] & ~masks[0], "lower only")):
        weights = np.zeros(photo.size[::-1], np.uint8)
        weights[part.y0:part.y1, part.x0:part.x1] = blend_mask(Image.fromarray(mask.astype(np.uint8) * 255),
                                                               box, part)
        assert np.abs(answer - before)[weights == 255].max() > 0, name
    weights = np.zeros(photo.size[::-1], np.uint8)
    weights[part.y0:part.y1, part.x0:part.x1] = blend_mask(sample.mask, box, part)
    assert np.array_equal(answer[weights == 0], before[weights == 0])  # outside both masks: the photo

    again = engine.tryon(photo, _outfit(), TryOnModel.VITON_HD, options, view=ResultView.PHOTO)
    assert all(np.array_equal(np.asarray(a.answer), np.asarray(b.answer))  # the seed decides
               for a, b in zip(again.samples, result.samples))


def test_the_editors_mask_is_the_first_garments(engine):
    photo, options = _photo(), GenerateOptions(steps=1, seed=3)
    edited = Image.new("L", (768, 1024), 0)
    edited.paste(255, (300, 300, 460, 600))
    result = engine.tryon(photo, _outfit(), TryOnModel.VITON_HD, options, edited_mask=edited, view=ResultView.FRAMED)
    upper, lower = result.samples[0].passes
    assert upper.inputs.mask is edited and lower.inputs.mask is not edited
    assert np.array_equal(np.asarray(result.samples[0].mask), np.asarray(union_mask([edited, lower.inputs.mask])))
    assert result.samples[0].answer.size == (768, 1024)  # the framed picture


def test_samples_split_into_batches_that_fit_each_equal_to_its_seed_alone(engine, monkeypatch):
    monkeypatch.setattr(engine, "samples_per_batch", lambda entry, samples: 2)  # memory for two at a time
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)) for _ in range(2)]
    inputs = (images[0], images[1], Image.new("L", (48, 64), 255), images[0])
    options = GenerateOptions(steps=2, seed=11, samples=3)
    samples = engine.generate("virtual_tryon", *inputs, options)
    assert [(s.seed, s.row) for s in samples] == [(11, 0), (12, 1), (13, 0)]
    for sample in samples:
        (alone,) = engine.generate("virtual_tryon", *inputs, dataclasses.replace(options, seed=sample.seed, samples=1))
        assert _same_picture(sample.image, alone.image)


def test_as_many_samples_in_a_batch_as_the_free_memory_holds():
    gib = 2**30
    assert samples_that_fit(3 * gib, 7 * gib, 4) == 2
    assert samples_that_fit(3 * gib, 20 * gib, 4) == 4
    assert samples_that_fit(3 * gib, 1 * gib, 4) == 1  # one at a time, even when short: that is what fits
    assert samples_that_fit(0, 1, 3) == 3


def test_the_next_model_takes_its_turn_in_a_one_model_cache():
    engine = Engine.create(ModelSetup(), WeightSource(tiny=True), max_models=1)
    loads = []
    real = engine.models._loader
    engine.models._loader = lambda entry: (loads.append(entry.name), real(entry))[1]
    engine.tryon(_photo(), _outfit(), TryOnModel.VITON_HD, GenerateOptions(steps=1, samples=2))
    assert loads == ["virtual_tryon", "virtual_tryon_dc"]  # each loaded once: a pass for all samples at a time
    assert engine.models.loaded() == ["virtual_tryon_dc"]


# -- the command line -----------------------------------------------------------------------------------
def _cli(tmp_path, *args):
    from cli.main import main

    _photo().save(tmp_path / "person.png")
    return main(["tryon", "--tiny", "--person", str(tmp_path / "person.png"), "--steps", "1", *args])


def test_cli_writes_one_file_per_sample_named_by_its_seed(tmp_path, capsys):
    out = tmp_path / "look.png"
    assert _cli(tmp_path, "--garment", str(TEE), "--samples", "3", "--seed", "5", "--out", str(out)) == 0
    written = sorted(p.name for p in tmp_path.glob("look*"))
    assert written == ["look-seed5.png", "look-seed6.png", "look-seed7.png"]
    printed = capsys.readouterr().out
    assert all(f"saved {tmp_path / name}" in printed for name in written)
    pictures = [np.asarray(Image.open(tmp_path / name)) for name in written]
    assert pictures[0].shape == (1000, 1500, 3) and not np.array_equal(pictures[0], pictures[1])


def test_cli_outfit(tmp_path, capsys):
    out = tmp_path / "outfit.png"
    assert _cli(tmp_path, "--garment", str(TEE), "--garment-type", "upper_body", "--garment", str(OTHER),
                "--garment-type", "lower_body", "--out", str(out)) == 0
    assert Image.open(out).size == (1500, 1000)
    assert "upper_body: the virtual_tryon model; lower_body: the virtual_tryon_dc model" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "--samples must be a whole number between 1 and 4, got 0"),
    (["--samples", "5"], "--samples must be a whole number between 1 and 4, got 5"),
    (["--garment", str(OTHER), "--garment-type", "upper_body", "--garment-type", "upper_body"],
     "got two upper_body garments: make the second --garment a lower_body one"),
    (["--garment", str(OTHER)], "give one --garment-type per --garment, in the same order: got 2 garments and 0 types"),
])
def test_cli_refuses_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    import cli.run as cli_module

    monkeypatch.setattr(cli_module, "_read_images", lambda *a: pytest.fail("read the inputs before the checks"))
    assert _cli(tmp_path, "--garment", str(TEE), *args, "--out", str(tmp_path / "o.png")) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("o*.png"))


# -- the API --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def test_the_api_returns_every_sample_with_its_seed_and_each_garments_pass(client):
    from gradio_client import handle_file

    from tests.test_app import submit_tryon

    job = submit_tryon(client, samples=3, seed=20, garment2=handle_file(str(OTHER)), garment2_type="lower_body")
    out = job.result()
    answer, seed, gallery = out[0], out[1], out[9]  # (no State in the API's answer)
    assert seed == 20 and Image.open(answer).size == (768, 1024)
    assert [item["caption"] for item in gallery] == ["seed 20", "seed 21", "seed 22"]
    pictures = [np.asarray(Image.open(item["image"])) for item in gallery]
    assert np.array_equal(pictures[0], np.asarray(Image.open(answer)))  # the first sample is the result
    assert not np.array_equal(pictures[0], pictures[1])
    second_parsing, second_mask, second_densepose = out[10:13]
    assert Image.open(second_mask).size == (768, 1024) and second_parsing and second_densepose
    refused = submit_tryon(client, samples=5)
    with pytest.raises(Exception, match="samples must be a whole number between 1 and 4, got 5"):
        refused.result()
    two_upper = submit_tryon(client, garment2=handle_file(str(OTHER)), garment2_type="upper_body")
    with pytest.raises(Exception, match="two upper_body garments"):
        two_upper.result()
