"""The app's engine, from its settings: the shared ``engine.service.Engine`` with a model cache that
counts memory under the chosen preset, and on a Space with on-demand GPUs (ZeroGPU) the models and
the preprocessing on the CPU and each generation inside ``spaces.GPU``."""

from __future__ import annotations

from engine.service import Engine
from engine.setup import ModelSetup, WeightSource
from engine.zerogpu import on_demand_gpus
from runtime.speed import SpeedOptions


def model_setup(settings, on_demand: bool = False) -> ModelSetup:
    """The settings' device (``auto``: CUDA when there is one, or ``on_demand``: the GPU a ZeroGPU
    Space lends per call), dtype, memory preset and speed options."""
    speed = SpeedOptions(settings.fuse_qkv, settings.channels_last, settings.compile)
    return ModelSetup.resolve(settings.device, settings.dtype, settings.memory, speed,
                              auto_device="cuda" if on_demand else None, check_available=not on_demand)


def build_engine(settings) -> Engine:
    """The app's engine: models loaded on first use, at most ``max_models`` and (real models) as many
    as fit in memory."""
    spaces = on_demand_gpus()
    setup = model_setup(settings, on_demand=spaces is not None)
    source = WeightSource(settings.checkpoint_dir, tiny=settings.tiny)
    return Engine.create(setup, source, settings.max_models, budget=True, on_demand=spaces)
