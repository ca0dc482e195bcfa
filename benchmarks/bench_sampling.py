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
from dataclasses import dataclass

import torch

from benchmarks.bench_samples import _inputs, _model
from engine.options import SAMPLING_PRESETS, SamplingPreset
from leffa import LeffaPipeline
from leffa.sampling import GuidanceInterval, Sampler, make_scheduler
from runtime.sampling import check_cache_interval

KINDS = ("guided whole", "guided shallow", "unguided whole", "unguided shallow")


@dataclass(frozen=True)
class Setting:
    name: str
    sampler: Sampler
    steps: int
    interval: tuple[float, float] = (0.0, 1.0)
    cache: int = 1


def settings() -> list[Setting]:
    rows = [Setting("Published (30 DDPM)", Sampler.DDPM, 30)]
    for preset in (SamplingPreset.FAST, SamplingPreset.PREVIEW):
        s = preset.setting
        rows.append(Setting(preset.value.capitalize(), s.sampler or Sampler.DDPM, s.steps, s.guidance_interval,
                            s.cache_interval))
    rows += [Setting("dpm++2m 12", Sampler.DPM_SOLVER, 12), Setting("unipc 8", Sampler.UNIPC, 8),
             Setting("ddpm 30, guide 0.07-0.81", Sampler.DDPM, 30, (0.07, 0.81)),
             Setting("ddpm 30, cache 3", Sampler.DDPM, 30, cache=3)]
    return rows


def step_kinds(setting: Setting, scheduler_config: dict, zero_snr: bool) -> list[str]:
    """The kind of each of the setting's steps, as ``LeffaPipeline.denoise`` and ``FeatureCache.run``
    run them: a shallow step reuses the last whole step's features when their rows fit (the same
    rows, or the conditional half of a guided step's)."""
    scheduler = make_scheduler(scheduler_config, setting.sampler, zero_snr)
    scheduler.set_timesteps(setting.steps)
    interval, cache = GuidanceInterval(*setting.interval), check_cache_interval(setting.cache)
    kinds, deep_rows = [], None
    for i, t in enumerate(scheduler.timesteps):
        rows = 2 if interval.guides(t, scheduler.config.num_train_timesteps) else 1
        whole = cache == 1 or i % cache == 0 or deep_rows not in (rows, 2 * rows)
        if whole:
            deep_rows = rows
        kinds.append(f"{'guided' if rows == 2 else 'unguided'} {'whole' if whole else 'shallow'}")
    return kinds


def measure_kinds(pipe: LeffaPipeline, inputs: dict, sync) -> tuple[dict[str, float], float]:
    """Seconds of each step kind, from one 4-step run, and the seconds outside the steps."""
    model = pipe.model
    scheduler = make_scheduler(model.scheduler_config, Sampler.DPM_SOLVER, model.is_sdxl)
    scheduler.set_timesteps(4)
    t = [int(v) for v in scheduler.timesteps]  # guide the first two steps only
    probe = Setting("probe", Sampler.DPM_SOLVER, 4, ((t[1] + t[2]) / 2 / scheduler.config.num_train_timesteps, 1.0), 2)
    expected = step_kinds(probe, model.scheduler_config, model.is_sdxl)
    assert expected == list(KINDS), expected
    stamps = []

    def callback(step: int, total: int) -> None:
        sync()
        stamps.append(time.perf_counter())

    first = []  # each step begins with its reference pass (no reference acceleration here)
    hook = model.reference_unet.register_forward_pre_hook(lambda m, a: None if first else first.append(time.perf_counter()))
    sync()
    start = time.perf_counter()
    try:
        pipe(**inputs, num_inference_steps=4, sampler=probe.sampler, guidance_interval=probe.interval,
             cache_interval=probe.cache, callback=callback, generator=torch.Generator().manual_seed(0))
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
    print(f"\n{args.variant} widths, random weights, {size[0]}x{size[1]}, guidance 2.5, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads; {'each setting run whole' if args.whole else 'composed from measured step costs'}"
          f"\n", flush=True)
    if not args.whole:
        kinds, outside = measure_kinds(pipe, inputs, sync)
        print("| step kind | seconds |\n|---|---|")
        for kind, seconds in kinds.items():
            print(f"| {kind} | {seconds:.2f} |")
        print(f"| encoding, preparing, decoding (once per image) | {outside:.2f} |\n", flush=True)
    print("| setting | UNet passes (shallow) | seconds per image | ratio to Published |\n|---|---|---|---|")
    published = None
    for s in settings():
        steps = step_kinds(s, model.scheduler_config, model.is_sdxl)
        passes = sum(2 if k.startswith("guided") else 1 for k in steps)
        shallow = sum((2 if k.startswith("guided") else 1) for k in steps if k.endswith("shallow"))
        if args.whole:
            sync()
            start = time.perf_counter()
            pipe(**inputs, num_inference_steps=s.steps, sampler=s.sampler, guidance_interval=s.interval,
                 cache_interval=s.cache, generator=torch.Generator().manual_seed(0))
            sync()
            seconds = time.perf_counter() - start
        else:
            seconds = outside + sum(kinds[k] for k in steps)
        published = published or seconds
        print(f"| {s.name} | {passes} ({shallow}) | {seconds:.2f} | {seconds / published:.3f} |", flush=True)
    print(f"\nPresets: {', '.join(f'{p.value} = {SAMPLING_PRESETS[p]}' for p in SamplingPreset)}")


if __name__ == "__main__":
    main()
