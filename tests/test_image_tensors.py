"""Images and masks as tensors, and the repaint blend, against the original's arithmetic.

The "original" formulas below are written out in numpy from the published code's behaviour
(spec §4.11 and the authors' transform): images become uint8 with ``(x * 255).round()``,
the uint8 mask is blurred as an RGB PIL image, and the blend is computed in float64 and
truncated to uint8; masks are binarised with ``< 0.5 -> 0``, ``>= 0.5 -> 1``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from runtime.image_tensors import image_to_tensor, mask_to_tensor, repaint_blend


# -- the original's formulas, in numpy -----------------------------------------------------------
def original_to_uint8(x: np.ndarray) -> np.ndarray:
    """Float32 image(s) in [0, 1] -> uint8, as the original's numpy-to-PIL conversion."""
    return (x.astype(np.float32) * 255).round().astype(np.uint8)


def original_repaint(person: np.ndarray, result: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """person, result: (H, W, 3) uint8; mask: (H, W) uint8 -> (H, W, 3) uint8."""
    k = result.shape[0] // 100
    if k % 2 == 0:
        k += 1
    blurred = Image.fromarray(mask).convert("RGB").filter(ImageFilter.GaussianBlur(k))
    mask_np = np.array(blurred) / 255
    return (person * (1 - mask_np) + result * mask_np).astype(np.uint8)


def original_binarise(mask: np.ndarray) -> np.ndarray:
    mask = mask.astype(np.float32).copy()
    mask[mask < 0.5] = 0
    mask[mask >= 0.5] = 1
    return mask


def _inputs(batch=2, h=300, w=40, seed=0):
    """Person on the uint8 grid (it comes from a photo), a generated image anywhere in [0, 1],
    and rectangular masks whose edges give a feather band (k = 300 // 100 -> 3)."""
    g = torch.Generator().manual_seed(seed)
    person = torch.randint(0, 256, (batch, 3, h, w), generator=g).float() / 255
    generated = torch.rand(batch, 3, h, w, generator=g)
    mask = torch.zeros(batch, 1, h, w)
    for b in range(batch):
        mask[b, :, 40 + 30 * b: 200, 8 + 4 * b: 30] = 1
    return person, generated, mask


def _expected(person, generated, mask):
    hwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    return np.stack([
        original_repaint(original_to_uint8(p), original_to_uint8(g), original_to_uint8(m[:, :, 0]))
        for p, g, m in zip(hwc(person), hwc(generated), hwc(mask))])


# -- repaint --------------------------------------------------------------------------------------
def test_repaint_is_the_originals_uint8_blend_with_truncation():
    person, generated, mask = _inputs()
    out = repaint_blend(person, generated, mask)
    assert out.dtype == torch.float32 and out.shape == person.shape
    levels = out.permute(0, 2, 3, 1).numpy() * 255
    np.testing.assert_allclose(levels, levels.round(), atol=1e-4, rtol=0)  # exact uint8 levels
    expected = _expected(person, generated, mask)
    np.testing.assert_array_equal(levels.round().astype(np.uint8), expected)

    # the test is sharp: the feather band exists, and there truncating differs from rounding
    hwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    blur = lambda m: np.asarray(  # k = 300 // 100 -> 3
        Image.fromarray(original_to_uint8(m[:, :, 0])).filter(ImageFilter.GaussianBlur(3)))
    a = np.stack([blur(m) for m in hwc(mask)])[..., None] / 255
    band = (a > 0) & (a < 1)
    assert band.sum() > 100
    exact = original_to_uint8(hwc(person)) * (1 - a) + original_to_uint8(hwc(generated)) * a
    rounded = np.round(exact).astype(np.uint8)
    differs = np.broadcast_to(band, rounded.shape) & (rounded != expected)
    assert differs.sum() > 10


def test_repaint_equal_images_can_lose_a_level_as_in_the_original():
    """Where person and result agree, v * (1 - a) + v * a can fall just below v in float64 and
    the original's truncation then gives v - 1: reproduced, not smoothed over."""
    person, _, mask = _inputs(batch=1)
    same = torch.full_like(person, 124 / 255)  # a level that loses one for many feather values
    expected = _expected(same, same, mask)
    assert (expected == 123).any() and (expected >= 123).all()
    out = repaint_blend(same, same, mask)
    np.testing.assert_array_equal((out.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), expected)


def test_repaint_far_from_the_mask_is_the_person_and_inside_is_the_result_in_uint8():
    person, generated, mask = _inputs(batch=1)
    person = torch.rand(person.shape, generator=torch.Generator().manual_seed(1))  # off the uint8 grid
    out = repaint_blend(person, generated, mask)
    q = lambda t: (t * 255).round() / 255
    far = torch.ones(mask.shape[-2:], dtype=torch.bool)
    far[40 - 12: 200 + 12, 8 - 8: 30 + 8] = False
    inside = torch.zeros_like(far)
    inside[40 + 12: 200 - 12, 8 + 12: 30 - 12] = True
    torch.testing.assert_close(out[0][:, far], q(person)[0][:, far], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0][:, inside], q(generated)[0][:, inside], atol=1e-6, rtol=0)


