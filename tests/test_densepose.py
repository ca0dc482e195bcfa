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

from weightfiles.checkpoint import CheckpointError
from preprocess.densepose import DensePoseInstance, DensePoseRCNN, RCNNConfig, ops, weights
from preprocess.densepose.extract import chart_to_box, extract_instances, int_box
from preprocess.densepose.model import ChartOutput, Detections, resized_shape

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
