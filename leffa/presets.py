"""Re-export: the memory presets moved to ``runtime.presets`` (shared by the model families)."""

from runtime.presets import MEMORY_PRESETS, MemoryPreset

__all__ = ["MEMORY_PRESETS", "MemoryPreset"]
