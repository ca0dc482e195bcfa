"""Training-free attention focus (issue 15): does sharpening the attention over the reference
at inference do what the Leffa loss does in training?

    python -m experiments.attention_focus                 # seeds 0 1 2, the figures in the docs
    python -m experiments.attention_focus --cache /tmp/toy-models   # keep the trained models

On the toy of ``experiments/toy_flow.py`` (its data, model, training and metrics, imported),
each seed's model is trained twice from one initialisation: with the diffusion loss only (the
model the focus is meant for) and with the Leffa loss too (the reference). Then, on the held-out
samples, every ``AttentionFocus`` of a grid (temperature × resolution levels × denoising steps,
and the generative tokens' own keys) is applied at inference and the attention and the
denoising are measured at the timesteps t = 100, 300, 500, 700, 900 (fixed noise, as the toy's
diffusion loss): the end-point error of the attention flow, the attention's share near the true
source (both over the three 16×12 layers, from the attention the model uses, so the focused
one) and the diffusion loss, each the mean over the five timesteps. The timestep t is step
999 − t of a 1000-step denoising run, so the steps ``(0, 0.5)`` ("early") are the noisier half,
t ≥ 500 (here 500, 700, 900), and ``(0.5, 1)`` ("late") the rest (100, 300). A focus that does
not cover t leaves its forward pass as it is without one (the processors take the unfocused
path), so that pass is shared, not repeated; and the reference UNet's features, which no focus
changes, are computed once per timestep.

Writes a compact JSON (per seed and over the seeds: each focus's means over the timesteps; and,
over the seeds, the unfocused metrics per timestep) and a figure of attention heatmaps and
attention-warped garments without and with the focus (t = 300, seed 0, τ = 0.1, 16×12 layers),
reduced to a 256-colour PNG.

Settings against the toy's (``docs/toy/toy_results.json``), so that the whole run (3 seeds × 2
trainings × 23 foci) takes about 10 minutes on 2 CPU cores: the models are trained 300 steps
(the toy: 400; the rest as the toy: 256 training samples, batch 8, lr 1e-3, λ = 1, the same 32
held-out samples), two at a time in worker processes (``--workers``); the sweep measures 5
timesteps (the toy's diffusion loss: 10, t = 50, 150, ..., 950; its attention: t = 300 only);
and torch runs on one thread per process (``--threads``). Training takes most of the time. One
thread is barely slower than two on this tiny model, and far faster when another process shares
the cores: with two threads each of the thousands of small operators waits at a barrier for a
descheduled thread, which made a 17 s sweep take 6 minutes once. A model trained in a worker is
the one trained in the main process (one thread, the same seeds), bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from experiments.toy_flow import (EVAL_T, Evaluation, attention_near_source, batch_of, build_model,
                                  end_point_error, figure, make_set, train_run)
from leffa.attention import AttentionFocus, run_reference_unet
from leffa.flow import coordinate_grid
from leffa.loss import diffusion_loss
from leffa.model import LeffaModel
from leffa.pipeline import latent_conditioning
from leffa.recording import AttentionRecorder
from training.trainer import encode_batch

TIMESTEPS = (100, 300, 500, 700, 900)  # 300: the toy's attention timestep (EVAL_T)
NUM_TRAIN_TIMESTEPS = 1000
TEMPERATURES = (0.5, 0.25, 0.1)  # sharper; and τ = 2 (flatter) once, as a check
LEVELS = {1: "16×12", 2: "16×12 + 8×6"}
STEP_RANGES = {"all": (0.0, 1.0), "early": (0.0, 0.5), "late": (0.5, 1.0)}
FIGURE_FOCUS = AttentionFocus(min(TEMPERATURES), levels=1)


def focus_grid() -> list[AttentionFocus | None]:
    """None (off), temperature × levels × steps, temperature with the own keys too, and τ = 2."""
    grid: list[AttentionFocus | None] = [None]
    grid += [AttentionFocus(tau, levels, steps) for tau in TEMPERATURES for levels in LEVELS
             for steps in STEP_RANGES.values()]
    grid += [AttentionFocus(tau, 1, own_keys=True) for tau in TEMPERATURES]
    return grid + [AttentionFocus(2.0)]


def label(focus: AttentionFocus | None) -> str:
    if focus is None:
        return "off"
    steps = next(name for name, r in STEP_RANGES.items() if r == focus.steps)
    own = ", own keys too" if focus.own_keys else ""
    return f"τ = {focus.temperature:g}, {LEVELS[focus.levels]}, {steps} steps{own}"


def denoising_step(t: int) -> int:
    """Step of a ``NUM_TRAIN_TIMESTEPS``-step DDPM run at which timestep ``t`` is denoised."""
    return NUM_TRAIN_TIMESTEPS - 1 - t


@dataclass
class HeldOut:
    """The held-out samples encoded once, with fixed noise (as ``toy_flow.evaluate``)."""

    samples: list[dict]
    latents: torch.Tensor
    ref_latents: torch.Tensor
    cond: torch.Tensor
    noise: torch.Tensor
    scheduler: DDPMScheduler

    @classmethod
    def encode(cls, model: LeffaModel, samples: list[dict], seed: int = 0) -> HeldOut:
        b = batch_of(samples)
        g = torch.Generator().manual_seed(seed)
        latents, masked, ref = encode_batch(model.vae, b, g)
        noise = torch.randn(latents.shape, generator=g)
        cond = latent_conditioning(b["mask"], masked, b["densepose"])
        return cls(samples, latents, ref, cond, noise, model.make_scheduler())


def active(focus: AttentionFocus | None, t: int) -> AttentionFocus | None:
    """What ``focus`` does at timestep ``t``: None if it does not cover t, else it with every step."""
    if focus is None or not focus.covers(0, denoising_step(t), NUM_TRAIN_TIMESTEPS):
        return None
    return dataclasses.replace(focus, steps=(0.0, 1.0))


@torch.no_grad()
def reference_features(model: LeffaModel, held: HeldOut, t: int) -> dict[str, torch.Tensor]:
    """The reference UNet's features at timestep ``t``; a focus does not change them."""
    with model.attention_session() as state:
        run_reference_unet(model.reference_unet, state, held.ref_latents, torch.full((len(held.samples),), t))
        return dict(state.ref_features)


