"""Human parsing through onnxruntime with a tiny ONNX model built here (same input name and
output structure as the SCHP exports: input "input.1", logits in the second output)."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from preprocess.masks import HEAD, LEFT_ARM, NECK, UPPER_CLOTHES
from preprocess.parsing import (ATR_INPUT, LIP_INPUT, MEAN_BGR, STD_BGR, HumanParser, OnnxSegmenter,
                                refine_atr, schp_affine)

PLANTED = 7  # the label the tiny network gives to pure blue pixels


def tiny_parser_onnx(path, num_labels: int = 20) -> str:
    """1×1 conv on the normalised BGR input: label PLANTED where blue ≫ green, else label 0.
    Output 0 is a decoy; output 1 holds the logits at quarter resolution (like SCHP)."""
    w = np.zeros((num_labels, 3, 1, 1), np.float32)
    b = np.full(num_labels, -100.0, np.float32)
    b[0] = 0.0
    w[PLANTED, 0, 0, 0], w[PLANTED, 1, 0, 0], b[PLANTED] = 5.0, -5.0, -10.0  # channel 0 is B
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "w", "b"], ["full"]),
         helper.make_node("AveragePool", ["full"], ["logits"], kernel_shape=[4, 4], strides=[4, 4]),
         helper.make_node("Neg", ["full"], ["decoy"])],
        "tiny_schp",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("decoy", TensorProto.FLOAT, [1, num_labels, "h", "w"]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, num_labels, "h4", "w4"])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
                     helper.make_tensor("b", TensorProto.FLOAT, b.shape, b)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    return tiny_parser_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def _person(color=(0, 0, 255), box=(100, 200, 180, 280)):
    img = np.full((512, 384, 3), 255, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = color
    return img


def test_affine_maps_the_image_into_the_square_input():
    m = schp_affine((512, 384), ATR_INPUT)
    apply = lambda x, y: m @ np.array([x, y, 1.0])
    np.testing.assert_allclose(apply(191.5, 255.5), [255.5, 255.5], atol=1e-4)  # centre to centre
    np.testing.assert_allclose(apply(0, 0), [64, 0], atol=1e-4)  # letterboxed left/right
    np.testing.assert_allclose(apply(383, 511), [447, 511], atol=1e-4)
    m = schp_affine((512, 384), LIP_INPUT)
    # 473/512 scale about the centres: x = 236 + (0 - 191.5) * 472 / 511
    np.testing.assert_allclose(m @ np.array([0, 511, 1.0]), [236 - 191.5 * 472 / 511, 472], atol=1e-4)


def test_network_input_is_bgr_normalised(onnx_path, monkeypatch):
    seg = OnnxSegmenter(onnx_path, ATR_INPUT, ["CPUExecutionProvider"])
    seen = {}
    real_run = seg.session.run

    def spy(outputs, feeds):
        seen.update(feeds)
        return real_run(outputs, feeds)

    monkeypatch.setattr(seg.session, "run", spy)
    seg(_person())
    x = seen["input.1"]
    assert x.shape == (1, 3, 512, 512) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 256, 256], (1 - MEAN_BGR) / STD_BGR, rtol=1e-5)  # white
    np.testing.assert_allclose(x[0, :, 256, 10], -MEAN_BGR / STD_BGR, rtol=1e-5)  # black letterbox


@pytest.mark.parametrize("input_hw", [ATR_INPUT, LIP_INPUT])
def test_planted_label_comes_back_where_it_was(onnx_path, input_hw):
    seg = OnnxSegmenter(onnx_path, input_hw, ["CPUExecutionProvider"])
    labels = seg(_person()).argmax(axis=2)
    assert labels.shape == (512, 384)
    assert (labels[212:268, 112:168] == PLANTED).all()  # inside the blue square
    outside = np.ones_like(labels, bool)
    outside[188:292, 88:192] = False
    assert (labels[outside] == 0).all()
    red = seg(_person(color=(255, 0, 0))).argmax(axis=2)
    assert (red == 0).all()  # channel order matters: red is not blue


def test_refine_fills_small_holes_keeps_large_ones_and_arms():
    atr = np.zeros((512, 384), np.uint8)
    atr[100:400, 100:300] = UPPER_CLOTHES
    atr[150:170, 150:170] = 0  # small hole (400 px): becomes upper clothes
    atr[250:320, 150:230] = 5  # large hole (5600 px): keeps its label
    atr[100:400, 300:330] = LEFT_ARM
    atr[30:100, 170:230] = HEAD
    lip = np.zeros_like(atr)
    lip[30:80, 170:230] = 13  # LIP face ends higher than ATR's
    out = refine_atr(atr, lip)
    assert (out[150:170, 150:170] == UPPER_CLOTHES).all()
    assert (out[250:320, 150:230] == 5).all()
    assert (out[100:400, 300:330] == LEFT_ARM).all()
    assert (out[30:80, 170:230] == HEAD).all() and (out[80:100, 170:230] == NECK).all()
    assert out.dtype == np.uint8 and out.max() <= NECK


def test_human_parser_end_to_end(onnx_path):
    parser = HumanParser.from_files(onnx_path, onnx_path, providers=["CPUExecutionProvider"])
    result = parser(Image.fromarray(_person()))
    assert result.labels.shape == (512, 384) and result.labels.dtype == np.uint8
    assert result.image.size == (384, 512) and result.image.mode == "RGB"
    assert (result.labels[220:260, 120:160] == PLANTED).all()
    colours = np.asarray(result.image)
    assert len({tuple(c) for c in colours[220:260, 120:160].reshape(-1, 3)}) == 1
    assert cv2.countNonZero((result.labels == 0).astype(np.uint8)) > 0
