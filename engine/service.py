"""``Engine``: a request from photos to a generated image, the same for the app, the command line
and ``leffa infer``: the option checks (the model's limits and what it supports), every weight file
it needs fetched before any work, the inputs (given, or from the shared preprocessor), the model
from the cache, and the generation with progress and stop, here or on an on-demand GPU."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from engine import inputs, registry, weights
from engine.adapters import GenerationCall, Pictures
from engine.cache import MemoryBudget, Model, ModelCache, estimated_budget
from engine.outfit import Garment, GarmentPass, TryOnResult, TryOnSample, check_outfit, outfit_models, union_mask
from engine.options import API_NAMES, MAX_SEED, GenerateOptions, OptionCheck, OptionLimits, OptionNames, ResultView
from engine.progress import DENOISING, Progress, ShouldStop, never_stop, no_progress, step_callback
from engine.registry import ModelEntry, WeightSet
from engine.setup import ModelSetup, WeightSource
from engine.zerogpu import OnDemandGPU
from errors import GenerationStopped, OptionError
from preprocess.appearance import AppearanceInputs
from preprocess.framing import Framing, paste_back
from preprocess.images import MODEL_SIZE, load_image
from preprocess.inputs import ImageSource, PersonMask, PoseInputs, Preprocessor, TryOnInputs
from preprocess.masks import GarmentType, TryOnModel
from preprocess.weights import MASK_ANALYSES, Analysis, analysis_files
from runtime.memory import free_memory, samples_that_fit
from runtime.sampling import cache_refusal
from weightfiles.manifest import HubFile


@dataclass
class Generation:
    """One sample of a request."""

    image: Image.Image
    seed: int
    steps: int  # denoising steps run
    reference: Image.Image  # the garment / the kept person: what the attention looks at
    recorder: Any  # the attention recording of the sample's batch (the family's recorder), or None
    row: int = 0  # the sample's row in that recording's batch


def _sample(pictures: Pictures, k: int) -> Image.Image:
    return pictures[k] if isinstance(pictures, tuple) else pictures


def _samples(pictures: Pictures, chunk: slice) -> Pictures:
    return pictures[chunk] if isinstance(pictures, tuple) else pictures


def loader(setup: ModelSetup, source: WeightSource, device: str | None = None):
    """``ModelCache``'s loader: an entry's model from ``source``, placed as ``setup`` says (on
    ``device`` instead of the setup's when given: a ZeroGPU Space keeps the models on the CPU)."""
    return lambda entry: entry.adapter().load(setup, source, device)


class Engine:
    """Everything a front end asks of the models. ``source`` says where the weights come from
    (``limits_for`` follows it), ``setup`` where they run; ``preprocessor`` (default: the source's,
    ``make_preprocessor``) turns photos into inputs; ``limits``, when given, replaces every entry's
    option limits; ``gpu``: on a Space with on-demand GPUs, runs each generation on one (else it
    runs here).

    Before a request preprocesses anything, every published file it needs is fetched at once, so a
    missing one is reported with all the others."""

    def __init__(self, models: ModelCache, preprocessor: Preprocessor | None = None,
                 source: WeightSource = WeightSource(), setup: ModelSetup = ModelSetup(),
                 limits: OptionLimits | None = None, gpu: OnDemandGPU | None = None):
        self.models, self.source, self.setup, self.limits, self.gpu = models, source, setup, limits, gpu
        self.preprocessor = preprocessor if preprocessor is not None else self.make_preprocessor(source, setup.device)

    @classmethod
    def create(cls, setup: ModelSetup, source: WeightSource, max_models: int = 1, budget: bool = False,
               on_demand=None) -> Engine:
        """An engine whose cache loads from ``source`` and keeps up to ``max_models`` (with ``budget``:
        only as many as fit in memory, real models only). ``on_demand``: the ``spaces`` package on a
        ZeroGPU Space (``engine.zerogpu.on_demand_gpus``): the models and the preprocessing stay on
        the CPU and each generation runs inside ``spaces.GPU``."""
        rest = "cpu" if on_demand is not None else setup.device  # where the models rest
        memory: MemoryBudget | None = None
        if budget and not source.tiny:
            memory = estimated_budget(setup.memory, rest, setup.dtype, setup.speed.fuse_qkv)
        models = ModelCache(loader(setup, source, rest), max_models, memory)
        gpu = OnDemandGPU(on_demand, setup, models) if on_demand is not None else None
        preprocessor = cls.make_preprocessor(source, rest)
        return cls(models, preprocessor, source, setup, gpu=gpu)

    @staticmethod
    def make_preprocessor(source: WeightSource, device: str) -> Preprocessor:
        """The preprocessor of ``source`` on ``device``: the stand-ins for the tiny models, else the
        published analysis models (each loaded on first use, so making it costs nothing)."""
        if source.tiny:
            from preprocess.standins import standin_preprocessor

            return standin_preprocessor()
        return Preprocessor.from_checkpoints(source.checkpoint_dir, str(device), source.revision)

    @property
    def tiny(self) -> bool:
        return self.source.tiny

    # -- options --------------------------------------------------------------------------------
    def limits_for(self, model: Model) -> OptionLimits:
        return self.limits or self.source.limits(registry.entry(model))

    def check(self, model: Model, options: GenerateOptions, names: OptionNames = API_NAMES) -> GenerateOptions:
        """``options`` checked against the model's limits and what it supports (one ``OptionError``
        lists every problem, each option named by ``names``)."""
        with OptionCheck() as check:
            return self.checked(model, options, check, names)

    def checked(self, model: Model, options: GenerateOptions, check: OptionCheck,
                names: OptionNames = API_NAMES) -> GenerateOptions:
        """``check`` as ``check`` does, its problems added to ``check`` (a caller's own, to list them
        with the problems of its other values)."""
        entry = registry.entry(model)
        if not entry.published and self.source.published:  # before any file is fetched for it
            check.problems.append(f"the {entry.name} model has no published weights: give your own checkpoint "
                                  "(--checkpoint; python -m training writes one), or try --tiny")
        checked = self.limits_for(entry).checked(options, check, names)
        supports = entry.supports
        for asked, supported, name in ((options.repaint, supports.repaint, names.repaint),
                                       (options.ref_acceleration, supports.ref_acceleration, names.ref_acceleration),
                                       (options.record_attention, supports.attention_recording, names.record),
                                       (options.attention_focus is not None, supports.attention_focus, names.focus),
                                       (options.fast_sampling, supports.fast_sampling,
                                        f"{names.sampler}, {names.guidance_interval}, {names.cache_interval}")):
            if asked is True and not supported:
                check.unsupported(name, f"the {entry.name} model does not support it")
        refusal = cache_refusal(self.setup.memory)
        if isinstance(checked.cache_interval, int) and checked.cache_interval > 1 and refusal is not None:
            check.unsupported(names.cache_interval, refusal)
        return checked

    # -- weights ----------------------------------------------------------------------------------
    def request_files(self, entry: ModelEntry, analyses) -> list[HubFile]:
        """The published files a request of ``entry`` computing ``analyses`` needs."""
        return entry.files_for(analyses, own_checkpoint=not self.source.published)

    def fetch(self, files: Sequence[HubFile]) -> None:
        """``files``, downloaded if missing (``MissingWeightsError`` names every one that cannot be);
        nothing with the tiny models."""
        if not self.tiny:
            weights.fetch(files, self.source.checkpoint_dir, self.source.revision)

    def missing_weights(self, weight_set: WeightSet) -> list[HubFile]:
        """The files of ``weight_set`` not on this machine yet (none with the tiny models)."""
        return [] if self.tiny else weights.missing(weight_set, self.source.checkpoint_dir)

    # -- inputs -----------------------------------------------------------------------------------
    def person_mask(self, person: ImageSource, model_type: TryOnModel, garment_type: GarmentType,
                    keep_fixed_regions: bool = False, view: ResultView = ResultView.CANVAS) -> PersonMask:
        """The automatic try-on mask of a person photo (the app's mask editor), of the picture the
        model will see: framed around the person for a ``view`` around the person (``framing``)."""
        self.fetch(analysis_files(MASK_ANALYSES + ((Analysis.DENSEPOSE,) if view.around_person else ())))
        framing = None
        if view.around_person:
            person, framing = inputs.framed_person(lambda: self.preprocessor, load_image(person, name="person image"))
        mask = self.preprocessor.person_mask(person, model_type, garment_type, keep_fixed_regions=keep_fixed_regions)
        mask.framing = framing
        return mask

    def tryon_inputs(self, person: ImageSource, garment: ImageSource, model_type: TryOnModel | str,
                     garment_type: GarmentType | str, preprocess_garment: bool = False,
                     keep_fixed_regions: bool = False, *, densepose: ImageSource | None = None,
                     mask: ImageSource | None = None, size: tuple[int, int] = MODEL_SIZE,
                     view: ResultView = ResultView.CANVAS) -> TryOnInputs:
        """A try-on's inputs (``engine.inputs.tryon_inputs``), every file they and the model need
        fetched first (after the checks that need no file)."""
        entry = registry.tryon_entry(model_type)
        analyses = inputs.tryon_analyses(entry, mask is not None, densepose is not None)
        inputs.check_size(analyses, size)
        self.fetch(self.request_files(entry, analyses))
        return inputs.tryon_inputs(lambda: self.preprocessor, entry, person, garment, GarmentType(garment_type),
                                   preprocess_garment, keep_fixed_regions, mask=mask, densepose=densepose, size=size,
                                   view=view)

    def pose_inputs(self, person: ImageSource, target: ImageSource | None, densepose: ImageSource | None = None,
                    size: tuple[int, int] = MODEL_SIZE, view: ResultView = ResultView.CANVAS,
                    model: Model | None = None) -> PoseInputs:
        """A pose transfer's inputs for ``model`` (default: the first pose model;
        ``engine.inputs.pose_inputs``), every file fetched first (after the checks that need no file)."""
        entry = registry.pose_entry(model)
        inputs.check_pose_target(target, densepose)
        analyses = inputs.pose_analyses(entry, densepose is not None)
        inputs.check_size(analyses, size, entry)
        self.fetch(self.request_files(entry, analyses))
        return inputs.pose_inputs(lambda: self.preprocessor, entry, person, target, densepose=densepose, size=size,
                                  view=view)

    def tryon(self, person: ImageSource, garments: Sequence[Garment], model_type: TryOnModel | str,
              options: GenerateOptions, *, keep_fixed_regions: bool = False, densepose: ImageSource | None = None,
              mask: ImageSource | None = None, edited_mask: Image.Image | None = None,
              size: tuple[int, int] = MODEL_SIZE, view: ResultView = ResultView.CANVAS,
              progress: Progress = no_progress, should_stop: ShouldStop = never_stop,
              names: OptionNames = API_NAMES, model: str | ModelEntry | None = None) -> TryOnResult:
        """A try-on of one garment or an outfit (``engine.outfit``): ``options.samples`` samples, each
        garment put on every sample in turn by the model trained on its type (``model_type``'s when it
        is; ``model`` instead, when given), the later garments masked on each sample's own picture after the garment before, with the
        sample's seed. ``mask`` and ``densepose`` (made for the whole photo) and ``edited_mask`` (the
        mask editor's, of the model's picture) are the first garment's. Everything is checked, and
        every file fetched, before any work; the models take turns in the cache (one garment's pass
        for all the samples, then the next)."""
        types = check_outfit([g.garment_type for g in garments])
        entries = outfit_models(model_type, types, model)
        with OptionCheck() as check:
            for entry in dict.fromkeys(entries):
                options = self.checked(entry, options, check, names)
        if len(entries) > 1 and tuple(size) != MODEL_SIZE:
            raise OptionError("an outfit's later garments are masked automatically, which works at 768x1024: "
                              "drop --size")
        first_analyses = inputs.tryon_analyses(entries[0], mask is not None or edited_mask is not None,
                                               densepose is not None)
        inputs.check_size(first_analyses, size)
        self.fetch(list(dict.fromkeys([*self.request_files(entries[0], first_analyses),
                                       *(f for e in entries[1:] for f in self.request_files(e, e.analyses))])))
        first = self.tryon_inputs(person, garments[0].image, entries[0].mask_variant, types[0], garments[0].cut_out,
                                  keep_fixed_regions, densepose=densepose, mask=mask, size=size, view=view)
        if edited_mask is not None:
            first.mask = edited_mask
        generations = self.generate(entries[0], first.person, first.garment, first.mask, first.densepose, options,
                                    progress, should_stop, names)
        passes = [[GarmentPass(entries[0], types[0], first)] for _ in generations]
        options = replace(options, seed=generations[0].seed)  # every garment's pass: the samples' own seeds
        for entry, garment in zip(entries[1:], garments[1:]):
            later = [self.tryon_inputs(g.image, garment.image, entry.mask_variant, garment.garment_type,
                                       garment.cut_out, keep_fixed_regions) for g in generations]
            generations = self.generate(entry, *(tuple(getattr(i, name) for i in later)
                                                 for name in ("person", "garment", "mask", "densepose")),
                                        options, progress, should_stop, names)
            for sample, sample_inputs in zip(passes, later):
                sample.append(GarmentPass(entry, garment.garment_type, sample_inputs))
        samples = []
        for generation, sample_passes in zip(generations, passes):
            blend = union_mask([p.inputs.mask for p in sample_passes])
            samples.append(TryOnSample(self.answer(generation.image, first.framing, blend, view), generation,
                                       sample_passes))
        return TryOnResult(samples, first.framing)

    @staticmethod
    def answer(image: Image.Image, framing: Framing | None, mask: Image.Image, view: ResultView) -> Image.Image:
        """What a request answers with: in the photo view, the generated ``image`` blended back into
        the photo at full resolution through the ``mask`` the model used (``preprocess.framing``);
        else the model's picture itself."""
        if view is ResultView.PHOTO and framing is not None:
            return paste_back(framing.photo, image, framing.box, mask)
        return image

    # -- generating -------------------------------------------------------------------------------
    def preload(self, models: Sequence[Model] | None = None) -> None:
        """Load ``models`` (default: the try-on task's default model) now (on a Space with on-demand
        GPUs: at start, onto the CPU)."""
        for model in models or (registry.default_for(registry.Task.TRYON),):
            self.models.get(model)

    def generate(self, model: Model, src: Pictures, ref: Pictures, mask: Pictures, densepose: Pictures,
                 options: GenerateOptions, progress: Progress = no_progress, should_stop: ShouldStop = never_stop,
                 names: OptionNames = API_NAMES, appearance: AppearanceInputs | None = None) -> list[Generation]:
        """``options.samples`` samples, sample k drawn with seed + k (a drawn seed when ``options.seed``
        is None), in as few batches as memory allows (``samples_per_batch``); each equals the run of
        its seed alone. Loads the model if needed, denoises and decodes, reporting each phase to
        ``progress``. ``should_stop`` is asked before the model is loaded and after every denoising
        step: once it says True, ``GenerationStopped`` is raised (the request was cancelled or its
        client left). A picture is shared by the samples, or a tuple of one per sample. ``appearance``:
        the kept person's texture map and face, for a model that needs them (MCLD)."""
        entry = registry.entry(model)
        options = self.check(entry, options, names)
        if inputs.needs_appearance(entry) and appearance is None:
            raise OptionError(f"the {entry.name} model needs the kept person's texture map and face: "
                              "make its inputs with Engine.pose_inputs(model=...)")
        if should_stop():
            raise GenerationStopped("stopped before generating")
        loaded = self.models.get(entry, progress)
        seeds = self.seeds(options)
        per_batch = self.samples_per_batch(entry, len(seeds))
        extra = (appearance.texture, appearance.face_embedding) if appearance is not None else ()
        generations = []
        for start in range(0, len(seeds), per_batch):
            chunk = slice(start, start + per_batch)
            call = GenerationCall(entry.name, *(_samples(p, chunk) for p in (src, ref, mask, densepose)), options,
                                  seeds[chunk], *extra)
            if self.gpu is None:
                progress(DENOISING, f"Denoising step 0/{options.steps}")
                images, recorder = entry.adapter().generate(loaded, call, step_callback(progress, should_stop))
            else:
                progress(DENOISING, f"Denoising {options.steps} steps on a GPU")
                images, recorder = self.gpu(call)
            generations += [Generation(image, seed, options.steps, _sample(ref, start + row), recorder, row)
                            for row, (image, seed) in enumerate(zip(images, call.seeds))]
        return generations

    @staticmethod
    def seeds(options: GenerateOptions) -> tuple[int, ...]:
        """The samples' seeds: ``options.seed`` (or a drawn one), + 1, + 2, ..."""
        first = random.randint(0, MAX_SEED - options.samples + 1) if options.seed is None else options.seed
        return tuple(range(first, first + options.samples))

    def samples_per_batch(self, entry: ModelEntry, samples: int) -> int:
        """How many samples to denoise in one batch: all of them with the tiny models and on an
        on-demand GPU (lent whole per call), else as many as the free memory holds beside the loaded
        model, by its estimated working memory per sample (``runtime.memory.samples_that_fit``)."""
        if samples == 1 or self.tiny or self.gpu is not None:
            return samples
        setup = self.setup
        need = entry.adapter().memory_need(setup.memory, setup.device, setup.dtype, setup.speed.fuse_qkv)
        return samples_that_fit(need.working, free_memory(setup.device).device, samples)

    def generate_batch(self, model: Model, batch: dict[str, torch.Tensor], options: GenerateOptions,
                       generators: Sequence[torch.Generator]) -> list[Image.Image]:
        """A batch of input tensors, one generator per sample (``leffa infer``); ``options`` checked
        beforehand (``check``)."""
        entry = registry.entry(model)
        return entry.adapter().generate_batch(self.models.get(entry), batch, options, generators)
