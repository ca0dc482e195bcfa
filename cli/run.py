"""The work behind ``leffa tryon`` and ``leffa pose``: the arguments become an engine request
(``engine.service.Engine``), whose image is written atomically. Imported once the arguments parse."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from engine import registry
from engine import options as engine_options
from engine.options import CLI_NAMES, GenerateOptions, OptionCheck, OptionLimits, ResultView
from engine.progress import DECODING, DENOISING
from engine.registry import Task
from engine.service import Engine
from engine.setup import ModelSetup, WeightSource
from errors import OptionError
from preprocess.images import check_output_path, load_image, save_image_atomic
from runtime.speed import SpeedOptions

IMAGE_ARGS = {"person": "person image", "garment": "garment image", "target": "target-pose image",
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
    return GenerateOptions(limits.steps_default if args.steps is None else args.steps,
                           limits.guidance_default if args.guidance_scale is None else args.guidance_scale,
                           args.seed, args.ref_acceleration, getattr(args, "repaint", False), False,
                           attention_focus(args, check), args.guidance_rescale)


def _read_images(args) -> dict[str, Image.Image | None]:
    """Every given image, read once (transparency kept for ``--preprocess-garment``), so that a
    bad one is reported before any download or model; ``None`` for those not given."""
    return {arg: None if getattr(args, arg, None) is None else
            load_image(getattr(args, arg), name=name, keep_alpha=True) for arg, name in IMAGE_ARGS.items()}


def _bar_progress(bar: tqdm, steps: int):
    """The engine's progress as a bar of denoising steps (the phases' shares: ``engine.progress``)."""

    def progress(fraction: float, desc: str) -> None:
        if fraction >= DENOISING:
            bar.n = min(steps, round(steps * (fraction - DENOISING) / (DECODING - DENOISING)))
            bar.refresh()

    return progress


def run(args) -> Path:
    task = Task(args.command)
    check_output_path(args.out)  # before the slow part: a real write is tried
    if task is Task.POSE and args.target is None and args.densepose is None:
        raise OptionError("pose transfer needs --target (a photo in the target pose) or --densepose")
    entry = registry.tryon_entry(args.model_type) if task is Task.TRYON else registry.pose_entry(args.model)
    setup = ModelSetup.resolve(args.device, args.dtype, args.memory,
                               SpeedOptions(args.fuse_qkv, args.channels_last, args.compile))
    engine = Engine.create(setup, weight_source(args))
    with OptionCheck() as check:  # every bad option in one message
        checked = engine.checked(entry, options(args, check, engine.limits_for(entry)), check, CLI_NAMES)
    images = _read_images(args)  # inputs first: fail before any download or slow load
    view = ResultView(args.result)
    if task is Task.TRYON:
        t = engine.tryon_inputs(images["person"], images["garment"], args.model_type, args.garment_type,
                                args.preprocess_garment, args.keep_fixed_regions, densepose=images["densepose"],
                                mask=images["mask"], size=args.size, view=view)
        inputs, framings, appearance = (t.person, t.garment, t.mask, t.densepose), (t.framing,), None
    else:
        p = engine.pose_inputs(images["person"], images["target"], images["densepose"], args.size, view, entry)
        inputs, framings = (p.target, p.reference, p.mask, p.densepose), (p.reference_framing, p.target_framing)
        appearance = p.appearance
    for framing in framings:
        if framing is not None and framing.people > 1:
            print(f"{framing.people} people in the photo: framed the largest", file=sys.stderr)
    t0 = time.perf_counter()
    engine.models.get(entry)
    print(f"loaded {entry.name} on {setup.device} ({setup.dtype}, --memory {setup.memory.value}) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    with tqdm(total=checked.steps, desc="denoising", unit="step") as bar:
        gen = engine.generate(entry, *inputs, checked, progress=_bar_progress(bar, checked.steps), names=CLI_NAMES,
                              appearance=appearance)
    return save_image_atomic(engine.answer(gen.image, framings[0], inputs[2], view), args.out)
