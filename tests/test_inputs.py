"""The shared entry point: model inputs from photos, lazy models and the per-photo cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from preprocess.densepose import render_segmentation
from preprocess.inputs import PARSE_SIZE, Preprocessor
from preprocess.masks import agnostic_mask
from preprocess.openpose import NoPersonError
from preprocess.standins import StandInDensePose, StandInParser, StandInPose


def person_photo(seed=0, size=(600, 900)) -> Image.Image:
    """A dark figure on a white background."""
    rng = np.random.default_rng(seed)
    img = np.full((size[1], size[0], 3), 255, np.uint8)
    img[100:850, 200:400] = rng.integers(0, 120, (750, 200, 3))
    return Image.fromarray(img)


class Counting:
    def __init__(self, cls):
        self.cls, self.built, self.calls = cls, 0, 0

    def __call__(self):
        self.built += 1
        inner = self.cls()

        def run(*a):
            self.calls += 1
            return inner(*a)

        return run


@pytest.fixture
def counted():
    parts = {"parser": Counting(StandInParser), "pose": Counting(StandInPose),
             "densepose": Counting(StandInDensePose)}
    return Preprocessor(parts["parser"], parts["pose"], parts["densepose"]), parts


def test_tryon_inputs(counted):
    pre, _ = counted
    out = pre.tryon(person_photo(), person_photo(1), "viton_hd", "upper_body")
    for img in (out.person, out.garment, out.mask, out.densepose):
        assert img.size == (768, 1024)
    assert out.mask.mode == "L" and set(np.unique(np.asarray(out.mask))) <= {0, 255}
    assert out.parsing.size == PARSE_SIZE and out.pose_image.size == PARSE_SIZE
    assert out.keypoints.shape == (18, 2)
    # the mask is the agnostic mask of the parsing + keypoints, resized
    small = out.person.resize(PARSE_SIZE, Image.Resampling.BICUBIC)
    parse = StandInParser()(small).labels
    expected = agnostic_mask(parse, StandInPose()(np.asarray(small)), "upper_body", "viton_hd")
    resized = np.asarray(Image.fromarray(expected).resize((768, 1024), Image.Resampling.BICUBIC)) >= 128
    assert np.array_equal(np.asarray(out.mask) > 0, resized)
    dp = render_segmentation(StandInDensePose()(np.asarray(out.person)), (768, 1024))
    assert np.array_equal(np.asarray(out.densepose), np.asarray(dp))


def test_models_are_built_once_and_results_cached(counted):
    pre, parts = counted
    person = person_photo()
    pre.tryon(person, person_photo(1), "viton_hd", "upper_body")
    pre.tryon(person, person_photo(2), "dress_code", "dresses")  # same person: nothing recomputed
    assert [parts[k].calls for k in ("parser", "pose", "densepose")] == [1, 1, 1]
    pre.tryon(person_photo(3), person_photo(1), "viton_hd", "upper_body")
    assert [parts[k].calls for k in ("parser", "pose", "densepose")] == [2, 2, 2]
    assert [parts[k].built for k in ("parser", "pose", "densepose")] == [1, 1, 1]


def test_mask_then_generation_reuse_parsing(counted):
    """The app computes the mask first (parsing + keypoints), then generation adds DensePose."""
    pre, parts = counted
    person = person_photo()
    pre.person_mask(person, "viton_hd", "upper_body")
    assert [parts[k].calls for k in ("parser", "pose", "densepose")] == [1, 1, 0]
    pre.tryon(person, person_photo(1), "viton_hd", "upper_body")
    assert [parts[k].calls for k in ("parser", "pose", "densepose")] == [1, 1, 1]


def test_cache_is_bounded():
    pre = Preprocessor(StandInParser, StandInPose, StandInDensePose, cache_size=2)
    for seed in range(4):
        pre.tryon(person_photo(seed), person_photo(9), "viton_hd", "upper_body")
    assert len(pre._cache) == 2  # (photo, part) entries


def test_uploaded_densepose_skips_the_backend():
    def never():
        raise AssertionError("the DensePose backend must not be built when a DensePose image is given")

    pre = Preprocessor(StandInParser, StandInPose, never)
    dp = Image.new("RGB", (300, 400), (10, 20, 30))
    out = pre.tryon(person_photo(), person_photo(1), "viton_hd", "upper_body", densepose=dp)
    assert np.asarray(out.densepose)[512, 384].tolist() == [10, 20, 30]


def test_no_person():
    pre = Preprocessor(StandInParser, StandInPose, StandInDensePose)
    with pytest.raises(NoPersonError, match="no person detected"):
        pre.tryon(Image.new("RGB", (300, 400), "white"), person_photo(), "viton_hd", "upper_body")


def test_pose_inputs():
    pre = Preprocessor(StandInParser, StandInPose, StandInDensePose)
    out = pre.pose(person_photo(), person_photo(1))
    assert np.asarray(out.mask).min() == 255
    assert out.densepose.size == (768, 1024) and np.asarray(out.densepose).max() > 0
    with pytest.raises(NoPersonError):
        pre.pose(person_photo(), Image.new("RGB", (300, 400), "white"))


def test_checkpoint_preprocessor_reports_missing_densepose_weights(tmp_path, monkeypatch):
    from leffa import MissingWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pre = Preprocessor.from_checkpoints(tmp_path)
    with pytest.raises(MissingWeightsError, match="densepose/model_final_162be9.pkl"):
        pre.pose(person_photo(), person_photo(1))


def test_checkpoint_preprocessor_reports_missing_weights(tmp_path, monkeypatch):
    from leffa import MissingWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pre = Preprocessor.from_checkpoints(tmp_path)
    with pytest.raises(MissingWeightsError, match="humanparsing/parsing_atr.onnx"):
        pre.tryon(person_photo(), person_photo(1), "viton_hd", "upper_body")