class MapRecorder(AttentionRecorder):
    """An ``AttentionRecorder`` that computes each head-averaged map once: the end-point error
    (via ``flow``) and the near-source share read the same maps. Its flow is the parent's
    (``map @ coords``; one chunk for these small layers), bit for bit."""

    def begin(self, latent_hw: tuple[int, int], batch: slice = slice(None)) -> None:
        super().begin(latent_hw, batch)
        self._maps: dict[tuple[int, str, float], torch.Tensor] = {}

    def attention(self, step: int, name: str, tau: float = 1.0) -> torch.Tensor:
        key = (step, name, tau)
        if key not in self._maps:
            self._maps[key] = super().attention(step, name, tau=tau)
        return self._maps[key]

    def flow(self, step: int, name: str, chunk: int = 1024, tau: float = 1.0) -> torch.Tensor:
        attention, (h, w) = self.attention(step, name, tau), self.grid(name)
        return (attention @ coordinate_grid(h, w, device=attention.device)).view(len(attention), h, w, 2)


@torch.no_grad()
def forward(model: LeffaModel, held: HeldOut, t: int, focus: AttentionFocus | None,
            features: dict[str, torch.Tensor]) -> Evaluation:
    """One denoising forward pass at timestep ``t`` with ``focus``, its attention recorded."""
    ts = torch.full((len(held.samples),), t)
    noisy = held.scheduler.add_noise(held.latents, held.noise, ts)
    recorder = MapRecorder()
    with model.attention_session(recorder=recorder, attention_focus=focus) as state:
        state.set_step(denoising_step(t), NUM_TRAIN_TIMESTEPS)
        recorder.begin(tuple(noisy.shape[-2:]))
        recorder.set_step(0)
        state.ref_features.update(features)
        eps = model.unet(torch.cat([noisy, held.cond], dim=1), ts, encoder_hidden_states=None).sample
    finest = [name for name in recorder.layers() if recorder.grid(name) == tuple(noisy.shape[-2:])]
    return Evaluation(recorder, finest, diffusion_loss(eps, held.noise).item())


def measure(ev: Evaluation, samples: list[dict]) -> dict[str, float]:
    return {"end_point_error_px": end_point_error(ev.flow(), samples),
            "attention_near_source": attention_near_source(ev, samples),
            "diffusion_loss": ev.diffusion_loss}


def sweep(model: LeffaModel, held: HeldOut, grid: list[AttentionFocus | None]) -> dict[str, dict]:
    """{label: {metric: mean over TIMESTEPS, "per_timestep": {t: metrics}}}. A focus acts on a
    timestep's forward pass or not at all, so each distinct pass runs once."""
    done = {}
    for t in TIMESTEPS:
        features = reference_features(model, held, t)
        for focus in dict.fromkeys(active(f, t) for f in grid):
            done[focus, t] = measure(forward(model, held, t, focus, features), held.samples)
    results = {}
    for focus in grid:
        per_t = {t: done[active(focus, t), t] for t in TIMESTEPS}
        rounded = {t: {k: round(v, 4) for k, v in m.items()} for t, m in per_t.items()}
        results[label(focus)] = {**mean_of(list(per_t.values())), "per_timestep": rounded}
    return results


