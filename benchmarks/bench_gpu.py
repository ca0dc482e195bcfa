"""Speed and memory of every memory preset and speed option, against the original's formulation.

Random-initialised full-size models (no weights needed): try-on with SD1.5 widths and pose
transfer with SDXL widths, at 768x1024, 30 steps, float16 on CUDA by default:

    python -m benchmarks.bench_gpu --json bench_gpu.json              # everything (H100: ~15 min)
    python -m benchmarks.bench_gpu --tasks tryon --configs literal,fast,low
    python -m benchmarks.bench_gpu --tiny --device cpu                # smoke test: tiny models, CPU
    python -m benchmarks.bench_gpu --device cpu --size 384x512 --steps 3 --dtypes float32,bfloat16 \\
        --configs fast,fast+accel                                     # bfloat16 against float32 on the CPU

A config is a memory preset (fast, balanced, low, low-fp8) with options joined by "+": accel
(reference acceleration), fuse_qkv, channels_last, compile; "literal" is the original's
formulation (benchmarks/literal.py: [x; r] through attn1 as queries, first n outputs kept, the
whole reference UNet run), everything on the device. Each config runs in its own process: one
warm-up generation of 2 steps (compiling, cuDNN's choices, the offloading hooks' prefetch order),
then one timed generation, its peak memory counted from a reset after the warm-up. Reported per
config: seconds per step (median over the steps after the first), seconds per image (VAE
included), peak memory allocated and reserved (CUDA; on the CPU the process's peak RSS in both),
leffa.memory's estimate of the peak, speed ratios against "literal" in the same run, the largest
difference of the image from the "fast" config's (with reference acceleration if the config has
it) in the same dtype, and from float32's when several dtypes run (0 for the presets that move
weights without changing them), and the warm-up's seconds ("first run", compiling included).
Prints a Markdown table; ``--json PATH`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TASKS = {"tryon": "stable-diffusion-inpainting", "pose": "stable-diffusion-xl-1.0-inpainting-0.1"}
OPTIONS = ("accel", "fuse_qkv", "channels_last", "compile")
DEFAULT_CONFIGS = ("literal", "fast", "fast+accel", "balanced", "balanced+accel", "low", "low+accel",
                   "low-fp8", "low-fp8+accel", "fast+fuse_qkv", "fast+channels_last", "fast+compile",
                   "fast+fuse_qkv+channels_last+compile", "fast+fuse_qkv+channels_last+compile+accel")
WARMUP_STEPS = 2


@dataclass(frozen=True)
class Config:
    """One benchmarked way of running: a memory preset (or the literal formulation) and options."""

    name: str
    memory: str
    literal: bool = False
    accel: bool = False
    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, name: str) -> Config:
        from runtime.presets import MemoryPreset

        if name == "literal":
            return cls(name, MemoryPreset.FAST.value, literal=True)
        memory, *options = name.split("+")
        if memory not in {p.value for p in MemoryPreset}:
            raise SystemExit(f"unknown memory preset {memory!r} in {name!r}; presets: "
                             f"{', '.join(p.value for p in MemoryPreset)}, or 'literal'")
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise SystemExit(f"unknown option(s) {sorted(unknown)} in {name!r}; options: {', '.join(OPTIONS)}")
        return cls(name, memory, **{o: True for o in options})


# -- one config, in a child process ------------------------------------------------------------------
def _inputs(w: int, h: int) -> dict:
    g = torch.Generator().manual_seed(0)
    img = lambda: torch.rand(1, 3, h, w, generator=g) * 2 - 1  # noqa: E731
    mask = torch.zeros(1, 1, h, w)
    mask[:, :, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    return dict(src_image=img(), ref_image=img(), mask=mask, densepose=img())


def _build(args, config: Config):
    from benchmarks.literal import LiteralPipeline
    from leffa import LeffaModel, LeffaPipeline
    from leffa.model import CONFIG_ROOT
    from runtime.presets import MemoryPreset
    from runtime.speed import SpeedOptions

    torch.manual_seed(0)
    base = CONFIG_ROOT / ("tiny" if args.tiny else TASKS[args.task])
    # random init where it runs (fast on a GPU), then placed as the config says
    model = LeffaModel.from_config_dir(base, device=args.device).eval()
    speed = SpeedOptions(config.fuse_qkv, config.channels_last, config.compile)
    model.place(args.device, getattr(torch, args.dtype), memory=MemoryPreset(config.memory), speed=speed)
    return model, (LiteralPipeline(model) if config.literal else LeffaPipeline(model))


def _generate(pipe, inputs: dict, steps: int, accel: bool, callback=None) -> torch.Tensor:
    return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                ref_acceleration=accel, output_type="pt", callback=callback).images


def run_config(args, config: Config) -> dict:
    from leffa.memory import estimate_memory
    from runtime.presets import MemoryPreset

    cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    model, pipe = _build(args, config)
    inputs = _inputs(*args.size)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _generate(pipe, inputs, WARMUP_STEPS, config.accel)
    sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps = []

    def tick(step, total):
        sync()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    images = _generate(pipe, inputs, args.steps, config.accel, tick)
    sync()
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:])] or [total]
    if cuda:
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    else:
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    estimate = estimate_memory(model, MemoryPreset(config.memory), args.device, model.dtype,
                               model.placement.dtype_of("vae"), args.size)
    torch.save(images, args.save)
    return {"s_per_step": statistics.median(steps), "s_per_image": total, "peak_allocated_gib": allocated / 2**30,
            "peak_reserved_gib": reserved / 2**30, "estimated_peak_gib": estimate.peak / 2**30,
            "build_s": build_s, "warmup_s": warmup_s, "finite": bool(torch.isfinite(images).all())}


# -- the parent: every config, the table ------------------------------------------------------------
def _child(args, task: str, dtype: str, config: Config, save: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_gpu", "--child", config.name, "--task", task,
           "--dtype", dtype, "--save", str(save), "--size", "x".join(map(str, args.size)),
           "--steps", str(args.steps), "--device", args.device] + (["--tiny"] if args.tiny else [])
    child = subprocess.run(cmd, capture_output=True, text=True)
    if child.returncode:
        return {"error": child.stderr.strip().splitlines()[-1] if child.stderr.strip() else f"exit {child.returncode}"}
    return json.loads(child.stdout.strip().splitlines()[-1])


def _compare(rows: list[dict], images: dict) -> None:
    """Ratios against "literal" and image differences against "fast" (with reference acceleration
    if the config has it), in each task and dtype, and against float32's."""
    for row in rows:
        if "error" in row:
            continue
        task, dtype = row["task"], row["dtype"]
        literal = next((r for r in rows if (r["task"], r["dtype"], r["config"]) == (task, dtype, "literal")
                        and "error" not in r), None)
        if literal is not None:
            row["speedup_per_step_vs_literal"] = literal["s_per_step"] / row["s_per_step"]
            row["speedup_per_image_vs_literal"] = literal["s_per_image"] / row["s_per_image"]
        mine = images[(task, dtype, row["config"])]
        fast = "fast+accel" if row["accel"] else "fast"
        for key, other in (("max_diff_vs_fast", (task, dtype, fast)),
                           ("max_diff_vs_float32_fast", (task, "float32", fast))):
            if other in images and other[1:] != (dtype, row["config"]) and not (key.endswith("float32_fast")
                                                                               and dtype == "float32"):
                row[key] = (mine - images[other]).abs().max().item()


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "–"


