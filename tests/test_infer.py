"""``leffa infer`` (training/inference.py) on CPU with tiny models and tiny dataset trees: the three
layouts, paired and unpaired names, per-sample seeds, resuming, user errors, our preprocessing,
and two processes sharing the work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli.main import LAYOUTS, MODELS, main
from engine.registry import MODEL_NAMES
from leffa.pipeline import LeffaPipeline
from training.datasets import DatasetLayout, LeffaDataset
from training.inference import MANIFEST, InferenceConfig, infer, sample_seed
from tests.conftest import ROOT, deepfashion_tree, dress_code_tree, free_port, tiny_model, viton_tree


@pytest.fixture(scope="session")
def models(base_dirs, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(checkpoint, base config) of a tiny try-on (SD1.5-like) and pose-transfer (SDXL-like) model."""
    folder = tmp_path_factory.mktemp("ckpt")
    for variant in ("sd15", "sdxl"):
        torch.save(tiny_model(base_dirs[variant]).state_dict(), folder / f"{variant}.pth")
    return {v: (folder / f"{v}.pth", base_dirs[v]) for v in ("sd15", "sdxl")}


def _args(data: Path, layout: str, out: Path, models, *extra) -> list[str]:
    checkpoint, base = models["sdxl" if layout == "deepfashion" else "sd15"]
    return ["infer", "--dataset", str(data), "--layout", layout, "--out", str(out),
            "--checkpoint", str(checkpoint), "--base-config", str(base),
            "--size", "48x64", "--steps", "1", "--num-workers", "0", *extra]


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def _summary(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())["summary"]


def test_cli_choices_are_the_enums():
    assert LAYOUTS == tuple(m.value for m in DatasetLayout) and MODELS == MODEL_NAMES