def mean_of(metrics: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.mean([m[k] for m in metrics])), 4) for k in metrics[0]}


def trained_model(seed: int, lam: float, train_set: list[dict], init: LeffaModel, args,
                  log=print) -> tuple[LeffaModel, float | None]:
    """``init`` trained ``args.steps`` steps with λ = ``lam``, and the seconds it took (None when
    read from ``args.cache``, where it is written otherwise)."""
    model = build_model(seed, train_set[:64])
    settings = (seed, lam, args.steps, args.train_size, args.batch, args.lr, args.print_alpha)
    cached = args.cache and args.cache / f"toy-{hashlib.sha256(repr(settings).encode()).hexdigest()[:16]}.pt"
    if cached and cached.exists():
        model.load_state_dict(torch.load(cached, weights_only=True))
        return model.eval(), None
    model.load_state_dict(init.state_dict())
    start = time.perf_counter()
    train_run(model, train_set, args.steps, lam, args.batch, args.lr, seed, log)
    seconds = round(time.perf_counter() - start, 1)
    if cached:
        args.cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cached.with_suffix(".tmp"))
        cached.with_suffix(".tmp").replace(cached)
    return model, seconds


def runs(args) -> list[tuple[str, float]]:
    """(name, λ) of the two trainings of a seed."""
    return [("diffusion loss only", 0.0), (f"+ Leffa loss (λ = {args.lambda_leffa:g})", args.lambda_leffa)]


def train_job(seed: int, lam: float, args) -> float | None:
    """Train seed ``seed``'s model with λ = ``lam`` into ``args.cache`` (run in a worker process
    too): the seconds it took, None when it was there already."""
    torch.set_num_threads(args.threads)
    train_set = make_set(args.train_size, seed, args.print_alpha)
    init = build_model(seed, train_set[:64])
    _, seconds = trained_model(seed, lam, train_set, init, args,
                               log=lambda line: print(f"seed {seed}, λ = {lam:g}:{line}", flush=True))
    print(f"seed {seed}, λ = {lam:g}: trained ({seconds} s)", flush=True)
    return seconds


def train_all(args) -> dict[tuple[int, float], float | None]:
    """Every model of the run into ``args.cache``, ``args.workers`` at a time (each its own process
    on ``args.threads`` threads, so what it learns does not depend on the workers):
    {(seed, λ): seconds}."""
    jobs = [(seed, lam) for seed in args.seeds for _, lam in runs(args)]
    if args.workers <= 1:
        return {job: train_job(*job, args) for job in jobs}
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds OpenMP threads
    with ProcessPoolExecutor(min(args.workers, len(jobs)), mp_context=context) as pool:
        futures = {job: pool.submit(train_job, *job, args) for job in jobs}
        return {job: future.result() for job, future in futures.items()}


def run_seed(seed: int, args, pictures: bool, train_seconds: dict[tuple[int, float], float | None],
             log=print) -> tuple[dict, dict, dict[str, Evaluation], list[dict]]:
    """The sweeps of one seed's two models, trained before (``train_all``) or trained here:
    ({run: {focus: results}}, {run: seconds}, {picture: evaluation at EVAL_T} when ``pictures``,
    the held-out samples)."""
    train_set = make_set(args.train_size, seed, args.print_alpha)
    test_set = make_set(args.test_size, 10_000 + seed, args.print_alpha)
    init = build_model(seed, train_set[:64])
    results, seconds, evaluations = {}, {}, {}
    for run, lam in runs(args):
        log(f"seed {seed}, {run}:")
        model, trained_here = trained_model(seed, lam, train_set, init, args, log)
        held = HeldOut.encode(model, test_set)
        start = time.perf_counter()
        results[run] = sweep(model, held, focus_grid())
        seconds[run] = {"train": train_seconds.get((seed, lam), trained_here),
                        "sweep": round(time.perf_counter() - start, 1)}
        log(f"  seconds: {seconds[run]}")
        if pictures:
            short = "diffusion only" if lam == 0 else "+ Leffa loss"
            features = reference_features(model, held, EVAL_T)
            for name, focus in ((short, None), (f"{short}, τ = {FIGURE_FOCUS.temperature:g}", FIGURE_FOCUS)):
                evaluations[name] = forward(model, held, EVAL_T, focus, features)
    return results, seconds, evaluations, test_set


