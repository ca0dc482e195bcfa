"""MCLD's model inputs from pictures, as their DeepFashion test set makes them (``DeepFashionBaseline``
without normalisation): every picture resized to the model's 512×512 with PIL's default (bicubic)
``Image.resize``, as tensors in [0, 1]; the face embedding as float32."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

MODEL_SIZE = (512, 512)  # (width, height) of every image input
ANSWER_SIZE = (352, 512)  # (width, height) of the published 512-high results (test.py; DeepFashion's aspect)


def model_image(picture: Image.Image) -> Image.Image:
    """``picture`` as the model takes it: RGB, 512×512 (their ``Image.resize((512, 512))``)."""
    picture = picture.convert("RGB")
    return picture if picture.size == MODEL_SIZE else picture.resize(MODEL_SIZE, Image.Resampling.BICUBIC)


def unit_tensor(picture: Image.Image) -> torch.Tensor:
    """(3, 512, 512) float32 in [0, 1] (their ``ToTensor``)."""
    return torch.from_numpy(np.asarray(model_image(picture)).copy()).permute(2, 0, 1).float().div(255)


def sample_tensors(source: Image.Image, texture: Image.Image, pose: Image.Image,
                   face_embedding: np.ndarray) -> dict[str, torch.Tensor]:
    """One sample of a batch (``leffa infer``): the person to keep, its texture map, the target's
    IUV image (channels V, U, I) and its face embedding (512,)."""
    face = np.asarray(face_embedding, np.float32).reshape(-1)
    return {"source": unit_tensor(source), "texture": unit_tensor(texture), "pose": unit_tensor(pose),
            "face": torch.from_numpy(face.copy())}
