"""The engine (engine/): one registry, one set of option checks, one input dispatch and one request
flow under the app, the command line and ``leffa infer``; every family through the same path."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cli.main import build_parser, main
from engine import inputs, registry
from engine.cache import ModelCache
from engine.options import CHECKPOINT_LIMITS, CLI_NAMES, MODEL_LIMITS, TINY_LIMITS, GenerateOptions
from engine.registry import ENTRIES, MODEL_NAMES, Supports, Task, WeightSet
from engine.service import Engine
from engine.setup import ModelSetup, WeightSource
from errors import OptionError, UserError
from mcld.inputs import ANSWER_SIZE, sample_tensors
from preprocess.masks import GarmentType, TryOnModel
from preprocess.weights import Analysis
from tests.conftest import viton_tree

ROOT = Path(__file__).resolve().parent.parent
PERSON = str(ROOT / "examples/person/astronaut.png")
GARMENT = str(ROOT / "examples/garment/striped_tee.png")


def _picture(path: Path, size=(48, 64), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _no_model(monkeypatch):
    """Fail the test if any model is loaded."""
    from engine.adapters import leffa

    monkeypatch.setattr(leffa.Adapter, "load", lambda *a, **k: pytest.fail("a model was loaded"))


# -- the same checks everywhere ------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--guidance-scale", "nan"], "--guidance-scale must be a number between 0.1 and 5.0, got nan"),
    (["--guidance-scale", "-3"], "--guidance-scale must be a number between 0.1 and 5.0, got -3.0"),
    (["--seed", "1180591620717411303424"],
     "--seed must be a whole number between 0 and 2147483647, got 1180591620717411303424"),
    (["--seed", "-5"], "--seed must be a whole number between 0 and 2147483647, got -5"),
    (["--steps", "101"], "--steps must be a whole number between 1 and 100, got 101"),
    (["--guidance-rescale", "inf"], "--guidance-rescale must be a number between 0.0 and 5.0, got inf"),
])
def test_cli_refuses_what_the_app_refuses_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    """As a new user meets it (``leffa tryon --tiny``): the app's limits, from the registry entry."""
    _no_model(monkeypatch)
    out = tmp_path / "o.png"
    assert main(["tryon", "--tiny", "--person", PERSON, "--garment", GARMENT, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_cli_lists_every_bad_option_at_once(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    assert main(["pose", "--tiny", "--person", PERSON, "--target", PERSON, "--out", str(tmp_path / "o.png"),
                 "--seed", "-1", "--guidance-scale", "9"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --guidance-scale must be a number between 0.1 and 5.0, got 9.0",
                   "--seed must be a whole number between 0 and 2147483647, got -1"]


def test_infer_refuses_what_the_app_refuses(tmp_path, capsys):
    data = viton_tree(tmp_path / "viton")
    assert main(["infer", "--dataset", str(data), "--layout", "viton_hd", "--out", str(tmp_path / "out"), "--tiny",
                 "--guidance-scale", "nan", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--guidance-scale must be a number between 0.1 and 5.0, got nan" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_is_written_to_for_real_before_any_work(tmp_path, capsys, monkeypatch):
    """``--out /proc/o.png`` passes the folder checks (it exists; root may write anywhere, and here
    ``os.access`` says yes to everyone) but no file can be made there: the early check tries it,
    before the images are read."""
    import cli.run
    import preprocess.images

    monkeypatch.setattr(preprocess.images.os, "access", lambda *a: True)
    monkeypatch.setattr(cli.run, "_read_images", lambda *a: pytest.fail("read the inputs before checking --out"))
    assert main(["tryon", "--tiny", "--person", PERSON, "--garment", GARMENT, "--out", "/proc/o.png"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot write /proc/o.png" in err and "Traceback" not in err


def test_a_failed_write_is_a_message_and_leaves_nothing(tmp_path, monkeypatch):
    from preprocess.images import save_image_atomic

    def disk_full(self, fp, *a, **k):
        Path(fp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OptionError, match="cannot write .*o.png: No space left on device"):
        save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "o.png")
    assert list(tmp_path.iterdir()) == []


def test_an_option_a_model_lacks_is_refused_by_what_it_supports():
    """Not by the model's name: an entry without the support, whatever it is called."""
    plain = dataclasses.replace(registry.pose_entry(), supports=Supports())
    engine = Engine(ModelCache(lambda entry: pytest.fail("loaded")))
    asked = GenerateOptions(repaint=True, record_attention=True, ref_acceleration=True)
    with pytest.raises(OptionError) as info:
        engine.check(plain, asked, CLI_NAMES)
    assert str(info.value).splitlines() == [
        "--repaint: the pose_transfer model does not support it",
        "--ref-acceleration: the pose_transfer model does not support it",
        "--record: the pose_transfer model does not support it"]
    assert engine.check(registry.pose_entry(), asked) == asked  # Leffa's pose model supports all three


def test_limits_follow_the_weight_source():
    entry = registry.tryon_entry(TryOnModel.VITON_HD)
    assert WeightSource().limits(entry) is MODEL_LIMITS is entry.limits
    assert WeightSource(tiny=True).limits(entry) is TINY_LIMITS
    assert WeightSource(checkpoint=Path("mine.pth")).limits(entry) is CHECKPOINT_LIMITS
    with pytest.raises(OptionError, match="steps must be at least 1 \\(a whole number\\), got 0"):
        CHECKPOINT_LIMITS.check(GenerateOptions(steps=0))
    assert CHECKPOINT_LIMITS.check(GenerateOptions(steps=500)).steps == 500


# -- one registry --------------------------------------------------------------------------------------
def _choices(parser, *path) -> dict[str, list]:
    for name in path:
        parser = next(a for a in parser._actions if a.dest == "command").choices[name]
    return {a.dest: list(a.choices) for a in parser._actions if a.choices is not None}


def test_the_command_line_takes_its_names_and_choices_from_the_registry():
    parser = build_parser()
    assert _choices(parser, "infer")["model"] == list(MODEL_NAMES) == [e.name for e in ENTRIES]
    assert _choices(parser, "download")["weights"] == [w.value for w in WeightSet]
    assert _choices(parser, "tryon")["model_type"] == [e.mask_variant.value for e in registry.for_task(Task.TRYON)]
    assert set(_choices(parser)["command"]) >= {t.value for t in Task}  # a subcommand per task


def test_every_entry_is_complete():
    for entry in ENTRIES:
        # an entry without published weights runs own checkpoints only (the concatenation family)
        assert entry.weights or entry.family is registry.Family.CONCAT, entry.name
        assert set(entry.weights) <= set(WeightSet.ALL.files), entry.name
        assert entry.weight_set is not WeightSet.ALL and set(entry.weights) <= set(entry.weight_set.files)
        assert (entry.mask_variant is not None) == (entry.task is Task.TRYON)
        assert entry.adapter().entry is entry
    assert [registry.tryon_entry(m).mask_variant for m in TryOnModel] == list(TryOnModel)
    with pytest.raises(OptionError, match="model must be one of virtual_tryon, virtual_tryon_dc, pose_transfer"):
        registry.entry("virtual_tryon_hd")


# -- one input dispatch --------------------------------------------------------------------------------
def test_what_is_given_is_not_computed():
    """The entry's analyses, less what was given (a given mask alone still runs the mask's analyses:
    ``Preprocessor.tryon`` makes the mask whenever it runs)."""
    tryon, pose = registry.tryon_entry(TryOnModel.VITON_HD), registry.pose_entry()
    mask = (Analysis.PARSING, Analysis.KEYPOINTS)
    assert inputs.tryon_analyses(tryon, mask_given=False, densepose_given=False) == (*mask, Analysis.DENSEPOSE)
    assert inputs.tryon_analyses(tryon, mask_given=True, densepose_given=False) == (*mask, Analysis.DENSEPOSE)
    assert inputs.tryon_analyses(tryon, mask_given=False, densepose_given=True) == mask
    assert inputs.tryon_analyses(tryon, mask_given=True, densepose_given=True) == ()
    assert inputs.pose_analyses(pose, densepose_given=True) == ()
    assert inputs.pose_analyses(pose, densepose_given=False) == (Analysis.DENSEPOSE,)
    # an entry that needs another analysis gets it (the registry decides, not the task)
    other = dataclasses.replace(pose, analyses=(Analysis.KEYPOINTS, Analysis.DENSEPOSE))
    assert inputs.pose_analyses(other, densepose_given=True) == (Analysis.KEYPOINTS,)


def test_given_inputs_need_no_preprocessor(tmp_path):
    none = lambda: pytest.fail("the preprocessor was asked for")  # noqa: E731
    person, garment, dense = (_picture(tmp_path / f"{n}.png", seed=i) for i, n in enumerate("pgd"))
    Image.new("L", (48, 64), 255).save(tmp_path / "m.png")
    tryon, pose = registry.tryon_entry(TryOnModel.VITON_HD), registry.pose_entry()
    t = inputs.tryon_inputs(none, tryon, person, garment, GarmentType.UPPER_BODY, mask=tmp_path / "m.png",
                            densepose=dense, size=(48, 64))
    assert t.person.size == t.mask.size == (48, 64) and t.parsing is None
    p = inputs.pose_inputs(none, pose, person, None, densepose=dense, size=(48, 64))
    assert np.asarray(p.mask).min() == 255 and p.reference.size == (48, 64)
    assert np.asarray(p.target).min() == 255  # no target photo: white (the mask hides it all)
    (tmp_path / "broken.png").write_bytes(b"not an image")  # a given target photo is still read
    with pytest.raises(UserError, match="target-pose image"):
        inputs.pose_inputs(none, pose, person, tmp_path / "broken.png", densepose=dense, size=(48, 64))
    with pytest.raises(OptionError, match="works at 768x1024"):
        inputs.pose_inputs(none, pose, person, person, size=(48, 64))
    with pytest.raises(OptionError, match="needs the photo of a person in the target pose, or its DensePose"):
        inputs.pose_inputs(none, pose, person, None)


# -- every family through the same path ----------------------------------------------------------------
def _same_picture(a: Image.Image, b: Image.Image) -> bool:
    """Equal but for float rounding: a batch's kernels round differently from one sample's (about 2e-6
    in float at 48x64), which moves a value by one level now and then (1 % of them at 768x1024 through
    the random tiny models); two different samples differ by far more."""
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    return diff.max() <= 1 and (diff > 0).mean() < 0.02


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_entry_generates_through_the_engine(tmp_path, name):
    """Each registry entry's tiny configuration: inputs, options, cache, adapter, seed; the same
    seed gives the same image."""
    engine = Engine.create(ModelSetup(), WeightSource(tiny=True))
    entry = registry.entry(name)
    person, other, dense = (_picture(tmp_path / f"{n}.png", seed=i) for i, n in enumerate("pod"))
    appearance, size = None, (48, 64)
    if entry.task is Task.TRYON:
        Image.new("L", (48, 64), 255).save(tmp_path / "m.png")
        t = engine.tryon_inputs(person, other, entry.mask_variant, GarmentType.UPPER_BODY, densepose=dense,
                                mask=tmp_path / "m.png", size=(48, 64))
        images = (t.person, t.garment, t.mask, t.densepose)
    elif inputs.needs_appearance(entry):  # MCLD: the kept person's texture map and face, from its photo
        p = engine.pose_inputs(_figure(tmp_path / "person.png"), None, densepose=dense, model=name)
        images, appearance, size = (p.target, p.reference, p.mask, p.densepose), p.appearance, ANSWER_SIZE
    else:
        p = engine.pose_inputs(person, None, densepose=dense, size=(48, 64))
        images = (p.target, p.reference, p.mask, p.densepose)
    supports = entry.supports
    options = GenerateOptions(steps=2, seed=3, ref_acceleration=supports.ref_acceleration,
                              record_attention=supports.attention_recording)
    (first,), (again,) = (engine.generate(entry, *images, options, appearance=appearance) for _ in range(2))
    assert first.image.size == size and first.seed == 3
    assert first.recorder is None if not supports.attention_recording else first.recorder.steps() == [1]
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert engine.models.loaded() == [name]
    # variations: one batch, sample k drawn with seed + k, each equal to the run of its seed alone
    samples = engine.generate(entry, *images, dataclasses.replace(options, samples=3), appearance=appearance)
    (fourth,) = engine.generate(entry, *images, dataclasses.replace(options, seed=4), appearance=appearance)
    assert [s.seed for s in samples] == [3, 4, 5] and [s.row for s in samples] == [0, 1, 2]
    for sample, alone in ((samples[0], first), (samples[1], fourth)):  # equal up to float rounding in a batch
        assert _same_picture(sample.image, alone.image)
    assert not _same_picture(samples[1].image, samples[2].image)
    if supports.attention_recording:  # one recording of the batch: sample k is its row k
        assert samples[0].recorder is samples[2].recorder
        name0 = samples[0].recorder.layers()[0]
        assert samples[0].recorder.flow(1, name0).shape[0] == 3
    tensors = (_tensors(*images) if appearance is None else
               sample_tensors(images[1], appearance.texture, images[3], appearance.face_embedding))
    batch = engine.generate_batch(entry, {k: torch.stack([v] * 2) for k, v in tensors.items()},
                                  dataclasses.replace(options, record_attention=False),
                                  [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert len(batch) == 2 and batch[0].size == size


def _figure(path: Path) -> Path:
    """A person-like figure (head and body) on white, for the analyses' stand-ins."""
    img = Image.new("RGB", (240, 320), "white")
    ImageDraw.Draw(img).rectangle((80, 40, 160, 300), fill=(40, 60, 90))
    img.save(path)
    return path


def _tensors(src, ref, mask, densepose) -> dict[str, torch.Tensor]:
    from runtime.image_tensors import image_to_tensor, mask_to_tensor

    return {"src_image": image_to_tensor(src, "src")[0], "ref_image": image_to_tensor(ref, "ref")[0],
            "densepose": image_to_tensor(densepose, "densepose")[0], "mask": mask_to_tensor(mask)[0]}


def test_device_and_dtype_resolve_in_one_place():
    from runtime.devices import resolve_device, resolve_dtype

    assert resolve_device("auto", auto="cpu") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(OptionError, match="--device must be auto, cpu, cuda or cuda:N; got 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="--device cuda:1 asked for, but no CUDA GPU is available"):
            resolve_device("cuda:1")
        assert resolve_device("cuda", check_available=False) == torch.device("cuda")  # a ZeroGPU Space
    assert resolve_dtype("auto", "cuda") == torch.float16 and resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(OptionError, match="--dtype must be auto or one of float32, float16, bfloat16"):
        resolve_dtype("float64", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_app_refuses_a_device_it_does_not_have_with_a_message(monkeypatch):
    import app
    import webapp.ui

    monkeypatch.setattr(webapp.ui, "launch", lambda *a: pytest.fail("the app started"))
    with pytest.raises(SystemExit, match="error: --device cuda:3 asked for, but no CUDA GPU is available"):
        app.main(["--tiny", "--device", "cuda:3"])
