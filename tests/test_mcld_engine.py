"""MCLD everywhere Leffa's pose transfer is: the registry, the engine's inputs (texture map, face,
the target's IUV image), generation through the tiny model, the command line and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from engine import registry
from engine.options import GenerateOptions, ResultView
from engine.registry import Task, WeightSet
from engine.service import Engine
from engine.setup import ModelSetup, WeightSource
from errors import OptionError
from preprocess.appearance import PICTURE
from preprocess.openpose import NoPersonError
from preprocess.weights import Analysis
from tests.test_framing import figure

MCLD = "mcld"


@pytest.fixture(scope="module")
def engine():
    return Engine.create(ModelSetup(), WeightSource(tiny=True))


def _people():
    person = figure((900, 1300), (250, 100, 650, 1250))
    target = figure((1600, 1200), (900, 150, 1250, 1150))
    return person, target


def test_mcld_is_a_pose_model_with_its_published_settings_and_files():
    entry = registry.pose_entry(MCLD)
    assert entry.task is Task.POSE and registry.pose_entry() is not entry  # Leffa stays the default
    assert (entry.limits.steps_default, entry.limits.guidance_default) == (20, 3.5)
    files = {f.local: f for f in entry.files_for(entry.analyses)}
    assert {"mcld/denoising_unet.pth", "mcld/reference_unet.pth", "mcld/pose_guider.pth", "mcld/image_projector.pth",
            "sd-vae-ft-mse/config.json", "densepose/model_final_844d15.pkl", "antelopev2/glintr100.onnx",
            "mcld/texture_bg_200.png"} <= set(files)
    assert files["densepose/model_final_844d15.pkl"].url.startswith("https://dl.fbaipublicfiles.com/densepose/")
    assert set(WeightSet.POSE_MCLD.files) == set(entry.files_for(entry.analyses))
    assert set(WeightSet.POSE_MCLD.files) <= set(WeightSet.ALL.files)
    with pytest.raises(OptionError, match="pose transfer runs one of the models pose_transfer, mcld; "
                                          "virtual_tryon is a tryon model"):
        registry.pose_entry("virtual_tryon")


@pytest.mark.parametrize("view", [ResultView.FRAMED, ResultView.CANVAS])
def test_inputs_hold_the_target_pose_and_the_kept_persons_texture_and_face(engine, view):
    person, target = _people()
    p = engine.pose_inputs(person, target, view=view, model=MCLD)
    assert p.reference.size == p.target.size == p.densepose.size == PICTURE
    assert (p.reference_framing is not None) == (view is ResultView.FRAMED)
    pose = np.asarray(p.densepose)  # their file as PIL reads it: V, U, part index
    assert pose[..., 2].max() <= 24 and pose[..., 2].max() > 0 and pose[..., 0].max() > 24
    a = p.appearance
    assert a.texture.size == (512, 512) and a.texture.mode == "RGB"
    assert np.asarray(a.texture).any()  # the person's pixels reached the atlas
    assert a.face_embedding.shape == (512,) and a.face_embedding.dtype == np.float32 and a.face_embedding.any()
    x0, y0, x1, y1 = a.face_box
    assert 0 <= x0 < x1 <= PICTURE[0] and 0 <= y0 < y1 <= PICTURE[1] / 3  # at the top of the person


def test_a_given_iuv_image_replaces_the_target_photo(engine, tmp_path):
    person, target = _people()
    iuv = engine.pose_inputs(person, target, view=ResultView.CANVAS, model=MCLD).densepose
    iuv.save(tmp_path / "iuv.png")
    p = engine.pose_inputs(person, None, densepose=tmp_path / "iuv.png", view=ResultView.FRAMED, model=MCLD)
    assert np.array_equal(np.asarray(p.densepose), np.asarray(iuv))
    assert p.target_framing is None and not np.asarray(p.target).min() < 255  # a white stand-in


def test_nobody_in_a_photo_is_a_clear_error(engine):
    person, _ = _people()
    blank = Image.new("RGB", (600, 800), "white")
    with pytest.raises(NoPersonError, match="no person detected in the target-pose photo"):
        engine.pose_inputs(person, blank, view=ResultView.CANVAS, model=MCLD)
    with pytest.raises(NoPersonError, match="no person detected in the person photo"):
        engine.pose_inputs(blank, person, view=ResultView.FRAMED, model=MCLD)


def test_generation_through_the_tiny_model(engine):
    person, target = _people()
    p = engine.pose_inputs(person, target, view=ResultView.FRAMED, model=MCLD)
    options = GenerateOptions(steps=2, guidance_scale=3.5, seed=3)
    (a,) = engine.generate(MCLD, p.target, p.reference, p.mask, p.densepose, options, appearance=p.appearance)
    (b,) = engine.generate(MCLD, p.target, p.reference, p.mask, p.densepose, options, appearance=p.appearance)
    assert a.image.size == (352, 512) and a.seed == 3
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))  # the seed decides
    with pytest.raises(OptionError, match="needs the kept person's texture map and face"):
        engine.generate(MCLD, p.target, p.reference, p.mask, p.densepose, options)


def test_what_mcld_lacks_is_refused_by_name(engine):
    with pytest.raises(OptionError, match="ref_acceleration: the mcld model does not support it") as info:
        engine.check(MCLD, GenerateOptions(steps=20, guidance_scale=3.5, ref_acceleration=True, record_attention=True))
    assert "record: the mcld model does not support it" in str(info.value)


def test_cli_pose_with_mcld(tmp_path, capsys):
    person, target = _people()
    person.save(tmp_path / "person.png")
    target.save(tmp_path / "target.png")
    out = tmp_path / "out.png"
    args = ["pose", "--tiny", "--model", MCLD, "--person", str(tmp_path / "person.png"),
            "--target", str(tmp_path / "target.png"), "--out", str(out), "--steps", "2"]
    assert main(args) == 0
    assert Image.open(out).size == (352, 512)
    assert main([*args, "--size", "48x64"]) == 2
    assert "mcld generates at its own size: drop --size" in capsys.readouterr().err
    assert main([*args, "--ref-acceleration"]) == 2
    assert "--ref-acceleration: the mcld model does not support it" in capsys.readouterr().err


def test_analyses_name_their_files():
    assert Analysis.DENSEPOSE_R101.files[0].path == "densepose/model_final_844d15.pkl"
    assert [f.local for f in Analysis.FACE.files] == ["antelopev2/scrfd_10g_bnkps.onnx", "antelopev2/glintr100.onnx"]


def test_leffa_eval_faces_fetches_its_face_models_and_names_the_missing_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for folder in ("real", "fake"):
        (tmp_path / folder).mkdir()
        for name in ("a", "b"):
            Image.new("RGB", (176, 256), "white").save(tmp_path / folder / f"{name}.png")
    code = main(["eval", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--paired",
                 "--faces", "buffalo_s", "--checkpoint-dir", str(tmp_path / "ckpts"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "buffalo_s/det_500m.onnx, buffalo_s/w600k_mbf.onnx" in err and "Traceback" not in err


def _mcld_tree(root, names=("a", "b", "c"), pairs=(("a", "b"), ("c", "b")), faces=("a",)):
    """MCLD's prepared layout: photos, IUV images, texture maps, face embeddings (not for every person)."""
    rng = np.random.default_rng(0)
    for kind in ("test", "test_densepose", "test_texture", "test_face"):
        (root / kind).mkdir(parents=True)
    for name in names:
        figure((176, 256), (40, 20, 136, 250)).save(root / "test" / f"{name}.jpg")
        Image.fromarray(rng.integers(0, 256, (256, 176, 3), dtype=np.uint8)).save(root / "test_densepose" / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(root / "test_texture" / f"{name}.png")
    for name in faces:
        np.save(root / "test_face" / f"{name}.npy", rng.standard_normal(512).astype(np.float32))
    with open(root / "test.csv", "w") as f:
        f.write("from,to\n" + "".join(f"{s}.jpg,{t}.jpg\n" for s, t in pairs))
    return root


def test_leffa_infer_runs_mcld_on_its_prepared_deepfashion_folder(tmp_path):
    data = _mcld_tree(tmp_path / "df")
    args = ["infer", "--dataset", str(data), "--layout", "deepfashion_mcld", "--pairs", str(data / "test.csv"),
            "--tiny", "--steps", "2", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert out == ["a___b.png", "c___b.png"]  # c has no face file: zeros, as their dataset
    assert all(Image.open(tmp_path / "out" / name).size == (352, 512) for name in out)
    settings = __import__("json").loads((tmp_path / "out" / "leffa_infer.json").read_text())["settings"]
    assert (settings["model"], settings["steps"]) == ("mcld", 2)


def test_leffa_infer_runs_mcld_from_photos_with_our_preprocessing(tmp_path):
    data = _mcld_tree(tmp_path / "df")
    assert main(["infer", "--dataset", str(data), "--layout", "deepfashion_mcld", "--pairs", str(data / "test.csv"),
                 "--tiny", "--steps", "2", "--preprocess", "--limit", "1", "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "a___b.png").size == (352, 512)


def test_leffa_infer_refuses_what_does_not_fit_mcld(tmp_path, capsys):
    data = _mcld_tree(tmp_path / "df")
    base = ["infer", "--dataset", str(data), "--tiny", "--steps", "2", "--out", str(tmp_path / "out")]
    assert main([*base, "--layout", "deepfashion_mcld", "--model", "pose_transfer"]) == 2
    assert "pose_transfer model does not fit the deepfashion_mcld layout's files" in capsys.readouterr().err
    assert main([*base, "--layout", "deepfashion_mcld", "--pairs", str(data / "test.csv"), "--size", "48x64"]) == 2
    assert "mcld generates at its own size" in capsys.readouterr().err
    (data / "test_face" / "a.npy").write_bytes(b"garbage")
    assert main([*base, "--layout", "deepfashion_mcld", "--pairs", str(data / "test.csv")]) == 2
    assert "a.npy is not a readable .npy face embedding" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("source,target\na.jpg,b.jpg\n")
    assert main([*base, "--layout", "deepfashion_mcld", "--pairs", str(bad)]) == 2
    assert "expected the columns 'from,to'" in capsys.readouterr().err
