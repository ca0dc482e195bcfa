"""Generations on a Hugging Face Space with on-demand GPUs (ZeroGPU)."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from engine import registry
from engine.adapters import GenerationCall
from engine.cache import ModelCache
from engine.setup import ModelSetup
from runtime.presets import MemoryPreset

# the offloading presets move weights during the call: slower, so more GPU time is asked for
PRESET_SLOWDOWN = {MemoryPreset.FAST: 1.0, MemoryPreset.BALANCED: 1.5, MemoryPreset.LOW: 3.0,
                   MemoryPreset.LOW_FP8: 3.0}


def on_demand_gpus():
    """The ``spaces`` package when the app runs on a Hugging Face Space with on-demand GPUs
    (ZeroGPU: ``spaces.config.Config.zero_gpu``), else None: then nothing changes (``spaces`` is
    installed on other Spaces too, where its decorator does nothing)."""
    try:
        import spaces
        from spaces.config import Config
    except ImportError:
        return None
    return spaces if Config.zero_gpu else None


class OnDemandGPU:
    """Generations on a Space with on-demand GPUs (ZeroGPU). The models rest on the CPU, loaded
    before the call; ``spaces.GPU`` runs each generation in a GPU worker process (forked, so it
    sees them), for a duration estimated from its steps, model and preset (``seconds``): there
    the model moves onto the setup's device, and back to the CPU after. The call's arguments and
    result cross processes pickled, so the worker gets a ``GenerationCall`` and no callbacks: the
    progress bar shows no denoising steps, and Stop acts before the GPU call, not during it."""

    def __init__(self, spaces, setup: ModelSetup, models: ModelCache):
        self.setup, self.models = setup, models
        self._run = spaces.GPU(duration=self.seconds)(self._on_gpu)

    def seconds(self, call: GenerationCall) -> int:
        """The GPU time to ask for (``spaces`` passes the decorated call's arguments)."""
        cost = registry.entry(call.model).gpu_seconds
        per_step = cost.per_step * len(call.seeds) * PRESET_SLOWDOWN[self.setup.memory]  # a batch: one step each
        return math.ceil(cost.fixed + call.options.steps * per_step)

    def _on_gpu(self, call: GenerationCall) -> tuple[list[Image.Image], Any]:
        adapter = registry.entry(call.model).adapter()
        loaded = self.models.get(call.model)  # loaded on the CPU before the call
        try:
            adapter.place(loaded, self.setup.device, self.setup)
            return adapter.generate(loaded, call)
        finally:
            adapter.place(loaded, "cpu", self.setup)

    def __call__(self, call: GenerationCall) -> tuple[list[Image.Image], Any]:
        return self._run(call)
