"""The models every application can run, as data: one ``ModelEntry`` per model (its task, weight
files, the analyses preprocessing computes for it, what it supports, its option limits, its GPU-time
estimate and the family adapter that runs it, imported on first use). Torch-free: the command
line's parser, ``--help`` and the app's settings read it before anything heavy is imported.

Applications branch on an entry's fields (``supports``, ``analyses``), never on its name. Adding a
model family: docs/architecture.md, "How to add a model family".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from engine.options import MCLD_LIMITS, MODEL_LIMITS, OptionLimits
from errors import OptionError
from leffa.weights import ModelKind
from mcld.weights import MCLD_FILES
from preprocess.masks import GarmentType, TryOnModel
from preprocess.weights import MASK_ANALYSES, Analysis, analysis_files
from weightfiles.manifest import HubFile

if TYPE_CHECKING:  # pragma: no cover
    from engine.adapters import ModelAdapter


class Task(str, Enum):
    """What a model does (the CLI's generation subcommands, the app's tabs)."""

    TRYON = "tryon"  # a person wearing a garment
    POSE = "pose"  # a person in another person's pose


class Family(str, Enum):
    """A model family: one library package and one adapter (``engine/adapters/``)."""

    LEFFA = "leffa"
    MCLD = "mcld"
    CONCAT = "concat"  # CatVTON-style: person and garment in one latent (leffa.concat); own checkpoints only

    @property
    def adapter_path(self) -> str:
        return f"engine.adapters.{self.value}"


class WeightSet(str, Enum):
    """What ``leffa download`` fetches and ``leffa check`` reports: the files one model needs from
    photos (each entry names its set), or all of them."""

    TRYON = "tryon"
    TRYON_DC = "tryon-dc"
    POSE = "pose"
    POSE_MCLD = "pose-mcld"
    ALL = "all"

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        return tuple(e for e in ENTRIES if self is WeightSet.ALL or e.weight_set is self)

    @property
    def files(self) -> list[HubFile]:
        """Each entry's files for a run from photos (its analyses and its weights), each once."""
        return list(dict.fromkeys(f for e in self.entries for f in e.files_for(e.analyses)))


@dataclass(frozen=True)
class Supports:
    """What a model can do beyond generating: an option it lacks is refused by these, not by name."""

    repaint: bool = False  # keep the photo's pixels outside the mask
    ref_acceleration: bool = False  # run the reference network once
    attention_recording: bool = False  # attention maps and flow fields
    attention_focus: bool = False  # the experimental training-free focus
    fast_sampling: bool = False  # another sampler, guidance in an interval, the feature cache (leffa.sampling)


@dataclass(frozen=True)
class GpuSeconds:
    """GPU time to ask for one generation on a Space with on-demand GPUs (ZeroGPU): ``fixed`` (moving
    the weights on and off, encoding, decoding) plus ``per_step``, several times the H100 figures
    (README), as a shared GPU may be slower (``engine.zerogpu`` scales them by memory preset)."""

    fixed: float
    per_step: float


@dataclass(frozen=True)
class ModelEntry:
    """One runnable model. ``name`` is how applications call it (``--model``, the cache, manifests)."""

    name: str
    family: Family
    task: Task
    label: str
    weights: tuple[HubFile, ...]  # the model's own published files
    analyses: tuple[Analysis, ...]  # what preprocessing computes for it from photos
    supports: Supports
    weight_set: WeightSet
    gpu_seconds: GpuSeconds
    limits: OptionLimits = MODEL_LIMITS
    mask_variant: TryOnModel | None = None  # try-on: the published preprocessing it was trained with
    garments: tuple[GarmentType, ...] = ()  # try-on: the garment types it was trained on

    @property
    def published(self) -> bool:
        """Whether published weights exist (the concatenation family runs own checkpoints only)."""
        return bool(self.weights)

    def files_for(self, analyses, own_checkpoint: bool = False) -> list[HubFile]:
        """The published files a run needs: those of ``analyses`` and, unless an own checkpoint
        replaces them, the model's."""
        return analysis_files(analyses) + ([] if own_checkpoint else list(self.weights))

    def adapter(self) -> ModelAdapter:
        """The family's adapter (imported now: it brings torch and the family's library)."""
        return importlib.import_module(self.family.adapter_path).Adapter(self)


_LEFFA = Supports(repaint=True, ref_acceleration=True, attention_recording=True, attention_focus=True,
                  fast_sampling=True)
