"""Checkpoint resolution (never touching the network) and the command line."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli.main import main
from engine import registry
from engine.registry import WeightSet
from engine.weights import fetch
from leffa import LeffaModel, MissingWeightsError, ModelKind, load_model
from tests.conftest import tiny_model
from weightfiles import hub
from weightfiles.manifest import HubFile, paths

PUBLISHED = {f.path: f for f in WeightSet.ALL.files}  # every published file, by its path in the Hub repo


def _files(*names: str):
    return [PUBLISHED[name] for name in names]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to download."""
    import huggingface_hub

    def forbidden(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)


@pytest.fixture
def online(monkeypatch):
    """Pretend the Hub is reachable (scripts/test.sh sets HF_HUB_OFFLINE=1, which
    huggingface_hub reads at import): its metadata request answers; the tests still replace
    hf_hub_download itself."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, **kwargs: None)


@pytest.mark.parametrize("kind, gigabytes", [(ModelKind.VITON_HD, 7.21), (ModelKind.DRESS_CODE, 7.21),
                                             (ModelKind.POSE_TRANSFER, 20.87)])
def test_each_kind_builds_the_model_of_its_published_file(kind, gigabytes):
    """A kind's base config gives a model the size of its published float32 file (spec §1)."""
    model = LeffaModel.from_config_dir(kind.base, device="meta")
    assert model.is_sdxl == (kind is ModelKind.POSE_TRANSFER)
    assert sum(p.numel() for p in model.state_dict().values()) * 4 / 1e9 == pytest.approx(gigabytes, abs=0.01)


def test_local_file_is_used(tmp_path, no_download):
    (tmp_path / "virtual_tryon.pth").write_bytes(b"x")
    assert fetch(_files("virtual_tryon.pth"), tmp_path) == [tmp_path / "virtual_tryon.pth"]


def test_checkpoint_dir_from_env(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("LEFFA_CHECKPOINT_DIR", str(tmp_path))
    (tmp_path / "pose_transfer.pth").write_bytes(b"x")
    assert fetch(_files("pose_transfer.pth")) == [tmp_path / "pose_transfer.pth"]
    monkeypatch.delenv("LEFFA_CHECKPOINT_DIR")
    assert hub.checkpoint_dir() == hub.Path("ckpts")


def test_offline_fails_fast_listing_files(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "openpose").mkdir()
    (tmp_path / "openpose" / "body_pose_model.pth").write_bytes(b"x")
    with pytest.raises(MissingWeightsError) as info:
        fetch(_files("virtual_tryon.pth", "openpose/body_pose_model.pth", "humanparsing/parsing_atr.onnx"), tmp_path)
    msg = str(info.value)
    assert "virtual_tryon.pth, humanparsing/parsing_atr.onnx" in msg
    assert "body_pose_model" not in msg.split("(")[0]  # present files are not listed
    assert f"hf download franciszzj/Leffa virtual_tryon.pth humanparsing/parsing_atr.onnx --local-dir {tmp_path}" in msg


def test_download_only_missing_files(tmp_path, monkeypatch, online):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, *, revision=None, local_dir=None, tqdm_class=None):
        asked.append((repo_id, filename, revision))
        (local_dir / filename).write_bytes(b"w")
        return str(local_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    (tmp_path / "virtual_tryon.pth").write_bytes(b"x")
    paths = fetch(_files("virtual_tryon.pth", "virtual_tryon_dc.pth"), tmp_path, revision="abc123")
    assert asked == [("franciszzj/Leffa", "virtual_tryon_dc.pth", "abc123")]
    assert all(p.is_file() for p in paths)


def test_download_failure_is_explained(tmp_path, monkeypatch, online):
    import huggingface_hub

    def no_network(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    from engine.setup import ModelSetup, WeightSource

    with pytest.raises(MissingWeightsError, match=r"(?s)virtual_tryon.pth \(about 7.2 GB; download failed: ConnectionError.*leffa download tryon.*hf download"):
        registry.entry(ModelKind.VITON_HD).adapter().load(ModelSetup(), WeightSource(tmp_path))  # as the engine loads


URL_FILE = HubFile("example.org models", "densepose/model.pkl", 1000, url="https://example.org/x/model.pkl",
                   sha256=hashlib.sha256(b"weights").hexdigest())


def _serve(monkeypatch, body: bytes, calls: list):
    """``urllib`` answers ``body`` (HEAD probes answer nothing), recording every request."""
    import io
    import urllib.request

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(body))}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    def urlopen(request, timeout=None):
        calls.append((request.get_method(), request.full_url))
        return Response(b"" if request.get_method() == "HEAD" else body)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_a_file_published_at_a_url_is_downloaded_checked_and_kept(tmp_path, monkeypatch, online, no_download):
    calls = []
    _serve(monkeypatch, b"weights", calls)
    assert hub.resolve_files([URL_FILE], tmp_path) == [tmp_path / "densepose/model.pkl"]
    assert (tmp_path / "densepose/model.pkl").read_bytes() == b"weights"
    assert calls == [("HEAD", URL_FILE.url), ("GET", URL_FILE.url)]
    assert sorted(p.name for p in (tmp_path / "densepose").iterdir()) == ["model.pkl"]  # no .partial left


