"""What the app runs: lazily loaded, LRU-cached Leffa pipelines and the shared preprocessor.

Nothing here knows about Gradio; the UI passes plain images and a progress callback.
"""

from __future__ import annotations

import gc
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import torch
from PIL import Image

from errors import OptionError, enum_option
from leffa import AttentionRecorder, LeffaModel, LeffaPipeline, ModelKind, load_model
from leffa.hub import tiny_model
from leffa.pipeline import GenerationStopped
from preprocess.inputs import PersonMask, PoseInputs, Preprocessor, TryOnInputs
from preprocess.masks import GarmentType, TryOnModel
from weightfiles.hub import missing_files, resolve_files
from weightfiles.manifest import Component, WeightSet, components_for, files_of

Progress = Callable[[float, str], None]  # (fraction of the whole request done, what runs now)
ShouldStop = Callable[[], bool]  # asked after every denoising step: True stops the generation
MAX_SEED = 2**31 - 1
E = TypeVar("E", bound=Enum)
# where each phase of a request starts on its progress bar (preprocessing starts at 0)
LOADING, DENOISING, DECODING = 0.05, 0.1, 0.95


def _no_progress(fraction: float, desc: str) -> None:
    pass


def never_stop() -> bool:
    return False


def _shown(value: Any) -> str:
    """A value as a message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class OptionCheck:
    """Checks raw option values (as an API caller sent them) one by one; each problem names the
    option and what it allows. Leaving the ``with`` block raises one ``OptionError`` that lists
    every problem, one per line."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def __enter__(self) -> OptionCheck:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None and self.problems:
            raise OptionError("\n".join(self.problems))

    def integer(self, name: str, value: Any, low: int, high: int) -> int:
        """A whole number in [low, high]; a float with no fractional part (30.0) counts."""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.problems.append(f"{name} must be a whole number between {low} and {high}, got {_shown(value)}")
        return value

    def number(self, name: str, value: Any, low: float, high: float) -> float:
        """A number in [low, high] (NaN and infinities are outside every range)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            self.problems.append(f"{name} must be a number between {low} and {high}, got {_shown(value)}")
            return value
        return float(value)

    def flag(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.problems.append(f"{name} must be true or false, got {_shown(value)}")
        return value

    def choice(self, name: str, cls: type[E], value: Any) -> E:
        try:
            return enum_option(cls, value, name)
        except OptionError as e:
            self.problems.append(str(e))
            return value


@dataclass
class GenerateOptions:
    steps: int = 30
    guidance_scale: float = 2.5
    seed: int | None = 42  # None: draw one (the seed used is returned)
    ref_acceleration: bool = False
    repaint: bool = False
    record_attention: bool = False


@dataclass(frozen=True)
class OptionLimits:
    """The ranges and defaults of the generation options, as data: what a front end offers
    (the UI's sliders read them; nothing decides ranges from the model elsewhere)."""

    steps_min: int = 30  # the original demo's 30-100 steps, default 30
    steps_max: int = 100
    steps_default: int = 30
    guidance_min: float = 0.1
    guidance_max: float = 5.0
    guidance_default: float = 2.5
    seed_default: int = 42
    seed_max: int = MAX_SEED

    def check(self, options: GenerateOptions) -> GenerateOptions:
        """``options`` with their types and ranges checked (the server's own check: API callers
        bypass the sliders, and the handlers get the values unconverted), whole numbers as
        ``int``; one ``OptionError`` lists every problem. Messages use the endpoints' parameter names."""
        with OptionCheck() as check:
            return self._checked(options, check)

    def options(self, values: Mapping[str, Any], check: OptionCheck) -> GenerateOptions:
        """The generation options among an endpoint's raw values, by parameter name (``steps``,
        ``guidance``, ``seed``, ``random_seed``, ``ref_acceleration``, ``record`` and, where the
        endpoint has it, ``repaint``), checked into ``check``."""
        random_seed = check.flag("random_seed", values["random_seed"])
        raw = GenerateOptions(values["steps"], values["guidance"], None if random_seed is True else values["seed"],
                              values["ref_acceleration"], values.get("repaint", False), values["record"])
        return self._checked(raw, check)

    def _checked(self, options: GenerateOptions, check: OptionCheck) -> GenerateOptions:
        return GenerateOptions(
            check.integer("steps", options.steps, self.steps_min, self.steps_max),
            check.number("guidance", options.guidance_scale, self.guidance_min, self.guidance_max),
            None if options.seed is None else check.integer("seed", options.seed, 0, self.seed_max),
            check.flag("ref_acceleration", options.ref_acceleration), check.flag("repaint", options.repaint),
            check.flag("record", options.record_attention))


MODEL_LIMITS = OptionLimits()  # the published models
TINY_LIMITS = OptionLimits(steps_min=1, steps_default=4)  # the untrained --tiny model: a few steps are enough


@dataclass
class Generation:
    image: Image.Image
    seed: int
    steps: int  # denoising steps run
    reference: Image.Image  # the garment / the kept person: what the attention looks at
    recorder: AttentionRecorder | None


def free_accelerator_memory() -> None:
    """Give memory back after dropping models or an out-of-memory error: collect the garbage
    (the dropped tensors) and return the CUDA caching allocator's free blocks to the device, so
    that the next load or generation can use them. Safe to call on CPU-only machines."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelCache:
    """Pipelines by model kind, loaded on first use; the least recently used is dropped when
    more than ``max_models`` are asked for, or when loading runs out of GPU memory."""

    def __init__(self, loader: Callable[[ModelKind], LeffaModel], max_models: int = 2):
        self._loader, self.max_models = loader, max_models
        self._pipes: OrderedDict[ModelKind, LeffaPipeline] = OrderedDict()
        self._lock = threading.Lock()

    def loaded(self) -> list[ModelKind]:
        return list(self._pipes)

    def _drop_oldest(self) -> None:
        self._pipes.popitem(last=False)
        free_accelerator_memory()

    def get(self, kind: ModelKind, progress: Progress = _no_progress) -> LeffaPipeline:
        with self._lock:
            if kind in self._pipes:
                self._pipes.move_to_end(kind)
                return self._pipes[kind]
            while len(self._pipes) >= self.max_models:
                self._drop_oldest()
            progress(LOADING, f"Loading the {kind.value} model (downloaded on first use)")
            try:
                model = self._loader(kind)
            except torch.cuda.OutOfMemoryError:
                if not self._pipes:
                    raise
                while self._pipes:  # make room and try once more
                    self._drop_oldest()
                model = self._loader(kind)
            self._pipes[kind] = LeffaPipeline(model)
            return self._pipes[kind]


def checkpoint_loader(root: str | None, device: str, dtype: torch.dtype) -> Callable[[ModelKind], LeffaModel]:
    def load(kind: ModelKind) -> LeffaModel:
        return load_model(kind, root, device=device, dtype=dtype).eval()

    return load


class Predictor:
    """Preprocessing and generation for a front end: ``limits`` are the option ranges it should
    offer; ``tiny`` says the models are the untrained ``--tiny`` ones (no weights, for a notice).

    Before a request preprocesses anything, every published file it needs is fetched at once from
    ``checkpoint_dir`` or the Hub, so a missing one is reported with all the others."""

    def __init__(self, models: ModelCache, preprocessor: Preprocessor, tiny: bool = False,
                 limits: OptionLimits = MODEL_LIMITS, checkpoint_dir: str | None = None):
        self.models, self.preprocessor, self.tiny, self.limits = models, preprocessor, tiny, limits
        self.checkpoint_dir = checkpoint_dir

    def fetch_weights(self, components: tuple[Component, ...]) -> None:
        """The files of ``components``, downloaded if missing (``MissingWeightsError`` names every
        one that cannot be); nothing with the tiny models."""
        if not self.tiny:
            resolve_files(files_of(components), self.checkpoint_dir)

    def missing_weights(self, weight_set: WeightSet) -> list[str]:
        """The files of ``weight_set`` not on this server yet (none with the tiny models)."""
        return [] if self.tiny else missing_files(files_of(weight_set.components), self.checkpoint_dir)

    def person_mask(self, person, model_type: TryOnModel, garment_type: GarmentType,
                    keep_fixed_regions: bool = False) -> PersonMask:
        self.fetch_weights((Component.PARSING, Component.OPENPOSE))
        return self.preprocessor.person_mask(person, model_type, garment_type, keep_fixed_regions=keep_fixed_regions)

    def tryon_inputs(self, person, garment, model_type: TryOnModel, garment_type: GarmentType,
                     preprocess_garment: bool = False, keep_fixed_regions: bool = False, densepose=None) -> TryOnInputs:
        kind = ModelKind(TryOnModel(model_type).weights)
        self.fetch_weights(components_for(kind.component, compute_mask=True, compute_densepose=densepose is None))
        return self.preprocessor.tryon(person, garment, model_type, garment_type, preprocess_garment,
                                       densepose=densepose, keep_fixed_regions=keep_fixed_regions)

    def pose_inputs(self, person, target, densepose=None) -> PoseInputs:
        self.fetch_weights(components_for(Component.POSE_TRANSFER, compute_mask=False,
                                          compute_densepose=densepose is None))
        return self.preprocessor.pose(person, target, densepose=densepose)

    def generate(self, kind: ModelKind, src: Image.Image, ref: Image.Image, mask: Image.Image,
                 densepose: Image.Image, options: GenerateOptions,
                 progress: Progress = _no_progress, should_stop: ShouldStop = never_stop) -> Generation:
        """Load the model if needed, denoise and decode, reporting each phase to ``progress``.
        ``should_stop`` is asked before the model is loaded and after every denoising step: once it
        says True, ``GenerationStopped`` is raised (the request was cancelled or its client left)."""
        options = self.limits.check(options)
        if should_stop():
            raise GenerationStopped("stopped before generating")
        pipe = self.models.get(kind, progress)
        seed = random.randint(0, MAX_SEED) if options.seed is None else options.seed
        recorder = None
        if options.record_attention:  # the middle and the last step, every layer, float16 on CPU
            n = options.steps
            recorder = AttentionRecorder(steps=sorted({n // 2, n - 1}), dtype=torch.float16)
        progress(DENOISING, f"Denoising step 0/{options.steps}")
        out = pipe(src, ref, mask, densepose, num_inference_steps=options.steps,
                   guidance_scale=options.guidance_scale, generator=torch.Generator().manual_seed(seed),
                   ref_acceleration=options.ref_acceleration, repaint=options.repaint,
                   attention_recorder=recorder, callback=_step_callback(progress, should_stop))
        return Generation(out.images[0], seed, options.steps, ref, recorder)


def _step_callback(progress: Progress, should_stop: ShouldStop) -> Callable[[int, int], bool]:
    """The pipeline's step callback: the phase and its share of the progress bar; False to stop."""

    def callback(step: int, total: int) -> bool:
        if step < total:
            progress(DENOISING + (DECODING - DENOISING) * step / total, f"Denoising step {step}/{total}")
        else:
            progress(DECODING, "Decoding the image")
        return not should_stop()

    return callback


def build_predictor(settings) -> Predictor:
    from preprocess.standins import standin_preprocessor

    if settings.tiny:
        return Predictor(ModelCache(tiny_model, settings.max_models), standin_preprocessor(), tiny=True,
                         limits=TINY_LIMITS)
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.float16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16}[settings.dtype]
    models = ModelCache(checkpoint_loader(settings.checkpoint_dir, device, dtype), settings.max_models)
    return Predictor(models, Preprocessor.from_checkpoints(settings.checkpoint_dir, device),
                     checkpoint_dir=settings.checkpoint_dir)