def without_timesteps(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """``sweep``'s results without their "per_timestep"."""
    return {focus: {k: v for k, v in r.items() if k != "per_timestep"} for focus, r in results.items()}


def mean_over_seeds(per_seed: dict[int, dict]) -> dict[str, dict[str, dict[str, float]]]:
    first = next(iter(per_seed.values()))
    return {run: {focus: mean_of([without_timesteps(r[run])[focus] for r in per_seed.values()])
                  for focus in first[run]}
            for run in first}


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per focus, EPE / near source / diffusion loss per run."""
    runs = list(summary)
    head = "| focus | " + " | ".join(f"{r}: EPE (px) | near source | diffusion loss" for r in runs) + " |"
    rows = [head, "|---" * (1 + 3 * len(runs)) + "|"]
    for focus in summary[runs[0]]:
        cells = [f"{m['end_point_error_px']:.2f} | {100 * m['attention_near_source']:.1f} % | "
                 f"{m['diffusion_loss']:.3f}" for m in (summary[r][focus] for r in runs)]
        rows.append(f"| {focus} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def compact_json(data, indent: int = 0) -> str:
    """JSON with one line per innermost object or list (one focus's metrics: one line)."""
    if isinstance(data, (dict, list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in
                                                     (data.values() if isinstance(data, dict) else data)):
        pad = " " * (indent + 2)
        if isinstance(data, dict):
            items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {compact_json(v, indent + 2)}"
                     for k, v in data.items()]
            return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
        return "[\n" + ",\n".join(pad + compact_json(v, indent + 2) for v in data) + "\n" + " " * indent + "]"
    return json.dumps(data, ensure_ascii=False)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(compact_json(data) + "\n")
    tmp.replace(path)


def write_figure(path: Path, samples: list[dict], evaluations: dict[str, Evaluation]) -> None:
    """``toy_flow.figure``, reduced to 256 colours (a quarter of the bytes), written atomically."""
    from PIL import Image

    full = path.with_name(f".{path.stem}-full.png")
    figure(full, samples, evaluations)
    tmp = path.with_name(f".{path.name}.tmp")
    with Image.open(full) as img:
        img.convert("RGB").quantize(256).save(tmp, format="PNG", optimize=True)
    full.unlink()
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns what the JSON holds plus "per_timestep": {seed: {run: {focus:
    {t: metrics}}}}, which is left out of the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps (the toy: 400)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--test-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lambda-leffa", type=float, default=1.0)
    p.add_argument("--print-alpha", type=int, default=90, choices=range(0, 256), metavar="0..255")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (1: see above)")
    p.add_argument("--workers", type=int, default=2, help="models trained at once, each in its own process")
    p.add_argument("--cache", type=Path, default=None, help="folder to keep the trained models in (reused)")
    p.add_argument("--out", type=Path, default=Path("docs/toy/attention-focus"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="attention-focus-") as tmp:
            # the models go through the cache folder, a temporary one unless --cache is given
            work = argparse.Namespace(**{**vars(args), "cache": args.cache or Path(tmp)})
            train_seconds = train_all(work)
            print(f"trained: {time.perf_counter() - start:.0f} s so far", flush=True)
            per_seed, seconds = {}, {}
            for seed in args.seeds:
                pictures = seed == args.seeds[0]
                per_seed[seed], seconds[seed], evaluations, test_set = run_seed(seed, work, pictures,
                                                                                train_seconds)
                if evaluations:
                    write_figure(args.out / "attention_focus.png", test_set[:3], evaluations)
                print(f"  {time.perf_counter() - start:.0f} s so far", flush=True)
    finally:
        torch.set_num_threads(threads)
    summary = mean_over_seeds(per_seed)
    report = {"settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "timesteps": TIMESTEPS, "figure_focus": dataclasses.asdict(FIGURE_FOCUS),
                           "figure_timestep": EVAL_T},
              "seconds": {"total": round(time.perf_counter() - start), "per_seed": seconds},
              "mean_over_seeds": summary,
              "off_per_timestep": {run: {t: mean_of([r[run]["off"]["per_timestep"][t]
                                                      for r in per_seed.values()]) for t in TIMESTEPS}
                                   for run in summary},
              "per_seed": {seed: {run: without_timesteps(r) for run, r in by_run.items()}
                           for seed, by_run in per_seed.items()}}
    write_json(args.out / "attention_focus.json", report)
    print(table(summary))
    print(f"{report['seconds']['total']} s; figure: {args.out / 'attention_focus.png'}")
    per_timestep = {seed: {run: {focus: r["per_timestep"] for focus, r in results.items()}
                           for run, results in by_run.items()} for seed, by_run in per_seed.items()}
    return {**report, "per_timestep": per_timestep}


if __name__ == "__main__":
    main()
