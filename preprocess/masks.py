"""Agnostic (inpainting) masks from a human-parsing map and body keypoints (spec §5).

Both variants work on the 384×512 parsing map and keypoints in its pixels, and return a
uint8 mask (255 = inpaint) of the same size; the caller resizes it to 768×1024.
"""

from __future__ import annotations

from enum import Enum

import cv2
import numpy as np
from PIL import Image, ImageDraw

from errors import enum_option
from preprocess.densepose.render import DensePoseInstance, render_labels, render_segmentation

# ATR labels (0..17) plus 18 = neck
BACKGROUND, HAT, HAIR, SUNGLASSES, UPPER_CLOTHES, SKIRT, PANTS, DRESS, BELT = range(9)
LEFT_SHOE, RIGHT_SHOE, HEAD, LEFT_LEG, RIGHT_LEG, LEFT_ARM, RIGHT_ARM, BAG, SCARF, NECK = range(9, 19)
LABELS = ["background", "hat", "hair", "sunglasses", "upper_clothes", "skirt", "pants", "dress", "belt",
          "left_shoe", "right_shoe", "head", "left_leg", "right_leg", "left_arm", "right_arm", "bag",
          "scarf", "neck"]

# COCO-order OpenPose body keypoints used here
R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST = 2, 3, 4, 5, 6, 7


class GarmentType(str, Enum):
    UPPER_BODY = "upper_body"
    LOWER_BODY = "lower_body"
    DRESSES = "dresses"

    @property
    def label(self) -> str:
        return {"upper_body": "Upper body", "lower_body": "Lower body", "dresses": "Dress"}[self.value]


class TryOnModel(str, Enum):
    """The two published try-on models' preprocessing: the mask variant (``agnostic_mask``) and
    the DensePose rendering each was trained with (which weights each uses: ``engine.registry``)."""

    VITON_HD = "viton_hd"  # VITON-HD data, upper body ("recommended")
    DRESS_CODE = "dress_code"  # DressCode data, upper / lower body / dresses ("experimental")

    @property
    def label(self) -> str:
        return {"viton_hd": "VITON-HD (recommended)", "dress_code": "DressCode (experimental)"}[self.value]

    def render_densepose(self, instances: list[DensePoseInstance], size: tuple[int, int]) -> Image.Image:
        """VITON-HD was fed the part-colour segmentation, DressCode the part labels (spec §5)."""
        render = render_segmentation if self is TryOnModel.VITON_HD else render_labels
        return render(instances, size)


def _is(parse: np.ndarray, *labels: int) -> np.ndarray:
    return np.isin(parse, labels)


def _dilate(m: np.ndarray, k: int, iterations: int) -> np.ndarray:
    return cv2.dilate(m.astype(np.uint8), np.ones((k, k), np.uint8), iterations=iterations) > 0


def _missing(point: np.ndarray) -> bool:
    return point[0] <= 1.0 and point[1] <= 1.0


def _stroke(size: tuple[int, int], points: list, width: int) -> Image.Image:
    im = Image.new("L", size)
    if len(points) >= 2:
        ImageDraw.Draw(im).line([tuple(int(v) for v in p) for p in points], fill=255, width=width,
                                joint="curve")
    return im


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Everything not reachable from the top-left corner through background becomes mask."""
    img = np.where(mask, 255, 0).astype(np.uint8)
    flooded = img.copy()
    cv2.floodFill(flooded, np.zeros((img.shape[0] + 2, img.shape[1] + 2), np.uint8), (0, 0), 255)
    return (img > 0) | (flooded == 0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The filled outer contour of largest area."""
    contours, _ = cv2.findContours(mask.astype(np.uint8) * 255, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_TC89_L1)
    out = np.zeros(mask.shape, np.uint8)
    if contours:
        best = max(range(len(contours)), key=lambda i: abs(cv2.contourArea(contours[i], True)))
        cv2.drawContours(out, contours, best, color=255, thickness=-1)
    return out > 0


