"""What the app runs: lazily loaded, LRU-cached Leffa pipelines and the shared preprocessor.

Nothing here knows about Gradio; the UI passes plain images and a progress callback.
"""

from __future__ import annotations

import functools
import gc
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import torch
from PIL import Image

from errors import OptionError, enum_option
from leffa import AttentionRecorder, LeffaModel, LeffaPipeline, ModelKind, load_model
from leffa.attention import AttentionFocus
from leffa.hub import tiny_model
from leffa.memory import (FreeMemory, MemoryNeed, MemoryPreset, estimate_memory, fits, free_memory, meta_model,
                          not_enough_memory)
from leffa.model import BaseModel
from leffa.pipeline import GenerationStopped
from leffa.speed import SpeedOptions
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
    attention_focus: AttentionFocus | None = None  # experimental (leffa.attention.AttentionFocus)


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
    # the experimental attention focus: its temperature (1 = off) and how many token-grid levels
    focus_min: float = 0.1
    focus_max: float = 2.0
    focus_levels_max: int = 4

    def check(self, options: GenerateOptions) -> GenerateOptions:
        """``options`` with their types and ranges checked (the server's own check: API callers
        bypass the sliders, and the handlers get the values unconverted), whole numbers as
        ``int``; one ``OptionError`` lists every problem. Messages use the endpoints' parameter names."""
        with OptionCheck() as check:
            return self._checked(options, check)

    def options(self, values: Mapping[str, Any], check: OptionCheck) -> GenerateOptions:
        """The generation options among an endpoint's raw values, by parameter name (``steps``,
        ``guidance``, ``seed``, ``random_seed``, ``ref_acceleration``, ``record``, the focus's
        ``focus``, ``focus_levels``, ``focus_start``, ``focus_end`` and, where the endpoint has it,
        ``repaint``), checked into ``check``."""
        random_seed = check.flag("random_seed", values["random_seed"])
        raw = GenerateOptions(values["steps"], values["guidance"], None if random_seed is True else values["seed"],
                              values["ref_acceleration"], values.get("repaint", False), values["record"])
        checked = self._checked(raw, check)
        checked.attention_focus = self._focus(values, check)
        return checked

    def _focus(self, values: Mapping[str, Any], check: OptionCheck) -> AttentionFocus | None:
        """The experimental attention focus, None when ``focus`` is 1 (which changes nothing)."""
        temperature = check.number("focus", values["focus"], self.focus_min, self.focus_max)
        levels = check.integer("focus_levels", values["focus_levels"], 1, self.focus_levels_max)
        steps = (check.number("focus_start", values["focus_start"], 0.0, 1.0),
                 check.number("focus_end", values["focus_end"], 0.0, 1.0))
        if check.problems or temperature == 1.0:
            return None
        try:
            return AttentionFocus(temperature, levels, steps)
        except OptionError as e:  # the steps' order
            check.problems.append(str(e).replace("attention focus steps", "focus_start and focus_end"))
            return None

    def _checked(self, options: GenerateOptions, check: OptionCheck) -> GenerateOptions:
        return GenerateOptions(
            check.integer("steps", options.steps, self.steps_min, self.steps_max),
            check.number("guidance", options.guidance_scale, self.guidance_min, self.guidance_max),
            None if options.seed is None else check.integer("seed", options.seed, 0, self.seed_max),
            check.flag("ref_acceleration", options.ref_acceleration), check.flag("repaint", options.repaint),
            check.flag("record", options.record_attention), options.attention_focus)


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


@dataclass(frozen=True)
class MemoryBudget:
    """The model cache's memory accounting: ``need(kind, preset)`` is what a model needs
    (``leffa.memory.MemoryNeed``), ``free()`` what is free now; ``device`` names the pool in
    messages. Both functions are injected, so tests give fake figures."""

    preset: MemoryPreset
    need: Callable[[ModelKind, MemoryPreset], MemoryNeed]
    free: Callable[[], FreeMemory]
    device: str = "cpu"


def estimated_budget(preset: MemoryPreset, device: str, dtype: torch.dtype, fuse_qkv: bool = False) -> MemoryBudget:
    """The budget of real models: needs estimated from each base's structure (a meta-device
    build, no weights) and the free memory measured on ``device``."""

    def need(kind: ModelKind, memory: MemoryPreset) -> MemoryNeed:
        return estimate_memory(meta_model(kind.base), memory, device, dtype, fuse_qkv=fuse_qkv)

    return MemoryBudget(preset, need, functools.partial(free_memory, device), device)


