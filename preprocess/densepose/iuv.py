"""The DensePose image MCLD's data preparation computes (its ``preprocess_data/densepose_interface.py``
``process_output`` with DensePose R101-FPN-DL s1x): the top-scoring person's I, U, V in the
photo's frame.

Its array, H × W × 3 uint8, zeros outside the person's box:

- channel 0 = part index I (0 background, 1..24), channel 1 = U·255, channel 2 = V·255, each
  computed as float32 U·255, widened to float64 and cast to uint8 (truncation; a value outside
  0..255, from U or V slightly outside [0, 1], wraps as numpy's float -> uint8 cast does);
- pasted at x, y, w, h = int(x1), int(y1), int(x2 − x1), int(y2 − y1) (the differences in
  float32), the top instance's box as ``extract.int_box`` computes it.

MCLD writes that array with ``cv2.imwrite``, so the PNG on disk holds B = I, G = U, R = V. Two
readers of that file see two channel orders:

- its texture code (``texture_interface.py``) reads it with ``cv2.imread``: the array as
  computed, (I, U, V) — ``iuv_image``;
- its dataset reads it with ``PIL.Image.open`` for the pose condition: RGB = (V, U, I) —
  ``iuv_pose_rgb``.

The instances should come from ``mcld_densepose(path)``: MCLD's score threshold is 0.05.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from preprocess.densepose.render import DensePoseInstance

# MCLD's predictor keeps detectron2's default ROI_HEADS.SCORE_THRESH_TEST (its config files and
# setup_config set none): a photo whose best person scores 0.05..0.5 still gets an IUV image
MCLD_SCORE_THRESHOLD = 0.05


def iuv_image(instances: Sequence[DensePoseInstance], height: int, width: int) -> np.ndarray | None:
    """(height, width, 3) uint8 in cv2 order (I, U·255, V·255), the top instance pasted at its
    box; ``None`` when nobody was found (MCLD skips such a photo). ``instances`` best first, as
    ``DensePoseRCNN`` returns them.

    One difference from MCLD, for boxes under one pixel wide or high: MCLD pastes nothing, the
    instance here (``DensePoseInstance`` keeps at least one pixel) pastes one row or column.
    """
    if not instances:
        return None
    top = instances[0]
    x, y, w, h = top.box
    uv255 = (top.uv.astype(np.float32, copy=False) * np.float32(255.0)).astype(np.float64)  # (2, h, w)
    iuv = np.stack([top.labels.astype(np.float64), uv255[0], uv255[1]], axis=2)  # (h, w, 3) float64
    canvas = np.zeros((height, width, 3), np.float64)
    region = canvas[max(y, 0):y + h, max(x, 0):x + w]  # the box within the photo
    region[...] = iuv[max(-y, 0):max(-y, 0) + region.shape[0], max(-x, 0):max(-x, 0) + region.shape[1]]
    with np.errstate(invalid="ignore", over="ignore"):  # values outside 0..255 wrap, as in MCLD
        return canvas.astype(np.uint8)


def iuv_pose_rgb(instances: Sequence[DensePoseInstance], height: int, width: int) -> Image.Image | None:
    """MCLD's pose condition: the saved IUV file as PIL reads it, RGB = (V·255, U·255, I);
    ``None`` when nobody was found."""
    iuv = iuv_image(instances, height, width)
    return None if iuv is None else Image.fromarray(np.ascontiguousarray(iuv[:, :, ::-1]), "RGB")


def mcld_densepose(path, device: str = "cpu"):
    """DensePose R101-FPN-DL s1x from ``path`` (``model_final_844d15.pkl`` or its conversion) as
    MCLD runs it for ``iuv_image``: score threshold 0.05, and only the best detection (the first
    that NMS keeps is the best-scoring box, so detectron2's top-100 list starts with the same
    person; the DensePose head then runs on one box, not up to 100)."""
    from dataclasses import replace

    from preprocess.densepose.model import R101_FPN_DL_S1X, DensePoseRCNN

    cfg = replace(R101_FPN_DL_S1X, score_threshold=MCLD_SCORE_THRESHOLD, max_detections=1)
    return DensePoseRCNN.from_checkpoint(path, device, config=cfg)


def photo_iuv(model: Callable[[np.ndarray], list[DensePoseInstance]],
              photo: Image.Image | np.ndarray) -> np.ndarray | None:
    """``iuv_image`` of a photo: a PIL image (its EXIF orientation applied, as detectron2's
    ``read_image`` does, then RGB) or an RGB uint8 array; ``model`` e.g. a ``DensePoseRCNN``."""
    if isinstance(photo, Image.Image):
        photo = np.asarray(ImageOps.exif_transpose(photo).convert("RGB"))
    return iuv_image(model(photo), photo.shape[0], photo.shape[1])
