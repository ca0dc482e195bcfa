"""The dataset folder layouts ``training.datasets`` reads (torch-free: the command line lists them
before anything heavy is imported)."""

from __future__ import annotations

from enum import Enum


class DatasetLayout(str, Enum):
    VITON_HD = "viton_hd"
    DRESS_CODE = "dress_code"
    DEEPFASHION = "deepfashion"
    DEEPFASHION_MCLD = "deepfashion_mcld"  # MCLD's prepared folder: IUV images, texture maps, face embeddings
