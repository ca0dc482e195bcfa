"""Speed and memory of every memory preset and speed option, against the original's formulation.

Random-initialised full-size models (no weights needed), float16 on CUDA by default: Leffa's
try-on with SD1.5 widths ("tryon") and pose transfer with SDXL widths ("pose"), at 768x1024, 30
steps; MCLD's pose transfer at the published architecture ("mcld": ``mcld.configs.published_config``,
SD1.5-sized), at its only size, 512x512, 20 steps, guidance 3.5 (its defaults):

    python -m benchmarks.bench_gpu --json bench_gpu.json              # everything (H100: ~15 min)
    python -m benchmarks.bench_gpu --tasks tryon --configs literal,fast,low
    python -m benchmarks.bench_gpu --tasks mcld --configs fast,balanced,low,low-fp8
    python -m benchmarks.bench_gpu --tiny --device cpu                # smoke test: tiny models, CPU
    python -m benchmarks.bench_gpu --device cpu --size 384x512 --steps 3 --dtypes float32,bfloat16 \\
        --configs fast,fast+accel                                     # bfloat16 against float32 on the CPU
    python -m benchmarks.bench_gpu --device cpu --tasks mcld,pose --configs fast --dtypes bfloat16 \\
        --steps 2 --warmup-steps 1 --init-in-dtype                    # MCLD against Leffa's pose, 24 GB RAM

A config is a memory preset (fast, balanced, low, low-fp8) with options joined by "+": accel
(reference acceleration), fuse_qkv, channels_last, compile; "literal" is the original's
formulation (benchmarks/literal.py: [x; r] through attn1 as queries, first n outputs kept, the
whole reference UNet run), everything on the device. MCLD takes the memory presets only (its
``MCLDModel.place`` has no speed options, its pipeline no reference acceleration, and there is no
literal formulation of it here): a config with "literal" or an option is skipped for "mcld", with
a note in its row. Each config runs in its own process: one warm-up generation of
``--warmup-steps`` steps (default 2: compiling, cuDNN's choices, the offloading hooks' prefetch
order), then one timed generation, its peak memory counted from a reset after the warm-up.
Reported per config: seconds per step (median over the steps after the first; MCLD's reference
pass runs once, before the first step; Leffa's runs in every step unless "accel"), seconds per
image (VAE included), peak memory allocated and reserved (CUDA; on the CPU the peak RSS in both,
from a reset after the warm-up where Linux allows it, /proc/self/clear_refs, else the whole
process's, its build included; the whole process's is in the JSON too), the estimate of the peak
(``leffa.memory.estimate_memory``, ``mcld.memory.estimate_memory``), speed ratios against
"literal" in the same run, the largest difference of the image from the "fast" config's (with
reference acceleration if the config has it) in the same task and dtype, and from float32's when
several dtypes run (0 for the presets that move weights without changing them), and the warm-up's
seconds ("first run", compiling included). Prints a Markdown table; ``--json PATH`` writes every
figure.

The random weights are drawn in float32 and cast to the run's dtype (the same weights, rounded, in
every dtype), so building needs the float32 model in memory: about 21 GB for the SDXL-sized pose
model. ``--init-in-dtype`` draws them in the run's dtype instead (building needs only the model in
that dtype; the speed and the memory while generating are the same, but the images then differ
from float32's by more than rounding, so that comparison is left out).
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LEFFA_TASKS = {"tryon": "stable-diffusion-inpainting", "pose": "stable-diffusion-xl-1.0-inpainting-0.1"}
TASKS = (*LEFFA_TASKS, "mcld")
MCLD_STEPS, MCLD_GUIDANCE = 20, 3.5  # MCLD's defaults (engine.options.MCLD_LIMITS, MCLDPipeline)
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

    def leffa_only(self) -> list[str]:
        """What in this config only Leffa has: "literal" and the options."""
        return (["literal"] if self.literal else []) + [o for o in OPTIONS if getattr(self, o)]


def task_size(args, task: str) -> tuple[int, int]:
    """(width, height): ``--size`` for Leffa's tasks; MCLD's model size (512, tiny 64) for "mcld"."""
    if task != "mcld":
        return args.size
    from mcld.configs import published_config, tiny_config

    side = (tiny_config() if args.tiny else published_config()).image_size
    return side, side


def task_steps(args, task: str) -> int:
    return args.steps or (3 if args.tiny else MCLD_STEPS if task == "mcld" else 30)


# -- one config, in a child process ------------------------------------------------------------------
def _inputs(task: str, w: int, h: int) -> dict:
    g = torch.Generator().manual_seed(0)
    if task == "mcld":  # pictures in [0, 1] (the pose too: MCLD's DensePose channels / 255), a face embedding
        source, texture, pose = (torch.rand(1, 3, h, w, generator=g) for _ in range(3))
        return {"source": source, "texture": texture, "pose": pose, "face_embedding": torch.randn(1, 512, generator=g)}
    img = lambda: torch.rand(1, 3, h, w, generator=g) * 2 - 1  # noqa: E731
    mask = torch.zeros(1, 1, h, w)
    mask[:, :, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    return dict(src_image=img(), ref_image=img(), mask=mask, densepose=img())


@contextmanager
def _init_dtype(dtype: torch.dtype | None):
    """Parameters created inside are in ``dtype`` (None: as they are, float32)."""
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build(args, config: Config):
    if args.task == "mcld":
        return _build_mcld(args, config)
    return _build_leffa(args, config)


def _build_mcld(args, config: Config):
    from mcld.configs import published_config
    from mcld.hub import tiny_model
    from mcld.model import MCLDModel
    from mcld.pipeline import MCLDPipeline
    from runtime.presets import MemoryPreset

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with _init_dtype(dtype if args.init_in_dtype else None):
        # random init where it runs (fast on a GPU; tiny: on the CPU, as mcld.hub builds it)
        model = tiny_model(0) if args.tiny else MCLDModel.from_config(published_config(), device=args.device)
    model.eval().place(args.device, dtype, memory=MemoryPreset(config.memory))
    return model, MCLDPipeline(model)


def _build_leffa(args, config: Config):
    from benchmarks.literal import LiteralPipeline
    from leffa import LeffaModel, LeffaPipeline
    from leffa.model import CONFIG_ROOT
    from runtime.presets import MemoryPreset
    from runtime.speed import SpeedOptions

    torch.manual_seed(0)
    base = CONFIG_ROOT / ("tiny" if args.tiny else LEFFA_TASKS[args.task])
    # random init where it runs (fast on a GPU), then placed as the config says
    with _init_dtype(getattr(torch, args.dtype) if args.init_in_dtype else None):
        model = LeffaModel.from_config_dir(base, device=args.device).eval()
    speed = SpeedOptions(config.fuse_qkv, config.channels_last, config.compile)
    model.place(args.device, getattr(torch, args.dtype), memory=MemoryPreset(config.memory), speed=speed)
    return model, (LiteralPipeline(model) if config.literal else LeffaPipeline(model))


def _generate(task: str, pipe, inputs: dict, steps: int, accel: bool, callback=None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if task == "mcld":
        return pipe(**inputs, num_inference_steps=steps, guidance_scale=MCLD_GUIDANCE, generator=generator,
                    callback=callback).tensors
    return pipe(**inputs, num_inference_steps=steps, generator=generator,
                ref_acceleration=accel, output_type="pt", callback=callback).images


def _estimate(args, model, config: Config):
    from runtime.presets import MemoryPreset

    memory = MemoryPreset(config.memory)
    if args.task == "mcld":
        from mcld.memory import estimate_memory

        return estimate_memory(model, memory, args.device, model.dtype, args.size[0])
    from leffa.memory import estimate_memory

    return estimate_memory(model, memory, args.device, model.dtype, model.placement.dtype_of("vae"), args.size)


CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def _reset_peak_rss() -> bool:
    """Linux: the peak RSS (VmHWM) from now on; False where it cannot be reset."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """Bytes: VmHWM (Linux) or, failing that, the process's peak RSS."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _process_peak_rss()


