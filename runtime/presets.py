"""The memory presets' names (``--memory``) and the compute dtypes' names, without importing torch:
the command line and the app's settings list them before anything heavy is imported. What each
preset does is in ``runtime.placement``."""

from __future__ import annotations

from enum import Enum


class MemoryPreset(str, Enum):
    """Where the weights live while generating (``--memory``; see ``runtime.placement``'s table)."""

    FAST = "fast"
    BALANCED = "balanced"
    LOW = "low"
    LOW_FP8 = "low-fp8"

    @property
    def group_offload(self) -> bool:
        """The UNets are offloaded block by block (diffusers group offloading)."""
        return self in (MemoryPreset.LOW, MemoryPreset.LOW_FP8)

    @property
    def float8(self) -> bool:
        """The UNets' weights are stored in float8 (diffusers layerwise casting)."""
        return self is MemoryPreset.LOW_FP8


MEMORY_PRESETS = tuple(p.value for p in MemoryPreset)
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the compute dtypes the applications offer (torch's names)
