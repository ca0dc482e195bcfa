"""The work behind the command line: inputs (given or preprocessed), the model, the pipeline."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from cli.main import Task
from errors import OptionError
from leffa.attention import AttentionFocus
from leffa.hub import ModelKind, load_model, tiny_model
from leffa.model import LeffaModel
from leffa.pipeline import LeffaPipeline
from leffa.presets import MemoryPreset
from leffa.speed import SpeedOptions
from preprocess.images import (MODEL_SIZE, check_output_path, fit_to_canvas, load_garment, load_image,
                               load_label_image, save_image_atomic)
from preprocess.inputs import Preprocessor
from preprocess.masks import TryOnModel
from preprocess.standins import standin_preprocessor
from weightfiles.hub import resolve_files
from weightfiles.manifest import components_for, files_of

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _device_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {args.device} asked for, but no CUDA GPU is available")
    if args.dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, DTYPES[args.dtype]


def attention_focus(args) -> AttentionFocus | None:
    """The experimental focus from ``--attention-focus TAU`` and its companions (checked: a bad
    value, or a companion without TAU, is an ``OptionError``)."""
    if args.attention_focus is None:
        given = [flag for flag, on in (("--focus-levels", args.focus_levels != 1),
                                       ("--focus-steps", args.focus_steps != (0.0, 1.0)),
                                       ("--focus-own-keys", args.focus_own_keys)) if on]
        if given:
            raise OptionError(f"{', '.join(given)}: only with --attention-focus TAU (the focus is off without it)")
        return None
    return AttentionFocus(args.attention_focus, args.focus_levels, args.focus_steps, args.focus_own_keys)


def _load(args, kind: ModelKind, device, dtype) -> LeffaModel:
    placing = {"memory": MemoryPreset(args.memory),
               "speed": SpeedOptions(args.fuse_qkv, args.channels_last, args.compile)}
    if args.tiny:
        return tiny_model(kind).place(device, dtype, **placing)
    if args.checkpoint is not None:
        base = args.base_config or kind.base
        return LeffaModel.from_pretrained(base, args.checkpoint, device=device, dtype=dtype, **placing)
    return load_model(kind, args.checkpoint_dir, revision=args.revision, device=device, dtype=dtype, **placing)


def _inputs(args, task: Task, device: torch.device, images: dict[str, Image.Image | None], compute_mask: bool,
            compute_densepose: bool) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image]:
    """(src, ref, mask, densepose) fitted to the canvas (spec §4 roles), from ``_read_images``."""
    size = args.size
    if task is Task.TRYON and not (compute_mask or compute_densepose):
        src = fit_to_canvas(load_image(images["person"], name="person image"), size)
        ref = load_garment(images["garment"], size, cut_out=args.preprocess_garment)
        return src, ref, load_label_image(images["mask"], "mask", size, binary=True), \
            load_label_image(images["densepose"], "DensePose image", size)
    if task is Task.POSE and not compute_densepose:
        ref = fit_to_canvas(load_image(images["person"], name="person image"), size)
        src = Image.new("RGB", size, (255, 255, 255))  # all masked: its pixels are never seen
        return src, ref, Image.new("L", size, 255), load_label_image(images["densepose"], "DensePose image", size)

    pre = standin_preprocessor() if args.tiny else Preprocessor.from_checkpoints(args.checkpoint_dir, str(device),
                                                                                  args.revision)
    if task is Task.POSE:
        p = pre.pose(images["person"], images["target"])
        return p.target, p.reference, p.mask, p.densepose
    t = pre.tryon(images["person"], images["garment"], args.model_type, args.garment_type, args.preprocess_garment,
                  densepose=images["densepose"], keep_fixed_regions=args.keep_fixed_regions)
    mask = t.mask if images["mask"] is None else load_label_image(images["mask"], "mask", size, binary=True)
    return t.person, t.garment, mask, t.densepose


IMAGE_ARGS = {"person": "person image", "garment": "garment image", "target": "target-pose image",
              "mask": "mask", "densepose": "DensePose image"}  # argument -> its name in messages


def _read_images(args) -> dict[str, Image.Image | None]:
    """Every given image, read once (transparency kept for ``--preprocess-garment``), so that a
    bad one is reported before any download or model; ``None`` for those not given."""
    return {arg: None if getattr(args, arg, None) is None else
            load_image(getattr(args, arg), name=name, keep_alpha=True) for arg, name in IMAGE_ARGS.items()}


def _preprocessing(args, task: Task) -> tuple[bool, bool]:
    """(compute the mask, compute the DensePose image): what ``_inputs`` will preprocess."""
    compute_densepose = args.densepose is None
    compute_mask = task is Task.TRYON and (args.mask is None or compute_densepose)  # Preprocessor.tryon
    if task is Task.POSE and compute_densepose and args.target is None:
        raise OptionError("pose transfer needs --target (a photo in the target pose) or --densepose")
    if (compute_mask or compute_densepose) and args.size != MODEL_SIZE:
        raise OptionError("automatic preprocessing works at 768x1024: drop --size, or give --mask and --densepose")
    return compute_mask, compute_densepose


def _fetch_weights(args, kind: ModelKind, compute_mask: bool, compute_densepose: bool) -> None:
    """Every published file this run needs, at once: all of them missing are named in one message."""
    components = components_for(kind.component, compute_mask=compute_mask, compute_densepose=compute_densepose)
    if args.checkpoint is not None:
        components = components[:-1]  # the given file instead of the published model
    resolve_files(files_of(components), args.checkpoint_dir, args.revision)


def run(args) -> Path:
    task = Task(args.command)
    check_output_path(args.out)  # before the slow part
    kind = ModelKind(TryOnModel(args.model_type).weights) if task is Task.TRYON else ModelKind.POSE_TRANSFER
    if args.steps < 1:
        raise OptionError("--steps must be at least 1")
    focus = attention_focus(args)
    device, dtype = _device_dtype(args)
    plan = _preprocessing(args, task)
    images = _read_images(args)  # inputs first: fail before any download or slow load
    if not args.tiny:
        _fetch_weights(args, kind, *plan)
    src, ref, mask, densepose = _inputs(args, task, device, images, *plan)
    t0 = time.perf_counter()
    model = _load(args, kind, device, dtype)
    print(f"loaded {kind.value} on {device} ({dtype}, --memory {args.memory}) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    pipe = LeffaPipeline(model)
    with tqdm(total=args.steps, desc="denoising", unit="step") as bar:
        out = pipe(src, ref, mask, densepose, num_inference_steps=args.steps,
                   guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
                   generator=torch.Generator("cpu").manual_seed(args.seed),
                   ref_acceleration=args.ref_acceleration,
                   repaint=getattr(args, "repaint", False), attention_focus=focus,
                   callback=lambda step, total: bar.update(1))
    return save_image_atomic(out.images[0], args.out)