_SD15, _SDXL = GpuSeconds(10.0, 0.25), GpuSeconds(20.0, 0.5)

ENTRIES = (
    ModelEntry("virtual_tryon", Family.LEFFA, Task.TRYON, "Leffa try-on, VITON-HD (upper body)",
               (ModelKind.VITON_HD.file,), (*MASK_ANALYSES, Analysis.DENSEPOSE),
               _LEFFA, WeightSet.TRYON, _SD15,
               mask_variant=TryOnModel.VITON_HD, garments=(GarmentType.UPPER_BODY,)),
    ModelEntry("virtual_tryon_dc", Family.LEFFA, Task.TRYON, "Leffa try-on, DressCode (upper, lower, dresses)",
               (ModelKind.DRESS_CODE.file,), (*MASK_ANALYSES, Analysis.DENSEPOSE),
               _LEFFA, WeightSet.TRYON_DC, _SD15,
               mask_variant=TryOnModel.DRESS_CODE, garments=tuple(GarmentType)),
    ModelEntry("pose_transfer", Family.LEFFA, Task.POSE, "Leffa pose transfer (DeepFashion, SDXL-sized)",
               (ModelKind.POSE_TRANSFER.file,), (Analysis.DENSEPOSE,), _LEFFA, WeightSet.POSE, _SDXL),
    ModelEntry("mcld", Family.MCLD, Task.POSE, "MCLD pose transfer (DeepFashion, SD1.5-sized; face identity kept)",
               MCLD_FILES, (Analysis.DENSEPOSE_R101, Analysis.TEXTURE, Analysis.FACE), Supports(), WeightSet.POSE_MCLD,
               _SD15, limits=MCLD_LIMITS),
    # no published weights: a checkpoint of ``python -m training`` with family = "concat" (or --tiny)
    ModelEntry("concat_tryon", Family.CONCAT, Task.TRYON, "CatVTON-style try-on (SD1.5-sized; your own checkpoint)",
               (), (*MASK_ANALYSES, Analysis.DENSEPOSE), Supports(repaint=True, attention_recording=True),
               WeightSet.TRYON, _SD15,
               mask_variant=TryOnModel.VITON_HD, garments=(GarmentType.UPPER_BODY,)),
)
MODEL_NAMES = tuple(e.name for e in ENTRIES)


def entry(name: str | ModelEntry) -> ModelEntry:
    """The entry called ``name`` (an ``OptionError`` listing the names otherwise)."""
    if isinstance(name, ModelEntry):
        return name
    for e in ENTRIES:
        if e.name == getattr(name, "value", name):
            return e
    raise OptionError(f"model must be one of {', '.join(MODEL_NAMES)}; got {name!r}")


def for_task(task: Task) -> tuple[ModelEntry, ...]:
    """The published models of ``task``: what the app's tabs and the generation subcommands offer
    (``leffa infer --model`` takes any entry, an own checkpoint's too)."""
    return tuple(e for e in ENTRIES if e.task is task and e.published)


def default_for(task: Task) -> ModelEntry:
    """The model a task runs unless another is chosen: its first entry."""
    return for_task(task)[0]


def tryon_entry(variant: TryOnModel | str) -> ModelEntry:
    """The try-on model trained with the ``variant`` preprocessing (the app's and CLI's model type):
    the first entry with that variant."""
    variant = TryOnModel(variant)
    return next(e for e in for_task(Task.TRYON) if e.mask_variant is variant)


def garment_entry(variant: TryOnModel | str, garment_type: GarmentType | str) -> ModelEntry:
    """The try-on model for one garment: the ``variant``'s model when it was trained on that garment
    type, else the first model that was (VITON-HD knows upper-body garments only: a lower-body garment
    or a dress goes to DressCode)."""
    chosen, garment_type = tryon_entry(variant), GarmentType(garment_type)
    if garment_type in chosen.garments:
        return chosen
    return next(e for e in for_task(Task.TRYON) if garment_type in e.garments)


def pose_entry(name: str | ModelEntry | None = None) -> ModelEntry:
    """The pose-transfer model called ``name`` (default: the first pose entry); an ``OptionError``
    listing the pose models for any other name."""
    if name is None:
        return default_for(Task.POSE)
    chosen = entry(name)
    if chosen.task is not Task.POSE:
        names = ", ".join(e.name for e in for_task(Task.POSE))
        raise OptionError(f"pose transfer runs one of the models {names}; {chosen.name} is a {chosen.task.value} model")
    return chosen