def _process_peak_rss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_config(args, config: Config) -> dict:
    cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    model, pipe = _build(args, config)
    inputs = _inputs(args.task, *args.size)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _generate(args.task, pipe, inputs, args.warmup_steps, config.accel)
    sync()
    warmup_s = time.perf_counter() - t0
    rss_reset = False
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        rss_reset = _reset_peak_rss()
    stamps = []

    def tick(step, total):
        sync()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    images = _generate(args.task, pipe, inputs, args.steps, config.accel, tick)
    sync()
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:])] or [total]
    extra = {}
    if cuda:
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    else:
        allocated = reserved = _peak_rss() if rss_reset else _process_peak_rss()
        extra = {"peak_rss_from_reset": rss_reset, "peak_rss_process_gib": _process_peak_rss() / 2**30}
    estimate = _estimate(args, model, config)
    torch.save(images, args.save)
    return {"s_per_step": statistics.median(steps), "s_per_image": total, "peak_allocated_gib": allocated / 2**30,
            "peak_reserved_gib": reserved / 2**30, "estimated_peak_gib": estimate.peak / 2**30,
            "build_s": build_s, "warmup_s": warmup_s, "finite": bool(torch.isfinite(images).all()), **extra}


# -- the parent: every config, the table ------------------------------------------------------------
def _child(args, task: str, dtype: str, config: Config, save: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_gpu", "--child", config.name, "--task", task,
           "--dtype", dtype, "--save", str(save), "--size", "x".join(map(str, task_size(args, task))),
           "--steps", str(task_steps(args, task)), "--warmup-steps", str(args.warmup_steps),
           "--device", args.device] + (["--tiny"] if args.tiny else []) + (
               ["--init-in-dtype"] if args.init_in_dtype else [])
    child = subprocess.run(cmd, capture_output=True, text=True)
    if child.returncode:
        return {"error": child.stderr.strip().splitlines()[-1] if child.stderr.strip() else f"exit {child.returncode}"}
    return json.loads(child.stdout.strip().splitlines()[-1])


