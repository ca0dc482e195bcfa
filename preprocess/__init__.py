"""Turning user photos into Leffa's model inputs (spec §5).

``preprocess_tryon`` and ``preprocess_pose`` use one shared ``Preprocessor`` whose models
load from the checkpoint folder (or the Hub) on first use.
"""

from __future__ import annotations

import threading

from preprocess.inputs import PoseInputs, Preprocessor, TryOnInputs

_default: Preprocessor | None = None
_default_lock = threading.Lock()


def default_preprocessor() -> Preprocessor:
    global _default
    with _default_lock:
        if _default is None:
            _default = Preprocessor.from_checkpoints()
        return _default


def preprocess_tryon(person, garment, model_type, garment_type, preprocess_garment=False, **options) -> TryOnInputs:
    """See ``Preprocessor.tryon``."""
    return default_preprocessor().tryon(person, garment, model_type, garment_type, preprocess_garment, **options)


def preprocess_pose(reference, target, **options) -> PoseInputs:
    """See ``Preprocessor.pose``."""
    return default_preprocessor().pose(reference, target, **options)


__all__ = ["PoseInputs", "Preprocessor", "TryOnInputs", "default_preprocessor", "preprocess_pose",
           "preprocess_tryon"]
