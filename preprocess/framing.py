"""Framing a photo around its person for the model, and pasting the model's answer back into the
photo at full resolution. Pure geometry and pixels: no model here (the person's box comes from
``Preprocessor.people``).

* ``frame_box``: the 3:4 box around a person, with a margin, inside the photo where it can be and
  padded only where the photo ends. A photo that is already a 3:4 portrait of its person gets the
  whole photo, so ``crop_to_model`` gives exactly ``fit_to_canvas``'s picture.
* ``crop_to_model``: the box as the model's 768×1024 input (white where the photo ends).
* ``paste_back``: the generated 768×1024 picture back into the photo, through the mask the model
  used, dilated and feathered: every pixel outside that blend region is the photo's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from preprocess.images import MODEL_SIZE, WHITE, ImageLoadError, canvas_placement
from preprocess.openpose import NoPersonError

ASPECT = MODEL_SIZE[0] / MODEL_SIZE[1]  # width / height of the model's canvas: 3:4
MARGIN = 0.08  # around the person, as a fraction of its height (each side)
MIN_SIDE = 32  # pixels: a smaller photo holds no person the model could dress
# the blend region around the mask, in model pixels: dilated, then feathered
DILATE_PX, FEATHER_PX = 4, 6
STRIP_PIXELS = 1 << 21  # the blend is computed about two million pixels at a time (bounded memory)


@dataclass(frozen=True)
class Box:
    """A rectangle in photo pixels, ``(x0, y0)`` inclusive, ``(x1, y1)`` exclusive; it may reach
    outside the photo (there the model's input is padded)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return self.width * self.height

    def inside(self, size: tuple[int, int]) -> Box:
        """The part of the box inside a photo of ``size`` (width, height)."""
        w, h = size
        return Box(max(self.x0, 0), max(self.y0, 0), min(self.x1, w), min(self.y1, h))

    def scaled(self, factor: float) -> Box:
        """The box in a picture ``factor`` times the size (outward rounding: it still holds what it held)."""
        return Box(math.floor(self.x0 * factor), math.floor(self.y0 * factor),
                   math.ceil(self.x1 * factor), math.ceil(self.y1 * factor))


def _span(lo: float, length: int, limit: int) -> int:
    """Where a span of ``length`` that would start at ``lo`` starts: moved inside ``[0, limit]`` when
    it fits; when it is longer, moved as little as possible so that it covers all of ``[0, limit]``
    (it reaches out of the photo only there)."""
    if length > limit:
        return min(max(round(lo), limit - length), 0)
    return min(max(round(lo), 0), limit - length)


def frame_box(person: Box, size: tuple[int, int], margin: float = MARGIN) -> Box:
    """The 3:4 box the model sees of a photo of ``size`` (width, height) around ``person``.

    The person with ``margin`` (a fraction of its height) on each side, cut to the photo, then
    widened or heightened to 3:4 around its centre, moved inside the photo where it fits; where
    the photo is too small for it, it reaches out of the photo (padding) equally on both sides."""
    w, h = size
    pad = margin * person.height
    want = Box(math.floor(person.x0 - pad), math.floor(person.y0 - pad),
               math.ceil(person.x1 + pad), math.ceil(person.y1 + pad)).inside(size)
    bw, bh = want.width, want.height
    if bw < bh * ASPECT:
        bw = round(bh * ASPECT)
    else:
        bh = round(bw / ASPECT)
    x0 = _span(want.x0 + (want.width - bw) / 2, bw, w)
    y0 = _span(want.y0 + (want.height - bh) / 2, bh, h)
    return Box(x0, y0, x0 + bw, y0 + bh)


@dataclass(frozen=True)
class Framing:
    """What the model saw of a photo: the upright ``photo`` (EXIF applied), the ``box`` of it that
    became the model's picture, and how many ``people`` were found in it (the largest is framed;
    0 when the box was not chosen around a person: the whole photo, as ``fit_to_canvas`` fits it)."""

    photo: Image.Image
    box: Box
    people: int = 0
    others: tuple[Box, ...] = ()  # the other people found (not framed)


def canvas_box(size: tuple[int, int], canvas: tuple[int, int] = MODEL_SIZE) -> Box:
    """The box of a photo of ``size`` that ``fit_to_canvas`` makes the canvas (the whole photo,
    with the padding around it), to the nearest pixel."""
    new, (cx, cy) = canvas_placement(size, canvas)
    sx, sy = size[0] / new[0], size[1] / new[1]
    return Box(round(-cx * sx), round(-cy * sy), round((canvas[0] - cx) * sx), round((canvas[1] - cy) * sy))


def frame_person(photo: Image.Image, find_people: Callable[[Image.Image], list[Box]], what: str = "photo",
                 margin: float = MARGIN) -> Framing:
    """The framing of ``photo`` around the largest of the people ``find_people`` finds in it (boxes
    in its pixels); ``what`` names the photo in the messages (too small, nobody in it)."""
    if min(photo.size) < MIN_SIDE:
        raise ImageLoadError(f"the {what} is {photo.width}x{photo.height} pixels, too small to find a person in: "
                             f"use a photo at least {MIN_SIDE} pixels wide and high")
    people = find_people(photo)
    if not people:
        raise NoPersonError(f"no person detected in the {what}: use a photo of one person, whole or from the waist up")
    largest = max(people, key=lambda b: b.area)
    return Framing(photo, frame_box(largest, photo.size, margin), len(people),
                   tuple(b for b in people if b is not largest))


def crop_to_model(photo: Image.Image, box: Box, size: tuple[int, int] = MODEL_SIZE,
                  resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """The ``box`` of ``photo`` at ``size``, white where the box reaches out of the photo. The part
    inside the photo is resampled straight from the photo (no full-size crop is made first)."""
    sx, sy = size[0] / box.width, size[1] / box.height
    part = box.inside(photo.size)
    # the whole model pixels the photo covers, and exactly the photo area they show (the same mapping
    # as paste_back's, so that the answer goes back where it came from)
    dst = (math.ceil((part.x0 - box.x0) * sx - 1e-9), math.ceil((part.y0 - box.y0) * sy - 1e-9),
           math.floor((part.x1 - box.x0) * sx + 1e-9), math.floor((part.y1 - box.y0) * sy + 1e-9))
    canvas = Image.new(photo.mode, size, WHITE if photo.mode == "RGB" else 255)
    if dst[2] <= dst[0] or dst[3] <= dst[1]:  # a sliver of a photo: nothing of it at this size
        return canvas
    src = (box.x0 + dst[0] / sx, box.y0 + dst[1] / sy, box.x0 + dst[2] / sx, box.y0 + dst[3] / sy)
    region = photo.resize((dst[2] - dst[0], dst[3] - dst[1]), resample, box=src)
    if dst == (0, 0, *size):
        return region
    canvas.paste(region, dst[:2])
    return canvas


def blend_mask(mask: Image.Image, box: Box, part: Box) -> np.ndarray:
    """The blend weights (uint8, 0..255) of the photo pixels in ``part`` (the box inside the photo):
    255 on the model's mask and ``DILATE_PX`` model pixels around it; then falling linearly to 0 over
    ``FEATHER_PX`` more (computed at the model picture's size, pixels counted at 768 wide, then resized
    to the photo's). Zero exactly where the photo is kept."""
    on = (np.asarray(mask.convert("L")) >= 128).astype(np.uint8)
    scale = mask.width / MODEL_SIZE[0]
    dilate, feather = max(1, round(DILATE_PX * scale)), max(1.0, FEATHER_PX * scale)
    grown = cv2.dilate(on, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1)))
    distance = cv2.distanceTransform((1 - grown).astype(np.uint8), cv2.DIST_L2, 3)  # 0 on the grown mask
    soft = np.rint(np.clip(1 - distance / feather, 0, 1) * 255).astype(np.uint8)
    sx, sy = mask.width / box.width, mask.height / box.height
    src = ((part.x0 - box.x0) * sx, (part.y0 - box.y0) * sy, (part.x1 - box.x0) * sx, (part.y1 - box.y0) * sy)

    def at_photo(values: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(values).resize((part.width, part.height), Image.Resampling.BILINEAR, box=src))

    weights = at_photo(soft).copy()
    weights[at_photo(on * 255) >= 128] = 255  # the mask itself is the model's answer, whole
    return weights


