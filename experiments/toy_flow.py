"""Toy reproduction of the paper's claim: the Leffa loss makes attention follow the garment.

    python -m experiments.toy_flow                      # one seed, ~5 min on 2 CPU cores
    python -m experiments.toy_flow --seeds 0 1 2        # the figures in the README
    python -m experiments.toy_flow --seeds 0 1 2 --family concat   # the CatVTON-style model

A synthetic try-on dataset: a textured garment on white (a colour ramp under stripes, a logo
and a text line) is warped onto a target by a known random affine transform (scale,
rotation, shift); the mask is the warped garment. A tiny Leffa model (both UNets trainable
and started from one random base UNet, as the published ones start from one Stable
Diffusion UNet; a random frozen VAE) is trained twice from the same initialisation, on the
same batches, noise and timesteps: with the diffusion loss only, and with the diffusion loss
plus λ·Leffa loss. On held-out samples we record the generative-over-reference attention of
the finest layers and measure the end-point error (pixels) between its flow field and the
true warp inside the mask, and the diffusion loss (fixed noise and timesteps). Writes the
numbers (JSON) and a figure of attention heatmaps and attention-warped garments.

``--family concat`` repeats it for the CatVTON-style model (``leffa.concat``): one UNet of the same
size over the person above the garment in one latent (started from the same random base UNet),
its person half's attention over the garment half recorded and trained by the same loss
(``leffa.reference_keys``). Its diffusion loss is measured on the person half.

The logo and the text are semi-transparent (``--print-alpha``, default 90/255). The Leffa
loss is photometric: its gradient only sees the reference's local image gradient where the
flow currently points, so opaque prints (a flat disc, black text) hide the ramp and make
local minima; with ``--print-alpha 255`` the loss does not lower the error at all.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from engine.registry import Family
from leffa.concat import CONCAT, ConcatModel, conditioning
from leffa.flow import coordinate_grid, resize_flow, warp_with_flow
from leffa.loss import diffusion_loss
from leffa.pipeline import latent_conditioning
from leffa.recording import AttentionRecorder
from training.trainer import (TRAINABLE, Model, TrainConfig, encode_batch, trained_unets, training_module,
                              training_step)

H, W = 128, 96
TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1, "attention_head_dim": 4, "cross_attention_dim": 32, "in_channels": 9,
    "out_channels": 4, "norm_num_groups": 8, "sample_size": 16,
}


# -- data ---------------------------------------------------------------------------------------
STRIPE_ALPHA = 40


def garment(rng: np.random.Generator, print_alpha: int) -> Image.Image:
    """A textured garment on white: a smooth colour ramp (so that every point of the garment
    looks locally different, as on a real print) under stripes (alpha 40/255), a logo and a
    text line (alpha ``print_alpha``)."""
    x0, y0, x1, y1 = 14, 12, W - 14, H - 12
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    ramp = np.stack([(xs - x0) / (x1 - x0), (ys - y0) / (y1 - y0), np.full_like(xs, rng.uniform(0.2, 0.8))], -1)
    ramp = np.clip(ramp[..., rng.permutation(3)] * 215 + 20, 0, 255).astype(np.uint8)
    img = Image.new("RGB", (W, H), "white")
    img.paste(Image.fromarray(ramp).crop((x0, y0, x1, y1)), (x0, y0))
    over = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    stripe = tuple(int(v) for v in rng.integers(0, 255, 3)) + (STRIPE_ALPHA,)
    period = int(rng.integers(8, 16))
    if rng.random() < 0.5:
        for y in range(y0, y1, period):
            d.rectangle([x0, y, x1, y + period // 2], fill=stripe)
    else:
        for x in range(x0, x1, period):
            d.rectangle([x, y0, x + period // 2, y1], fill=stripe)
    cx, cy = int(rng.integers(30, 66)), int(rng.integers(30, 60))
    d.ellipse([cx - 12, cy - 12, cx + 12, cy + 12], fill=tuple(int(v) for v in rng.integers(0, 255, 3)) + (print_alpha,),
              outline=(0, 0, 0, print_alpha), width=2)
    d.text((x0 + 4, int(rng.integers(70, 100))), "".join(rng.choice(list("LEFFA25XO"), 5)), fill=(0, 0, 0, print_alpha),
           font_size=16)
    return Image.alpha_composite(img.convert("RGBA"), over).convert("RGB")


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """3×3 matrix taking target pixel (x, y, 1) to garment pixel coordinates."""
    s = rng.uniform(0.75, 1.0)
    a = math.radians(rng.uniform(-15, 15))
    tx, ty = rng.uniform(-10, 10), rng.uniform(-10, 10)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    # forward (garment -> target): rotate+scale about the centre, then shift
    fwd = np.array([[s * math.cos(a), -s * math.sin(a), 0], [s * math.sin(a), s * math.cos(a), 0], [0, 0, 1]])
    centre = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]]) @ fwd @ np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    forward = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]]) @ centre
    return np.linalg.inv(forward)


def make_sample(rng: np.random.Generator, print_alpha: int = 90) -> dict[str, torch.Tensor]:
    """Tensors in the pipeline's conventions plus the true flow (H, W, 2) in grid_sample units."""
    g = garment(rng, print_alpha)
    inv = random_affine(rng)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    src = inv @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    true_flow = np.stack([src[0] / (W - 1) * 2 - 1, src[1] / (H - 1) * 2 - 1], axis=-1).reshape(H, W, 2)
    flow_t = torch.from_numpy(true_flow).float()
    ref = torch.from_numpy(np.asarray(g, np.float32) / 127.5 - 1).permute(2, 0, 1)
    warped = F.grid_sample(ref[None], flow_t[None], mode="bilinear", align_corners=True, padding_mode="border")[0]
    garment_alpha = (ref.min(0).values < 0.99).float()  # non-white pixels of the garment
    mask = F.grid_sample(garment_alpha[None, None], flow_t[None], mode="nearest", align_corners=True)[0]
    background = torch.linspace(-0.6, 0.2, H)[:, None].expand(H, W)[None].repeat(3, 1, 1)
    target = warped * mask + background * (1 - mask)
    return {"src_image": target, "ref_image": ref, "mask": mask, "densepose": mask.repeat(3, 1, 1) * 2 - 1,
            "true_flow": flow_t}


