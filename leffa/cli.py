"""Command line: ``python -m leffa tryon ...`` and ``python -m leffa pose ...``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from leffa.checkpoint import CheckpointError
from leffa.hub import ENV_CHECKPOINT_DIR, MissingWeightsError, ModelKind, load_model
from leffa.model import LeffaModel
from leffa.pipeline import LeffaPipeline
from preprocess.images import BLACK, ImageLoadError, fit_to_canvas, load_image, save_image_atomic

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRYON_KINDS = {"viton_hd": ModelKind.VITON_HD, "dress_code": ModelKind.DRESS_CODE}


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

    t = sub.add_parser("tryon", parents=[common], help="virtual try-on")
    t.add_argument("--person", required=True, type=Path, help="photo of the person")
    t.add_argument("--garment", required=True, type=Path, help="photo of the garment")
    t.add_argument("--mask", required=True, type=Path, help="inpainting mask (white = replace)")
    t.add_argument("--densepose", required=True, type=Path, help="DensePose rendering of the person")
    t.add_argument("--model-type", choices=list(TRYON_KINDS), default="viton_hd",
                   help="viton_hd (recommended, upper body) or dress_code (upper, lower, dresses)")
    t.add_argument("--repaint", action="store_true", help="keep the person's pixels outside the mask")
    t.add_argument("--out", required=True, type=Path, help="output image (.png, .jpg, .webp)")

    p = sub.add_parser("pose", parents=[common], help="pose transfer")
    p.add_argument("--person", required=True, type=Path, help="the person whose appearance is kept")
    p.add_argument("--target", type=Path, default=None,
                   help="photo of a person in the target pose (only its DensePose is used)")
    p.add_argument("--densepose", required=True, type=Path,
                   help="DensePose IUV rendering of the target-pose person")
    p.add_argument("--out", required=True, type=Path, help="output image (.png, .jpg, .webp)")
    return parser


def _device_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is available")
    if args.dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, DTYPES[args.dtype]


def _load(args, kind: ModelKind, device, dtype) -> LeffaModel:
    if args.checkpoint is not None:
        base = args.base_config or kind.base
        return LeffaModel.from_pretrained(base, args.checkpoint, device=device, dtype=dtype)
    return load_model(kind, args.checkpoint_dir, revision=args.revision, device=device, dtype=dtype)


def _inputs(args) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image]:
    """(src, ref, mask, densepose) fitted to the canvas (spec §4 roles)."""
    size = args.size
    label = lambda path, name: fit_to_canvas(load_image(path, name=name), size, fill=BLACK,
                                             resample=Image.Resampling.NEAREST)
    densepose = label(args.densepose, "DensePose image")
    if args.command == "tryon":
        src = fit_to_canvas(load_image(args.person, name="person image"), size)
        ref = fit_to_canvas(load_image(args.garment, name="garment image"), size)
        mask = label(args.mask, "mask").convert("L")
    else:  # pose transfer: generate everything; the source's pixels are never seen
        ref = fit_to_canvas(load_image(args.person, name="person image"), size)
        src = (fit_to_canvas(load_image(args.target, name="target image"), size) if args.target
               else Image.new("RGB", size, (255, 255, 255)))
        mask = Image.new("L", size, 255)
    return src, ref, mask, densepose


def run(args) -> Path:
    kind = TRYON_KINDS[args.model_type] if args.command == "tryon" else ModelKind.POSE_TRANSFER
    if args.steps < 1:
        raise SystemExit("error: --steps must be at least 1")
    device, dtype = _device_dtype(args)
    src, ref, mask, densepose = _inputs(args)  # read inputs before the slow model load
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
    except (ImageLoadError, MissingWeightsError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved {path}")
    return 0
