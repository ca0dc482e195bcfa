"""Hand-built 384×512 parse maps and keypoints of a standing figure, for mask tests."""

from __future__ import annotations

import numpy as np

from preprocess.masks import (BACKGROUND, DRESS, HAIR, HEAD, LEFT_ARM, LEFT_SHOE, NECK, PANTS, RIGHT_ARM,
                              RIGHT_SHOE, UPPER_CLOTHES)

H, W = 512, 384


def _box(p, x0, x1, y0, y1, label):
    p[y0:y1, x0:x1] = label


def figure(arms: str = "down", lower: str = "pants", full_body: bool = True,
           missing_wrist: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(parse (512, 384) uint8, keypoints (18, 2)) of a person facing the camera.

    arms: "down" or "raised"; lower: "pants" or "dress"; full_body=False cuts the figure at
    the hips like a VITON-HD photo; missing_wrist: "right"/"left" sets that wrist to (0, 0).
    """
    p = np.full((H, W), BACKGROUND, np.uint8)
    kp = np.zeros((18, 2))
    kp[0], kp[1] = (192, 80), (192, 125)  # nose, neck
    kp[2], kp[5] = (130, 135), (254, 135)  # r/l shoulder (image left / right)
    kp[8], kp[11] = (165, 290), (219, 290)  # hips
    kp[14], kp[15], kp[16], kp[17] = (182, 70), (202, 70), (172, 75), (212, 75)  # eyes, ears
    _box(p, 165, 220, 25, 45, HAIR)
    _box(p, 162, 222, 45, 110, HEAD)
    _box(p, 180, 204, 110, 126, NECK)
    if lower == "dress":
        _box(p, 130, 254, 126, 400, DRESS)
    else:
        _box(p, 130, 254, 126, 290, UPPER_CLOTHES)
        _box(p, 135, 249, 290, 450, PANTS)
    if arms == "down":
        kp[3], kp[4] = (115, 215), (115, 300)  # r elbow, wrist
        kp[6], kp[7] = (269, 215), (269, 300)
        _box(p, 100, 130, 130, 360, RIGHT_ARM)  # arm + hand (y 320..360)
        _box(p, 254, 284, 130, 360, LEFT_ARM)
    else:
        kp[3], kp[4] = (105, 80), (100, 25)
        kp[6], kp[7] = (279, 80), (284, 25)
        _box(p, 88, 130, 10, 150, RIGHT_ARM)
        _box(p, 254, 296, 10, 150, LEFT_ARM)
    if full_body:
        kp[9], kp[12], kp[10], kp[13] = (165, 370), (219, 370), (165, 450), (219, 450)
        _box(p, 135, 190, 450, 480, RIGHT_SHOE)
        _box(p, 194, 249, 450, 480, LEFT_SHOE)
    else:  # cut at the bottom edge, like VITON-HD's half-body photos
        p[400:] = BACKGROUND
        p[330:, 135:249] = np.where(p[330:, 135:249] == BACKGROUND, PANTS, p[330:, 135:249])
        kp[8:14] = 0
    if missing_wrist == "right":
        kp[4] = 0
    elif missing_wrist == "left":
        kp[7] = 0
    return p, kp


def region(parse: np.ndarray, *labels: int, erode: int = 0) -> np.ndarray:
    import cv2

    m = np.isin(parse, labels).astype(np.uint8)
    if erode:
        m = cv2.erode(m, np.ones((2 * erode + 1, 2 * erode + 1), np.uint8))
    return m > 0


def hands(parse: np.ndarray, erode: int = 3) -> np.ndarray:
    m = region(parse, LEFT_ARM, RIGHT_ARM, erode=erode)
    m[:330] = False  # the hands are the arm parsing below y = 330 in the arms-down figure
    return m
