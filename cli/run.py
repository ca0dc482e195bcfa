"""The work behind ``leffa tryon`` and ``leffa pose``: the arguments become an engine request
(``engine.service.Engine``), whose image is written atomically. Imported once the arguments parse."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from engine import registry
from engine import options as engine_options
from engine.outfit import Garment, check_outfit, outfit_models
from engine.options import CLI_NAMES, GenerateOptions, OptionCheck, OptionLimits, ResultView
from engine.progress import DECODING, DENOISING, LOADING
from engine.registry import Task
from engine.service import Engine
from engine.setup import ModelSetup, WeightSource
from errors import OptionError
from preprocess.masks import GarmentType
from preprocess.images import check_output_path, load_image, save_image_atomic
from runtime.speed import SpeedOptions

IMAGE_ARGS = {"person": "person image", "target": "target-pose image",
              "mask": "mask", "densepose": "DensePose image"}  # argument -> its name in messages


def attention_focus(args, check: OptionCheck):
    """The experimental focus from ``--attention-focus TAU`` and its companions; a bad value, or a
    companion without TAU, goes into ``check``. The command line takes every focus the library
    takes (``leffa.attention.AttentionFocus``: more levels than a model has = every layer); the
    app's sliders offer a part of that (``OptionLimits.focus_*``)."""
    if args.attention_focus is None:
        given = [flag for flag, on in (("--focus-levels", args.focus_levels != 1),
                                       ("--focus-steps", args.focus_steps != (0.0, 1.0)),
                                       ("--focus-own-keys", args.focus_own_keys)) if on]
        if given:
            check.problems.append(f"{', '.join(given)}: only with --attention-focus TAU (the focus is off without it)")
        return None
    return engine_options.attention_focus(check, args.attention_focus, args.focus_levels, args.focus_steps,
                                          args.focus_own_keys, CLI_NAMES)


def weight_source(args) -> WeightSource:
    return WeightSource(args.checkpoint_dir, args.revision, args.tiny, args.checkpoint, args.base_config)


def options(args, check: OptionCheck, limits: OptionLimits) -> GenerateOptions:
    """The generation options as given, the model's defaults (``limits``) for those not given (the
    focus checked into ``check``; ``Engine.checked`` checks the rest)."""
    given = GenerateOptions(limits.steps_default,
                            limits.guidance_default if args.guidance_scale is None else args.guidance_scale,
                            args.seed, args.ref_acceleration, getattr(args, "repaint", False), False,
                            attention_focus(args, check), args.guidance_rescale, getattr(args, "samples", 1))
    # --sampling's preset, then --steps and the sampling flags given over it
    return engine_options.with_sampling(given, args.sampling, steps=args.steps, sampler=args.sampler,
                                        guidance_interval=args.guidance_interval, cache_interval=args.cache_interval)


def garment_types(args) -> tuple[GarmentType, ...]:
    """Each ``--garment``'s type, by order (one garment: upper_body unless given), the outfit checked."""
    types = args.garment_type or ([GarmentType.UPPER_BODY.value] if len(args.garment) == 1 else [])
    if len(types) != len(args.garment):
        raise OptionError(f"give one --garment-type per --garment, in the same order: got {len(args.garment)} "
                          f"garments and {len(types)} types")
    return check_outfit(types, what="--garment")


def output_paths(out: Path, seeds: tuple[int, ...]) -> list[Path]:
    """Where each sample goes: ``out`` itself for one, else ``out`` with its seed in the name."""
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-seed{seed}{out.suffix}") for seed in seeds]


def _read_images(args) -> dict:
    """Every given image, read once (transparency kept for ``--preprocess-garment``), so that a
    bad one is reported before any download or model; ``None`` for those not given; ``garments``:
    each ``--garment``'s."""
    images = {arg: None if getattr(args, arg, None) is None else
              load_image(getattr(args, arg), name=name, keep_alpha=True) for arg, name in IMAGE_ARGS.items()}
    images["garments"] = [load_image(path, name="garment image", keep_alpha=True)
                          for path in getattr(args, "garment", None) or ()]
    return images


def _bar_progress(bar: tqdm, steps: int, setup: ModelSetup):
    """The engine's progress as a bar of denoising steps (the phases' shares: ``engine.progress``);
    each model load said on its own line with the time it took (an outfit's models take turns)."""
    loading: dict[str, float] = {}

    def progress(fraction: float, desc: str) -> None:
        if fraction == LOADING:
            loading["since"], loading["what"] = time.perf_counter(), desc.removeprefix("Loading ").split(" (")[0]
            return
        if "since" in loading:
            bar.write(f"loaded {loading['what']} on {setup.device} ({setup.dtype}, --memory {setup.memory.value}) in "
                      f"{time.perf_counter() - loading.pop('since'):.1f} s", file=sys.stderr)
        if fraction >= DENOISING:
            bar.n = min(steps, round(steps * (fraction - DENOISING) / (DECODING - DENOISING)))
            bar.refresh()

    return progress


def run(args) -> list[Path]:
    """The images written, one per sample."""
    task = Task(args.command)
    if task is Task.POSE and args.target is None and args.densepose is None:
        raise OptionError("pose transfer needs --target (a photo in the target pose) or --densepose")
    types = garment_types(args) if task is Task.TRYON else ()
    entries = (outfit_models(args.model_type, types, args.model) if task is Task.TRYON
               else [registry.pose_entry(args.model)])
    setup = ModelSetup.resolve(args.device, args.dtype, args.memory,
                               SpeedOptions(args.fuse_qkv, args.channels_last, args.compile))
    engine = Engine.create(setup, weight_source(args))
    with OptionCheck() as check:  # every bad option in one message
        checked = options(args, check, engine.limits_for(entries[0]))
        for entry in dict.fromkeys(entries):
            checked = engine.checked(entry, checked, check, CLI_NAMES)
    paths = output_paths(args.out, engine.seeds(checked))
    for path in paths:
        check_output_path(path)  # before the slow part: a real write is tried
    images = _read_images(args)  # inputs first: fail before any download or slow load
    view = ResultView(args.result)
    bar = tqdm(total=checked.steps, desc="denoising", unit="step")
    with bar:
        if task is Task.TRYON:
            garments = [Garment(image, kind, args.preprocess_garment) for image, kind in zip(images["garments"], types)]
            if len(entries) > 1 or entries[0] is not registry.tryon_entry(args.model_type):
                print("; ".join(f"{kind.value}: the {e.name} model" for e, kind in zip(entries, types)), file=sys.stderr)
            result = engine.tryon(images["person"], garments, args.model_type, checked,
                                  keep_fixed_regions=args.keep_fixed_regions, densepose=images["densepose"],
                                  mask=images["mask"], size=args.size, view=view,
                                  progress=_bar_progress(bar, checked.steps, setup), names=CLI_NAMES,
                                  model=args.model)
            _say_who_was_framed(result.framing)
            answers = [s.answer for s in result.samples]
        else:
            p = engine.pose_inputs(images["person"], images["target"], images["densepose"], args.size, view, entries[0])
            _say_who_was_framed(p.reference_framing, p.target_framing)
            generations = engine.generate(entries[0], p.target, p.reference, p.mask, p.densepose, checked,
                                          progress=_bar_progress(bar, checked.steps, setup), names=CLI_NAMES,
                                          appearance=p.appearance)
            answers = [g.image for g in generations]
    return [save_image_atomic(answer, path) for answer, path in zip(answers, paths)]


def _say_who_was_framed(*framings) -> None:
    for framing in framings:
        if framing is not None and framing.people > 1:
            print(f"{framing.people} people in the photo: framed the largest", file=sys.stderr)