class ModelCache:
    """Pipelines by model kind, loaded on first use. At most ``max_models`` are kept, and with a
    ``budget`` only as many as fit in memory: before loading, the least recently used are dropped
    until the new model fits (``leffa.memory.fits``); a model that cannot fit even alone is refused
    with a ``NotEnoughMemoryError`` saying what it needs, what is free and which preset would fit.
    Should loading still run out of GPU memory, the others are dropped and it is tried once more."""

    def __init__(self, loader: Callable[[ModelKind], LeffaModel], max_models: int = 2,
                 budget: MemoryBudget | None = None):
        self._loader, self.max_models, self.budget = loader, max_models, budget
        self._pipes: OrderedDict[ModelKind, LeffaPipeline] = OrderedDict()
        self._needs: dict[ModelKind, MemoryNeed] = {}
        self._lock = threading.Lock()

    def loaded(self) -> list[ModelKind]:
        return list(self._pipes)

    def _drop_oldest(self) -> None:
        kind, _ = self._pipes.popitem(last=False)
        self._needs.pop(kind, None)
        free_accelerator_memory()

    def _refusal(self, kind: ModelKind, free: FreeMemory, others_dropped: bool):
        budget = self.budget
        needs = {preset: budget.need(kind, preset) for preset in MemoryPreset}
        return not_enough_memory(f"the {kind.value} model", budget.preset, needs, free, budget.device,
                                 others_dropped=others_dropped)

    def _make_room(self, kind: ModelKind) -> MemoryNeed | None:
        """Room for ``kind``: at most ``max_models - 1`` others kept and, with a budget, the least
        recently used dropped until it fits. A model that would not fit even with all the others
        gone is refused before anything is dropped; one that still does not fit once they are
        gone (memory held elsewhere) is refused then."""
        budget = self.budget
        if budget is None:
            while len(self._pipes) >= self.max_models:
                self._drop_oldest()
            return None
        need = budget.need(kind, budget.preset)
        free = budget.free()
        held = list(self._needs.values())
        alone = FreeMemory(free.device + sum(n.resident for n in held), free.host + sum(n.host for n in held))
        if not fits(need, alone):
            raise self._refusal(kind, alone, others_dropped=bool(held))
        while len(self._pipes) >= self.max_models:
            self._drop_oldest()
            free = budget.free()
        while not fits(need, free, max((n.working for n in self._needs.values()), default=0)):
            if not self._pipes:
                raise self._refusal(kind, free, others_dropped=bool(held))
            self._drop_oldest()
            free = budget.free()
        return need

    def get(self, kind: ModelKind, progress: Progress = _no_progress) -> LeffaPipeline:
        with self._lock:
            if kind in self._pipes:
                self._pipes.move_to_end(kind)
                return self._pipes[kind]
            need = self._make_room(kind)
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
            if need is not None:
                self._needs[kind] = need
            return self._pipes[kind]


