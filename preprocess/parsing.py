"""Human parsing with the SCHP ATR and LIP ONNX models (spec §5 "Human parsing").

The person (384×512) is affine-cropped into each network's square input with SCHP's
centre/scale transform, normalised with BGR-order ImageNet statistics, and the logits of
the network's second output are upsampled and mapped back to the image. ATR gives the
labels; LIP adds the neck (ATR face where LIP is not face) and small holes in the
upper clothes are filled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from preprocess.masks import HEAD, LABELS, LEFT_ARM, NECK, RIGHT_ARM, UPPER_CLOTHES

ATR_INPUT = (512, 512)  # (height, width)
LIP_INPUT = (473, 473)
LIP_FACE = 13
MEAN_BGR = np.array([0.406, 0.456, 0.485], np.float32)
STD_BGR = np.array([0.225, 0.224, 0.229], np.float32)
MIN_HOLE_AREA = 2000  # holes in the upper clothes larger than this keep their labels


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]], np.float32)


def schp_affine(image_hw: tuple[int, int], input_hw: tuple[int, int]) -> np.ndarray:
    """2×3 matrix taking image pixels to network-input pixels (SCHP's centre/scale crop).

    The whole image is the person box; the box is widened or heightened to the input's
    aspect ratio around its centre, then mapped onto the input.
    """
    h, w = image_hw
    in_h, in_w = input_hw
    bw, bh = w - 1.0, h - 1.0
    centre = np.array([bw * 0.5, bh * 0.5], np.float32)
    aspect = in_w / in_h
    if bw > aspect * bh:
        bh = bw / aspect
    elif bw < aspect * bh:
        bw = bh * aspect
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0], src[1] = centre, centre + np.array([0, -0.5 * bw], np.float32)
    dst[0] = [(in_w - 1) * 0.5, (in_h - 1) * 0.5]
    dst[1] = dst[0] + np.array([0, -0.5 * (in_w - 1)], np.float32)
    src[2], dst[2] = _third_point(src[0], src[1]), _third_point(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


class OnnxSegmenter:
    """One SCHP network: RGB image -> per-pixel logits (H, W, C) at the image's size."""

    def __init__(self, path: str | Path, input_hw: tuple[int, int], providers: list[str] | None = None):
        import onnxruntime as ort

        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        from weightfiles.checkpoint import CheckpointError, unreadable

        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        load_errors = (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidProtobuf,
                       ort_errors.InvalidGraph, ort_errors.NoSuchFile, ort_errors.NotImplemented)
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except load_errors as e:
            raise unreadable(path, "the human-parsing model", e, "an ONNX model") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) < 2:
            raise CheckpointError(f"{path}: not an SCHP parsing model (expected one image input and at least "
                                  f"two outputs, found {len(inputs)} inputs and {len(outputs)} outputs)")
        self.input_name = inputs[0].name  # "input.1" in the published models
        self.input_hw = input_hw

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        in_h, in_w = self.input_hw
        forward = schp_affine((h, w), self.input_hw)
        bgr = rgb[:, :, ::-1].astype(np.float32) / 255.0
        crop = cv2.warpAffine(bgr, forward, (in_w, in_h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        x = ((crop - MEAN_BGR) / STD_BGR).transpose(2, 0, 1)[None].astype(np.float32)
        outputs = self.session.run(None, {self.input_name: x})
        logits = torch.from_numpy(np.asarray(outputs[1], np.float32))  # (1, C, h', w')
        logits = F.interpolate(logits, size=(in_h, in_w), mode="bilinear", align_corners=True)
        logits = logits[0].permute(1, 2, 0).numpy()  # (in_h, in_w, C)
        inverse = cv2.invertAffineTransform(forward)
        channels = [cv2.warpAffine(np.ascontiguousarray(logits[:, :, c]), inverse, (w, h),
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
                    for c in range(logits.shape[2])]
        return np.stack(channels, axis=2)


def refine_atr(atr: np.ndarray, lip: np.ndarray) -> np.ndarray:
    """Post-process ATR labels: fill small holes in upper clothes + arms, add the neck (18)."""
    p = np.pad(atr, 1)
    arms = np.isin(p, (LEFT_ARM, RIGHT_ARM))
    region = (p == UPPER_CLOTHES) | arms
    img = np.where(region, 255, 0).astype(np.uint8)
    flooded = img.copy()
    cv2.floodFill(flooded, np.zeros((img.shape[0] + 2, img.shape[1] + 2), np.uint8), (0, 0), 255)
    filled = region | (flooded == 0)  # the region with its holes
    holes = (filled & (p != UPPER_CLOTHES) & ~arms).astype(np.uint8) * 255
    contours, _ = cv2.findContours(holes, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_TC89_L1)
    keep = np.zeros_like(holes)
    for i, contour in enumerate(contours):
        if abs(cv2.contourArea(contour, True)) > MIN_HOLE_AREA:
            cv2.drawContours(keep, contours, i, color=255, thickness=-1)
    keep = (keep > 0) | arms  # large holes and the arms keep their labels
    out = np.where(filled & ~keep, UPPER_CLOTHES, p)[1:-1, 1:-1]
    neck = (out == HEAD) & (lip != LIP_FACE)
    return np.where(neck, NECK, out).astype(np.uint8)


PALETTE = np.array([
    [0, 0, 0], [128, 0, 0], [255, 0, 0], [0, 85, 0], [170, 0, 51], [255, 85, 0], [0, 0, 85],
    [0, 119, 221], [85, 85, 0], [0, 85, 85], [85, 51, 0], [52, 86, 128], [0, 128, 0], [0, 0, 255],
    [51, 170, 221], [0, 255, 255], [85, 255, 170], [170, 255, 85], [255, 255, 0]], np.uint8)


def colorize(labels: np.ndarray) -> Image.Image:
    """A colour picture of a label map (one colour per label of ``LABELS``)."""
    return Image.fromarray(PALETTE[np.clip(labels, 0, len(LABELS) - 1)])


@dataclass
class Parsing:
    labels: np.ndarray  # (H, W) uint8, ATR labels 0..17 and 18 = neck
    image: Image.Image  # colour visualisation


class HumanParser:
    """ATR + LIP parsers; call with the person at 384×512."""

    def __init__(self, atr: OnnxSegmenter, lip: OnnxSegmenter):
        self.atr, self.lip = atr, lip

    @classmethod
    def from_files(cls, atr_path, lip_path, providers: list[str] | None = None) -> HumanParser:
        return cls(OnnxSegmenter(atr_path, ATR_INPUT, providers), OnnxSegmenter(lip_path, LIP_INPUT, providers))

    def __call__(self, person: Image.Image) -> Parsing:
        rgb = np.asarray(person.convert("RGB"))
        atr = self.atr(rgb).argmax(axis=2).astype(np.uint8)
        lip = self.lip(rgb).argmax(axis=2).astype(np.uint8)
        labels = refine_atr(atr, lip)
        return Parsing(labels, colorize(labels))
