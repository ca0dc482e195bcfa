"""What the app runs: lazily loaded, LRU-cached Leffa pipelines and the shared preprocessor.

Nothing here knows about Gradio; the UI passes plain images and a progress callback.
"""

from __future__ import annotations

import gc
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from errors import OptionError
from leffa import AttentionRecorder, LeffaModel, LeffaPipeline, ModelKind, load_model
from leffa.hub import tiny_model
from preprocess.inputs import PoseInputs, Preprocessor, TryOnInputs

Progress = Callable[[float, str], None]
MAX_SEED = 2**31 - 1


def _no_progress(fraction: float, desc: str) -> None:
    pass


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

    def check(self, options: GenerateOptions) -> None:
        """Raise an ``OptionError`` for an option outside these limits (the server's own check:
        API callers bypass the sliders)."""
        problems = []
        if not self.steps_min <= options.steps <= self.steps_max:
            problems.append(f"steps must be between {self.steps_min} and {self.steps_max}, got {options.steps}")
        if not self.guidance_min <= options.guidance_scale <= self.guidance_max:
            problems.append(f"guidance must be between {self.guidance_min} and {self.guidance_max}, "
                            f"got {options.guidance_scale}")
        if options.seed is not None and not 0 <= options.seed <= self.seed_max:
            problems.append(f"seed must be between 0 and {self.seed_max}, got {options.seed}")
        if problems:
            raise OptionError("; ".join(problems))


MODEL_LIMITS = OptionLimits()  # the published models
TINY_LIMITS = OptionLimits(steps_min=1, steps_default=4)  # the untrained --tiny model: a few steps are enough


@dataclass
class Generation:
    image: Image.Image
    seed: int
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
            progress(0.0, f"Loading the {kind.value} model (downloaded on first use)")
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
    offer; ``tiny`` says the models are the untrained ``--tiny`` ones (for a notice)."""

    def __init__(self, models: ModelCache, preprocessor: Preprocessor, tiny: bool = False,
                 limits: OptionLimits = MODEL_LIMITS):
        self.models, self.preprocessor, self.tiny, self.limits = models, preprocessor, tiny, limits

    def tryon_inputs(self, person, garment, model_type: str, garment_type: str, preprocess_garment: bool = False,
                     keep_fixed_regions: bool = False, densepose=None) -> TryOnInputs:
        return self.preprocessor.tryon(person, garment, model_type, garment_type, preprocess_garment,
                                       densepose=densepose, keep_fixed_regions=keep_fixed_regions)

    def pose_inputs(self, person, target, densepose=None) -> PoseInputs:
        return self.preprocessor.pose(person, target, densepose=densepose)

    def generate(self, kind: ModelKind, src: Image.Image, ref: Image.Image, mask: Image.Image,
                 densepose: Image.Image, options: GenerateOptions,
                 progress: Progress = _no_progress) -> Generation:
        self.limits.check(options)
        pipe = self.models.get(kind, progress)
        seed = random.randint(0, MAX_SEED) if options.seed is None else int(options.seed)
        recorder = None
        if options.record_attention:  # the middle and the last step, every layer, float16 on CPU
            n = options.steps
            recorder = AttentionRecorder(steps=sorted({n // 2, n - 1}), dtype=torch.float16)
        progress(0.0, "Denoising")
        out = pipe(src, ref, mask, densepose, num_inference_steps=options.steps,
                   guidance_scale=options.guidance_scale, generator=torch.Generator().manual_seed(seed),
                   ref_acceleration=options.ref_acceleration, repaint=options.repaint,
                   attention_recorder=recorder,
                   callback=lambda step, total: progress(step / total, f"Denoising step {step}/{total}"))
        return Generation(out.images[0], seed, ref, recorder)


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
    return Predictor(models, Preprocessor.from_checkpoints(settings.checkpoint_dir, device))
