"""MCLD's face embedding (``preprocess.face``) on stand-in networks: SCRFD's outputs for planted
faces (no face -> zeros, several -> the largest), the threshold and NMS, the letterbox and the
network inputs by hand, the alignment's similarity transform (round trips), the ONNX loading and
its errors. Parity with insightface itself: ``benchmarks/parity_face_texture.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from errors import UserError
from preprocess.face import (
    ARCFACE_TEMPLATE,
    CROP,
    DetectorConfig,
    Face,
    FaceEmbedder,
    FaceModelError,
    align,
    alignment_matrix,
    detector_input,
    largest,
    letterbox,
    nms,
    recognizer_input,
    umeyama,
)
from preprocess.face_files import ANTELOPEV2, BUFFALO_S

SIZE = 640  # photos of the detector's size: the canvas is the photo


def similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), shift[0]],
                     [scale * math.sin(a), scale * math.cos(a), shift[1]]])


def keypoints_in(box: tuple[float, float, float, float]) -> np.ndarray:
    """The ArcFace template fitted into ``box`` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    return (ARCFACE_TEMPLATE / CROP * [x2 - x1, y2 - y1] + [x1, y1]).astype(np.float32)


class PlantedDetector:
    """SCRFD's nine outputs (strides 8, 16, 32; 2 anchors) with each planted face at anchor 0 of the
    stride-8 cell that holds its box's centre: score, box distances and keypoint offsets / 8."""

    def __init__(self, faces: list[tuple[tuple[float, ...], float]]):
        self.faces = faces  # (box, score)
        self.calls = []

    def __call__(self, blob: np.ndarray) -> list[np.ndarray]:
        self.calls.append(blob)
        _, _, h, w = blob.shape
        k = {s: (h // s) * (w // s) * 2 for s in (8, 16, 32)}
        scores = {s: np.zeros((k[s], 1), np.float32) for s in k}
        boxes = {s: np.ones((k[s], 4), np.float32) for s in k}
        kps = {s: np.zeros((k[s], 10), np.float32) for s in k}
        for box, score in self.faces:
            col, row = int((box[0] + box[2]) / 2 // 8), int((box[1] + box[3]) / 2 // 8)
            i, px, py = (row * (w // 8) + col) * 2, col * 8.0, row * 8.0
            scores[8][i] = score
            boxes[8][i] = np.array([px - box[0], py - box[1], box[2] - px, box[3] - py]) / 8
            kps[8][i] = ((keypoints_in(box) - [px, py]) / 8).ravel()
        return [scores[s] for s in k] + [boxes[s] for s in k] + [kps[s] for s in k]


def mean_colour_recognizer(blob: np.ndarray) -> np.ndarray:
    """(N, 3, 112, 112) -> (N, 512): the crop's mean normalised colour, repeated."""
    return np.tile(blob.mean(axis=(2, 3)), (1, 171))[:, :512].astype(np.float32)


def photo_with(*squares: tuple[tuple[int, int, int, int], tuple[int, int, int]]) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    for (x1, y1, x2, y2), colour in squares:
        image[y1:y2, x1:x2] = colour
    return image


def test_no_face_gives_zeros_and_none():
    embedder = FaceEmbedder(PlantedDetector([]), mean_colour_recognizer)
    result = embedder.embed(photo_with())
    assert not result.found and result.box is None and result.keypoints is None
    assert result.embedding.shape == (512,) and result.embedding.dtype == np.float32 and not result.embedding.any()
    assert embedder(photo_with()) is None


def test_several_faces_give_the_largest_one_s_embedding():
    small, big = (100, 100, 180, 180), (300, 260, 500, 480)
    detector = PlantedDetector([(small, 0.95), (big, 0.7)])  # the smaller one scores higher
    embedder = FaceEmbedder(detector, mean_colour_recognizer)
    image = photo_with((small, (255, 0, 0)), (big, (0, 0, 255)))
    faces = embedder.faces(image)
    assert [f.score for f in faces] == pytest.approx([0.95, 0.7])  # by score
    result = embedder.embed(image)
    assert result.box == pytest.approx(big, abs=1e-4)
    assert result.keypoints == pytest.approx(keypoints_in(big), abs=1e-4)
    blue = recognizer_input([np.full((CROP, CROP, 3), (0, 0, 255), np.uint8)])  # RGB: the crop is all blue
    assert result.embedding == pytest.approx(mean_colour_recognizer(blue)[0], abs=0.1)  # red would be 2 away
    assert np.array_equal(embedder(image), result.embedding)


def test_equal_areas_give_the_last_face_as_a_stable_sort_does():
    faces = [Face(np.array([0, 0, 10, 10], np.float32), s, np.zeros((5, 2), np.float32)) for s in (0.9, 0.8)]
    assert largest(faces) is faces[1] and largest([]) is None


def test_scores_below_the_threshold_are_dropped():
    detector = PlantedDetector([((100, 100, 200, 200), 0.5), ((400, 400, 500, 500), 0.4999)])
    faces = FaceEmbedder(detector, mean_colour_recognizer).faces(photo_with())
    assert len(faces) == 1 and faces[0].box == pytest.approx((100, 100, 200, 200), abs=1e-4)
    config = DetectorConfig(score_threshold=0.4)
    assert len(FaceEmbedder(detector, mean_colour_recognizer, config).faces(photo_with())) == 2


def test_nms_keeps_the_best_of_overlapping_boxes():
    dets = np.array([[0, 0, 99, 99, 0.8], [10, 0, 109, 99, 0.9], [50, 0, 149, 99, 0.7], [300, 300, 310, 310, 0.1]],
                    np.float32)
    # IoU of box 1 with 0: 90·100 / (2·10⁴ − 9000) = 0.82; with 2: 60·100 / 14000 = 0.43 > 0.4
    assert nms(dets, 0.4) == [1, 3]
    assert nms(dets, 0.5) == [1, 2, 3]  # 0 overlaps box 2 by 50·100 / 15000 = 0.33


@pytest.mark.parametrize("hw, new_hw", [((1101, 750), (640, 435)), ((750, 1101), (435, 640)), ((640, 640), (640, 640))])
def test_letterbox_scales_to_fit_at_the_top_left(hw, new_hw):
    image = np.full((*hw, 3), 200, np.uint8)
    canvas, scale = letterbox(image, (640, 640))
    assert canvas.shape == (640, 640, 3) and scale == new_hw[0] / hw[0]
    filled = canvas[..., 0] > 0
    assert filled[:new_hw[0], :new_hw[1]].all() and filled.sum() == new_hw[0] * new_hw[1]
    portrait, scale = letterbox(np.zeros((256, 176, 3), np.uint8), (512, 352))  # MCLD's evaluation size (W, H)
    assert portrait.shape == (352, 512, 3) and scale == 352 / 256


def test_network_inputs_by_hand():
    pixel = np.zeros((2, 2, 3), np.uint8)
    pixel[0, 1] = (255, 10, 0)
    blob = detector_input(pixel)
    assert blob.shape == (1, 3, 2, 2) and blob.dtype == np.float32
    assert blob[0, :, 0, 1] == pytest.approx([(255 - 127.5) / 128, (10 - 127.5) / 128, -127.5 / 128])  # RGB kept
    crop = np.zeros((CROP, CROP, 3), np.uint8)
    crop[0, 0] = (255, 0, 51)
    assert recognizer_input([crop])[0, :, 0, 0] == pytest.approx([1.0, -1.0, (51 - 127.5) / 127.5])


def test_umeyama_recovers_a_similarity_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    m = similarity(1.7, 33.0, (12.0, -40.0))
    dst = src @ m[:, :2].T + m[:, 2]
    assert umeyama(src, dst)[:2] == pytest.approx(m, abs=1e-9)
    assert umeyama(src, dst)[2] == pytest.approx([0, 0, 1])
    noisy = dst + rng.normal(0, 0.5, dst.shape)  # least squares: close, not exact
    assert umeyama(src, noisy)[:2, :2] == pytest.approx(m[:, :2], abs=0.05)
    assert np.isnan(umeyama(np.zeros((5, 2)), dst)).all()  # all points at one place: no transform


def test_alignment_round_trip_onto_the_arcface_template():
    m = similarity(2.5, -20.0, (300.0, 120.0))  # a face 2.5× the template, turned, elsewhere
    keypoints = (ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]).astype(np.float32)
    to_crop = alignment_matrix(keypoints)
    back = keypoints @ to_crop[:, :2].T + to_crop[:, 2]
    assert back == pytest.approx(ARCFACE_TEMPLATE, abs=1e-3)
    image = np.zeros((640, 640, 3), np.uint8)
    for (x, y), colour in zip(np.round(keypoints).astype(int), [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image[y - 3:y + 4, x - 3:x + 4] = colour  # eyes and nose as coloured dots
    crop = align(image, keypoints)
    assert crop.shape == (CROP, CROP, 3)
    for (x, y), channel in zip(np.round(ARCFACE_TEMPLATE[:3]).astype(int), range(3)):
        assert crop[y, x].argmax() == channel and crop[y, x, channel] > 200


def test_model_files_are_checked_with_clear_errors(tmp_path):
    missing = tmp_path / "scrfd_10g_bnkps.onnx"
    with pytest.raises(FaceModelError, match="face detector model .*scrfd_10g_bnkps.onnx does not exist"):
        FaceEmbedder.from_files(missing, tmp_path / "glintr100.onnx")
    missing.write_bytes(b"not an onnx file")
    (tmp_path / "glintr100.onnx").write_bytes(b"")
    with pytest.raises(FaceModelError, match="cannot load the face detector model .*scrfd_10g_bnkps.onnx"):
        FaceEmbedder.from_files(missing, tmp_path / "glintr100.onnx")
    assert issubclass(FaceModelError, UserError)


def test_onnx_models_end_to_end_and_the_wrong_kind_refused(tmp_path):
    pytest.importorskip("onnx")
    from benchmarks.parity_face_texture import build_detector, build_recognizer, synthetic_face_image

    build_detector(tmp_path / "det.onnx")
    build_recognizer(tmp_path / "rec.onnx")
    embedder = FaceEmbedder.from_files(tmp_path / "det.onnx", tmp_path / "rec.onnx", det_size=(512, 352))
    assert embedder.config.det_size == (512, 352)
    result = embedder.embed(synthetic_face_image(400, 300, [(100, 80, 120, 140)], 0))
    assert result.found and result.embedding.shape == (512,) and result.embedding.dtype == np.float32
    assert embedder.embed(synthetic_face_image(400, 300, [], 0)).found is False
    with pytest.raises(FaceModelError, match="1 outputs; an SCRFD model with keypoints has 9 or 15"):
        FaceEmbedder.from_files(tmp_path / "rec.onnx", tmp_path / "rec.onnx")
    with pytest.raises(FaceModelError, match="not an ArcFace model"):
        FaceEmbedder.from_files(tmp_path / "det.onnx", tmp_path / "det.onnx")


def test_the_declared_weight_files():
    assert [f.path for f in ANTELOPEV2.files] == ["scrfd_10g_bnkps.onnx", "glintr100.onnx"]
    assert [f.size for f in ANTELOPEV2.files] == [16_923_827, 260_665_334] and ANTELOPEV2.det_size == (640, 640)
    assert BUFFALO_S.det_size == (512, 352) and all(f.path.startswith("buffalo_s/") for f in BUFFALO_S.files)
