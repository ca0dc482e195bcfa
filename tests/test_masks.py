"""Agnostic masks on hand-built figures: properties derived from the spec's step lists."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from preprocess.masks import (DRESS, HEAD, LEFT_ARM, LEFT_SHOE, PANTS, RIGHT_ARM, RIGHT_SHOE, UPPER_CLOTHES,
                              agnostic_mask, fill_holes)
from tests.figures import figure, hands, region


def _mask(parse, kp, garment, variant, **kw):
    m = agnostic_mask(parse, kp, garment, variant, **kw)
    assert m.shape == (512, 384) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    return m > 0


def _covered(mask, where) -> float:
    return mask[where].mean()


def _components(mask) -> int:
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


VARIANTS = ["viton_hd", "dress_code"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arms", ["down", "raised"])
def test_upper_body_covers_garment_and_arms_not_face(variant, arms):
    parse, kp = figure(arms=arms, full_body=variant == "dress_code")
    m = _mask(parse, kp, "upper_body", variant)
    assert _covered(m, region(parse, UPPER_CLOTHES)) == 1.0
    upper_arm = region(parse, LEFT_ARM, RIGHT_ARM)
    upper_arm[(np.arange(512) > 300)[:, None].repeat(384, 1)] = False
    assert _covered(m, upper_arm) > 0.9
    assert _covered(m, region(parse, HEAD, erode=2)) == 0.0
    if arms == "down":
        assert _covered(m, hands(parse)) == 0.0
    if variant == "dress_code":
        assert _covered(m, region(parse, LEFT_SHOE, RIGHT_SHOE, erode=2)) == 0.0
        assert _covered(m, region(parse, PANTS, erode=4)) == 0.0


def test_viton_hd_mask_is_one_hole_free_component():
    parse, kp = figure(full_body=False)
    m = _mask(parse, kp, "upper_body", "viton_hd")
    assert _components(m) == 1
    assert np.array_equal(fill_holes(m), m)
    assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()


def test_viton_hd_half_body_keeps_trousers():
    parse, kp = figure(full_body=False)
    m = _mask(parse, kp, "upper_body", "viton_hd")
    trousers = region(parse, PANTS, erode=4)
    trousers[:340] = False  # below the garment's dilation band
    assert _covered(m, trousers) == 0.0


def test_viton_hd_full_body_quirk_and_correction():
    """Spec §5 known quirk: on a full-body photo the eroded ring around trousers + shoes closes,
    hole filling masks them; keep_fixed_regions keeps them."""
    parse, kp = figure(full_body=True)
    lower = region(parse, PANTS, LEFT_SHOE, RIGHT_SHOE, erode=4)
    lower[:340] = False
    assert _covered(_mask(parse, kp, "upper_body", "viton_hd"), lower) == 1.0  # the original
    fixed = _mask(parse, kp, "upper_body", "viton_hd", keep_fixed_regions=True)
    assert _covered(fixed, region(parse, PANTS, LEFT_SHOE, RIGHT_SHOE)) == 0.0
    assert _covered(fixed, region(parse, UPPER_CLOTHES)) == 1.0


@pytest.mark.parametrize("side,arm_label", [("right", RIGHT_ARM), ("left", LEFT_ARM)])
def test_viton_hd_missing_wrist_uses_arm_parsing(side, arm_label):
    parse, kp = figure(full_body=False, missing_wrist=side)
    m = _mask(parse, kp, "upper_body", "viton_hd")
    assert _covered(m, region(parse, arm_label)) == 1.0  # the whole arm, hand included
    other = RIGHT_ARM if arm_label == LEFT_ARM else LEFT_ARM
    other_hand = hands(parse) & region(parse, other)
    assert _covered(m, other_hand) == 0.0  # the other hand is still kept


def test_dress_code_missing_wrist_drops_it_from_the_stroke():
    parse, kp = figure(missing_wrist="right")
    m = _mask(parse, kp, "upper_body", "dress_code")
    assert _covered(m, region(parse, UPPER_CLOTHES)) == 1.0
    assert _covered(m, hands(parse) & region(parse, LEFT_ARM)) == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_dresses(variant):
    parse, kp = figure(lower="dress", full_body=variant == "dress_code")
    m = _mask(parse, kp, "dresses", variant)
    assert _covered(m, region(parse, DRESS)) == 1.0
    assert _covered(m, region(parse, HEAD, erode=2)) == 0.0
    assert _covered(m, hands(parse)) == 0.0


@pytest.mark.parametrize("variant,options", [("dress_code", {}), ("viton_hd", {"keep_fixed_regions": True})])
def test_lower_body_trousers(variant, options):
    parse, kp = figure(full_body=True)
    m = _mask(parse, kp, "lower_body", variant, **options)
    assert _covered(m, region(parse, PANTS)) == 1.0
    top = region(parse, UPPER_CLOTHES, erode=3)
    top[250:] = False  # above the trousers' dilation band
    assert _covered(m, top) == 0.0
    assert _covered(m, region(parse, HEAD, erode=2)) == 0.0
    assert _covered(m, region(parse, LEFT_ARM, RIGHT_ARM, erode=3)) == 0.0


def test_viton_hd_lower_body_quirk_masks_the_top():
    """The same quirk for trousers: the eroded ring around the (fixed) top closes."""
    parse, kp = figure(full_body=True)
    m = _mask(parse, kp, "lower_body", "viton_hd")
    assert _covered(m, region(parse, PANTS)) == 1.0
    assert _covered(m, region(parse, UPPER_CLOTHES, erode=3)) == 1.0


def test_dress_code_cuts_head_along_shoulder_line():
    """Head pixels lower than 20 px above the shoulder line become garment (spec step 4)."""
    parse, kp = figure()
    parse[110:126, 180:204] = HEAD  # a face label reaching down to y = 125
    m = _mask(parse, kp, "upper_body", "dress_code")
    assert m[118:126, 185:200].all()  # below 135 - 20 = 115: masked
    assert not m[60:100, 170:215].any()  # the face: kept


def test_bad_arguments():
    parse, kp = figure()
    with pytest.raises(ValueError, match="garment_type must be one of upper_body, lower_body, dresses; got 'hat'"):
        agnostic_mask(parse, kp, "hat", "viton_hd")
    with pytest.raises(ValueError, match="variant must be one of viton_hd, dress_code"):
        agnostic_mask(parse, kp, "upper_body", "viton")
    with pytest.raises(ValueError, match="keypoints must be"):
        agnostic_mask(parse, kp[:10], "upper_body", "viton_hd")
    with pytest.raises(ValueError, match="uint8 label map"):
        agnostic_mask(parse.astype(np.int64), kp, "upper_body", "viton_hd")
    with pytest.raises(ValueError, match="labels are 0..18"):
        agnostic_mask(parse + 30, kp, "upper_body", "viton_hd")
    with pytest.raises(ValueError, match="viton_hd variant only"):
        agnostic_mask(parse, kp, "upper_body", "dress_code", keep_fixed_regions=True)
