"""Command line: ``leffa tryon ...`` and ``leffa pose ...`` generate; ``leffa infer ...`` generates a
dataset split (``accelerate launch -m leffa infer ...`` on several GPUs); ``leffa check`` says which
weights are in the checkpoint folder and ``leffa download {tryon,tryon-dc,pose,all}`` fetches
them (``python -m leffa`` is the same command).

This module parses the arguments with light imports only (``--help`` answers at once); the
work (``cli/run.py``: preprocessing, the model, the pipeline) is imported after that.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.options import SAMPLING_PRESET_NAMES, ResultView
from engine.registry import ENTRIES, MODEL_NAMES, Task, WeightSet, for_task
from preprocess.face_files import FACE_PACKS
from errors import OptionError, UserError
from preprocess.masks import GarmentType, TryOnModel
from runtime.presets import DTYPE_NAMES, MEMORY_PRESETS
from runtime.sampling import SAMPLERS
from training.layouts import DatasetLayout
from weightfiles.hub import ENV_CHECKPOINT_DIR


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 768x1024, got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 8, got {text}")
    return w, h


CHECK, DOWNLOAD = "check", "download"  # the weight subcommands
INFER = "infer"  # dataset-scale generation (training/inference.py)
EVAL = "eval"  # metrics of a generated split (evaluation/)
# the values of evaluation.lpips.LpipsNet and evaluation.ssim.SsimBorder (they import torch;
# tests/test_evaluation.py checks that they match)
LPIPS_NETS = ("squeeze", "alex")
SSIM_BORDERS = ("reflect", "valid")
LAYOUTS = tuple(layout.value for layout in DatasetLayout)
MODELS = MODEL_NAMES  # the registry's models (engine.registry)


def _fractions(text: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END fractions of the run, e.g. 0:0.5, got {text!r}") from None
    return start, end


def _focus_options(parser: argparse.ArgumentParser) -> None:
    f = parser.add_argument_group("attention focus (experimental, off by default; see README)")
    f.add_argument("--attention-focus", type=float, default=None, metavar="TAU",
                   help="divide the generative-over-reference attention logits by TAU: < 1 sharpens, "
                        "> 1 flattens, 1 changes nothing")
    f.add_argument("--focus-levels", type=int, default=1, metavar="N",
                   help="token-grid resolutions focused, from the finest (default 1: the finest only)")
    f.add_argument("--focus-steps", type=_fractions, default=(0.0, 1.0), metavar="START:END",
                   help="the part of the denoising run focused, as fractions (default 0:1, every step; "
                        "0:0.5 = the noisier half)")
    f.add_argument("--focus-own-keys", action="store_true",
                   help="divide the generative tokens' own key logits by TAU too")


def _folder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-dir", default=None,
                        help=f"folder laid out like the Hub repo (default ${ENV_CHECKPOINT_DIR} or ./ckpts)")
    parser.add_argument("--revision", default=None, help="Hub revision to download (default: main)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leffa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("generation (defaults are the original demo's)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 30 for Leffa, "
                                                         "20 for MCLD)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale (default: the model's, 2.5 for Leffa, 3.5 for MCLD)")
    g.add_argument("--guidance-rescale", type=float, default=None,
                   help="rescaled-CFG strength; default: the guidance scale, as the original; 0 = off")
    g.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    g.add_argument("--samples", type=int, default=1,
                   help="variations, 1 to 4: sample k uses seed + k; with more than one, each is written beside "
                        "--out with its seed in the name (out-seed42.png, ...)")
    g.add_argument("--ref-acceleration", action="store_true",
                   help="run the reference UNet once (faster, may slightly reduce quality)")
    q = common.add_argument_group("fast sampling (Leffa models; README \"Fast sampling\")")
    q.add_argument("--sampling", choices=SAMPLING_PRESET_NAMES, default=None,
                   help="a preset of the four options below: published (30 DDPM steps), fast, preview; the "
                        "options given beside it win")
    q.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: the model's own (DDPM for Leffa); the multistep samplers need far fewer steps")
    q.add_argument("--guidance-interval", type=_fractions, default=None, metavar="START:END",
                   help="guide only at noise levels t/1000 in START:END, one UNet pass instead of two elsewhere "
                        "(default 0:1, every step; 0.07:0.81 is Kynkäänniemi et al.'s interval)")
    q.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="run the whole UNet every N steps, only its outer blocks between (DeepCache; default 1 "
                        "= off); not with --memory low or low-fp8")
    g.add_argument("--size", type=_size, default=(768, 1024), metavar="WxH",
                   help="canvas the inputs are fitted into (default 768x1024, what the models were trained on)")
    m = common.add_argument_group("model")
    _folder_options(m)
    m.add_argument("--checkpoint", type=Path, default=None,
                   help="use this .pth/.safetensors file instead of the published one")
    m.add_argument("--base-config", type=Path, default=None,
                   help="base config folder ({unet,vae,scheduler}/) for --checkpoint (default: shipped)")
    m.add_argument("--tiny", action="store_true",
                   help="offline demo: a tiny untrained model and stand-in preprocessing (no downloads; the "
                        "picture is noise), as the app's --tiny")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    m.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="auto = float16 on CUDA, float32 on CPU")

    _focus_options(common)

    # memory and speed: for one generation (leffa infer keeps everything on its GPUs)
    placing = argparse.ArgumentParser(add_help=False)
    s = placing.add_argument_group("memory and speed")
    s.add_argument("--memory", choices=MEMORY_PRESETS, default="fast",
                   help="where the weights live while generating: fast (default) = all on the device; balanced "
                        "= only what the current phase runs (VAE, reference UNet, generative UNet); low = one "
                        "UNet block at a time, from CPU memory; low-fp8 = low with float8 weights (least "
                        "memory; images differ slightly)")
    s.add_argument("--fuse-qkv", action="store_true", help="fused q/k/v projections in self-attention")
    s.add_argument("--channels-last", action="store_true", help="channels-last convolutions")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the generative UNet (pays off over many steps; slow first run)")

    t = sub.add_parser(Task.TRYON.value, parents=[common, placing], help="virtual try-on")
    t.add_argument("--person", required=True, type=Path, help="photo of the person")
    t.add_argument("--garment", required=True, type=Path, action="append",
                   help="photo of the garment; twice for an outfit (an upper-body and a lower-body garment, put on "
                        "in the order given, each followed by its --garment-type)")
    t.add_argument("--mask", type=Path, default=None,
                   help="inpainting mask (white = replace); default: computed from parsing + pose")
    t.add_argument("--densepose", type=Path, default=None,
                   help="DensePose rendering of the person; default: computed")
    t.add_argument("--model-type", choices=[e.mask_variant.value for e in for_task(Task.TRYON)],
                   default=TryOnModel.VITON_HD.value,
                   help="viton_hd (recommended, upper body) or dress_code (upper, lower, dresses)")
    t.add_argument("--model", choices=[e.name for e in ENTRIES if e.task is Task.TRYON], default=None,
                   help="one try-on model for every garment (default: chosen by --model-type and the garment type); "
                        "concat_tryon, the CatVTON-style model, has no published weights: give your own --checkpoint "
                        "(python -m training) or --tiny")
    t.add_argument("--garment-type", choices=[g.value for g in GarmentType], action="append", default=None,
                   help="what the garment is (default upper_body); one per --garment in an outfit. A lower-body "
                        "garment or a dress goes to the DressCode model, whatever --model-type says")
    t.add_argument("--preprocess-garment", action="store_true",
                   help="the garment is a PNG cut-out with transparency: crop and centre it")
    t.add_argument("--keep-fixed-regions", action="store_true",
                   help="VITON-HD masks: never mask other clothes, shoes, hands (fixes full-body photos)")
    t.add_argument("--repaint", action="store_true", help="keep the person's pixels outside the mask")
    t.add_argument("--result", choices=[v.value for v in ResultView], default=ResultView.PHOTO.value,
                   help="photo (default): your photo at its own size and resolution, the garment blended in; framed: "
                        "the model's 768x1024 picture framed around the person; canvas: the model's picture of the whole "
                        "photo fitted onto 768x1024 (as the original app)")
    t.add_argument("--out", required=True, type=Path, help="output image (.png, .jpg, .webp)")

    p = sub.add_parser(Task.POSE.value, parents=[common, placing], help="pose transfer")
    p.add_argument("--model", choices=[e.name for e in for_task(Task.POSE)], default=for_task(Task.POSE)[0].name,
                   help="; ".join(f"{e.name}: {e.label}" for e in for_task(Task.POSE)) + " (default %(default)s)")
    p.add_argument("--person", required=True, type=Path, help="the person whose appearance is kept")
    p.add_argument("--target", type=Path, default=None,
                   help="photo of a person in the target pose (its DensePose is computed)")
    p.add_argument("--densepose", type=Path, default=None,
                   help="DensePose IUV rendering of the target-pose person, instead of --target")
    p.add_argument("--result", choices=[ResultView.FRAMED.value, ResultView.CANVAS.value],
                   default=ResultView.FRAMED.value,
                   help="framed (default): both photos framed around their people; canvas: each photo fitted whole "
                        "onto the model's picture (768x1024 for Leffa, as the original app; 352x512 for MCLD)")
    p.add_argument("--out", required=True, type=Path, help="output image (.png, .jpg, .webp)")

    _infer_parser(sub, common)
    _eval_parser(sub)

    c = sub.add_parser(CHECK, help="say which weights are in the checkpoint folder, per task")
    _folder_options(c)
    d = sub.add_parser(DOWNLOAD, help="fetch the weights a task needs (to prepare an offline machine)")
    d.add_argument("weights", choices=[w.value for w in WeightSet],
                   help="tryon (VITON-HD), tryon-dc (DressCode), pose (pose transfer) or all; each with "
                        "the preprocessing models it needs")
    _folder_options(d)
    return parser


def _infer_parser(sub, common: argparse.ArgumentParser) -> None:
    i = sub.add_parser(
        INFER, parents=[common], help="generate a dataset split for evaluation (one GPU or many)",
        description="Generate a VITON-HD, DressCode or DeepFashion split with a model, as papers do; "
                    "resumable; several GPUs/nodes with `accelerate launch -m leffa infer ...`. Images are "
                    "named {person}.png (try-on) or {source}___{target}.png (pose transfer); each sample's "
                    "seed comes from --seed and its name (see training/inference.py).")
    i.add_argument("--dataset", required=True, type=Path,
                   help="dataset folder (layouts: training/datasets.py)")
    i.add_argument("--layout", required=True, choices=LAYOUTS, help="the dataset's folder layout")
    i.add_argument("--split", default="test", help="split folder and {split}_pairs.txt (default test)")
    i.add_argument("--unpaired", action="store_true",
                   help="try-on: each person wears the garment its pairs file names (default: its own)")
    i.add_argument("--pairs", type=Path, default=None,
                   help="pairs file instead of {split}_pairs.txt (e.g. DressCode's test_pairs_paired.txt)")
    i.add_argument("--model", choices=MODELS, default=None,
                   help="published model (default: the layout's); with --checkpoint, whose architecture and base "
                        "config (concat_tryon, the CatVTON-style model: your own checkpoint from python -m training)")
    i.add_argument("--preprocess", action="store_true",
                   help="masks and DensePose from our preprocessing of the photos (the demo pipeline) "
                        "instead of the dataset's files")
    i.add_argument("--repaint", action="store_true", help="keep the person's pixels outside the mask")
    i.add_argument("--batch-size", type=int, default=1, help="samples per pipeline call (default 1)")
    i.add_argument("--num-workers", type=int, default=2, help="data-loading workers per process (default 2)")
    i.add_argument("--limit", type=int, default=None, help="only the first N samples (a quick check)")
    i.add_argument("--out", required=True, type=Path,
                   help="output folder: images, and leffa_infer.json (settings and summary)")


def _eval_parser(sub) -> None:
    e = sub.add_parser(
        EVAL, help="score generated images against the real ones: FID, KID (and SSIM, LPIPS when paired)",
        description="The metrics of the Leffa authors' evaluation script (franciszzj/VtonEval), computed the "
                    "same way in plain PyTorch: PyTorch-FID, Clean-FID, Clean-KID (x1000) and, with --paired, "
                    "SSIM and LPIPS. Generated images pair with the real image of the same name.")
    e.add_argument("--real", required=True, type=Path, help="folder of real images (e.g. the test split's photos)")
    e.add_argument("--fake", required=True, type=Path, help="folder of generated images (leffa infer --out)")
    e.add_argument("--paired", action="store_true", help="each generated image has its ground truth: add SSIM, LPIPS")
    e.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    e.add_argument("--weights-dir", type=Path, default=None,
                   help="folder with the metric networks' files ($LEFFA_METRICS_DIR, default torch's hub cache)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    e.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    e.add_argument("--lpips-net", choices=LPIPS_NETS, default=LPIPS_NETS[0],
                   help="squeeze (the authors', default) or alex (lpips' default)")
    e.add_argument("--ssim-border", choices=SSIM_BORDERS, default=SSIM_BORDERS[0],
                   help="reflect (torchmetrics >= 1.4.2, default) or valid (torchmetrics <= 1.4.1)")
    e.add_argument("--seed", type=int, default=0, help="seed of KID's random subsets (default 0)")
    e.add_argument("--faces", choices=sorted(FACE_PACKS), default=None,
                   help="with --paired, also the face similarity of each generated image to its ground truth and "
                        "to its source (pose transfer, MCLD's metric: ArcFace cosine of the largest faces): buffalo_s "
                        "as MCLD's evaluate.py scores, antelopev2 as its data preparation embeds; the face models "
                        "are fetched into --checkpoint-dir")
    _folder_options(e)


def _eval_command(args) -> int:
    from evaluation.evaluate import EvalConfig, evaluate
    from evaluation.lpips import LpipsNet
    from evaluation.ssim import SsimBorder
    from runtime.devices import resolve_device

    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()
                                  or not os.access(args.json.parent, os.W_OK)):
        raise OptionError(f"--json {args.json}: give a file name in an existing folder you may write to")
    if args.batch_size < 1:
        raise OptionError("--batch-size must be at least 1")
    device = str(resolve_device(args.device))
    config = EvalConfig(batch_size=args.batch_size, lpips_net=LpipsNet(args.lpips_net),
                        ssim_border=SsimBorder(args.ssim_border), seed=args.seed)
    face_embed = None
    if args.faces is not None:
        from preprocess.face import FaceEmbedder
        from weightfiles.hub import resolve_files

        pack = FACE_PACKS[args.faces]
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        face_embed = FaceEmbedder.from_files(*resolve_files(pack.files, args.checkpoint_dir, args.revision),
                                             providers=providers, det_size=pack.det_size)
    result = evaluate(args.real, args.fake, args.paired, config, weights_dir=args.weights_dir, device=device,
                      face_embed=face_embed)
    print(result.to_markdown())
    if args.json is not None:
        result.save_json(args.json)
    return 0


def _infer_command(args) -> int:
    from cli.run import attention_focus
    from engine.options import OptionCheck
    from training.inference import InferenceConfig, InputSource, infer

    with OptionCheck() as check:
        focus = attention_focus(args, check)

    infer(InferenceConfig(
        data_root=args.dataset, layout=args.layout, out_dir=args.out, split=args.split,
        paired=not args.unpaired, pairs_file=args.pairs, model=args.model, checkpoint=args.checkpoint,
        base_config=args.base_config, checkpoint_dir=args.checkpoint_dir, revision=args.revision, tiny=args.tiny,
        inputs=InputSource.PREPROCESS if args.preprocess else InputSource.DATASET, steps=args.steps,
        guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
        sampling=args.sampling, sampler=args.sampler, guidance_interval=args.guidance_interval,
        cache_interval=args.cache_interval,
        ref_acceleration=args.ref_acceleration, repaint=args.repaint, attention_focus=focus,
        seed=args.seed, size=args.size,
        batch_size=args.batch_size, num_workers=args.num_workers, limit=args.limit, device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype))
    return 0


def _weights_command(args) -> int:
    from engine import weights

    if args.command == CHECK:
        print(weights.presence_report(args.checkpoint_dir))
        return 0
    paths = weights.download(WeightSet(args.weights), args.checkpoint_dir, args.revision)
    print("\n".join(["have:", *(f"  {p}" for p in paths)]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in (CHECK, DOWNLOAD):
            return _weights_command(args)
        if args.command == INFER:
            return _infer_command(args)
        if args.command == EVAL:
            return _eval_command(args)
        from cli.run import run  # torch, diffusers and the models: only once the arguments are fine

        paths = run(args)
    except UserError as e:  # anything else is a bug: it keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"saved {path}")
    return 0
