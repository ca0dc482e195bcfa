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


Pictures = Image.Image | tuple[Image.Image, ...]  # one for every sample, or one per sample


@dataclass(frozen=True)
class GenerationCall:
    """One generation's inputs as plain values: on ZeroGPU they go to the GPU worker process
    pickled (so no model, lock or callback in here). ``model``: the registry entry's name.

    One batch of samples, one per seed: sample k is drawn from a generator seeded with ``seeds[k]``
    alone, so it equals a run of that seed by itself. Each picture is shared by every sample, or
    given per sample (a tuple as long as ``seeds``: an outfit's later garments go onto each
    sample's own result)."""

    model: str
    src: Pictures  # the person (try-on) or the target-pose person (pose transfer)
    ref: Pictures  # the garment, or the person to keep
    mask: Pictures  # 255 = generate
    densepose: Pictures
    options: GenerateOptions  # checked
    seeds: tuple[int, ...]
    # families that condition on more of the kept person (MCLD): its appearance moved into the body's
    # UV texture map, and its face identity (a 512-d ArcFace embedding; zeros when there is no face)
    texture: Image.Image | None = None
    face_embedding: np.ndarray | None = None

    def __post_init__(self):
        for name in ("src", "ref", "mask", "densepose"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != len(self.seeds):
                raise ValueError(f"{name}: {len(value)} pictures for {len(self.seeds)} samples")

    def per_sample(self, picture: Pictures) -> tuple[Image.Image, ...]:
        return picture if isinstance(picture, tuple) else (picture,) * len(self.seeds)

    def batch(self, picture: Pictures) -> Image.Image | list[Image.Image]:
        """``picture`` as the pipelines take it: itself for one sample, else one per sample."""
        pictures = self.per_sample(picture)
        return pictures[0] if len(pictures) == 1 else list(pictures)

    def generators(self) -> torch.Generator | list[torch.Generator]:
        """The sources of the samples' randomness: one generator per seed (itself for one)."""
        import torch

        made = [torch.Generator().manual_seed(seed) for seed in self.seeds]
        return made[0] if len(made) == 1 else made


class ModelAdapter(Protocol):
    entry: ModelEntry

    def load(self, setup: ModelSetup, source: WeightSource, device: str | None = None) -> Any:
        """The model ready to generate (what ``ModelCache`` keeps), placed on ``device`` (default
        the setup's) with the setup's memory preset and speed options."""

    def place(self, loaded: Any, device: str, setup: ModelSetup) -> None:
        """Move a loaded model onto ``device`` with the setup's preset (ZeroGPU's calls)."""

    def generate(self, loaded: Any, call: GenerationCall,
                 callback: StepCallback | None = None) -> tuple[list[Image.Image], Any]:
        """One image per seed, and the attention recording when ``call.options.record_attention``
        (of the whole batch: sample k is its row k)."""

    def generate_batch(self, loaded: Any, inputs: dict[str, torch.Tensor], options: GenerateOptions,
                       generators: Sequence[torch.Generator]) -> list[Image.Image]:
        """A batch of (B, C, H, W) input tensors (``leffa infer``): one generator per sample."""

    def memory_need(self, memory: MemoryPreset, device: str, dtype: torch.dtype, fuse_qkv: bool) -> MemoryNeed:
        """What a model of this entry needs under ``memory`` (estimated without its weights)."""
