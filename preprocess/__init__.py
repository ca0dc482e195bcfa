"""Turning user photos into Leffa's model inputs (spec §5).

``preprocess.inputs.Preprocessor.from_checkpoints()`` builds the parsing, pose and DensePose
models from the checkpoint folder (or the Hub) on first use; its ``tryon`` and ``pose`` return
every model input plus the intermediates. Importing this package loads nothing, so the light
modules (``preprocess.masks``, ``preprocess.images``) stay light.
"""