def make_set(n: int, seed: int, print_alpha: int = 90) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [make_sample(rng, print_alpha) for _ in range(n)]


def batch_of(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# -- model, training, evaluation ---------------------------------------------------------------------
def build_model(seed: int, calibration: list[dict], family: Family = Family.LEFFA) -> Model:
    """Both UNets start from one random base UNet, as the published models start from one
    Stable Diffusion inpainting UNet (``LeffaModel.from_base_weights``); the concatenation model
    is that base UNet itself (``ConcatModel.from_base_weights``). The random VAE's
    ``scaling_factor`` is set so that latents have unit variance on ``calibration`` images,
    which is how Stable Diffusion's 0.18215 was chosen; without it the target's latent would
    drown in the noise (std 0.04 against 1)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from leffa.model import CONFIG_ROOT

    folder = Path(tempfile.mkdtemp(prefix="leffa-toy-"))
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(TINY_UNET).save_pretrained(folder / "unet")
    vae = AutoencoderKL.from_config(json.loads((CONFIG_ROOT / "tiny" / "vae" / "config.json").read_text()))
    with torch.no_grad():
        latents = vae.encode(batch_of(calibration)["src_image"]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir()
    shutil.copy(CONFIG_ROOT / "tiny" / "scheduler" / "scheduler_config.json", folder / "scheduler")
    try:
        return TRAINABLE[family].from_base_weights(folder)
    finally:
        shutil.rmtree(folder)


def train_run(model: Model, data: list[dict], steps: int, lam: float, batch: int, lr: float, seed: int,
              log=print, ref_dropout: float = 0.0) -> None:
    """``steps`` AdamW steps of ``training.trainer.training_step`` (λ = 0: the diffusion loss only).
    The batches, noise and timesteps depend on ``seed`` only, not on λ. ``ref_dropout`` > 0 trains
    guidance's unconditional branch too (``experiments.toy_sampling``)."""
    family = Family.CONCAT if isinstance(model, ConcatModel) else Family.LEFFA
    cfg = TrainConfig(output_dir="", data_root="", family=family, lambda_leffa=lam, ref_dropout=ref_dropout)
    module = training_module(model).train()
    model.vae.requires_grad_(False)
    params = [p for u in trained_unets(model) for p in u.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    scheduler = model.make_scheduler()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        idx = rng.choice(len(data), batch, replace=False)
        loss, parts = training_step(module, model.vae, scheduler, batch_of([data[i] for i in idx]), cfg, lam > 0, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        module.release()
        if step % 100 == 0 or step == steps:
            log(f"  step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))
    model.eval()


@dataclass
class Evaluation:
    """What one model does on the held-out samples."""

    attention: AttentionRecorder  # step 0: one forward pass at timestep EVAL_T
    layers: list[str]  # the finest (latent-resolution) attention layers
    diffusion_loss: float

    def flow(self) -> torch.Tensor:
        """Layer-averaged flow field (B, h, w, 2) of the attention the model uses (τ = 1)."""
        return torch.stack([self.attention.flow(0, name) for name in self.layers]).mean(0)

    def heatmap(self, i: int, x: float, y: float) -> torch.Tensor:
        """Layer-averaged attention (h, w) over the reference of sample i's query at (x, y)
        (fractions of the image)."""
        return torch.stack([self.attention.heatmap(0, name, [(x, y)])[i, 0] for name in self.layers]).mean(0)


EVAL_T = 300


@torch.no_grad()
def evaluate(model: Model, samples: list[dict], seed: int = 0) -> Evaluation:
    """Record the attention at timestep ``EVAL_T``, and the diffusion loss over timesteps
    50, 150, ..., 950 with fixed noise (on the person: the concatenation model's person half)."""
    b = batch_of(samples)
    g = torch.Generator().manual_seed(seed)
    latents, masked, ref = encode_batch(model.vae, b, g)
    scheduler, module = model.make_scheduler(), training_module(model).eval()
    person_hw = tuple(latents.shape[-2:])
    if isinstance(model, ConcatModel):
        x0, cond = CONCAT.latent(latents, ref), conditioning(b["mask"], masked, ref)
        noise = torch.randn(x0.shape, generator=g)
        predict = lambda t, rec=None: CONCAT.target_half(module(scheduler.add_noise(x0, noise, t), t, cond, rec))
        person_noise = CONCAT.target_half(noise)
    else:
        cond = latent_conditioning(b["mask"], masked, b["densepose"])
        noise = person_noise = torch.randn(latents.shape, generator=g)
        predict = lambda t, rec=None: module(scheduler.add_noise(latents, noise, t), t, cond, ref, rec)
    rec = AttentionRecorder()
    rec.set_step(0)
    predict(torch.full((len(samples),), EVAL_T), rec)
    layers = [name for name in rec.layers() if rec.grid(name) == person_hw]
    losses = [diffusion_loss(predict(torch.full((len(samples),), t)), person_noise).item() for t in range(50, 1000, 100)]
    module.release()
    return Evaluation(rec, layers, float(np.mean(losses)))


def end_point_error(flow: torch.Tensor, samples: list[dict]) -> float:
    """Mean distance in pixels, inside the mask, between a token-grid flow (B, h, w, 2)
    (upsampled bilinearly to the image) and the true warp."""
    b = batch_of(samples)
    up = resize_flow(flow, (H, W))
    scale = torch.tensor([(W - 1) / 2, (H - 1) / 2])
    err = ((up - b["true_flow"]) * scale).norm(dim=-1)  # (B, H, W) pixels
    m = b["mask"][:, 0] > 0
    return float(err[m].mean())


def attention_near_source(ev: Evaluation, samples: list[dict], radius: float = 12.0) -> float:
    """Mean share of a query's attention (layer-averaged, τ = 1) that falls on reference tokens
    within ``radius`` pixels of its true source, over the query tokens inside the mask. The
    end-point error only sees the attention's centre of mass; this sees whether the attention
    is on the right spot (a uniform attention gives about 5 % at 12 px)."""
    b = batch_of(samples)
    attn = torch.stack([ev.attention.attention(0, name) for name in ev.layers]).mean(0)  # (B, n, n)
    h, w = ev.attention.grid(ev.layers[0])
    px = torch.tensor([(W - 1) / 2, (H - 1) / 2])
    keys = (coordinate_grid(h, w) + 1) * px  # (n, 2) token centres in pixels
    source = (resize_flow(b["true_flow"], (h, w)).reshape(len(samples), h * w, 2) + 1) * px  # (B, n, 2)
    near = (keys[None, None] - source[:, :, None]).norm(dim=-1) <= radius  # (B, n queries, n keys)
    rows, cols = (torch.linspace(0, size - 1, n).round().long() for size, n in ((H, h), (W, w)))
    inside = b["mask"][:, 0][:, rows][:, :, cols].reshape(len(samples), h * w) > 0.5  # (B, n)
    return float((attn * near).sum(-1)[inside].mean())


def figure(path: Path, samples: list[dict], runs: dict[str, Evaluation]) -> None:
    """Per sample: the garment with the true source of a query point, the target with the
    query, the true warp, then per run the query's attention over the garment (heatmap, with
    its flow vector circled) and the garment warped by the attention flow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = batch_of(samples)
    show = lambda x: ((x.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
    to_px = lambda f: (f + 1) / 2 * torch.tensor([W - 1, H - 1])
    n_cols = 3 + 2 * len(runs)
    fig, axes = plt.subplots(len(samples), n_cols, figsize=(2.0 * n_cols, 2.6 * len(samples)), squeeze=False)
    flows = {name: ev.flow() for name, ev in runs.items()}
    for i in range(len(samples)):
        ys, xs = torch.nonzero(b["mask"][i, 0], as_tuple=True)
        qy, qx = int(ys.float().mean()), int(xs.float().mean())  # a query point inside the garment
        panels = [("garment: true source", show(b["ref_image"][i]), None, to_px(b["true_flow"][i, qy, qx])),
                  ("target + query", show(b["src_image"][i]), None, (qx, qy)),
                  ("true warp", show(warp_with_flow(b["ref_image"][i:i + 1], b["true_flow"][i:i + 1])[0]), None, None)]
        for name, ev in runs.items():
            flow = flows[name][i:i + 1]
            h, w = flow.shape[1:3]
            heat = F.interpolate(ev.heatmap(i, qx / W, qy / H)[None, None], size=(H, W), mode="bilinear")
            looked = to_px(flow[0, min(int(qy / H * h), h - 1), min(int(qx / W * w), w - 1)])
            panels.append((f"{name}:\nattention of the query", show(b["ref_image"][i]), heat[0, 0].numpy(), looked))
            panels.append((f"{name}:\nwarp by attention flow", show(warp_with_flow(b["ref_image"][i:i + 1], flow)[0]),
                           None, None))
        for ax, (title, img, heat, point) in zip(axes[i], panels):
            ax.imshow(img)
            if heat is not None:
                ax.imshow(heat, cmap="magma", alpha=0.6)
            if point is not None:
                ax.plot(float(point[0]), float(point[1]), "o", ms=9, mfc="none", mec="lime", mew=2.5)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def run_seed(seed: int, args, log=print) -> tuple[dict, dict[str, Evaluation], list[dict]]:
    """Both runs for one seed: ({run: figures}, {run: evaluation}, held-out samples)."""
    train_set = make_set(args.train_size, seed, args.print_alpha)
    test_set = make_set(args.test_size, 10_000 + seed, args.print_alpha)
    family = Family(args.family)
    init = build_model(seed, train_set[:64], family)
    runs = {"untrained": evaluate(init, test_set)}
    seconds = {}
    for name, lam in (("diffusion loss only", 0.0), (f"+ Leffa loss (λ = {args.lambda_leffa:g})", args.lambda_leffa)):
        model = build_model(seed, train_set[:64], family)
        model.load_state_dict(init.state_dict())
        log(f"seed {seed}, {family.value}, {name}:")
        start = time.perf_counter()
        train_run(model, train_set, args.steps, lam, args.batch, args.lr, seed, log)
        seconds[name] = round(time.perf_counter() - start, 1)
        runs[name] = evaluate(model, test_set)
    results = {name: {"end_point_error_px": round(end_point_error(ev.flow(), test_set), 3),
                      "attention_near_source": round(attention_near_source(ev, test_set), 4),
                      "diffusion_loss": round(ev.diffusion_loss, 4)}
               for name, ev in runs.items()}
    for name, s in seconds.items():
        results[name]["train_seconds"] = s
    return results, runs, test_set


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed")
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--test-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="toy learning rate (paper 1e-5 over far longer training)")
    p.add_argument("--lambda-leffa", type=float, default=1.0, help="toy weight (paper 1e-3 over far longer training)")
    p.add_argument("--print-alpha", type=int, default=90, choices=range(0, 256), metavar="0..255",
                   help="opacity of the logo and the text")
    p.add_argument("--family", choices=[f.value for f in TRAINABLE], default=Family.LEFFA.value,
                   help="leffa (default), or concat: the CatVTON-style model (leffa.concat)")
    p.add_argument("--out", type=Path, default=Path("docs/toy"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    per_seed, first = {}, None
    for seed in args.seeds:
        per_seed[seed], evaluations, test_set = run_seed(seed, args)
        first = first or (evaluations, test_set)
    runs = list(per_seed[args.seeds[0]])
    summary = {run: {key: round(float(np.mean([r[run][key] for r in per_seed.values()])), 4)
                     for key in ("end_point_error_px", "attention_near_source", "diffusion_loss")}
               for run in runs}
    evaluations, test_set = first
    suffix = "" if args.family == Family.LEFFA.value else f"_{args.family}"
    figure(args.out / f"toy_attention{suffix}.png", test_set[:3],
           {k: v for k, v in evaluations.items() if k != "untrained"})
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "mean_over_seeds": summary, "per_seed": per_seed}
    tmp = args.out / f".toy_results{suffix}.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    tmp.replace(args.out / f"toy_results{suffix}.json")
    print(json.dumps(report["mean_over_seeds"], indent=2, ensure_ascii=False))
    print(f"figure: {args.out / f'toy_attention{suffix}.png'}")
    return report


if __name__ == "__main__":
    main()
