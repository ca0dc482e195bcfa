"""Command line: ``python -m leffa tryon ...`` and ``python -m leffa pose ...``."""

from __future__ import annotations

import argparse
import sys
import time
from enum import Enum
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from errors import OptionError, UserError
from leffa.hub import ModelKind, load_model
from leffa.model import LeffaModel
from leffa.pipeline import LeffaPipeline
from preprocess.images import (MODEL_SIZE, fit_to_canvas, load_garment, load_image, load_label_image,
                               save_image_atomic)
from preprocess.inputs import Preprocessor
from preprocess.masks import GarmentType, TryOnModel
from weightfiles.hub import ENV_CHECKPOINT_DIR

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Task(str, Enum):
    """The subcommands."""

    TRYON = "tryon"
    POSE = "pose"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 768x1024, got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 8, got {text}")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m leffa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("generation (defaults are the original demo's)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    g.add_argument("--guidance-scale", type=float, default=2.5, help="CFG scale (default 2.5)")
    g.add_argument("--guidance-rescale", type=float, default=None,
                   help="rescaled-CFG strength; default: the guidance scale, as the original; 0 = off")
    g.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    g.add_argument("--ref-acceleration", action="store_true",
                   help="run the reference UNet once (faster, may slightly reduce quality)")
    g.add_argument("--size", type=_size, default=(768, 1024), metavar="WxH",
                   help="canvas the inputs are fitted into (default 768x1024, what the models were trained on)")
    m = common.add_argument_group("model")
    m.add_argument("--checkpoint-dir", default=None,
                   help=f"folder laid out like the Hub repo (default ${ENV_CHECKPOINT_DIR} or ./ckpts)")
    m.add_argument("--revision", default=None, help="Hub revision to download (default: main)")
    m.add_argument("--checkpoint", type=Path, default=None,
                   help="use this .pth/.safetensors file instead of the published one")
    m.add_argument("--base-config", type=Path, default=None,
                   help="base config folder ({unet,vae,scheduler}/) for --checkpoint (default: shipped)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    m.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto = float16 on CUDA, float32 on CPU")

    t = sub.add_parser(Task.TRYON.value, parents=[common], help="virtual try-on")
    t.add_argument("--person", required=True, type=Path, help="photo of the person")
    t.add_argument("--garment", required=True, type=Path, help="photo of the garment")
    t.add_argument("--mask", type=Path, default=None,
                   help="inpainting mask (white = replace); default: computed from parsing + pose")
    t.add_argument("--densepose", type=Path, default=None,
                   help="DensePose rendering of the person; default: computed")
    t.add_argument("--model-type", choices=[m.value for m in TryOnModel], default=TryOnModel.VITON_HD.value,
                   help="viton_hd (recommended, upper body) or dress_code (upper, lower, dresses)")
    t.add_argument("--garment-type", choices=[g.value for g in GarmentType], default="upper_body",
                   help="what the garment is (default upper_body)")
    t.add_argument("--preprocess-garment", action="store_true",
                   help="the garment is a PNG cut-out with transparency: crop and centre it")
    t.add_argument("--keep-fixed-regions", action="store_true",
                   help="VITON-HD masks: never mask other clothes, shoes, hands (fixes full-body photos)")
    t.add_argument("--repaint", action="store_true", help="keep the person's pixels outside the mask")
    t.add_argument("--out", required=True, type=Path, help="output image (.png, .jpg, .webp)")

    p = sub.add_parser(Task.POSE.value, parents=[common], help="pose transfer")
    p.add_argument("--person", required=True, type=Path, help="the person whose appearance is kept")
    p.add_argument("--target", type=Path, default=None,
                   help="photo of a person in the target pose (its DensePose is computed)")
    p.add_argument("--densepose", type=Path, default=None,
                   help="DensePose IUV rendering of the target-pose person, instead of --target")
    p.add_argument("--out", required=True, type=Path, help="output image (.png, .jpg, .webp)")
    return parser


def _device_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {args.device} asked for, but no CUDA GPU is available")
    if args.dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, DTYPES[args.dtype]


def _load(args, kind: ModelKind, device, dtype) -> LeffaModel:
    if args.checkpoint is not None:
        base = args.base_config or kind.base
        return LeffaModel.from_pretrained(base, args.checkpoint, device=device, dtype=dtype)
    return load_model(kind, args.checkpoint_dir, revision=args.revision, device=device, dtype=dtype)


def _inputs(args, task: Task, device: torch.device) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image]:
    """(src, ref, mask, densepose) fitted to the canvas (spec §4 roles)."""
    size = args.size
    if task is Task.TRYON and args.mask is not None and args.densepose is not None:
        src = fit_to_canvas(load_image(args.person, name="person image"), size)
        ref = load_garment(args.garment, size, cut_out=args.preprocess_garment)
        return src, ref, load_label_image(args.mask, "mask", size, binary=True), \
            load_label_image(args.densepose, "DensePose image", size)
    if task is Task.POSE and args.densepose is not None:
        ref = fit_to_canvas(load_image(args.person, name="person image"), size)
        src = Image.new("RGB", size, (255, 255, 255))  # all masked: its pixels are never seen
        return src, ref, Image.new("L", size, 255), load_label_image(args.densepose, "DensePose image", size)

    if size != MODEL_SIZE:
        raise OptionError("automatic preprocessing works at 768x1024: drop --size, or give "
                         "--mask and --densepose")
    pre = Preprocessor.from_checkpoints(args.checkpoint_dir, str(device), args.revision)
    if task is Task.POSE:
        if args.target is None:
            raise OptionError("pose transfer needs --target (a photo in the target pose) or --densepose")
        p = pre.pose(args.person, args.target)
        return p.target, p.reference, p.mask, p.densepose
    t = pre.tryon(args.person, args.garment, args.model_type, args.garment_type, args.preprocess_garment,
                  densepose=args.densepose, keep_fixed_regions=args.keep_fixed_regions)
    mask = t.mask if args.mask is None else load_label_image(args.mask, "mask", size, binary=True)
    return t.person, t.garment, mask, t.densepose


def run(args) -> Path:
    task = Task(args.command)
    kind = ModelKind(TryOnModel(args.model_type).weights) if task is Task.TRYON else ModelKind.POSE_TRANSFER
    if args.steps < 1:
        raise OptionError("--steps must be at least 1")
    device, dtype = _device_dtype(args)
    src, ref, mask, densepose = _inputs(args, task, device)  # inputs first: fail before the slow load
    t0 = time.perf_counter()
    model = _load(args, kind, device, dtype)
    print(f"loaded {kind.value} on {device} ({dtype}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    pipe = LeffaPipeline(model)
    with tqdm(total=args.steps, desc="denoising", unit="step") as bar:
        out = pipe(src, ref, mask, densepose, num_inference_steps=args.steps,
                   guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
                   generator=torch.Generator("cpu").manual_seed(args.seed),
                   ref_acceleration=args.ref_acceleration,
                   repaint=getattr(args, "repaint", False),
                   callback=lambda step, total: bar.update(1))
    return save_image_atomic(out.images[0], args.out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = run(args)
    except UserError as e:  # anything else is a bug: it keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved {path}")
    return 0