def _finish(changeable, garment, fixed) -> np.ndarray:
    keep = (changeable & ~garment) | fixed
    mask = ~keep
    mask[0, :] = mask[-1, :] = False
    mask[:, 0] = mask[:, -1] = False
    return fill_holes(mask)


def _viton_hd(parse, kp, garment_type, keep_fixed_regions) -> np.ndarray:
    h, w = parse.shape
    upper_like = garment_type in (GarmentType.UPPER_BODY, GarmentType.DRESSES)
    head = _is(parse, HAT, SUNGLASSES, HEAD)
    fixed = _is(parse, LEFT_SHOE, RIGHT_SHOE, HAT, SUNGLASSES, BAG)
    changeable = parse == BACKGROUND
    if garment_type is GarmentType.UPPER_BODY:
        garment = _is(parse, UPPER_CLOTHES, DRESS)
        fixed |= _is(parse, SKIRT, PANTS)
    elif garment_type is GarmentType.LOWER_BODY:
        garment = _is(parse, PANTS, SKIRT, LEFT_LEG, RIGHT_LEG)
        fixed |= _is(parse, UPPER_CLOTHES, LEFT_ARM, RIGHT_ARM)
    else:
        garment = _is(parse, DRESS, UPPER_CLOTHES, SKIRT, PANTS)
    changeable |= (parse != BACKGROUND) & ~fixed

    arm_images = np.zeros_like(fixed)
    if upper_like:
        width = int(60 / 512 * h)
        for shoulder, elbow, wrist, arm_label in ((R_SHOULDER, R_ELBOW, R_WRIST, RIGHT_ARM),
                                                  (L_SHOULDER, L_ELBOW, L_WRIST, LEFT_ARM)):
            arm = parse == arm_label
            if _missing(kp[wrist]):
                image = arm
            else:
                wrist_ext = kp[elbow] + 1.2 * (kp[wrist] - kp[elbow])
                im = _stroke((w, h), [kp[shoulder], kp[elbow], wrist_ext], width)
                sx, sy = (int(v) for v in kp[shoulder])
                ImageDraw.Draw(im).arc([sx - width // 2, sy - width // 2, sx + width // 2, sy + width // 2],
                                       0, 360, fill=255, width=width // 2)
                image = np.asarray(im) > 0
            arm_images |= image
            fixed |= arm & ~image  # the hand: arm parsing outside the arm image

    protected = fixed.copy()
    fixed = (cv2.erode(fixed.astype(np.uint8), np.ones((5, 5), np.uint8), iterations=1) > 0) | head
    garment = _dilate(garment, 10, 5)
    if upper_like:
        garment |= _dilate(parse == NECK, 5, 1) & ~head
        garment |= _dilate(arm_images, 5, 4)
    mask = largest_component(_finish(changeable, garment, fixed))
    if keep_fixed_regions:  # undo the erosion ring's hole filling (spec §5 "known quirk")
        mask &= ~protected
    return mask


def _dress_code(parse, kp, garment_type) -> np.ndarray:
    h, w = parse.shape
    upper_like = garment_type in (GarmentType.UPPER_BODY, GarmentType.DRESSES)
    head = _is(parse, HAT, HAIR, SUNGLASSES, HEAD, NECK)
    fixed = _is(parse, HAIR, LEFT_SHOE, RIGHT_SHOE, HAT, SUNGLASSES, SCARF, BAG)
    changeable = parse == BACKGROUND
    arms = _is(parse, LEFT_ARM, RIGHT_ARM)
    if garment_type is GarmentType.DRESSES:
        garment = _is(parse, DRESS, LEFT_LEG, RIGHT_LEG)
    elif garment_type is GarmentType.UPPER_BODY:
        garment = _is(parse, UPPER_CLOTHES)
        fixed |= _is(parse, SKIRT, PANTS)
    else:
        garment = _is(parse, PANTS, LEFT_LEG, RIGHT_LEG)
        fixed |= _is(parse, UPPER_CLOTHES) | arms
    changeable |= (parse != BACKGROUND) & ~fixed

    if upper_like:
        left = [kp[L_WRIST], kp[L_ELBOW], kp[L_SHOULDER]]
        right = [kp[R_SHOULDER], kp[R_ELBOW], kp[R_WRIST]]
        if _missing(kp[L_WRIST]):
            left = left[2:] if _missing(kp[L_ELBOW]) else left[1:]
        if _missing(kp[R_WRIST]):
            right = right[:1] if _missing(kp[R_ELBOW]) else right[:2]
        stroke = np.asarray(_stroke((w, h), left + right, 30)) > 0
        if h > 512:
            stroke = _dilate(stroke, 10, 5)
        elif h > 256:
            stroke = _dilate(stroke, 5, 5)
        garment |= stroke
        fixed |= arms & ~stroke

        # cut the head along the shoulder line, 20·H/512 px above it
        ls, rs = kp[L_SHOULDER], kp[R_SHOULDER]
        present = [p for p in (ls, rs) if not _missing(p)]
        if present:
            if len(present) == 2 and abs(rs[0] - ls[0]) >= 1:
                m = (rs[1] - ls[1]) / (rs[0] - ls[0])
                c = ls[1] - m * ls[0]
            else:  # one shoulder (or both in one column): a horizontal line
                m, c = 0.0, float(np.mean([p[1] for p in present]))
            cut = m * np.arange(w) + c - 20 * h / 512
            rows = np.arange(h)[:, None]
            head_kept = head & (rows < np.ceil(cut)[None, :])
        else:
            head_kept = head
        fixed |= head_kept
        garment |= head & ~head_kept

    k = 20 if h > 512 else 10 if h > 256 else 5
    garment = _dilate(garment, k, 5)
    return _finish(changeable, garment, fixed)


def agnostic_mask(parse: np.ndarray, keypoints: np.ndarray, garment_type: str | GarmentType,
                  variant: str | TryOnModel, *, keep_fixed_regions: bool = False) -> np.ndarray:
    """The inpainting mask for a try-on.

    Args:
        parse: (512, 384) uint8 label map (ATR labels 0..17, 18 = neck).
        keypoints: (18, 2) float OpenPose body points in pixels of that image, (0, 0) = missing.
        garment_type: ``upper_body``, ``lower_body`` or ``dresses``.
        variant: ``viton_hd`` (VITON-HD model) or ``dress_code`` (DressCode model).
        keep_fixed_regions: VITON-HD only: never mask what the garment type keeps (the other
            clothes, shoes, hands, hat, bag). Off by default: the original erodes those
            regions, and on full-body photos the eroded ring closes and hole filling masks
            them (the trousers of an upper-body try-on; spec §5 "known quirk").
    Returns:
        (512, 384) uint8 mask, 255 = inpaint.
    """
    garment_type, variant = enum_option(GarmentType, garment_type, "garment_type"), enum_option(TryOnModel, variant, "variant")
    parse = np.asarray(parse)
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if parse.ndim != 2 or parse.dtype != np.uint8:
        raise ValueError(f"parse must be a 2-D uint8 label map, got {parse.dtype} {parse.shape}")
    if parse.max(initial=0) > NECK:
        raise ValueError(f"parse has label {parse.max()}; labels are 0..{NECK}")
    if keypoints.shape != (18, 2):
        raise ValueError(f"keypoints must be (18, 2), got {keypoints.shape}")
    if variant is TryOnModel.VITON_HD:
        mask = _viton_hd(parse, keypoints, garment_type, keep_fixed_regions)
    else:
        if keep_fixed_regions:
            raise ValueError("keep_fixed_regions applies to the viton_hd variant only")
        mask = _dress_code(parse, keypoints, garment_type)
    return np.where(mask, 255, 0).astype(np.uint8)