def markdown(rows: list[dict], device: str) -> str:
    memory = "peak GPU GiB alloc / reserved" if device.startswith("cuda") else "peak RSS GiB"
    lines = [f"| task | dtype | config | s/step | s/image | × literal (step / image) | {memory} | "
             "estimated GiB | max Δ vs fast | first run s |", "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['dtype']} | {r['config']} | failed: {r['error'][:80]} |" + " |" * 6)
            continue
        peak = (f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f}" if device.startswith("cuda")
                else f"{r['peak_allocated_gib']:.2f}")
        ratio = (f"{_cell(r, 'speedup_per_step_vs_literal', '.2f')}× / "
                 f"{_cell(r, 'speedup_per_image_vs_literal', '.2f')}×")
        diff = _cell(r, "max_diff_vs_fast", ".1e")
        if "max_diff_vs_float32_fast" in r:
            diff += f" (vs float32: {r['max_diff_vs_float32_fast']:.1e})"
        lines.append(f"| {r['task']} | {r['dtype']} | {r['config']} | {r['s_per_step']:.3f} | {r['s_per_image']:.2f} | "
                     f"{ratio} | {peak} | {r['estimated_peak_gib']:.2f} | {diff} | {r['warmup_s']:.1f} |")
    return "\n".join(lines)


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
           "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="tryon,pose", help="tryon (SD1.5 widths), pose (SDXL widths)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated (see above)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 768x1024; 48x64 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; 3 with --tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="comma-separated (default float16 on CUDA, float32 on the CPU)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models (leffa/configs/tiny, for both tasks): a quick check of the script")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one config, in a child process
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.size = tuple(int(v) for v in (args.size or ("48x64" if args.tiny else "768x1024")).split("x"))
    args.steps = args.steps or (3 if args.tiny else 30)
    if args.child:
        print(json.dumps(run_config(args, Config.parse(args.child))))
        return

    dtypes = (args.dtypes or ("float16" if args.device.startswith("cuda") else "float32")).split(",")
    configs = [Config.parse(c) for c in args.configs.split(",")]
    rows, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            if task not in TASKS:
                raise SystemExit(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
            for dtype in dtypes:
                for config in configs:
                    save = Path(tmp) / f"{task}-{dtype}-{config.name}.pt"
                    print(f"{task} {dtype} {config.name} ...", file=sys.stderr, flush=True)
                    row = {"task": task, "dtype": dtype, "config": config.name, **asdict(config),
                           **_child(args, task, dtype, config, save)}
                    rows.append(row)
                    if "error" not in row:
                        images[(task, dtype, config.name)] = torch.load(save, weights_only=True)
    _compare(rows, images)
    env = environment(args.device)
    models = "tiny models (both tasks)" if args.tiny else "full-size random-init models"
    title = (f"{models}, {args.size[0]}x{args.size[1]}, "
             f"{args.steps} steps, {env.get('gpu', env.get('cpu'))}, torch {env['torch']}")
    print(f"{title}\n\n{markdown(rows, args.device)}")
    if args.json:
        args.json.write_text(json.dumps({"title": title, "environment": env, "size": args.size,
                                         "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
