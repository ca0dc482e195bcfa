"""MCLD's inputs from two photos (Liu et al., CVPR 2025, and their data preparation): the target's
pose as DensePose R101 part/U/V values, and the kept person's appearance as a texture map in the
body's UV space plus the identity of its face.

Their files, reproduced: ``*_densepose/*.png`` is the top person's IUV (part index, U·255, V·255)
pasted at its box, written with OpenCV (so its pixels read back in RGB order are V, U, I);
``*_texture/*.png`` is the texture map of the photo and that IUV; ``*_face/*.npy`` the raw ArcFace
embedding of the largest face (zeros when there is none). They are computed from the photo at its
own resolution; here from the picture the request framed (``PICTURE``, DeepFashion's aspect).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from preprocess.face import EMBEDDING_SIZE

PICTURE = (704, 1024)  # (width, height) photos are framed into: DeepFashion's 352:512 at its resolution


@dataclass
class AppearanceInputs:
    """What MCLD conditions on besides the target pose (``PoseInputs.appearance``)."""

    texture: Image.Image  # 512×512 RGB: the kept person's pixels in the SMPL UV atlas
    face_embedding: np.ndarray  # (512,) float32 raw ArcFace embedding, zeros when no face was found
    face_box: tuple[float, float, float, float] | None  # x0 y0 x1 y1 in the reference picture, None: no face


def no_face() -> np.ndarray:
    """The embedding of a photo without a face, as their data preparation stands it in: zeros."""
    return np.zeros(EMBEDDING_SIZE, np.float32)
