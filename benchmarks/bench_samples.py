"""Seconds per image for several samples of one request (issue 23's variations): one sample, then
N samples in one batch (sample k with seed s + k, as ``Engine.generate`` runs them when memory
allows) against the same N run one by one, in the same process and run.

    python -m benchmarks.bench_samples --model tiny                       # the app's --tiny model, 768x1024
    python -m benchmarks.bench_samples --model full --steps 2             # random-initialised SD1.5 widths
    python -m benchmarks.bench_samples --model full --device cuda --steps 30

``full`` is the published try-on models' architecture (SD1.5 widths) with random weights, so no
weights are needed; ``--variant sdxl`` gives the pose-transfer model's widths. Prints a Markdown
table: seconds per image, the ratio batched / one by one, and how far each batched sample is from
its single-seed run (max |difference| in 8-bit levels; batched and single runs differ only by
float rounding).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _model(args):
    from leffa import LeffaModel
    from leffa.hub import tiny_model
    from leffa.model import BaseModel
    from leffa.weights import ModelKind

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model == "tiny":
        return tiny_model(ModelKind.VITON_HD).place(device, dtype)
    torch.manual_seed(0)
    base = BaseModel.SDXL_INPAINTING if args.variant == "sdxl" else BaseModel.SD15_INPAINTING
    return LeffaModel.from_config_dir(base, device=device).eval().place(device, dtype)


def _inputs(size: tuple[int, int]) -> dict[str, torch.Tensor]:
    w, h = size
    g = torch.Generator().manual_seed(0)
    img = lambda: torch.rand(1, 3, h, w, generator=g) * 2 - 1  # noqa: E731
    mask = torch.zeros(1, 1, h, w)
    mask[:, :, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    return {"src_image": img(), "ref_image": img(), "mask": mask, "densepose": img()}


def main() -> None:
    from leffa import LeffaPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "full"), default="tiny")
    p.add_argument("--variant", choices=("sd15", "sdxl"), default="sd15", help="full model's widths")
    p.add_argument("--size", default="768x1024", help="WxH (default 768x1024)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: tiny 10, full 2)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="one untimed sample first (default: on for tiny and on CUDA)")
    args = p.parse_args()
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    steps = args.steps or (10 if args.model == "tiny" else 2)
    warmup = args.warmup if args.warmup is not None else (args.model == "tiny" or args.device.startswith("cuda"))
    size = tuple(int(v) for v in args.size.lower().split("x"))
    n = args.samples

    pipe = LeffaPipeline(_model(args))
    inputs = _inputs(size)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(seeds: list[int]) -> tuple[float, list[np.ndarray]]:
        batch = {k: v.repeat(len(seeds), 1, 1, 1) for k, v in inputs.items()}
        sync()
        start = time.perf_counter()
        out = pipe(**batch, num_inference_steps=steps, guidance_scale=2.5,
                   generator=[torch.Generator().manual_seed(s) for s in seeds])
        sync()
        return time.perf_counter() - start, [np.asarray(im, dtype=np.int16) for im in out.images]

    print(f"\n{args.model} model ({args.variant if args.model == 'full' else 'tiny config'}), "
          f"{size[0]}x{size[1]}, {steps} steps, guidance 2.5, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, warm-up {'on' if warmup else 'off'}\n")
    print("| request | seconds | seconds per image |")
    print("|---|---|---|", flush=True)  # each row as soon as it is measured: a full-size CPU run takes long
    if warmup:
        run([args.seed])
    seeds = [args.seed + k for k in range(n)]
    alone = []
    for s in seeds:  # sample k alone, with seed s + k (the first: the 1-sample request)
        alone.append(run([s]))
        if len(alone) == 1:
            print(f"| 1 sample | {alone[0][0]:.2f} | {alone[0][0]:.2f} |", flush=True)
    t_alone = sum(t for t, _ in alone)
    print(f"| {n} samples, one by one | {t_alone:.2f} | {t_alone / n:.2f} |", flush=True)
    t_batch, batched = run(seeds)
    print(f"| {n} samples, one batch | {t_batch:.2f} | {t_batch / n:.2f} |")
    diffs = [int(np.abs(b - a[1][0]).max()) for b, a in zip(batched, alone)]
    distinct = len({im.tobytes() for im in batched}) == n
    print(f"\nbatched / one by one: {t_batch / t_alone:.2f}x the time ({t_alone / t_batch:.2f}x faster); "
          f"samples distinct: {distinct}; max |batched − single-seed run| per sample (8-bit levels): {diffs}")


if __name__ == "__main__":
    main()
