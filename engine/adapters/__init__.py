"""One adapter per model family: what the engine calls to load, place, run and size a model of that
family (``ModelAdapter``), and the plain values one generation takes (``GenerationCall``).

An adapter module is named after its ``registry.Family`` and defines ``Adapter(entry)``; it is
imported on first use (it brings torch and the family's library).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from engine.options import GenerateOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from engine.registry import ModelEntry
    from engine.setup import ModelSetup, WeightSource
    from runtime.memory import MemoryNeed
    from runtime.presets import MemoryPreset

StepCallback = Callable[[int, int], bool]  # (step, total) after each denoising step; False stops


@dataclass(frozen=True)
class GenerationCall:
    """One generation's inputs as plain values: on ZeroGPU they go to the GPU worker process
    pickled (so no model, lock or callback in here). ``model``: the registry entry's name."""

    model: str
    src: Image.Image  # the person (try-on) or the target-pose person (pose transfer)
    ref: Image.Image  # the garment, or the person to keep
    mask: Image.Image  # 255 = generate
    densepose: Image.Image
    options: GenerateOptions  # checked
    seed: int
    # families that condition on more of the kept person (MCLD): its appearance moved into the body's
    # UV texture map, and its face identity (a 512-d ArcFace embedding; zeros when there is no face)
    texture: Image.Image | None = None
    face_embedding: np.ndarray | None = None


class ModelAdapter(Protocol):
    entry: ModelEntry

    def load(self, setup: ModelSetup, source: WeightSource, device: str | None = None) -> Any:
        """The model ready to generate (what ``ModelCache`` keeps), placed on ``device`` (default
        the setup's) with the setup's memory preset and speed options."""

    def place(self, loaded: Any, device: str, setup: ModelSetup) -> None:
        """Move a loaded model onto ``device`` with the setup's preset (ZeroGPU's calls)."""

    def generate(self, loaded: Any, call: GenerationCall,
                 callback: StepCallback | None = None) -> tuple[Image.Image, Any]:
        """The image, and the attention recording when ``call.options.record_attention``."""

    def generate_batch(self, loaded: Any, inputs: dict[str, torch.Tensor], options: GenerateOptions,
                       generators: Sequence[torch.Generator]) -> list[Image.Image]:
        """A batch of (B, C, H, W) input tensors (``leffa infer``): one generator per sample."""

    def memory_need(self, memory: MemoryPreset, device: str, dtype: torch.dtype, fuse_qkv: bool) -> MemoryNeed:
        """What a model of this entry needs under ``memory`` (estimated without its weights)."""
