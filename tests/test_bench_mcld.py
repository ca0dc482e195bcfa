"""``benchmarks/bench_gpu.py``'s "mcld" task on the tiny model, in this process: one config runs and
reports its figures; the Leffa-only configs are skipped with a note, not run."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from benchmarks.bench_gpu import Config, markdown, run_config, task_size, task_steps


@pytest.fixture()
def args(tmp_path) -> argparse.Namespace:
    return argparse.Namespace(task="mcld", tiny=True, device="cpu", dtype="float32", size=(64, 64), steps=2,
                              warmup_steps=1, init_in_dtype=False, save=str(tmp_path / "image.pt"))


def test_mcld_runs_at_its_model_size(args):
    assert task_size(argparse.Namespace(tiny=True, size=(48, 64)), "mcld") == (64, 64)
    assert task_size(argparse.Namespace(tiny=False, size=(768, 1024)), "mcld") == (512, 512)
    assert task_steps(argparse.Namespace(tiny=False, steps=None), "mcld") == 20
    assert task_steps(argparse.Namespace(tiny=False, steps=None), "pose") == 30
    row = run_config(args, Config.parse("low"))
    assert row["finite"] and row["s_per_step"] > 0 and row["s_per_image"] > 0
    assert 0 < row["estimated_peak_gib"] < 1 and math.isfinite(row["peak_allocated_gib"])
    image = torch.load(args.save, weights_only=True)
    assert image.shape == (1, 3, 64, 64)


def test_leffa_only_configs_are_named():
    assert Config.parse("fast").leffa_only() == []
    assert Config.parse("low-fp8").leffa_only() == []
    assert Config.parse("literal").leffa_only() == ["literal"]
    assert Config.parse("fast+fuse_qkv+compile+accel").leffa_only() == ["accel", "fuse_qkv", "compile"]
    row = {"task": "mcld", "dtype": "float32", "config": "fast+accel", "skipped": "Leffa-only (accel)"}
    line = markdown([row], "cpu").splitlines()[-1]
    assert "skipped: Leffa-only (accel)" in line and line.count("|") == 11  # ten columns