def test_a_url_download_with_other_bytes_is_refused_and_nothing_kept(tmp_path, monkeypatch, online, no_download):
    _serve(monkeypatch, b"<html>proxy login</html>", [])
    with pytest.raises(MissingWeightsError, match=r"(?s)densepose/model.pkl.*SHA-256.*curl -L --create-dirs -o "):
        hub.resolve_files([URL_FILE], tmp_path)
    assert not list((tmp_path / "densepose").iterdir())


def test_missing_url_files_are_listed_with_their_urls_offline(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_file = HubFile("franciszzj/Leffa", "virtual_tryon.pth", 7 * 10**9)
    with pytest.raises(MissingWeightsError) as info:
        hub.resolve_files([hub_file, URL_FILE], tmp_path)
    msg = str(info.value)
    assert "virtual_tryon.pth, densepose/model.pkl" in msg
    assert f"hf download franciszzj/Leffa virtual_tryon.pth --local-dir {tmp_path}" in msg
    assert f"curl -L --create-dirs -o {tmp_path / 'densepose/model.pkl'} {URL_FILE.url}" in msg
    assert "huggingface.co/example.org" not in msg


def test_the_python_api_names_the_missing_file_and_how_to_get_it(tmp_path, monkeypatch):
    """``leffa.load_model`` (the library, without the applications): the file, its size and the
    ``hf download`` command (the ``leffa download`` command is the applications', added by the engine)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match=r"(?s)virtual_tryon.pth \(about 7.2 GB; HF_HUB_OFFLINE is set\)"
                                                  r".*hf download franciszzj/Leffa virtual_tryon.pth"):
        load_model(ModelKind.VITON_HD, tmp_path)


# -- CLI ------------------------------------------------------------------------------------
def _write_inputs(tmp_path, size=(48, 64)):
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("person", "garment", "densepose"):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(paths[name])
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[16:48, 12:36] = 255
    paths["mask"] = tmp_path / "mask.png"
    Image.fromarray(mask).save(paths["mask"])
    return paths


@pytest.fixture
def tiny_checkpoint(base_dirs, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_model(base_dirs["sd15"]).state_dict(), path)
    return path


def _tryon_args(p, out, ckpt, base, *extra):
    return ["tryon", "--person", str(p["person"]), "--garment", str(p["garment"]), "--mask", str(p["mask"]),
            "--densepose", str(p["densepose"]), "--out", str(out), "--checkpoint", str(ckpt),
            "--base-config", str(base), "--size", "48x64", "--steps", "2", *extra]


def test_cli_tryon(tmp_path, tiny_checkpoint, base_dirs, capsys):
    p = _write_inputs(tmp_path)
    out = tmp_path / "out" / "result.png"
    assert main(_tryon_args(p, out, tiny_checkpoint, base_dirs["sd15"], "--seed", "5", "--repaint")) == 0
    first = np.asarray(Image.open(out))
    assert first.shape == (64, 48, 3)
    assert main(_tryon_args(p, out, tiny_checkpoint, base_dirs["sd15"], "--seed", "5", "--repaint")) == 0
    assert np.array_equal(first, np.asarray(Image.open(out)))  # same seed, same image
    assert f"saved {out}" in capsys.readouterr().out
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_pose(tmp_path, base_dirs):
    ckpt = tmp_path / "pose.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_model(base_dirs["sdxl"]).state_dict(), str(ckpt))
    p = _write_inputs(tmp_path)
    out = tmp_path / "pose.jpg"
    assert main(["pose", "--person", str(p["person"]), "--densepose", str(p["densepose"]), "--out", str(out),
                 "--checkpoint", str(ckpt), "--base-config", str(base_dirs["sdxl"]), "--size", "48x64",
                 "--steps", "2", "--ref-acceleration"]) == 0
    assert Image.open(out).size == (48, 64)


def test_cli_missing_weights_offline(tmp_path, monkeypatch, capsys, no_download):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = _write_inputs(tmp_path)
    code = main(["tryon", "--person", str(p["person"]), "--garment", str(p["garment"]), "--mask",
                 str(p["mask"]), "--densepose", str(p["densepose"]), "--out", str(tmp_path / "o.png"),
                 "--checkpoint-dir", str(tmp_path / "empty"), "--model-type", "dress_code"])
    err = capsys.readouterr().err
    assert code == 2 and "missing Leffa weights" in err and "virtual_tryon_dc.pth" in err
    assert "Traceback" not in err and not (tmp_path / "o.png").exists()


def test_cli_bad_image(tmp_path, tiny_checkpoint, base_dirs, capsys):
    p = _write_inputs(tmp_path)
    p["garment"].write_bytes(b"this is not an image")
    assert main(_tryon_args(p, tmp_path / "o.png", tiny_checkpoint, base_dirs["sd15"])) == 2
    assert "garment image (garment.png) is not a readable image" in capsys.readouterr().err


def test_cli_bad_size():
    with pytest.raises(SystemExit):
        main(["tryon", "--size", "50x64", "--person", "a", "--garment", "b", "--mask", "c",
              "--densepose", "d", "--out", "e.png"])


def test_cli_auto_preprocessing_needs_weights(tmp_path, monkeypatch, capsys, no_download):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = _write_inputs(tmp_path)
    code = main(["tryon", "--person", str(p["person"]), "--garment", str(p["garment"]),
                 "--out", str(tmp_path / "o.png"), "--checkpoint-dir", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and "humanparsing/parsing_atr.onnx" in err and "Traceback" not in err


def test_cli_auto_preprocessing_uses_the_preprocessor(tmp_path, monkeypatch, tiny_checkpoint, base_dirs):
    """Without --mask/--densepose the CLI takes them from the shared Preprocessor."""
    import engine.weights
    from preprocess.inputs import Preprocessor
    from preprocess.standins import standin_preprocessor

    seen = {}
    pre = standin_preprocessor()
    real_tryon = pre.tryon

    def tryon(*a, **k):
        seen["args"], seen["kw"] = a, k
        out = real_tryon(*a, **k)
        # shrink everything so the tiny model runs fast
        for name in ("person", "garment", "mask", "densepose"):
            setattr(out, name, getattr(out, name).resize((48, 64), Image.Resampling.NEAREST))
        return out

    pre.tryon = tryon
    monkeypatch.setattr(Preprocessor, "from_checkpoints", classmethod(lambda cls, *a, **k: pre))
    monkeypatch.setattr(engine.weights, "fetch", lambda files, *a: seen.setdefault("fetched", paths(files)))
    person = Image.new("RGB", (300, 400), "white")
    person.paste((20, 30, 40), (100, 50, 200, 380))
    person.save(tmp_path / "person.png")
    Image.new("RGB", (300, 400), "red").save(tmp_path / "garment.png")
    out = tmp_path / "o.png"
    assert main(["tryon", "--person", str(tmp_path / "person.png"), "--garment", str(tmp_path / "garment.png"),
                 "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--base-config", str(base_dirs["sd15"]),
                 "--steps", "1", "--model-type", "dress_code", "--garment-type", "dresses", "--result", "canvas"]) == 0
    assert seen["args"][2:4] == ("dress_code", "dresses")
    assert seen["fetched"] == ALL_TRYON_FILES[:-1]  # the preprocessing models, not the published try-on model
    assert Image.open(out).size == (48, 64)


def test_cli_pose_needs_target_or_densepose(tmp_path, capsys):
    p = _write_inputs(tmp_path)
    assert main(["pose", "--person", str(p["person"]), "--out", str(tmp_path / "o.png")]) == 2
    assert "needs --target" in capsys.readouterr().err


def test_cli_auto_preprocessing_refuses_other_sizes(tmp_path, capsys):
    p = _write_inputs(tmp_path)
    assert main(["tryon", "--person", str(p["person"]), "--garment", str(p["garment"]), "--size", "48x64",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "works at 768x1024" in capsys.readouterr().err


def test_cli_reports_user_errors_and_lets_bugs_raise(tmp_path, tiny_checkpoint, base_dirs, capsys, monkeypatch):
    from leffa.pipeline import LeffaPipeline

    p = _write_inputs(tmp_path)
    assert main(_tryon_args(p, tmp_path / "o.png", tiny_checkpoint, base_dirs["sd15"], "--steps", "0")) == 2
    assert "error: --steps must be at least 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(_tryon_args(p, tmp_path / "o.png", tiny_checkpoint, base_dirs["sd15"], "--device", "cuda")) == 2
        assert "--device cuda asked for, but no CUDA GPU is available" in capsys.readouterr().err

    def broken(*a, **k):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr(LeffaPipeline, "__call__", broken)
    with pytest.raises(KeyError, match="a bug"):  # not turned into a message: it keeps its traceback
        main(_tryon_args(p, tmp_path / "o.png", tiny_checkpoint, base_dirs["sd15"]))
    assert not (tmp_path / "o.png").exists()


def test_tryon_model_knows_its_weights_and_densepose_rendering():
    """One enum for the try-on model: the app and the CLI take its weights and rendering from it."""
    from preprocess.densepose import DensePoseInstance, render_labels, render_segmentation
    from preprocess.masks import TryOnModel

    assert {ModelKind(registry.tryon_entry(m).name) for m in TryOnModel} == {ModelKind.VITON_HD, ModelKind.DRESS_CODE}
    labels = np.array([[0, 3], [7, 24]], np.uint8)
    people = [DensePoseInstance((1, 1, 2, 2), labels, np.zeros((2, 2, 2), np.float32))]
    for model, render in ((TryOnModel.VITON_HD, render_segmentation), (TryOnModel.DRESS_CODE, render_labels)):
        assert np.array_equal(np.asarray(model.render_densepose(people, (4, 4))), np.asarray(render(people, (4, 4))))
    assert not np.array_equal(np.asarray(TryOnModel.VITON_HD.render_densepose(people, (4, 4))),
                              np.asarray(TryOnModel.DRESS_CODE.render_densepose(people, (4, 4))))


def test_cli_parses_arguments_without_torch():
    """``python -m leffa --help`` and argument errors answer at once: no torch or diffusers yet."""
    code = ("import sys; from cli.main import build_parser; "
            "build_parser().parse_args(['tryon', '--person', 'p.png', '--garment', 'g.png', '--out', 'o.png']); "
            "print(sorted(m for m in ('torch', 'diffusers', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("out, message", [("result.txt", "cannot tell the image format"),
                                          ("folder", "is a folder"),
                                          ("a_file.png/result.png", "is a file, not a folder")])
def test_cli_checks_out_before_any_work(tmp_path, capsys, monkeypatch, out, message):
    import cli.run as cli_module

    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file.png").write_bytes(b"x")
    p = _write_inputs(tmp_path)
    monkeypatch.setattr(cli_module, "_read_images", lambda *a: pytest.fail("read the inputs before checking --out"))
    assert main(["tryon", "--person", str(p["person"]), "--garment", str(p["garment"]),
                 "--out", str(tmp_path / out)]) == 2
    assert message in capsys.readouterr().err


def test_leffa_command_works_from_any_folder(tmp_path):
    """scripts/setup.sh installs the project (editable): a ``leffa`` command beside the interpreter."""
    command = Path(sys.executable).parent / "leffa"
    assert command.is_file(), "no leffa command: run scripts/setup.sh (pip install -e .)"
    out = subprocess.run([str(command), "tryon", "--help"], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "usage: leffa tryon" in out.stdout and "--garment" in out.stdout


def test_cli_tiny_runs_offline(tmp_path, capsys, monkeypatch, no_download):
    """``--tiny``, as in the app: a tiny untrained model and stand-in preprocessing, no weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LEFFA_CHECKPOINT_DIR", str(tmp_path / "empty"))
    p = _write_inputs(tmp_path)
    out = tmp_path / "tiny.png"
    for task in (["tryon", "--garment", str(p["garment"])], ["pose", "--target", str(p["person"])]):
        assert main([*task, "--tiny", "--person", str(p["person"]), "--out", str(out), "--steps", "1",
                     "--result", "canvas"]) == 0
        assert Image.open(out).size == (768, 1024)
    assert not (tmp_path / "empty").exists()  # nothing was downloaded or looked up


def test_cli_tryon_with_a_chosen_model(tmp_path, capsys, monkeypatch, no_download):
    """``leffa tryon --model concat_tryon``: the CatVTON-style model on a photo (tiny here; an own
    checkpoint otherwise), refused before any work without weights or for a garment it does not know."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LEFFA_CHECKPOINT_DIR", str(tmp_path / "empty"))
    p = _write_inputs(tmp_path)
    out = tmp_path / "concat.png"
    args = ["tryon", "--model", "concat_tryon", "--person", str(p["person"]), "--garment", str(p["garment"]),
            "--out", str(out), "--steps", "1", "--result", "canvas"]
    assert main([*args, "--tiny"]) == 0
    assert Image.open(out).size == (768, 1024)
    out.unlink()
    capsys.readouterr()
    assert main(args) == 2
    assert "concat_tryon model has no published weights: give your own checkpoint" in capsys.readouterr().err
    assert main([*args, "--tiny", "--garment-type", "lower_body"]) == 2
    assert "puts on upper_body garments, not lower_body: drop --model" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "empty").exists()
    with pytest.raises(SystemExit):
        main([*args, "--model", "pose_transfer"])


# -- weights: what is missing, at once; check, download; corrupt files ----------------------------
ALL_TRYON_FILES = ["humanparsing/parsing_atr.onnx", "humanparsing/parsing_lip.onnx", "openpose/body_pose_model.pth",
                   "densepose/model_final_162be9.pkl", "virtual_tryon.pth"]


def test_unreachable_hub_answers_at_once_with_every_missing_file(tmp_path, monkeypatch, online, no_download):
    """No network and no HF_HUB_OFFLINE: one metadata request without retries, then all missing files."""
    import httpx
    import huggingface_hub

    asked = []

    def unreachable(url, **kwargs):
        asked.append((url, kwargs.get("timeout")))
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    (tmp_path / "openpose").mkdir()
    (tmp_path / "openpose" / "body_pose_model.pth").write_bytes(b"x")
    with pytest.raises(MissingWeightsError) as info:
        fetch(_files(*ALL_TRYON_FILES), tmp_path)
    msg = str(info.value)
    missing = [f for f in ALL_TRYON_FILES if "openpose" not in f]
    assert f"missing Leffa weights in {tmp_path}: {', '.join(missing)}" in msg
    assert "ConnectError" in msg and f"leffa download tryon --checkpoint-dir {tmp_path}" in msg
    assert len(asked) == 1 and asked[0][0].endswith("/humanparsing/parsing_atr.onnx")
    assert asked[0][1] == hub.PROBE_TIMEOUT_S


def test_cli_without_network_names_every_file_the_task_needs(tmp_path):
    """End to end, as a user without network meets it: a closed local port as the Hub."""
    import os

    p = _write_inputs(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-m", "leffa", "tryon", "--person", str(p["person"]), "--garment",
                          str(p["garment"]), "--out", str(tmp_path / "o.png"), "--checkpoint-dir",
                          str(tmp_path / "empty")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: missing Leffa weights in {tmp_path / 'empty'}: {', '.join(ALL_TRYON_FILES)}" in out.stderr
    assert "the Hub did not answer" in out.stderr and "leffa download tryon" in out.stderr


def test_weight_sets_are_what_the_tasks_load():
    from preprocess.weights import Analysis

    assert paths(WeightSet.TRYON.files) == ALL_TRYON_FILES
    assert paths(WeightSet.TRYON_DC.files)[-1] == ModelKind.DRESS_CODE.checkpoint == "virtual_tryon_dc.pth"
    assert paths(WeightSet.POSE.files) == ["densepose/model_final_162be9.pkl", "pose_transfer.pth"]
    from mcld.weights import MCLD_FILES

    declared = ({f.local for a in Analysis for f in a.files} | {kind.checkpoint for kind in ModelKind}
                | {f.local for f in MCLD_FILES})
    assert set(paths(WeightSet.ALL.files)) == declared
    assert [kind.checkpoint for kind in ModelKind] == ["virtual_tryon.pth", "virtual_tryon_dc.pth", "pose_transfer.pth"]


def test_check_reports_each_task(tmp_path, capsys, no_download):
    for name in ("densepose/model_final_162be9.pkl", "pose_transfer.pth", "virtual_tryon.pth"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert main(["check", "--checkpoint-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Leffa weights in {tmp_path.resolve()}:"
    assert lines[1].split() == ["tryon", "missing", "humanparsing/parsing_atr.onnx,", "humanparsing/parsing_lip.onnx,",
                                "openpose/body_pose_model.pth", "(about", "710", "MB,", "downloaded", "on", "first", "use)"]
    assert f"fetch now: leffa download tryon --checkpoint-dir {tmp_path}" in lines[2]
    assert lines[3].split()[:2] == ["tryon-dc", "missing"] and "virtual_tryon_dc.pth (about 7.9 GB" in lines[3]
    assert lines[5].split() == ["pose", "ready"] and len(lines) == 8
    assert lines[6].split()[:2] == ["pose-mcld", "missing"] and "mcld/denoising_unet.pth," in lines[6]


def test_download_fetches_exactly_the_task_files(tmp_path, monkeypatch, capsys, online):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, *, revision=None, local_dir=None, tqdm_class=None):
        asked.append(filename)
        (local_dir / filename).parent.mkdir(parents=True, exist_ok=True)
        (local_dir / filename).write_bytes(b"w")
        return str(local_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert main(["download", "pose", "--checkpoint-dir", str(tmp_path)]) == 0
    assert asked == ["densepose/model_final_162be9.pkl", "pose_transfer.pth"]
    assert str(tmp_path / "pose_transfer.pth") in capsys.readouterr().out
    asked.clear()
    assert main(["download", "tryon", "--checkpoint-dir", str(tmp_path)]) == 0  # DensePose is there already
    assert asked == ["humanparsing/parsing_atr.onnx", "humanparsing/parsing_lip.onnx", "openpose/body_pose_model.pth",
                     "virtual_tryon.pth"]
    with pytest.raises(SystemExit):
        main(["download", "everything"])


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage protobuf"])
def test_corrupt_parsing_model_is_named(tmp_path, content):
    from preprocess.parsing import HumanParser
    from weightfiles.checkpoint import CheckpointError

    (tmp_path / "parsing_atr.onnx").write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        HumanParser.from_files(tmp_path / "parsing_atr.onnx", tmp_path / "parsing_lip.onnx")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'parsing_atr.onnx'}: cannot read the human-parsing model")
    assert "delete it and download it again" in msg and "leffa download" in msg


def test_corrupt_openpose_and_leffa_files_are_named(tmp_path):
    from preprocess.openpose import OpenPoseDetector
    from weightfiles.checkpoint import CheckpointError

    (tmp_path / "body_pose_model.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"body_pose_model.pth: cannot read checkpoint .*delete it"):
        OpenPoseDetector.from_file(tmp_path / "body_pose_model.pth")
    (tmp_path / "virtual_tryon.pth").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match=r"virtual_tryon.pth: cannot read checkpoint .*delete it"):
        load_model(ModelKind.VITON_HD, tmp_path)


def test_cli_names_a_corrupt_weight_file(tmp_path, monkeypatch, capsys, no_download):
    """Every file there but the parser empty: a message naming it, not onnxruntime's traceback."""
    for name in ALL_TRYON_FILES:
        (tmp_path / "ckpts" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ckpts" / name).write_bytes(b"")
    p = _write_inputs(tmp_path)
    code = main(["tryon", "--person", str(p["person"]), "--garment", str(p["garment"]), "--out",
                 str(tmp_path / "o.png"), "--checkpoint-dir", str(tmp_path / "ckpts"), "--result", "canvas"])
    err = capsys.readouterr().err
    assert code == 2 and "parsing_atr.onnx: cannot read the human-parsing model" in err
    assert "Traceback" not in err and "delete it and download it again" in err


def test_unsafe_pickle_message_gives_no_unsafe_advice(tmp_path):
    from weightfiles.checkpoint import CheckpointError, load_state_dict_file

    torch.save({"weight": torch.zeros(1), "extra": Path("x")}, tmp_path / "model.pth")
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(tmp_path / "model.pth")
    msg = str(info.value)
    assert "refused to load" in msg and "could run code" in msg and "PosixPath" in msg and "weights_only" not in msg
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(tmp_path / "junk.pth")
    msg = str(info.value)
    assert "cannot read checkpoint (UnpicklingError: Unsupported operand" in msg and "weights_only" not in msg


def test_no_diffusers_warnings_on_a_normal_run(tmp_path):
    p = _write_inputs(tmp_path)
    out = subprocess.run([sys.executable, "-m", "leffa", "pose", "--tiny", "--person", str(p["person"]), "--target",
                          str(p["person"]), "--steps", "1", "--out", str(tmp_path / "o.png")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    noise = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith(("loaded", "denoising"))]
    assert noise == [], noise


def test_cli_memory_presets_and_speed_options_keep_the_image(tmp_path, tiny_checkpoint, base_dirs, capsys):
    """``--memory`` and the speed options (leffa.memory, leffa.speed): the same picture as the default."""
    p = _write_inputs(tmp_path)
    plain, other = tmp_path / "plain.png", tmp_path / "other.png"
    assert main(_tryon_args(p, plain, tiny_checkpoint, base_dirs["sd15"])) == 0
    assert main(_tryon_args(p, other, tiny_checkpoint, base_dirs["sd15"], "--memory", "low", "--fuse-qkv")) == 0
    assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(other)))
    assert "--memory low" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_tryon_args(p, other, tiny_checkpoint, base_dirs["sd15"], "--memory", "huge"))
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_cli_attention_focus_is_experimental_and_checked(tmp_path, tiny_checkpoint, base_dirs, capsys):
    """``--attention-focus TAU`` (issue 15): off by default, TAU = 1 is the default picture, a
    sharper focus changes it; its companions need TAU and bad values are refused before any work."""
    p = _write_inputs(tmp_path)
    outs = {name: tmp_path / f"{name}.png" for name in ("plain", "one", "sharp")}

    def args(out, *extra):
        return _tryon_args(p, out, tiny_checkpoint, base_dirs["sd15"], *extra)

    assert main(args(outs["plain"])) == 0
    assert main(args(outs["one"], "--attention-focus", "1", "--focus-levels", "9")) == 0
    assert main(args(outs["sharp"], "--attention-focus", "0.1", "--focus-steps", "0:1", "--focus-own-keys")) == 0
    pixels = {name: np.asarray(Image.open(path)) for name, path in outs.items()}
    assert np.array_equal(pixels["plain"], pixels["one"]) and not np.array_equal(pixels["plain"], pixels["sharp"])
    capsys.readouterr()
    for extra, message in [(["--focus-levels", "2"], "--focus-levels: only with --attention-focus TAU"),
                           (["--attention-focus", "0"], "temperature must be a finite number > 0, got 0.0"),
                           (["--attention-focus", "0.5", "--focus-steps", "0.5:0.2"], "0 <= start < end <= 1"),
                           (["--attention-focus", "0.5", "--focus-levels", "0"], "levels must be a whole number >= 1")]:
        bad = tmp_path / "bad.png"
        assert main(args(bad, *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and not bad.exists()
    with pytest.raises(SystemExit):
        main(args(tmp_path / "bad.png", "--attention-focus", "0.5", "--focus-steps", "half"))
    assert "expected START:END fractions" in capsys.readouterr().err


def test_a_repo_with_a_folder_keeps_its_files_apart(tmp_path, monkeypatch, online):
    """Two repos' root files (the VAE's config.json) never meet: each repo may have its own folder."""
    import huggingface_hub

    vae = HubFile("stabilityai/sd-vae-ft-mse", "config.json", 1000, folder="sd-vae-ft-mse")
    asked = []

    def fake_download(repo_id, filename, *, revision=None, local_dir=None, tqdm_class=None):
        asked.append(Path(local_dir))
        (Path(local_dir) / filename).parent.mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / filename).write_text("{}")
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert hub.resolve_files([vae], tmp_path) == [tmp_path / "sd-vae-ft-mse/config.json"]
    assert asked == [tmp_path / "sd-vae-ft-mse"] and not (tmp_path / "config.json").exists()
    assert hub.missing_files([vae], tmp_path) == [] and str(vae) == "sd-vae-ft-mse/config.json"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match=re.escape(
            f"hf download stabilityai/sd-vae-ft-mse config.json --local-dir {tmp_path / 'other/sd-vae-ft-mse'}")):
        hub.resolve_files([vae], tmp_path / "other")