def _compare(rows: list[dict], images: dict) -> None:
    """Ratios against "literal" and image differences against "fast" (with reference acceleration
    if the config has it), in each task and dtype, and against float32's."""
    for row in rows:
        if "error" in row or "skipped" in row:
            continue
        task, dtype = row["task"], row["dtype"]
        literal = next((r for r in rows if (r["task"], r["dtype"], r["config"]) == (task, dtype, "literal")
                        and "error" not in r and "skipped" not in r), None)
        if literal is not None:
            row["speedup_per_step_vs_literal"] = literal["s_per_step"] / row["s_per_step"]
            row["speedup_per_image_vs_literal"] = literal["s_per_image"] / row["s_per_image"]
        mine = images[(task, dtype, row["config"])]
        fast = "fast+accel" if row["accel"] else "fast"
        for key, other in (("max_diff_vs_fast", (task, dtype, fast)),
                           ("max_diff_vs_float32_fast", (task, "float32", fast))):
            if key.endswith("float32_fast") and row.get("init_in_dtype"):
                continue  # other weights, not only other rounding
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
        if "skipped" in r:
            lines.append(f"| {r['task']} | {r['dtype']} | {r['config']} | skipped: {r['skipped']} |" + " |" * 6)
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
    p.add_argument("--tasks", default="tryon,pose,mcld",
                   help="tryon (Leffa, SD1.5 widths), pose (Leffa, SDXL widths), mcld (MCLD, SD1.5 widths)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated (see above)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT of Leffa's tasks (default 768x1024; 48x64 with "
                   "--tiny); mcld runs at its model's size (512x512; 64x64 with --tiny)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default 30, mcld 20; 3 with --tiny)")
    p.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS,
                   help=f"steps of the warm-up generation (default {WARMUP_STEPS})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="comma-separated (default float16 on CUDA, float32 on the CPU)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models (leffa/configs/tiny for Leffa's tasks, mcld.hub.tiny_model for mcld): "
                   "a quick check of the script")
    p.add_argument("--init-in-dtype", action="store_true",
                   help="draw the random weights in the run's dtype, not float32 (less memory while building)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one config, in a child process
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.size = tuple(int(v) for v in (args.size or ("48x64" if args.tiny else "768x1024")).split("x"))
    if args.warmup_steps < 1:
        raise SystemExit("--warmup-steps must be >= 1")
    if args.child:
        args.steps = task_steps(args, args.task)
        print(json.dumps(run_config(args, Config.parse(args.child))))
        return

    dtypes = (args.dtypes or ("float16" if args.device.startswith("cuda") else "float32")).split(",")
    configs = [Config.parse(c) for c in args.configs.split(",")]
    rows, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = args.tasks.split(",")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise SystemExit(f"unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
        for task in tasks:
            for dtype in dtypes:
                for config in configs:
                    row = {"task": task, "dtype": dtype, "config": config.name, **asdict(config),
                           "size": task_size(args, task), "steps": task_steps(args, task),
                           "init_in_dtype": args.init_in_dtype}
                    if task == "mcld" and config.leffa_only():
                        row["skipped"] = f"Leffa-only ({', '.join(config.leffa_only())})"
                        rows.append(row)
                        continue
                    save = Path(tmp) / f"{task}-{dtype}-{config.name}.pt"
                    print(f"{task} {dtype} {config.name} ...", file=sys.stderr, flush=True)
                    row.update(_child(args, task, dtype, config, save))
                    rows.append(row)
                    if "error" not in row:
                        images[(task, dtype, config.name)] = torch.load(save, weights_only=True)
    _compare(rows, images)
    env = environment(args.device)
    models = "tiny models" if args.tiny else "full-size random-init models"
    if args.init_in_dtype:
        models += " (weights drawn in the run's dtype)"
    shapes = "; ".join(f"{t} {'x'.join(map(str, task_size(args, t)))}, {task_steps(args, t)} steps" for t in tasks)
    title = (f"{models}: {shapes}; warm-up {args.warmup_steps} steps, "
             f"{env.get('gpu', env.get('cpu'))}, torch {env['torch']}")
    print(f"{title}\n\n{markdown(rows, args.device)}")
    if args.json:
        args.json.write_text(json.dumps({"title": title, "environment": env, "size": args.size,
                                         "steps": {t: task_steps(args, t) for t in tasks},
                                         "warmup_steps": args.warmup_steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