def test_repaint_survives_the_pipelines_pil_conversion():
    """The pipeline turns [0, 1] floats into PIL with (x * 255).round(): that must give back
    the original's uint8 image exactly."""
    from leffa.pipeline import _output

    person, generated, mask = _inputs()
    images = _output(repaint_blend(person, generated, mask), "pil").images
    pil_values = np.stack([np.asarray(im) for im in images])
    np.testing.assert_array_equal(pil_values, _expected(person, generated, mask))


def test_repaint_blurs_the_mask_as_an_rgb_image_would():
    """The original blurs the mask converted to RGB; we blur the single channel: same values."""
    rng = np.random.default_rng(0)
    for k in (1, 3, 5, 11):
        m = (rng.random((64, 50)) > 0.6).astype(np.uint8) * 255
        single = np.asarray(Image.fromarray(m).filter(ImageFilter.GaussianBlur(k)))
        rgb = np.asarray(Image.fromarray(m).convert("RGB").filter(ImageFilter.GaussianBlur(k)))
        for c in range(3):
            np.testing.assert_array_equal(rgb[..., c], single)


# -- masks ----------------------------------------------------------------------------------------
def test_tensor_masks_are_binarised_at_one_half_like_the_original():
    values = torch.tensor([[0.0, 0.3, 0.4999, 0.5, 0.7, 1.0]])
    out = mask_to_tensor(values)
    assert out.shape == (1, 1, 1, 6) and out.dtype == torch.float32
    np.testing.assert_array_equal(out[0, 0].numpy(), original_binarise(values.numpy()))
    assert out[0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]

    soft = torch.rand(2, 1, 16, 12, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(mask_to_tensor(soft).numpy(), original_binarise(soft.numpy()))
    np.testing.assert_array_equal(mask_to_tensor(soft.half()).numpy(), original_binarise(soft.half().numpy()))


def test_binary_and_bool_masks_pass_unchanged():
    m = torch.zeros(1, 1, 8, 6)
    m[..., 2:5, 1:4] = 1
    assert torch.equal(mask_to_tensor(m), m)
    assert torch.equal(mask_to_tensor(m[0, 0].bool()), m)
    assert torch.equal(mask_to_tensor(m[0].to(torch.uint8)), m)


@pytest.mark.parametrize("bad,message", [
    (torch.full((4, 4), 255.0), r"mask: values must lie in \[0, 1\].*found 255\.\.255.*/ 255"),
    (torch.full((4, 4), -0.2), r"mask: values must lie in \[0, 1\]"),
    (torch.tensor([[0.0, float("nan")]]), "mask: contains NaN"),
])
def test_masks_outside_zero_one_are_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        mask_to_tensor(bad)


def test_pil_masks_are_binarised_like_the_original():
    """The original reads a PIL mask as grayscale / 255 and binarises at 0.5: L >= 128."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = mask_to_tensor(Image.fromarray(levels))
    expected = original_binarise(levels.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(out[0, 0].numpy(), expected)
    assert out[0, 0].flatten()[127] == 0 and out[0, 0].flatten()[128] == 1


def test_pil_images_become_the_originals_float_tensors():
    """The original's image processor computes 2 * (v / 255) - 1 in float32: same values."""
    levels = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    out = image_to_tensor(Image.fromarray(levels), "src_image")
    expected = 2.0 * (levels.astype(np.float32) / np.float32(255.0)) - 1.0
    np.testing.assert_array_equal(out[0].permute(1, 2, 0).numpy(), expected)
