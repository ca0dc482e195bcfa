"""Leffa: flow fields in attention for controllable person image generation (CVPR 2025).

A clean re-implementation that loads the published weights (Hub repo ``franciszzj/Leffa``)
unchanged. Importing this package builds and downloads nothing.
"""

from leffa.checkpoint import CheckpointError
from leffa.hub import MissingWeightsError, ModelKind, load_model, resolve_files
from leffa.model import BaseModel, LeffaModel
from leffa.pipeline import LeffaPipeline, LeffaPipelineOutput
from leffa.recording import AttentionRecorder

__all__ = [
    "AttentionRecorder",
    "BaseModel",
    "CheckpointError",
    "LeffaModel",
    "LeffaPipeline",
    "LeffaPipelineOutput",
    "MissingWeightsError",
    "ModelKind",
    "load_model",
    "resolve_files",
]