def test_infer_arguments_parse_without_torch():
    code = ("import sys; from cli.main import build_parser; "
            "build_parser().parse_args(['infer', '--dataset', 'd', '--layout', 'viton_hd', '--out', 'o']); "
            "print(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_viton_hd_paired_and_unpaired(tmp_path, models, capsys):
    data = viton_tree(tmp_path / "viton")
    paired, unpaired = tmp_path / "paired", tmp_path / "unpaired"
    # one batch size for both: batches of other sizes may differ by float rounding (training/inference.py)
    assert main(_args(data, "viton_hd", paired, models, "--num-workers", "2", "--batch-size", "2")) == 0
    assert main(_args(data, "viton_hd", unpaired, models, "--unpaired", "--batch-size", "2")) == 0
    a, b = _images(paired), _images(unpaired)
    assert list(a) == list(b) == ["00000_00.png", "00001_00.png"]  # named after the person image
    assert a["00000_00.png"].shape == (64, 48, 3)
    # the tree's garments are alike, and a person's seed does not depend on its garment
    assert all(np.array_equal(a[k], b[k]) for k in a)
    manifest = json.loads((paired / MANIFEST).read_text())
    assert manifest["settings"]["paired"] and manifest["settings"]["model"] == "virtual_tryon"
    assert not json.loads((unpaired / MANIFEST).read_text())["settings"]["paired"]
    summary = manifest["summary"]
    assert summary["generated"] == 2 and summary["processes"][0]["images_per_second"] > 0
    assert "generated 2 images (0 already there)" in capsys.readouterr().out


def test_dress_code_and_deepfashion_names(tmp_path, models):
    data = dress_code_tree(tmp_path / "dc")
    assert main(_args(data, "dress_code", tmp_path / "dc-paired", models)) == 0
    assert list(_images(tmp_path / "dc-paired")) == ["000001_0.png", "000002_0.png"]  # both categories
    assert main(_args(data, "dress_code", tmp_path / "dc-un", models, "--unpaired")) == 0
    assert list(_images(tmp_path / "dc-un")) == ["000001_0.png"]
    # pose transfer: a target may come with several sources
    pairs = (("a", "b"), ("c", "b"), ("b", "a"))
    df = deepfashion_tree(tmp_path / "df", "test", names=("a", "b", "c"), pairs=pairs)
    assert main(_args(df, "deepfashion", tmp_path / "df-out", models, "--ref-acceleration")) == 0
    assert list(_images(tmp_path / "df-out")) == ["a___b.png", "b___a.png", "c___b.png"]


def test_seeds_follow_the_sample_not_the_order(tmp_path, models):
    data = viton_tree(tmp_path / "viton", n=3)
    reversed_pairs = tmp_path / "reversed.txt"
    reversed_pairs.write_text("".join(f"{i:05d}_00.jpg x.jpg\n" for i in (2, 1, 0)))  # paired: own garments
    runs = {"a": [], "b": ["--pairs", str(reversed_pairs)], "c": ["--seed", "7", "--limit", "1"]}
    for out, extra in runs.items():
        assert main(_args(data, "viton_hd", tmp_path / out, models, *extra)) == 0
    a, b, c = _images(tmp_path / "a"), _images(tmp_path / "b"), _images(tmp_path / "c")
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["00000_00.png"], c["00000_00.png"])  # another base seed
    assert len({sample_seed(42, f"{i:05d}_00") for i in range(3)} | {sample_seed(7, "00000_00")}) == 4


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption(tmp_path, models, monkeypatch, capsys):
    data = viton_tree(tmp_path / "viton", n=3)
    out = tmp_path / "out"
    real_call, calls = LeffaPipeline.__call__, []

    def stop_on_the_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(LeffaPipeline, "__call__", stop_on_the_third)
    with pytest.raises(Interrupted):
        main(_args(data, "viton_hd", out, models))
    assert list(_images(out)) == ["00000_00.png", "00001_00.png"]
    # nothing half-written
    assert sorted(p.name for p in out.iterdir()) == ["00000_00.png", "00001_00.png", MANIFEST]
    assert _summary(out) is None  # written at the end
    monkeypatch.setattr(LeffaPipeline, "__call__", real_call)
    first = _images(out)
    assert main(_args(data, "viton_hd", out, models)) == 0
    assert _summary(out)["skipped"] == 2 and _summary(out)["generated"] == 1
    assert all(np.array_equal(first[k], v) for k, v in _images(out).items() if k in first)  # untouched
    capsys.readouterr()
    assert main(_args(data, "viton_hd", out, models, "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "holds images made with other settings (seed: 42 there, 1 now)" in err and "Traceback" not in err


@pytest.mark.parametrize("layout, extra, message", [
    ("viton_hd", ["--dataset", "nowhere"], "dataset folder not found: nowhere"),
    ("deepfashion", ["--unpaired"], "DeepFashion has one setting"),
    ("viton_hd", ["--model", "pose_transfer"], "the pose_transfer model does not fit the viton_hd layout"),
    ("viton_hd", ["--preprocess"], "our preprocessing works at 768x1024"),
    ("viton_hd", ["--batch-size", "0"], "must be at least 1"),
    ("viton_hd", ["--pairs", "twice.txt"], "would be written twice, e.g. 00000_00.png"),
])
def test_user_errors(tmp_path, models, capsys, monkeypatch, layout, extra, message):
    monkeypatch.chdir(tmp_path)
    data = viton_tree(tmp_path / "data")
    deepfashion_tree(tmp_path / "data", "test")
    Path("twice.txt").write_text("00000_00.jpg 00001_00.jpg\n00000_00.jpg 00000_00.jpg\n")
    assert main(_args(data, layout, tmp_path / "out", models, *extra)) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err


def test_our_preprocessing_instead_of_the_dataset_files(tmp_path, monkeypatch):
    """--preprocess: masks and DensePose from the Preprocessor (the tiny stand-ins here), with each
    DressCode category's garment type."""
    import preprocess.standins as standins

    seen, make = [], standins.standin_preprocessor

    def small_preprocessor():
        pre = make()
        real_tryon = pre.tryon

        def tryon(person, garment, model, garment_type, *a, **k):
            seen.append((Path(person).name, model.value, garment_type.value))
            out = real_tryon(person, garment, model, garment_type, *a, **k)
            for name in ("person", "garment", "mask", "densepose"):  # small, so the tiny model runs fast
                setattr(out, name, getattr(out, name).resize((48, 64), Image.Resampling.NEAREST))
            return out

        pre.tryon = tryon
        return pre

    monkeypatch.setattr(standins, "standin_preprocessor", small_preprocessor)
    data = dress_code_tree(tmp_path / "dc")
    assert main(["infer", "--dataset", str(data), "--layout", "dress_code", "--out", str(tmp_path / "out"),
                 "--tiny", "--preprocess", "--steps", "1"]) == 0
    assert seen == [("000001_0.jpg", "dress_code", "upper_body"), ("000002_0.jpg", "dress_code", "dresses")]
    assert list(_images(tmp_path / "out")) == ["000001_0.png", "000002_0.png"]
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["settings"]["inputs"] == "preprocess"


def test_pairs_file_replaces_the_split_list(tmp_path):
    """--pairs: the listed people in its order; paired, each wears its own garment."""
    dc = dress_code_tree(tmp_path / "dc")
    (tmp_path / "pairs.txt").write_text("000002_0.jpg 000001_1.jpg\n000001_0.jpg 000002_1.jpg\n")
    own, listed = ["000002_1.jpg", "000001_1.jpg"], ["000001_1.jpg", "000002_1.jpg"]
    for paired, garments in ((True, own), (False, listed)):
        ds = LeffaDataset("dress_code", dc, "test", paired, (48, 64), pairs_file=tmp_path / "pairs.txt")
        assert [s.target.name for s in ds.samples] == ["000002_0.jpg", "000001_0.jpg"]
        assert [s.reference.name for s in ds.samples] == garments


def test_python_api(tmp_path, models):
    data = viton_tree(tmp_path / "viton")
    checkpoint, base = models["sd15"]
    cfg = InferenceConfig(data, DatasetLayout.VITON_HD, tmp_path / "out", checkpoint=checkpoint,
                          base_config=base, size=(48, 64), steps=1, num_workers=0, limit=1)
    summary = infer(cfg, log=lambda *_: None)
    assert (summary.total, summary.generated, summary.skipped) == (1, 1, 0)
    assert infer(cfg, log=lambda *_: None).skipped == 1
    with pytest.raises(ValueError, match="layout must be one of viton_hd, dress_code, deepfashion"):
        InferenceConfig(data, "vitonhd", tmp_path / "out")


@pytest.mark.slow
def test_two_processes_share_the_work(tmp_path, models):
    """Two processes (gloo on CPU, as NCCL on GPUs): each generates its share, no image twice, one
    summary; the images are those of a single process (seeds follow the sample)."""
    data = viton_tree(tmp_path / "viton", n=5)
    out = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "leffa",
                           *_args(data, "viton_hd", out, models)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("generated 5 images (0 already there)") == 1  # reported by one process
    summary = _summary(out)
    assert [(p["process"], p["generated"]) for p in summary["processes"]] == [(0, 3), (1, 2)]
    assert summary["generated"] == len(_images(out)) == 5  # every image once
    # one process, with the same number of CPU threads (it changes float rounding)
    one_process = [sys.executable, "-m", "leffa", *_args(data, "viton_hd", tmp_path / "one", models)]
    subprocess.run(one_process, cwd=ROOT, env=env, capture_output=True, check=True, timeout=300)
    one, two = _images(tmp_path / "one"), _images(out)
    assert list(one) == list(two) and all(np.array_equal(one[k], two[k]) for k in one)


def test_attention_focus_is_recorded_and_keeps_old_folders_resumable(tmp_path, models, capsys):
    """``leffa infer --attention-focus`` (experimental): the manifest records the focus, so a folder
    is not resumed with another one; without a focus the settings are as before the option."""
    data = viton_tree(tmp_path / "viton", n=1)
    plain, focused = tmp_path / "plain", tmp_path / "focused"
    assert main(_args(data, "viton_hd", plain, models)) == 0
    assert "attention_focus" not in json.loads((plain / MANIFEST).read_text())["settings"]
    assert main(_args(data, "viton_hd", focused, models, "--attention-focus", "0.25", "--focus-steps", "0:0.5")) == 0
    recorded = json.loads((focused / MANIFEST).read_text())["settings"]["attention_focus"]
    assert recorded == {"temperature": 0.25, "levels": 1, "steps": [0.0, 0.5], "own_keys": False}
    assert not np.array_equal(_images(plain)["00000_00.png"], _images(focused)["00000_00.png"])
    capsys.readouterr()
    assert main(_args(data, "viton_hd", focused, models, "--attention-focus", "0.5", "--focus-steps", "0:0.5")) == 2
    assert "holds images made with other settings (attention_focus:" in capsys.readouterr().err
