"""The loaded models, by registry entry, under a memory budget (the app keeps several; the command
line and ``leffa infer`` one)."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine import registry
from engine.progress import LOADING, Progress, no_progress
from engine.registry import ModelEntry
from runtime.memory import (FreeMemory, MemoryNeed, NotEnoughMemoryError, fits, free_accelerator_memory,
                            free_memory, not_enough_memory)
from runtime.presets import MemoryPreset

Model = str | ModelEntry  # an entry, or its name (a ``leffa.ModelKind`` is one: its value is the name)


@dataclass(frozen=True)
class MemoryBudget:
    """The model cache's memory accounting: ``need(entry, preset)`` is what a model needs
    (``runtime.memory.MemoryNeed``), ``free()`` what is free now; ``device`` names the pool in
    messages. Both functions are injected, so tests give fake figures."""

    preset: MemoryPreset
    need: Callable[[ModelEntry, MemoryPreset], MemoryNeed]
    free: Callable[[], FreeMemory]
    device: str = "cpu"


def estimated_budget(preset: MemoryPreset, device: str, dtype: torch.dtype, fuse_qkv: bool = False) -> MemoryBudget:
    """The budget of real models: needs estimated by each family's adapter from the model's
    structure (no weights), and the free memory measured on ``device``."""

    def need(model: Model, memory: MemoryPreset) -> MemoryNeed:
        return registry.entry(model).adapter().memory_need(memory, device, dtype, fuse_qkv)

    return MemoryBudget(preset, need, functools.partial(free_memory, device), device)


class ModelCache:
    """Loaded models by entry, loaded on first use by ``loader``. At most ``max_models`` are kept,
    and with a ``budget`` only as many as fit in memory: before loading, the least recently used
    are dropped until the new model fits (``runtime.memory.fits``); a model that cannot fit even
    alone is refused with a ``NotEnoughMemoryError`` saying what it needs, what is free and which
    preset would fit. Should loading still run out of GPU memory, the others are dropped and it is
    tried once more."""

    def __init__(self, loader: Callable[[ModelEntry], Any], max_models: int = 2, budget: MemoryBudget | None = None):
        self._loader, self.max_models, self.budget = loader, max_models, budget
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._needs: dict[str, MemoryNeed] = {}
        self._lock = threading.Lock()

    def loaded(self) -> list[str]:
        """The names of the loaded models, least recently used first."""
        return list(self._models)

    def _drop_oldest(self) -> None:
        name, _ = self._models.popitem(last=False)
        self._needs.pop(name, None)
        free_accelerator_memory()

    def _refusal(self, entry: ModelEntry, free: FreeMemory, others_dropped: bool) -> NotEnoughMemoryError:
        budget = self.budget
        needs = {preset: budget.need(entry, preset) for preset in MemoryPreset}
        return not_enough_memory(f"the {entry.name} model", budget.preset, needs, free, budget.device,
                                 others_dropped=others_dropped)

    def _make_room(self, entry: ModelEntry) -> MemoryNeed | None:
        """Room for ``entry``: at most ``max_models - 1`` others kept and, with a budget, the least
        recently used dropped until it fits. A model that would not fit even with all the others
        gone is refused before anything is dropped; one that still does not fit once they are
        gone (memory held elsewhere) is refused then."""
        budget = self.budget
        if budget is None:
            while len(self._models) >= self.max_models:
                self._drop_oldest()
            return None
        need = budget.need(entry, budget.preset)
        free = budget.free()
        held = list(self._needs.values())
        alone = FreeMemory(free.device + sum(n.resident for n in held), free.host + sum(n.host for n in held))
        if not fits(need, alone):
            raise self._refusal(entry, alone, others_dropped=bool(held))
        while len(self._models) >= self.max_models:
            self._drop_oldest()
            free = budget.free()
        while not fits(need, free, max((n.working for n in self._needs.values()), default=0)):
            if not self._models:
                raise self._refusal(entry, free, others_dropped=bool(held))
            self._drop_oldest()
            free = budget.free()
        return need

    def get(self, model: Model, progress: Progress = no_progress):
        """The loaded ``model`` (loading it first if needed, reported to ``progress``)."""
        entry = registry.entry(model)
        name = entry.name
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            need = self._make_room(entry)
            progress(LOADING, f"Loading the {name} model (downloaded on first use)")
            try:
                loaded = self._loader(entry)
            except torch.cuda.OutOfMemoryError:
                if not self._models:
                    raise
                while self._models:  # make room and try once more
                    self._drop_oldest()
                loaded = self._loader(entry)
            self._models[name] = loaded
            if need is not None:
                self._needs[name] = need
            return loaded
