"""Which cheaper sampling settings keep the published 30-DDPM-step quality, measured on a trained toy.

    python -m experiments.toy_sampling                       # train the toy (~11 min on 2 cores), then the table
    python -m experiments.toy_sampling --model docs/toy/sampling_model.pt   # reuse the trained toy

Untrained weights cannot judge a sampler: every setting turns their noise into other noise. So this
trains ``experiments.toy_flow``'s tiny Leffa model on its synthetic try-on task (a textured garment
warped onto a target by a known affine transform): first its VAE, to reconstruct the task's images
(the toy's random VAE decodes every latent to nearly the same picture), then both UNets with the
diffusion loss, the Leffa loss and 10 % reference dropout (so that guidance's unconditional branch
is learnt, as in ``training.trainer``). It then generates the held-out targets with each setting of
``leffa.sampling`` (sampler and steps, guidance interval, feature cache), for 3 seeds. Per setting:
generative-UNet passes per image (rows through the UNet: 2 per guided step, 1 per unguided one; how
many of them ran the shallow path only), seconds per image, and the distance to the held-out ground
truth and to the published setting's image of the same seed: SSIM (``evaluation.ssim``, 7×7
Gaussian window as the authors' torchmetrics), PSNR, and LPIPS (``evaluation.lpips``) when
``--lpips-weights`` names a folder with its published files. Each figure is the mean over the seeds
of the mean over images, ± the standard deviation over the seeds.

The toy is a proxy: a 2-block UNet on 128×96 images with 16×12 latents, trained for minutes. It
shows whether a setting reaches the same images as 30 DDPM steps of a model that has learnt its
task; it cannot show how the published models' textures, faces or text survive fewer steps, which
a GPU run with the published weights must confirm (README, "Fast sampling").
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from engine.options import SamplingSetting
from evaluation.ssim import ssim
from experiments.toy_flow import batch_of, build_model, make_set, train_run
from leffa.model import LeffaModel
from leffa.pipeline import LeffaPipeline
from leffa.sampling import GuidanceInterval, Sampler

PAPER_INTERVAL = (0.07, 0.81)  # Kynkäänniemi et al.'s σ ∈ (0.28, 5.42] on Stable Diffusion's schedule (t/1000)
GUIDANCE = 2.5
UNTRAINED = "untrained UNets (trained VAE), ddpm 30"

PUBLISHED = SamplingSetting(30, Sampler.DDPM)


def _settings() -> list[SamplingSetting]:
    """The table's rows: samplers and steps, then the guidance interval, the cache, and both."""
    S, DDPM, DDIM, DPM, UNIPC = SamplingSetting, Sampler.DDPM, Sampler.DDIM, Sampler.DPM_SOLVER, Sampler.UNIPC
    guided = PAPER_INTERVAL
    return [PUBLISHED, *(S(n, DDPM) for n in (15, 10, 8, 6)), *(S(n, DDIM) for n in (20, 10)),
            *(S(n, DPM) for n in (20, 12, 8, 5)), *(S(n, UNIPC) for n in (12, 8, 5)),
            *(S(n, DDPM, guided) for n in (30, 15, 10, 8)), *(S(n, DPM, guided) for n in (12, 8)),
            *(S(n, UNIPC, guided) for n in (8, 5)),
            S(30, DDPM, cache_interval=2), S(30, DDPM, cache_interval=3), S(12, DPM, cache_interval=2),
            S(8, UNIPC, cache_interval=2),
            *(S(n, DDPM, guided, 2) for n in (15, 10, 8)), S(12, DPM, guided, 2), S(8, UNIPC, guided, 2)]


SETTINGS = _settings()


