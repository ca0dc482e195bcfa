"""Turning user photos into Leffa's model inputs (spec §5).

``Preprocessor.from_checkpoints()`` builds the parsing, pose and DensePose models from the
checkpoint folder (or the Hub) on first use; its ``tryon`` and ``pose`` return every model input
plus the intermediates. Importing this package loads nothing.
"""

from preprocess.inputs import PoseInputs, Preprocessor, TryOnInputs

__all__ = ["PoseInputs", "Preprocessor", "TryOnInputs"]
