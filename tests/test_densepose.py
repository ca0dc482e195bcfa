"""DensePose R-CNN in plain PyTorch: box operations against their definitions, detectron2's
parameter layout, the restricted weight loader, result extraction and end-to-end runs."""

from __future__ import annotations

import builtins
import codecs
import json
import math
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocess.densepose import (
    R50_FPN_S1X,
    R101_FPN_DL_S1X,
    DensePoseHeadKind,
    DensePoseInstance,
    DensePoseRCNN,
    RCNNConfig,
    ops,
    weights,
)
from preprocess.densepose.extract import chart_to_box, extract_instances, int_box
from preprocess.densepose.model import ChartOutput, Detections, resized_shape
from weightfiles.checkpoint import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"


# -- ROIAlign ----------------------------------------------------------------------------------
def _bilinear(feat: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision's roi_align sampling rule, written out for one point."""
    _, H, W = feat.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return np.zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= H - 1:
        yl = yh = H - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xl = xh = W - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * feat[:, yl, xl] + hy * lx * feat[:, yl, xh] + ly * hx * feat[:, yh, xl] + ly * lx * feat[:, yh, xh]


def _roi_align_reference(feat, box, n, scale, s, aligned):
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (v * scale - offset for v in box)
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    out = np.zeros((feat.shape[0], n, n))
    for ph in range(n):
        for pw in range(n):
            for iy in range(s):
                for ix in range(s):
                    y = y1 + ph * rh / n + (iy + 0.5) * rh / n / s
                    x = x1 + pw * rw / n + (ix + 0.5) * rw / n / s
                    out[:, ph, pw] += _bilinear(feat, y, x)
    return out / (s * s)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_the_sampling_formula(aligned):
    rng = np.random.default_rng(0)
    feat = rng.normal(size=(2, 3, 9, 11))
    boxes = np.array([
        [0, 2.0, 3.0, 15.0, 12.0],     # inside
        [1, -6.0, -3.0, 8.0, 9.0],     # partly left of / above the map
        [0, 14.0, 10.0, 30.0, 25.0],   # partly right of / below the map
        [1, 5.2, 6.1, 5.6, 6.3],       # smaller than a feature pixel
        [0, -40.0, -40.0, -10.0, -10.0],  # entirely outside: zeros
        [1, -3.0, 1.0, 40.0, 16.0],    # wider than the map
    ])
    scale, n, s = 0.5, 3, 2
    got = ops.roi_align(torch.tensor(feat, dtype=torch.float32), torch.tensor(boxes, dtype=torch.float32),
                        n, scale, s, aligned, chunk=2)
    for r, (b, *box) in enumerate(boxes):
        want = _roi_align_reference(feat[int(b)], box, n, scale, s, aligned)
        np.testing.assert_allclose(got[r].numpy(), want, atol=1e-5, err_msg=f"box {r}")
    assert got[4].abs().max() == 0


def _roi_align_float32(feat: np.ndarray, box, n: int, scale: float, s: int, aligned: bool) -> np.ndarray:
    """torchvision's CPU ROIAlign loop for one box, in float32 scalars and its order of operations."""
    f = np.float32
    _, H, W = feat.shape
    off = f(0.5) if aligned else f(0.0)
    x1, y1, x2, y2 = (f(v) * f(scale) - off for v in box)
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = max(rw, f(1.0)), max(rh, f(1.0))
    bw, bh = rw / f(n), rh / f(n)

    def axis(start, bin_size, p, i, size):
        pos = start + f(p) * bin_size + (f(i) + f(0.5)) * bin_size / f(s)
        if pos < -1.0 or pos > size:
            return None
        pos = max(pos, f(0.0))
        low = int(pos)
        if low >= size - 1:
            low = high = size - 1
            pos = f(low)
        else:
            high = low + 1
        frac = pos - f(low)
        return low, high, f(1.0) - frac, frac

    out = np.zeros((feat.shape[0], n, n), np.float32)
    for ph in range(n):
        for pw in range(n):
            acc = np.zeros(feat.shape[0], np.float32)
            for iy in range(s):
                for ix in range(s):
                    ya, xa = axis(y1, bh, ph, iy, H), axis(x1, bw, pw, ix, W)
                    if ya is None or xa is None:
                        continue
                    (yl, yh, hy, ly), (xl, xh, hx, lx) = ya, xa
                    term = (hy * hx) * feat[:, yl, xl] + (hy * lx) * feat[:, yl, xh]
                    term = term + (ly * hx) * feat[:, yh, xl] + (ly * lx) * feat[:, yh, xh]
                    acc = acc + term
            out[:, ph, pw] = acc / f(s * s)
    return out


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_is_torchvisions_float32_arithmetic(aligned):
    """Bit for bit (checked against torchvision 0.28's CPU kernel): the box scores and NMS
    decisions downstream then equal detectron2's, not merely come close."""
    rng = np.random.default_rng(1)
    feat = rng.normal(size=(2, 3, 9, 11)).astype(np.float32)
    boxes = np.array([[0, 2.3, 3.1, 15.7, 12.9], [1, -6.1, -3.3, 8.2, 9.7], [0, 14.1, 10.3, 30.9, 25.1],
                      [1, 5.2, 6.1, 5.6, 6.3], [0, -3.7, 1.1, 40.3, 16.9]], np.float32)
    got = ops.roi_align(torch.tensor(feat), torch.tensor(boxes), 3, 0.5, 2, aligned, chunk=2).numpy()
    for r, (b, *box) in enumerate(boxes):
        np.testing.assert_array_equal(got[r], _roi_align_float32(feat[int(b)], box, 3, 0.5, 2, aligned),
                                      err_msg=f"box {r}")


def test_roi_align_refuses_adaptive_sampling():
    with pytest.raises(ValueError, match="sampling_ratio"):
        ops.roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, 1.0, 0, False)