class PassCounter:
    """Rows through the generative UNet, whole and shallow only (its mid block runs on whole passes)."""

    def __init__(self, model: LeffaModel):
        self.rows = self.whole = 0
        self.hooks = [model.unet.up_blocks[-1].register_forward_pre_hook(self._last, with_kwargs=True),
                      model.unet.mid_block.register_forward_pre_hook(self._mid)]

    def _last(self, module, args, kwargs):  # every pass, whole or shallow, ends with the last up block
        self.rows += kwargs["hidden_states"].shape[0]

    def _mid(self, module, args):
        self.whole += args[0].shape[0]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def generate(model: LeffaModel, batch: dict, setting: SamplingSetting,
             seed: int) -> tuple[torch.Tensor, float, int, int]:
    """Images (B, 3, H, W) in [0, 1], seconds, generative-UNet rows and whole-UNet rows."""
    counter = PassCounter(model)
    start = time.perf_counter()
    try:
        images = LeffaPipeline(model)(
            batch["src_image"], batch["ref_image"], batch["mask"], batch["densepose"],
            num_inference_steps=setting.steps, guidance_scale=GUIDANCE, sampler=setting.sampler,
            guidance_interval=GuidanceInterval(*setting.guidance_interval), cache_interval=setting.cache_interval,
            generator=torch.Generator().manual_seed(seed), output_type="pt").images
    finally:
        counter.close()
    return images, time.perf_counter() - start, counter.rows, counter.whole


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mse = ((x - y) ** 2).mean((1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def train_vae(model: LeffaModel, data: list[dict], steps: int, seed: int = 0) -> float:
    """Train the toy's VAE to reconstruct the task's images (targets and garments), then set its
    ``scaling_factor`` for unit-variance latents as ``build_model`` does; returns the seconds. A random
    VAE's decoder hardly depends on its latent (two random latents decode to pictures 13 dB apart, as
    close as a generated one to the truth), so no image metric could judge a sampler through it."""
    b = batch_of(data)
    images = torch.cat([b["src_image"], b["ref_image"]])
    vae = model.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = images[torch.randint(0, len(images), (16,), generator=g)]
        posterior = vae.encode(x).latent_dist
        loss = ((vae.decode(posterior.sample(g)).sample - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 200 == 0 or step == steps:
            print(f"  vae step {step}: reconstruction {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(images[:64]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return time.perf_counter() - start


def train_toy(args) -> LeffaModel:
    train_set = make_set(args.train_size, 0)
    model = build_model(0, train_set[:64])
    vae_seconds = train_vae(model, train_set, args.vae_steps)
    start = time.perf_counter()
    train_run(model, train_set, args.train_steps, args.lambda_leffa, args.batch, args.lr, 0,
              log=lambda line: print(line, flush=True), ref_dropout=0.1)
    print(f"trained the VAE {args.vae_steps} steps in {vae_seconds:.0f} s, the UNets {args.train_steps} steps in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    tmp = args.out / ".sampling_model.pt.tmp"
    torch.save({"state_dict": model.state_dict(), "scaling_factor": model.vae.config.scaling_factor}, tmp)
    tmp.replace(args.out / "sampling_model.pt")
    return model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a toy state dict saved by an earlier run (skips training)")
    p.add_argument("--vae-steps", type=int, default=1200, help="the toy VAE's reconstruction training")
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lambda-leffa", type=float, default=1.0)
    p.add_argument("--test-size", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", type=int, default=len(SETTINGS), help="the first N settings only (quick checks)")
    p.add_argument("--lpips-weights", type=Path, help="folder with LPIPS' published files (evaluation.weights)")
    p.add_argument("--out", type=Path, default=Path("docs/toy"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    calibration = make_set(64, 0)
    if args.model:
        model = build_model(0, calibration)
        saved = torch.load(args.model, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        model.vae.register_to_config(scaling_factor=saved["scaling_factor"])
    else:
        model = train_toy(args)
    model.eval()
    untrained = build_model(0, calibration).eval()  # the UNets as initialised, with the trained VAE
    untrained.vae.load_state_dict(model.vae.state_dict())
    untrained.vae.register_to_config(scaling_factor=model.vae.config.scaling_factor)
    lpips = None
    if args.lpips_weights:
        from evaluation.lpips import LPIPS, LpipsNet
        backbone, linear = LpipsNet.SQUEEZE.files
        lpips = LPIPS.from_files(LpipsNet.SQUEEZE, args.lpips_weights / backbone.name, args.lpips_weights / linear.name)

    batch = batch_of(make_set(args.test_size, 10_000))
    truth = (batch["src_image"] + 1) / 2
    n = args.test_size

    def scores(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        out = {"ssim": float(ssim(images, reference).mean()), "psnr": float(psnr(images, reference).mean())}
        if lpips is not None:
            out["lpips"] = float(lpips(images * 2 - 1, reference * 2 - 1).mean())
        return out

    with torch.no_grad():
        vae = model.vae
        round_trip = (vae.decode(vae.encode(batch["src_image"]).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    ceiling = {f"truth_{k}": v for k, v in scores(round_trip, truth).items()}
    print(f"the VAE's round trip of the truth (what no setting can beat): {ceiling}", flush=True)
    rows, published = [], {}
    runs = [(UNTRAINED, untrained, PUBLISHED)] + [(s.name, model, s) for s in SETTINGS[:args.settings]]
    for label, net, setting in runs:
        per_seed = []
        for seed in args.seeds:
            images, seconds, passes, whole = generate(net, batch, setting, seed)
            if net is model and setting == PUBLISHED:
                published[seed] = images
            per_seed.append({"seconds_per_image": seconds / n, "passes": passes / n, "whole": whole / n,
                             **{f"truth_{k}": v for k, v in scores(images, truth).items()},
                             **({f"published_{k}": v for k, v in scores(images, published[seed]).items()}
                                if net is model else {})})
        row = {"setting": label, **asdict(setting), "sampler": setting.sampler.value,
               "guidance_interval": list(setting.guidance_interval)}
        for key in per_seed[0]:
            values = [r[key] for r in per_seed]
            row[key] = round(float(np.mean(values)), 4)
            row[key + "_std"] = round(float(np.std(values)), 4)
        rows.append(row)
        print(table_line(row), flush=True)
    presets = choose_presets(rows)
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "guidance_scale": GUIDANCE, "vae_round_trip": ceiling, "rows": rows, "presets": presets}
    tmp = args.out / ".sampling_results.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out / "sampling_results.json")
    print(json.dumps(presets, indent=2))
    return report


def table_line(row: dict) -> str:
    def pm(key: str, fmt: str = ".3f") -> str:
        return f"{row[key]:{fmt}} ± {row[key + '_std']:{fmt}}" if key in row else "–"
    return (f"| {row['setting']} | {row['passes']:.0f} ({row['passes'] - row['whole']:.0f} shallow) "
            f"| {row['seconds_per_image'] * 1000:.1f} ms | {pm('truth_ssim')} | {pm('truth_psnr', '.2f')} "
            f"| {pm('published_ssim')} | {pm('published_psnr', '.2f')} |")


CLOSE_TO_PUBLISHED = 0.92  # Fast's SSIM to the published setting's image, at least


def choose_presets(rows: list[dict]) -> dict[str, str]:
    """Fast: the fewest UNet passes (then whole passes) among the settings whose SSIM to the ground
    truth is within the published setting's spread over seeds (its mean − std or better) and whose
    SSIM to the published image is at least ``CLOSE_TO_PUBLISHED``: a picture can score as well
    against the truth by being smoother, so Fast must also stay close to what the published setting
    draws. Preview: the fewest passes within 3 such spreads (or 0.02) of the truth."""
    trained = [r for r in rows if r["setting"] != UNTRAINED]
    base = next(r for r in trained if r["setting"] == PUBLISHED.name)
    spread = max(base["truth_ssim_std"], 1e-3)
    cost = lambda r: (r["passes"], r["whole"], r["seconds_per_image"])  # noqa: E731
    fast = [r for r in trained if r["truth_ssim"] >= base["truth_ssim"] - spread
            and r["published_ssim"] >= CLOSE_TO_PUBLISHED]
    preview = [r for r in trained if r["truth_ssim"] >= base["truth_ssim"] - max(3 * spread, 0.02)]
    return {"Published": base["setting"], "Fast": min(fast, key=cost)["setting"],
            "Preview": min(preview, key=cost)["setting"]}


if __name__ == "__main__":
    main()