@dataclass(frozen=True)
class ModelSetup:
    """Where and how the app runs the Leffa models (from the settings): ``device`` and ``dtype``,
    the memory preset and the speed options (``leffa.memory``, ``leffa.speed``)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    memory: MemoryPreset = MemoryPreset.FAST
    speed: SpeedOptions = field(default_factory=SpeedOptions)

    def loader(self, root: str | None, device: str | None = None,
               tiny: bool = False) -> Callable[[ModelKind], LeffaModel]:
        """Loads a model kind (published, or ``tiny``) placed on ``device`` (default: the setup's)."""
        device = device or self.device

        def load(kind: ModelKind) -> LeffaModel:
            if tiny:
                return tiny_model(kind).place(device, self.dtype, memory=self.memory, speed=self.speed)
            return load_model(kind, root, device=device, dtype=self.dtype, memory=self.memory,
                              speed=self.speed).eval()

        return load

    def move(self, model: LeffaModel, device: str) -> None:
        """Place a loaded model on ``device`` with the setup's preset (its speed options stay)."""
        model.place(device, self.dtype, memory=self.memory)


# ZeroGPU: seconds to ask for one generation, by base (is SDXL) -> (fixed: moving the weights to the
# GPU and back, encoding, decoding; per denoising step), several times the H100 figures (0.07 s/step
# for SD1.5, 0.11 for SDXL: README), as a shared GPU may be slower; the offloading presets are
# slower still. A Space's visitors are charged what a call takes, not what it asked for.
GPU_SECONDS = {False: (10.0, 0.25), True: (20.0, 0.5)}
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


@dataclass(frozen=True)
class GenerationCall:
    """One generation's inputs as plain values: on ZeroGPU they go to the GPU worker process
    pickled (so no model, lock or callback in here)."""

    kind: ModelKind
    src: Image.Image
    ref: Image.Image
    mask: Image.Image
    densepose: Image.Image
    options: GenerateOptions  # checked
    seed: int


def run_generation(pipe: LeffaPipeline, call: GenerationCall,
                   callback: Callable[[int, int], bool] | None = None) -> tuple[Image.Image, AttentionRecorder | None]:
    """The generated image, and the attention recording if asked (the middle and the last step,
    every layer, float16 on the CPU)."""
    options, recorder = call.options, None
    if options.record_attention:
        n = options.steps
        recorder = AttentionRecorder(steps=sorted({n // 2, n - 1}), dtype=torch.float16)
    out = pipe(call.src, call.ref, call.mask, call.densepose, num_inference_steps=options.steps,
               guidance_scale=options.guidance_scale, generator=torch.Generator().manual_seed(call.seed),
               ref_acceleration=options.ref_acceleration, repaint=options.repaint,
               attention_focus=options.attention_focus, attention_recorder=recorder, callback=callback)
    return out.images[0], recorder


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
        fixed, per_step = GPU_SECONDS[call.kind.base is BaseModel.SDXL_INPAINTING]
        return math.ceil(fixed + call.options.steps * per_step * PRESET_SLOWDOWN[self.setup.memory])

    def _on_gpu(self, call: GenerationCall) -> tuple[Image.Image, AttentionRecorder | None]:
        pipe = self.models.get(call.kind)  # loaded on the CPU before the call
        try:
            self.setup.move(pipe.model, self.setup.device)
            return run_generation(pipe, call)
        finally:
            self.setup.move(pipe.model, "cpu")

    def __call__(self, call: GenerationCall) -> tuple[Image.Image, AttentionRecorder | None]:
        return self._run(call)


class Predictor:
    """Preprocessing and generation for a front end: ``limits`` are the option ranges it should
    offer; ``tiny`` says the models are the untrained ``--tiny`` ones (no weights, for a notice).

    Before a request preprocesses anything, every published file it needs is fetched at once from
    ``checkpoint_dir`` or the Hub, so a missing one is reported with all the others."""

    def __init__(self, models: ModelCache, preprocessor: Preprocessor, tiny: bool = False,
                 limits: OptionLimits = MODEL_LIMITS, checkpoint_dir: str | None = None,
                 gpu: OnDemandGPU | None = None):
        """``gpu``: on a Space with on-demand GPUs, runs each generation on one (else it runs here)."""
        self.models, self.preprocessor, self.tiny, self.limits = models, preprocessor, tiny, limits
        self.checkpoint_dir, self.gpu = checkpoint_dir, gpu

    def preload(self, kinds: tuple[ModelKind, ...] = (ModelKind.VITON_HD,)) -> None:
        """Load ``kinds`` now (on a Space with on-demand GPUs: at start, onto the CPU)."""
        for kind in kinds:
            self.models.get(kind)

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
        call = GenerationCall(kind, src, ref, mask, densepose, options, seed)
        if self.gpu is None:
            progress(DENOISING, f"Denoising step 0/{options.steps}")
            image, recorder = run_generation(pipe, call, _step_callback(progress, should_stop))
        else:
            progress(DENOISING, f"Denoising {options.steps} steps on a GPU")
            image, recorder = self.gpu(call)
        return Generation(image, seed, options.steps, ref, recorder)


def _step_callback(progress: Progress, should_stop: ShouldStop) -> Callable[[int, int], bool]:
    """The pipeline's step callback: the phase and its share of the progress bar; False to stop."""

    def callback(step: int, total: int) -> bool:
        if step < total:
            progress(DENOISING + (DECODING - DENOISING) * step / total, f"Denoising step {step}/{total}")
        else:
            progress(DECODING, "Decoding the image")
        return not should_stop()

    return callback


def model_setup(settings, on_demand: bool = False) -> ModelSetup:
    """The settings' device (``auto``: CUDA when there is one, or ``on_demand``), dtype (``auto``:
    float16 on CUDA, float32 on the CPU), memory preset and speed options."""
    device = settings.device
    if device == "auto":
        device = "cuda" if on_demand or torch.cuda.is_available() else "cpu"
    if settings.dtype == "auto":
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    else:  # one of webapp.settings.DTYPES, torch's names
        dtype = getattr(torch, settings.dtype)
    speed = SpeedOptions(settings.fuse_qkv, settings.channels_last, settings.compile)
    return ModelSetup(device, dtype, MemoryPreset(settings.memory), speed)


def build_predictor(settings) -> Predictor:
    """The app's predictor. The model cache counts memory under the chosen preset (real models).
    On a ZeroGPU Space (``on_demand_gpus``) the models and the preprocessing stay
    on the CPU and each generation runs inside ``spaces.GPU`` (``OnDemandGPU``)."""
    from preprocess.standins import standin_preprocessor

    spaces = on_demand_gpus()
    setup = model_setup(settings, on_demand=spaces is not None)
    device = "cpu" if spaces is not None else setup.device  # where the models rest
    if settings.tiny:
        models = ModelCache(setup.loader(None, device, tiny=True), settings.max_models)
        gpu = OnDemandGPU(spaces, setup, models) if spaces is not None else None
        return Predictor(models, standin_preprocessor(), tiny=True, limits=TINY_LIMITS, gpu=gpu)
    budget = estimated_budget(setup.memory, device, setup.dtype, setup.speed.fuse_qkv)
    models = ModelCache(setup.loader(settings.checkpoint_dir, device), settings.max_models, budget)
    gpu = OnDemandGPU(spaces, setup, models) if spaces is not None else None
    return Predictor(models, Preprocessor.from_checkpoints(settings.checkpoint_dir, device),
                     checkpoint_dir=settings.checkpoint_dir, gpu=gpu)