# -- NMS ---------------------------------------------------------------------------------------
def _greedy_reference(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        if all(ops.box_iou(torch.tensor(boxes[[i]]), torch.tensor(boxes[[k]]))[0, 0] <= thr for k in keep):
            keep.append(i)
    return keep


def test_nms_keeps_a_box_whose_suppressor_was_suppressed():
    # A overlaps B (IoU 0.6), B overlaps C (IoU 0.6), A and C barely touch: greedy keeps A and C
    boxes = torch.tensor([[0, 0, 10, 10], [2.5, 0, 12.5, 10], [5, 0, 15, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert ops.nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert ops.nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    assert ops.nms(boxes, torch.tensor([0.7, 0.9, 0.8]), 0.5).tolist() == [1]  # B first hides both


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_equals_sequential_greedy(seed, thr):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 100, (6, 2))[rng.integers(0, 6, 80)] + rng.normal(0, 4, (80, 2))
    sizes = rng.uniform(8, 30, (80, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)
    scores = rng.permutation(80).astype(np.float32) / 80  # distinct
    got = ops.nms(torch.tensor(boxes), torch.tensor(scores), thr).tolist()
    assert got == _greedy_reference(boxes, scores, thr)
    assert 1 < len(got) < 80


def test_batched_nms_groups_do_not_suppress_each_other():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.8, 0.6])
    groups = torch.tensor([0, 1, 0, 1])
    assert ops.batched_nms(boxes, scores, groups, 0.5).tolist() == [1, 2, 3]  # by decreasing score
    assert ops.batched_nms(boxes, scores, torch.zeros(4, dtype=torch.int64), 0.5).tolist() == [1, 3]
    assert ops.nms(boxes[:0], scores[:0], 0.5).numel() == 0
    assert ops.batched_nms(boxes[:0], scores[:0], groups[:0], 0.5).numel() == 0


# -- anchors, box coding, resize ----------------------------------------------------------------
def test_cell_anchors_and_grid():
    cell = ops.cell_anchors(32, (0.5, 1.0, 2.0))
    w = math.sqrt(32 * 32 / 0.5)  # aspect = height / width
    torch.testing.assert_close(cell, torch.tensor([[-w / 2, -w / 4, w / 2, w / 4], [-16.0, -16, 16, 16],
                                                   [-w / 4, -w / 2, w / 4, w / 2]]))
    grid = ops.grid_anchors(cell, stride=4, height=2, width=3)
    assert grid.shape == (2 * 3 * 3, 4)
    # position (row 1, column 2), anchor 1: the square anchor shifted by (8, 4)
    torch.testing.assert_close(grid[(1 * 3 + 2) * 3 + 1], torch.tensor([-8.0, -12, 24, 20]))


def test_decode_boxes():
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    torch.testing.assert_close(ops.decode_boxes(torch.zeros(1, 4), box, (1, 1, 1, 1)), box)
    want = torch.tensor([[5.0, 10.0, 25.0, 30.0]])  # centre (15, 20), size 20 × 20
    torch.testing.assert_close(ops.decode_boxes(torch.tensor([[1.0, 0.5, math.log(2), 0.0]]), box, (1, 1, 1, 1)), want)
    torch.testing.assert_close(ops.decode_boxes(torch.tensor([[10.0, 5.0, 5 * math.log(2), 0.0]]), box,
                                                (10, 10, 5, 5)), want)
    huge = ops.decode_boxes(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), box, (1, 1, 1, 1))
    assert huge[0, 2] - huge[0, 0] == pytest.approx(10 * 1000 / 16)  # clamped scale
    two = ops.decode_boxes(torch.zeros(1, 8), box, (1, 1, 1, 1))  # k boxes per row
    assert two.shape == (1, 8) and torch.equal(two[0, 4:], box[0])
    torch.testing.assert_close(ops.clip_boxes(torch.tensor([[-5.0, 3, 50, 70]]), 60, 40),
                               torch.tensor([[0.0, 3, 40, 60]]))


def test_resized_shape_is_detectron2s_shortest_edge_rule():
    assert resized_shape(1024, 768, 800, 1333) == (1067, 800)
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert resized_shape(100, 1000, 800, 1333) == (133, 1333)
    assert resized_shape(800, 800, 800, 1333) == (800, 800)


# -- parameters and weights ----------------------------------------------------------------------
def test_parameters_equal_detectron2s_r50_fpn_s1x():
    want = json.loads((FIXTURES / "densepose_r50_fpn_s1x_params.json").read_text())
    with torch.device("meta"):
        model = DensePoseRCNN()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert len(got) == 335 and sum(math.prod(s) for s in got.values()) == 63_927_330


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A weights file in the published format (numpy arrays under "model") and its state."""
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) * 0.01 for k, v in DensePoseRCNN().state_dict().items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 1.0
    path = tmp_path_factory.mktemp("densepose") / "model_final_162be9.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f)
    return path, state


def _assert_loaded(model: DensePoseRCNN, state: dict[str, torch.Tensor]):
    got = model.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_loads_published_format(published):
    path, state = published
    model = DensePoseRCNN.from_checkpoint(path)
    _assert_loaded(model, state)
    assert not model.training and model.cfg.score_threshold == 0.5
    assert DensePoseRCNN.from_checkpoint(path, score_threshold=0.8).cfg.score_threshold == 0.8


def test_reads_numpy1_protocol2_pickles(tmp_path):
    """Python 3 + numpy 1.x files name ``numpy.core.multiarray`` and, at protocol 2, encode bytes
    with ``_codecs.encode(..., 'latin1')``."""
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.array([1.5, -2.0])}
    data = pickle.dumps({"model": arrays, "__author__": "Detectron2 Model Zoo"}, protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data and b"_codecs" in data
    (tmp_path / "old.pkl").write_bytes(data)
    got = weights.read_pkl(tmp_path / "old.pkl")
    assert set(got) == set(arrays)
    np.testing.assert_array_equal(got["a.weight"].numpy(), arrays["a.weight"])
    assert got["b.bias"].dtype == torch.float64  # cast to float32 when loaded into the model


class _WritesAFile:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return builtins.open, (str(self.target), "w")


class _Rot13:
    def __reduce__(self):
        return codecs.encode, ("payload", "rot13")


@pytest.mark.parametrize("payload", ["open", "codec"])
def test_refuses_pickles_that_run_code(tmp_path, payload):
    target = tmp_path / "pwned.txt"
    evil = _WritesAFile(target) if payload == "open" else _Rot13()
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": evil}, "__author__": "x"}))
    with pytest.raises(CheckpointError, match="refused"):
        weights.read_pkl(path)
    assert not target.exists()


def test_unreadable_files_are_clear_errors(tmp_path, published):
    path, _ = published
    cases = {
        "truncated.pkl": path.read_bytes()[: 1 << 20],
        "text.pkl": b"this is not a pickle",
        "empty.pkl": b"",
        "list.pkl": pickle.dumps([1, 2, 3]),
        "strings.pkl": pickle.dumps({"model": {"a": "not an array"}}),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            DensePoseRCNN.from_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="not found"):
        DensePoseRCNN.from_checkpoint(tmp_path / "absent.pkl")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported"):
        DensePoseRCNN.from_checkpoint(tmp_path / "model.bin")


def test_strict_names_and_shapes(monkeypatch, published):
    _, state = published

    def load_with(s):
        monkeypatch.setattr(weights, "read_weights", lambda p: dict(s))
        return DensePoseRCNN.from_checkpoint("model.pkl")

    missing = {k: v for k, v in state.items() if k != "roi_heads.densepose_predictor.u_lowres.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: roi_heads\.densepose_predictor\.u_lowres\.bias"):
        load_with(missing)
    with pytest.raises(CheckpointError, match=r"unexpected keys: roi_heads\.mask_head\.weight"):
        load_with({**state, "roi_heads.mask_head.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"shape mismatches: roi_heads\.box_predictor\.cls_score\.weight"):
        load_with({**state, "roi_heads.box_predictor.cls_score.weight": torch.zeros(81, 1024)})
    # buffers older detectron2 versions saved: accepted with the values the model uses, else refused
    cfg = RCNNConfig()
    old = {**state, "pixel_mean": torch.tensor(cfg.pixel_mean).view(3, 1, 1),
           "pixel_std": torch.ones(3, 1, 1),
           "proposal_generator.anchor_generator.cell_anchors.0": ops.cell_anchors(32, cfg.aspect_ratios)}
    _assert_loaded(load_with(old), state)
    with pytest.raises(CheckpointError, match="pixel_mean"):
        load_with({**old, "pixel_mean": torch.zeros(3, 1, 1)})
    with pytest.raises(CheckpointError, match="cell_anchors.7"):
        load_with({**old, "proposal_generator.anchor_generator.cell_anchors.7": torch.zeros(3, 4)})


def test_convert_to_safetensors(tmp_path, published, capsys):
    path, state = published
    src = tmp_path / path.name
    src.symlink_to(path)
    assert weights.main(["convert", str(src)]) == 0
    out = tmp_path / "model_final_162be9.safetensors"
    assert f"wrote {out}" in capsys.readouterr().out
    _assert_loaded(DensePoseRCNN.from_checkpoint(out), state)
    assert not list(tmp_path.glob("*.partial"))
    (tmp_path / "bad.pkl").write_bytes(b"junk")
    assert weights.main(["convert", str(tmp_path / "bad.pkl"), "--out", str(tmp_path / "bad.safetensors")]) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()


def test_preprocessor_uses_the_published_file_or_its_conversion(tmp_path, published, monkeypatch):
    from preprocess.inputs import Preprocessor
    from preprocess.weights import Analysis
    from weightfiles.hub import missing_files, resolve_files

    def densepose_weights(root):
        return resolve_files(Analysis.DENSEPOSE.files, root)[0]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, state = published
    (tmp_path / "densepose").mkdir()
    (tmp_path / "densepose" / path.name).symlink_to(path)
    assert densepose_weights(tmp_path) == tmp_path / "densepose" / path.name
    model = Preprocessor.from_checkpoints(tmp_path)._model("densepose")
    assert isinstance(model, DensePoseRCNN)
    _assert_loaded(model, state)
    weights.convert(tmp_path / "densepose" / path.name)
    assert densepose_weights(tmp_path) == tmp_path / "densepose" / "model_final_162be9.safetensors"
    (tmp_path / "densepose" / path.name).unlink()  # the conversion alone is enough
    assert missing_files(Analysis.DENSEPOSE.files, tmp_path) == []
    assert densepose_weights(tmp_path) == tmp_path / "densepose" / "model_final_162be9.safetensors"


# -- result extraction ---------------------------------------------------------------------------
def test_extraction_from_hand_made_head_outputs():
    n = 112
    coarse = torch.zeros(1, 2, n, n)
    coarse[:, 1, 8:] = 5.0  # foreground below the top rows
    fine = torch.zeros(1, 25, n, n)
    fine[:, 3, :, : n // 2] = 5.0  # part 3 on the left, part 7 on the right
    fine[:, 7, :, n // 2:] = 5.0
    u = torch.zeros(1, 25, n, n)
    v = torch.zeros(1, 25, n, n)
    u[:, 3], u[:, 7], v[:, 3], v[:, 7] = 0.25, 0.75, 0.5, 0.125
    u[:, 5] = 0.9  # a part no pixel has: never read
    charts = ChartOutput(coarse, fine, u, v)
    box = torch.tensor([[10.7, 20.2, 60.9, 80.5]])
    assert int_box(box[0]) == (10, 20, 50, 60)  # x1, y1, x2 − x1, y2 − y1 truncated
    (inst,) = extract_instances(Detections(box, torch.tensor([0.9]), charts))
    assert isinstance(inst, DensePoseInstance) and inst.box == (10, 20, 50, 60) and inst.score == pytest.approx(0.9)
    assert inst.labels.dtype == np.uint8 and inst.uv.dtype == np.float32
    assert (inst.labels[:3] == 0).all() and (inst.labels[10:, :20] == 3).all() and (inst.labels[10:, 30:] == 7).all()
    assert (inst.uv[:, :3] == 0).all()
    np.testing.assert_allclose(inst.uv[0, 10:, :20], 0.25, rtol=1e-6)
    np.testing.assert_allclose(inst.uv[1, 10:, 30:], 0.125, rtol=1e-6)
    labels, _ = chart_to_box(charts, 1, 1)  # a degenerate box still gives one pixel
    assert labels.shape == (1, 1)


# -- end to end ----------------------------------------------------------------------------------
def _person_picture(h=200, w=150, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, np.uint8)
    img[30:180, 50:100] = rng.integers(0, 255, (150, 50, 3))
    return img


@pytest.fixture(scope="module")
def small_model():
    """Random weights, a small test-time size, and a classifier biased so that people are found."""
    torch.manual_seed(0)
    model = DensePoseRCNN(replace(RCNNConfig(), min_size=160, max_size=256, max_detections=4))
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([4.0, 0.0]))
    return model


def test_end_to_end_on_random_weights(small_model):
    rgb = _person_picture()
    found = small_model(rgb)
    assert 1 <= len(found) <= 4
    scores = [i.score for i in found]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.5
    for inst in found:
        x, y, w, h = inst.box
        assert 0 <= x and 0 <= y and x + w <= 150 + 1 and y + h <= 200 + 1
        assert inst.labels.shape == (h, w) and inst.uv.shape == (2, h, w) and inst.labels.max() <= 24
        assert np.isfinite(inst.uv).all()
    again = small_model(rgb)  # deterministic
    assert [i.box for i in again] == [i.box for i in found]
    assert all(np.array_equal(a.labels, b.labels) and np.array_equal(a.uv, b.uv) for a, b in zip(again, found))


def test_nothing_found_and_bad_input(small_model):
    strict = DensePoseRCNN(replace(small_model.cfg, score_threshold=0.9999))
    strict.load_state_dict(small_model.state_dict())
    strict.roi_heads.box_predictor.cls_score.bias.data = torch.tensor([-4.0, 4.0])
    assert strict(_person_picture()) == []
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32),
                np.zeros((0, 10, 3), np.uint8), "image.png"):
        with pytest.raises(ValueError, match="RGB uint8"):
            small_model(bad)


def test_boxes_are_reported_in_the_callers_pixels(small_model, monkeypatch):
    """The network sees the resized image; boxes come back scaled to the photo as given."""
    small = _person_picture(200, 150)
    a = small_model.detect(small)
    seen = small_model.preprocess(small)
    monkeypatch.setattr(small_model, "preprocess", lambda rgb: seen)  # the same network input ...
    b = small_model.detect(np.zeros((400, 300, 3), np.uint8))  # ... reported for a photo twice the size
    assert len(a.boxes) >= 1
    torch.testing.assert_close(b.boxes, a.boxes * 2)
    torch.testing.assert_close(b.scores, a.scores)


def test_full_float32_turns_tf32_off_inside_and_restores_it():
    from preprocess.densepose.model import full_float32

    cudnn, cublas = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, cublas.allow_tf32
    try:
        cudnn.allow_tf32 = cublas.allow_tf32 = True
        with full_float32(torch.device("cpu")):  # nothing to change on the CPU
            assert cudnn.allow_tf32
        with pytest.raises(RuntimeError, match="inside"):
            with full_float32(torch.device("cuda")):
                assert not cudnn.allow_tf32 and not cublas.allow_tf32
                raise RuntimeError("inside")
        assert cudnn.allow_tf32 and cublas.allow_tf32
    finally:
        cudnn.allow_tf32, cublas.allow_tf32 = saved


# -- R101-FPN-DL (MCLD) ----------------------------------------------------------------------------
# sha256 of json.dumps(sorted({name: list(shape)}.items())) of detectron2's own model built from
# densepose_rcnn_R_101_FPN_DL_s1x.yaml (detectron2 02b5c4e, build_model(cfg).state_dict())
R101_DL_LAYOUT_SHA256 = "08afea5585db361bd0cb35329c11f1e655acd77dbf61723fe6a6b1b2fa94bdfb"
TINY = {"res_width": 8, "fpn_channels": 32, "box_fc_dim": 32, "dp_head_dim": 32, "dp_decoder_dim": 32,
        "min_size": 160, "max_size": 256, "max_detections": 4}


def _meta_state(cfg: RCNNConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return DensePoseRCNN(cfg).state_dict()


def test_parameters_equal_detectron2s_r101_fpn_dl_s1x():
    import hashlib

    state = _meta_state(R101_FPN_DL_S1X)
    layout = {k: list(v.shape) for k, v in state.items()}
    assert hashlib.sha256(json.dumps(sorted(layout.items())).encode()).hexdigest() == R101_DL_LAYOUT_SHA256
    assert len(layout) == 614 and sum(math.prod(s) for s in layout.values()) == 85_206_562
    head = "roi_heads.densepose_head."
    assert layout[head + "ASPP.convs.3.0.weight"] == [256, 256, 3, 3]  # dilation-56 branch, no bias
    assert layout[head + "ASPP.project.0.weight"] == [256, 5 * 256, 1, 1]
    assert layout[head + "body_conv_fcn1.weight"] == [512, 256, 3, 3] and head + "body_conv_fcn1.bias" not in layout
    assert layout[head + "body_conv_fcn8.norm.weight"] == [512]  # GroupNorm
    assert not [k for k in layout if "NLBlock" in k]  # DEEPLAB.NONLOCAL_ON: 0


def test_architecture_is_read_off_the_parameter_names():
    for cfg in (R50_FPN_S1X, R101_FPN_DL_S1X, RCNNConfig(depth=101), RCNNConfig(dp_head=DensePoseHeadKind.DEEPLAB)):
        assert weights.config_from_state(_meta_state(cfg), "x.pkl") == cfg
    state = _meta_state(R101_FPN_DL_S1X)
    with pytest.raises(CheckpointError, match=r"odd\.pkl: not a DensePose R-CNN .*12 res4 blocks"):
        weights.config_from_state({k: v for k, v in state.items() if not k.startswith(
            tuple(f"backbone.bottom_up.res4.{i}." for i in range(12, 23)))}, "odd.pkl")
    with pytest.raises(CheckpointError, match=r"model\.pkl: not a DensePose R-CNN .*no backbone"):
        weights.config_from_state({"model.weight": torch.zeros(1)}, "model.pkl")


def _deeplab_reference(sd: dict[str, torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
    """DensePoseDeepLabHead's computation written out from its definition, with F.* only."""
    F = torch.nn.functional

    def gn(t, name):
        return F.group_norm(t, 32, sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    out = [F.relu(gn(F.conv2d(x, sd["ASPP.convs.0.0.weight"]), "ASPP.convs.0.1"))]
    for i, d in zip((1, 2, 3), (6, 12, 56)):
        out.append(F.relu(gn(F.conv2d(x, sd[f"ASPP.convs.{i}.0.weight"], padding=d, dilation=d), f"ASPP.convs.{i}.1")))
    pooled = F.relu(gn(F.conv2d(x.mean(dim=(2, 3), keepdim=True), sd["ASPP.convs.4.1.weight"]), "ASPP.convs.4.2"))
    out.append(pooled.expand_as(out[0]))
    y = F.relu(F.conv2d(torch.cat(out, 1), sd["ASPP.project.0.weight"]))
    for i in range(1, n + 1):
        y = F.relu(gn(F.conv2d(y, sd[f"body_conv_fcn{i}.weight"], padding=1), f"body_conv_fcn{i}.norm"))
    return y


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and buffer drawn (norm scales and variances positive; the stem's variance
    that of pixels, the residual branches' last scale small, so that 101 layers stay finite)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("running_var", "norm.weight")) or ".1.weight" in name or ".2.weight" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                if name.endswith("stem.conv1.norm.running_var"):
                    t.mul_(1e4)
                elif name.endswith("conv3.norm.weight"):
                    t.mul_(0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.1 if t.dim() == 1 else (2.0 / t[0].numel()) ** 0.5))


def test_deeplab_head_matches_its_definition():
    from preprocess.densepose.heads import DeepLabHead

    head = DeepLabHead(32, 64, 3).eval()
    _randomise(head, 1)
    x = torch.randn(2, 32, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = head(x)
    assert got.shape == (2, 64, 28, 28)
    torch.testing.assert_close(got, _deeplab_reference(head.state_dict(), x, 3), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_dl(tmp_path_factory):
    """A small-width R101-FPN-DL with every weight drawn, saved in the model zoo's format."""
    cfg = replace(R101_FPN_DL_S1X, **TINY)
    model = DensePoseRCNN(cfg)
    _randomise(model, 0)
    with torch.no_grad():  # every proposal a person (score ≈ 0.98), so that NMS and the heads have work
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.01)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(0.1)
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([4.0, 0.0]))
    path = tmp_path_factory.mktemp("densepose") / "model_final_844d15.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "test"}, f,
                    protocol=2)
    return path, cfg, model


def test_tiny_r101_dl_loads_strictly_and_runs(tiny_dl):
    path, cfg, model = tiny_dl
    loaded = DensePoseRCNN.from_checkpoint(path, config=cfg)
    assert loaded.cfg.depth == 101 and loaded.cfg.dp_head is DensePoseHeadKind.DEEPLAB and loaded.cfg.name == "R_101_FPN_DL"
    _assert_loaded(loaded, model.state_dict())
    rgb = _person_picture()
    found = loaded(rgb)
    assert 1 <= len(found) <= 4 and all(np.isfinite(i.uv).all() and i.labels.max() <= 24 for i in found)
    again = model(rgb)  # the in-memory model gives the same people
    assert [i.box for i in again] == [i.box for i in found]
    assert all(np.array_equal(a.labels, b.labels) and np.allclose(a.uv, b.uv, atol=1e-6) for a, b in zip(again, found))


def test_mcld_runs_the_r101_dl_as_mcld_configures_it(tiny_dl, monkeypatch):
    """detectron2's default score threshold 0.05 (MCLD sets none), the best detection only."""
    from preprocess.densepose import MCLD_SCORE_THRESHOLD, mcld_densepose

    path, cfg, _ = tiny_dl
    assert DensePoseRCNN.from_checkpoint(path, config=replace(cfg, score_threshold=0.3)).cfg.score_threshold == 0.3
    seen = {}
    monkeypatch.setattr(DensePoseRCNN, "from_checkpoint", classmethod(lambda cls, p, device, config: seen.update(
        path=p, config=config) or "model"))
    assert mcld_densepose(path) == "model" and seen["path"] == path
    assert seen["config"] == replace(R101_FPN_DL_S1X, score_threshold=0.05, max_detections=1)
    assert MCLD_SCORE_THRESHOLD == 0.05


def test_r101_dl_file_errors_name_the_file(tiny_dl, tmp_path):
    path, cfg, model = tiny_dl
    with pytest.raises(CheckpointError, match=r"model_final_844d15\.pkl.*shape mismatches"):
        DensePoseRCNN.from_checkpoint(path)  # the published sizes, not this file's
    with pytest.raises(CheckpointError, match=r"model_final_844d15\.pkl: holds DensePose R_101_FPN_DL, not R_50_FPN"):
        DensePoseRCNN.from_checkpoint(path, config=replace(cfg, depth=50, dp_head=DensePoseHeadKind.CONV_X))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    cases = {"truncated.pkl": path.read_bytes()[: path.stat().st_size // 2],
             "nonlocal.pkl": pickle.dumps({"model": {**state, "roi_heads.densepose_head.NLBlock.g.weight":
                                                     np.zeros((16, 32, 1, 1), np.float32)}}, protocol=2),
             "nohead.pkl": pickle.dumps({"model": {k: v for k, v in state.items() if "ASPP.convs.4" not in k}})}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(CheckpointError, match=r"truncated\.pkl"):
        DensePoseRCNN.from_checkpoint(tmp_path / "truncated.pkl", config=cfg)
    with pytest.raises(CheckpointError, match=r"nonlocal\.pkl.*unexpected keys: roi_heads\.densepose_head\.NLBlock"):
        DensePoseRCNN.from_checkpoint(tmp_path / "nonlocal.pkl", config=cfg)
    with pytest.raises(CheckpointError, match=r"nohead\.pkl.*missing keys: roi_heads\.densepose_head\.ASPP\.convs\.4"):
        DensePoseRCNN.from_checkpoint(tmp_path / "nohead.pkl", config=cfg)


# -- parity with detectron2's arithmetic --------------------------------------------------------------
def test_batched_nms_shifts_groups_apart_as_torchvision_does():
    """torchvision's batched_nms (detectron2's) runs NMS once on boxes moved apart by group ×
    (max + 1) when there are at most 1000 on the CPU (25 000 on CUDA). The shift rounds: these two
    level-1 boxes overlap by IoU 0.70000017 as they are, 0.69999981 shifted, so torchvision
    keeps both (checked against torchvision 0.28)."""
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0],
                          [298.5111999511719, 260.46368408203125, 429.7845153808594, 374.04644775390625],
                          [321.67706298828125, 260.46368408203125, 452.95037841796875, 374.04644775390625]])
    scores, groups = torch.tensor([0.5, 0.9, 0.8]), torch.tensor([0, 1, 1])
    assert ops.box_iou(boxes[1:2], boxes[2:3]).item() > 0.7
    assert ops.batched_nms(boxes, scores, groups, 0.7).tolist() == [1, 2, 0]
    # above the limit torchvision loops over the groups on the boxes as they are: 2 is suppressed
    far = torch.tensor([[2000.0, 2000.0, 2010.0, 2010.0]]) + torch.arange(1000.0)[:, None] * 20
    keep = ops.batched_nms(torch.cat([boxes, far]), torch.cat([scores, torch.full((1000,), 0.1)]),
                           torch.cat([groups, torch.zeros(1000, dtype=torch.int64)]), 0.7)
    assert keep[:2].tolist() == [1, 0] and 2 not in keep.tolist() and len(keep) == 1002
    assert ops.batched_nms_limit(torch.device("cpu")) == 1000 and ops.batched_nms_limit(torch.device("cuda")) == 25_000


def test_convolutions_run_in_detectron2s_memory_format(published):
    """NCHW as detectron2 (bit-equal features on the CPU); NHWC only when asked for."""
    path, _ = published
    x, _ = DensePoseRCNN.from_checkpoint(path).preprocess(_person_picture())
    assert x.is_contiguous()
    fast = DensePoseRCNN.from_checkpoint(path, channels_last=True)
    assert fast.preprocess(_person_picture())[0].is_contiguous(memory_format=torch.channels_last)
