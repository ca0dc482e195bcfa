"""Seconds per image of the sampling settings (issue 24) at full size, against the published 30 DDPM
steps in the same run.

    python -m benchmarks.bench_sampling                               # SD1.5 widths, 768x1024, this CPU
    python -m benchmarks.bench_sampling --variant sdxl                # the pose-transfer model's widths
    python -m benchmarks.bench_sampling --device cuda --whole         # on a GPU: every setting run whole

Random weights (``benchmarks.bench_samples``' models: the published architectures, no weights
needed). A denoising step costs one of four amounts: guided or not (2 rows through both UNets, or
1), whole UNet or its shallow path only (the feature cache). By default one pipeline run of 4 steps
measures each of the four once (DPM-Solver++ with guidance at its first two steps and the cache
interval 2: guided whole, guided shallow, unguided whole, unguided shallow), and the time before
and after the steps (encoding, decoding); each setting's seconds are then composed from its own
steps, replayed from its scheduler, guidance interval and cache interval as ``LeffaPipeline`` runs
them. A full-size CPU step takes minutes, so running 30 of them per setting is out of reach there;
``--whole`` times every setting's own run instead (where steps are cheap: a GPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_samples import _inputs, _model
from engine.options import SamplingPreset, SamplingSetting
from leffa import LeffaPipeline
from leffa.sampling import FeatureCache, GuidanceInterval, Sampler, make_scheduler

KINDS = ("guided whole", "guided shallow", "unguided whole", "unguided shallow")


def settings() -> list[tuple[str, SamplingSetting]]:
    """(label, setting): the presets, then single levers."""
    rows = [(f"{p.value.capitalize()} ({p.setting.name if p.setting.sampler else '30 DDPM'})", p.setting)
            for p in SamplingPreset]
    for s in (SamplingSetting(12, Sampler.DPM_SOLVER), SamplingSetting(8, Sampler.UNIPC),
              SamplingSetting(30, Sampler.DDPM, (0.07, 0.81)), SamplingSetting(30, Sampler.DDPM, cache_interval=3)):
        rows.append((s.name, s))
    return rows


def step_kinds(setting: SamplingSetting, scheduler_config: dict, zero_snr: bool) -> list[str]:
    """The kind of each of the setting's steps, as ``LeffaPipeline.denoise`` and ``FeatureCache.run``
    run them."""
    scheduler = make_scheduler(scheduler_config, setting.sampler or Sampler.DDPM, zero_snr)
    scheduler.set_timesteps(setting.steps)
    interval = GuidanceInterval(*setting.guidance_interval)
    kinds, kept_rows = [], None
    for i, t in enumerate(scheduler.timesteps):
        rows = 2 if interval.guides(t, scheduler.config.num_train_timesteps) else 1
        whole = not FeatureCache.reuses(i, setting.cache_interval, rows, kept_rows)
        if whole:
            kept_rows = rows
        kinds.append(f"{'guided' if rows == 2 else 'unguided'} {'whole' if whole else 'shallow'}")
    return kinds


def pipeline_kwargs(setting: SamplingSetting) -> dict:
    return {"num_inference_steps": setting.steps, "sampler": setting.sampler or Sampler.DDPM,
            "guidance_interval": GuidanceInterval(*setting.guidance_interval),
            "cache_interval": setting.cache_interval}


def measure_kinds(pipe: LeffaPipeline, inputs: dict, sync) -> tuple[dict[str, float], float]:
    """Seconds of each step kind, from one 4-step run, and the seconds outside the steps."""
    model = pipe.model
    scheduler = make_scheduler(model.scheduler_config, Sampler.DPM_SOLVER, model.is_sdxl)
    scheduler.set_timesteps(4)
    t = [int(v) for v in scheduler.timesteps]  # guide the first two steps only
    probe = SamplingSetting(4, Sampler.DPM_SOLVER, ((t[1] + t[2]) / 2 / scheduler.config.num_train_timesteps, 1.0), 2)
    expected = step_kinds(probe, model.scheduler_config, model.is_sdxl)
    assert expected == list(KINDS), expected
    stamps = []

    def callback(step: int, total: int) -> None:
        sync()
        stamps.append(time.perf_counter())

    first = []  # each step begins with its reference pass (no reference acceleration here)
    hook = model.reference_unet.register_forward_pre_hook(
        lambda m, a: None if first else first.append(time.perf_counter()))
    sync()
    start = time.perf_counter()
    try:
        pipe(**inputs, **pipeline_kwargs(probe), callback=callback, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    sync()
    end = time.perf_counter()
    edges = [first[0], *stamps]
    return dict(zip(KINDS, (b - a for a, b in zip(edges, edges[1:])))), (first[0] - start) + (end - stamps[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--size", default="768x1024", help="WxH (default 768x1024)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--whole", action="store_true", help="time every setting's own run (a GPU)")
    args = p.parse_args()
    args.model = "full"
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    size = tuple(int(v) for v in args.size.lower().split("x"))
    pipe = LeffaPipeline(_model(args))
    inputs = _inputs(size)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model = pipe.model
    how = "each setting run whole" if args.whole else "composed from measured step costs"
    print(f"\n{args.variant} widths, random weights, {size[0]}x{size[1]}, guidance 2.5, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads; {how}\n", flush=True)
    if not args.whole:
        kinds, outside = measure_kinds(pipe, inputs, sync)
        print("| step kind | seconds |\n|---|---|")
        for kind, seconds in kinds.items():
            print(f"| {kind} | {seconds:.2f} |")
        print(f"| encoding, preparing, decoding (once per image) | {outside:.2f} |\n", flush=True)
    print("| setting | UNet passes (shallow) | seconds per image | ratio to Published |\n|---|---|---|---|")
    published = None
    for label, s in settings():
        steps = step_kinds(s, model.scheduler_config, model.is_sdxl)
        passes = sum(2 if k.startswith("guided") else 1 for k in steps)
        shallow = sum((2 if k.startswith("guided") else 1) for k in steps if k.endswith("shallow"))
        if args.whole:
            sync()
            start = time.perf_counter()
            pipe(**inputs, **pipeline_kwargs(s), generator=torch.Generator().manual_seed(0))
            sync()
            seconds = time.perf_counter() - start
        else:
            seconds = outside + sum(kinds[k] for k in steps)
        published = published or seconds
        print(f"| {label} | {passes} ({shallow}) | {seconds:.2f} | {seconds / published:.3f} |", flush=True)


if __name__ == "__main__":
    main()
