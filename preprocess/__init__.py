"""Turning user photos into Leffa's model inputs (spec §5).

``Preprocessor.from_checkpoints()`` builds the parsing, pose and DensePose models from the
checkpoint folder (or the Hub) on first use; its ``tryon`` and ``pose`` return every model input
plus the intermediates. Importing this package loads nothing: the names below import their
module on first use, so light modules (``preprocess.masks``, ``preprocess.images``) stay light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"PoseInputs": "preprocess.inputs", "Preprocessor": "preprocess.inputs", "TryOnInputs": "preprocess.inputs"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'preprocess' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
