"""Speed and peak memory of the Leffa pipeline: literal formulation vs ours vs ours + ref acceleration.

Random-initialised full-size model (SD1.5 widths by default), so no weights are needed:

    python -m benchmarks.bench_pipeline                      # CPU float32, 384x512, 3 steps
    python -m benchmarks.bench_pipeline --size 768x1024 --steps 10 --device cuda --dtype float16

(a) "literal": the original's formulation, [x; r] through attn1 as queries, keys and values,
    first n outputs kept (benchmarks/literal.py), and the whole reference UNet run;
(b) "ours": queries from x only, keys/values from [x; r]; the reference pass stops after the
    last reference feature;
(c) "ours + ref_acceleration": the reference UNet run once, its K/V projections cached.
Each mode runs in a fresh process so its peak memory is its own. Prints seconds per step
(median and minimum over the steps after the first: the minimum is the least disturbed by
anything else running), total seconds, peak memory and the max |a − b| of the images.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("literal", "ours", "accel")
LABELS = {"literal": "(a) literal concat-then-slice", "ours": "(b) ours",
          "accel": "(c) ours + ref_acceleration"}


def run_mode(args) -> dict:
    from benchmarks.literal import LiteralPipeline
    from leffa import LeffaModel, LeffaPipeline
    from leffa.model import BaseModel

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = BaseModel.SDXL_INPAINTING if args.variant == "sdxl" else BaseModel.SD15_INPAINTING
    model = LeffaModel.from_config_dir(base, device=device).eval().place(device, dtype)  # built where it runs
    # the original: literal attention and the whole reference UNet
    pipe = LiteralPipeline(model) if args.mode == "literal" else LeffaPipeline(model)
    w, h = args.size
    g = torch.Generator().manual_seed(0)
    img = lambda: torch.rand(1, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, h, w)
    mask[:, :, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    inputs = dict(src_image=img(), ref_image=img(), mask=mask, densepose=img())

    stamps = []
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def tick(step, total):
        sync()
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    out = pipe(**inputs, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
               ref_acceleration=args.mode == "accel", output_type="pt", callback=tick)
    sync()
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    torch.save(out.images, args.save)
    return {"mode": args.mode, "s_per_step": statistics.median(steps) if steps else total,
            "min_s_per_step": min(steps) if steps else total,
            "total_s": total, "peak_gib": peak / 2**30, "device": str(device),
            "finite": bool(torch.isfinite(out.images).all())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="384x512", help="WIDTHxHEIGHT (default 384x512)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variant", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if args.mode:
        args.size = tuple(int(v) for v in args.size.split("x"))
        print(json.dumps(run_mode(args)))
        return

    results, images = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            save = Path(tmp) / f"{mode}.pt"
            cmd = [sys.executable, "-m", "benchmarks.bench_pipeline", "--mode", mode, "--save", str(save),
                   "--size", args.size, "--steps", str(args.steps), "--variant", args.variant,
                   "--device", args.device, "--dtype", args.dtype]
            child = subprocess.run(cmd, capture_output=True, text=True)
            if child.returncode:
                sys.exit(f"{mode} failed:\n{child.stderr[-3000:]}")
            results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
            images[mode] = torch.load(save, weights_only=True)

    print(f"{args.variant} random init, {args.size}, {args.steps} steps, {args.device} {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'mode':32s} {'s/step':>8s} {'min s/step':>10s} {'total s':>8s} {'peak GiB':>9s} finite")
    for mode, r in results.items():
        print(f"{LABELS[mode]:32s} {r['s_per_step']:8.3f} {r['min_s_per_step']:10.3f} {r['total_s']:8.2f} "
              f"{r['peak_gib']:9.2f} {r['finite']}")
    ratio = lambda a, b, key: results[a][key] / results[b][key]
    if "literal" in results and "ours" in results:
        diff = (images["literal"] - images["ours"]).abs().max().item()
        print(f"speed-up (b) vs (a): {ratio('literal', 'ours', 's_per_step'):.2f}x per step (median), "
              f"{ratio('literal', 'ours', 'min_s_per_step'):.2f}x (min); max |a - b| of the images: {diff:.2e}")
    if "ours" in results and "accel" in results:
        print(f"speed-up (c) vs (b): {ratio('ours', 'accel', 's_per_step'):.2f}x per step (median), "
              f"{ratio('ours', 'accel', 'min_s_per_step'):.2f}x (min), {ratio('ours', 'accel', 'total_s'):.2f}x in total")


if __name__ == "__main__":
    main()