def paste_back(photo: Image.Image, generated: Image.Image, box: Box, mask: Image.Image) -> Image.Image:
    """``photo`` with the ``generated`` picture of ``box`` blended in through ``mask`` (both at the
    model's size): a new RGB image of the photo's size, equal to the photo outside the blend region."""
    part = box.inside(photo.size)
    weights = blend_mask(mask, box, part)
    rows, cols = np.flatnonzero(weights.any(axis=1)), np.flatnonzero(weights.any(axis=0))
    out = photo.convert("RGB")  # a new image: the caller's photo stays as it was
    if not len(rows):
        return out
    # only the rows and columns the blend reaches are resampled and blended
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    weights = weights[y0:y1, x0:x1]
    region = Box(part.x0 + x0, part.y0 + y0, part.x0 + x1, part.y0 + y1)
    sx, sy = generated.width / box.width, generated.height / box.height
    src = ((region.x0 - box.x0) * sx, (region.y0 - box.y0) * sy, (region.x1 - box.x0) * sx, (region.y1 - box.y0) * sy)
    new = np.asarray(generated.convert("RGB").resize((region.width, region.height), Image.Resampling.LANCZOS, box=src))
    old = np.asarray(out.crop((region.x0, region.y0, region.x1, region.y1)))
    blended = np.empty_like(old)
    rows = max(1, STRIP_PIXELS // max(1, region.width))
    for r in range(0, region.height, rows):  # bounded memory: a strip of rows at a time
        a = weights[r:r + rows, :, None].astype(np.uint16)
        mixed = new[r:r + rows].astype(np.uint16) * a + old[r:r + rows].astype(np.uint16) * (255 - a)
        blended[r:r + rows] = ((mixed + 127) // 255).astype(np.uint8)
    out.paste(Image.fromarray(blended), (region.x0, region.y0))
    return out


def box_drawn(photo: Image.Image, box: Box, longest: int = 1024, others: tuple[Box, ...] = ()) -> Image.Image:
    """A preview of ``photo`` (at most ``longest`` pixels on its longest side) with ``box`` drawn, and
    the ``others`` (people not framed) in grey."""
    from PIL import ImageDraw

    scale = min(1.0, longest / max(photo.size))
    preview = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))),
                           Image.Resampling.BILINEAR, reducing_gap=2.0).convert("RGB")
    width = max(2, round(max(preview.size) / 200))
    draw = ImageDraw.Draw(preview)
    for shown, colour in [*((b.scaled(scale), (150, 150, 150)) for b in others), (box.scaled(scale), (255, 0, 160))]:
        draw.rectangle((shown.x0, shown.y0, shown.x1 - 1, shown.y1 - 1), outline=colour, width=width)
    return preview
