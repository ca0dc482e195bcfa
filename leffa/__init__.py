"""Leffa: flow fields in attention for controllable person image generation (CVPR 2025).

A clean re-implementation that loads the published weights (Hub repo ``franciszzj/Leffa``)
unchanged. Importing this package builds and downloads nothing, and imports its submodules
(and diffusers) only when one of the names below is first used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AttentionFocus": "leffa.attention",
    "AttentionRecorder": "leffa.recording",
    "BaseModel": "leffa.model",
    "CheckpointError": "weightfiles.checkpoint",
    "LeffaModel": "leffa.model",
    "LeffaPipeline": "leffa.pipeline",
    "LeffaPipelineOutput": "leffa.pipeline",
    "MemoryPreset": "runtime.presets",
    "MissingWeightsError": "weightfiles.hub",
    "ModelKind": "leffa.hub",
    "SpeedOptions": "runtime.speed",
    "load_model": "leffa.hub",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'leffa' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
