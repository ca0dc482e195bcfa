"""Toy reproduction of the paper's claim: the Leffa loss makes attention follow the garment.

    python -m experiments.toy_flow                 # ~5 min on 2 CPU cores
    python -m experiments.toy_flow --steps 600 --out docs/toy

A synthetic try-on dataset: a textured garment (stripes, text, a logo) on white is warped
onto a target by a known random affine transform (scale, rotation, shift); the mask is the
warped garment. A tiny Leffa model (both UNets trainable, random frozen VAE) is trained from
the same diffusion-only pre-training twice more, with only the diffusion loss and with the
diffusion loss plus λ·Leffa loss (the paper adds the loss in the last stage only). On held-out samples we record the generative-over-reference attention of the
finest layers and measure the end-point error (in pixels) between its flow field and the
true warp inside the mask. Prints both figures and writes a figure of attention heatmaps and
attention-warped garments.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from leffa.loss import warp_with_flow
from leffa.model import LeffaModel
from leffa.pipeline import latent_conditioning
from leffa.recording import FlowRecorder
from leffa.train import LeffaTrainingModule, TrainConfig, training_step

H, W = 128, 96
TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1, "attention_head_dim": 4, "cross_attention_dim": 32, "in_channels": 9,
    "out_channels": 4, "norm_num_groups": 8, "sample_size": 16,
}


# -- data ---------------------------------------------------------------------------------------
def garment(rng: np.random.Generator) -> Image.Image:
    """A textured garment on white: a smooth colour ramp (so that every point of the garment
    looks locally different, as on a real print) under stripes, a logo and a text line."""
    x0, y0, x1, y1 = 14, 12, W - 14, H - 12
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    ramp = np.stack([(xs - x0) / (x1 - x0), (ys - y0) / (y1 - y0), np.full_like(xs, rng.uniform(0.2, 0.8))], -1)
    ramp = np.clip(ramp[..., rng.permutation(3)] * 215 + 20, 0, 255).astype(np.uint8)
    img = Image.new("RGB", (W, H), "white")
    img.paste(Image.fromarray(ramp).crop((x0, y0, x1, y1)), (x0, y0))
    over = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    stripe = tuple(int(v) for v in rng.integers(0, 255, 3)) + (90,)
    period = int(rng.integers(8, 16))
    if rng.random() < 0.5:
        for y in range(y0, y1, period):
            d.rectangle([x0, y, x1, y + period // 2], fill=stripe)
    else:
        for x in range(x0, x1, period):
            d.rectangle([x, y0, x + period // 2, y1], fill=stripe)
    cx, cy = int(rng.integers(30, 66)), int(rng.integers(30, 60))
    d.ellipse([cx - 12, cy - 12, cx + 12, cy + 12], fill=tuple(int(v) for v in rng.integers(0, 255, 3)) + (255,),
              outline=(0, 0, 0, 255), width=2)
    d.text((x0 + 4, int(rng.integers(70, 100))), "".join(rng.choice(list("LEFFA25XO"), 5)), fill=(0, 0, 0, 255),
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


def make_sample(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Tensors in the pipeline's conventions plus the true flow (H, W, 2) in grid_sample units."""
    g = garment(rng)
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


def make_set(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [make_sample(rng) for _ in range(n)]


def batch_of(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# -- model, training, evaluation ---------------------------------------------------------------------
def build_model(seed: int) -> LeffaModel:
    """Both UNets start from one random base UNet, as the published models start from one
    Stable Diffusion inpainting UNet (``LeffaModel.from_base_weights``)."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from leffa.model import CONFIG_ROOT

    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(TINY_UNET).save_pretrained(folder / "unet")
    AutoencoderKL.from_config(json.loads((CONFIG_ROOT / "tiny" / "vae" / "config.json").read_text())).save_pretrained(
        folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        (CONFIG_ROOT / "tiny" / "scheduler" / "scheduler_config.json").read_text())
    return LeffaModel.from_base_weights(folder)


def train_run(model: LeffaModel, data: list[dict], steps: int, lam: float, batch: int, lr: float, seed: int, log):
    cfg = TrainConfig(output_dir="", data_root="", lambda_leffa=lam, ref_dropout=0.0)
    module = LeffaTrainingModule(model).train()
    model.vae.requires_grad_(False)
    params = [p for u in (model.unet, model.unet_encoder) for p in u.parameters()]
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
        if step % 50 == 0 or step == steps:
            log(f"  step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))


@torch.no_grad()
def attention_flows(model: LeffaModel, samples: list[dict], t: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    """Flow fields (B, h, w, 2) of the finest attention layers (τ = 1: the attention the model uses)."""
    b = batch_of(samples)
    g = torch.Generator().manual_seed(seed)
    vae, sf = model.vae, model.vae.config.scaling_factor
    enc = lambda x: vae.encode(x).latent_dist.sample(g) * sf
    latents, masked, ref = enc(b["src_image"]), enc(b["src_image"] * (b["mask"] < 0.5)), enc(b["ref_image"])
    ts = torch.full((len(samples),), t)
    noisy = model.make_scheduler().add_noise(latents, torch.randn(latents.shape, generator=g), ts)
    hw = latents.shape[-2:]
    cond = latent_conditioning(b["mask"], masked, b["densepose"])
    rec = FlowRecorder(tau=1.0)
    module = LeffaTrainingModule(model).eval()
    module(noisy, ts, cond, ref, rec)
    module.release()
    return {k: v for k, v in rec.flows.items() if v.shape[1] == hw[0]}  # the latent-resolution layers


def end_point_error(flows: dict[str, torch.Tensor], samples: list[dict]) -> float:
    """Mean distance in pixels, inside the mask, between the layer-averaged attention flow
    (upsampled to the image) and the true warp."""
    b = batch_of(samples)
    flow = torch.stack(list(flows.values())).mean(0)  # (B, h, w, 2)
    up = F.interpolate(flow.permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    scale = torch.tensor([(W - 1) / 2, (H - 1) / 2])
    err = ((up - b["true_flow"]) * scale).norm(dim=-1)  # (B, H, W) pixels
    m = b["mask"][:, 0] > 0
    return float(err[m].mean())


def figure(path: Path, samples, flows_by_run: dict[str, dict[str, torch.Tensor]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = batch_of(samples)
    show = lambda x: ((x.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
    runs = list(flows_by_run)
    fig, axes = plt.subplots(len(samples), 3 + 2 * len(runs), figsize=(2.0 * (3 + 2 * len(runs)), 2.6 * len(samples)))
    for i in range(len(samples)):
        ys, xs = torch.nonzero(b["mask"][i, 0], as_tuple=True)
        qy, qx = int(ys.float().mean()), int(xs.float().mean())  # a query point inside the garment
        true_src = (b["true_flow"][i, qy, qx] + 1) / 2 * torch.tensor([W - 1, H - 1])
        panels = [("garment (reference)", show(b["ref_image"][i]), true_src),
                  ("target + query", show(b["src_image"][i]), (qx, qy)),
                  ("true warp", show(warp_with_flow(b["ref_image"][i:i + 1], b["true_flow"][i:i + 1])[0]), None)]
        for run in runs:
            flow = torch.stack(list(flows_by_run[run].values())).mean(0)[i:i + 1]
            h, w = flow.shape[1:3]
            # the query's attention target: its flow vector, marked on the garment
            fy, fx = min(int(qy / H * h), h - 1), min(int(qx / W * w), w - 1)
            looked = (flow[0, fy, fx] + 1) / 2 * torch.tensor([W - 1, H - 1])
            panels.append((f"{run}: attention of query", show(b["ref_image"][i]), looked))
            panels.append((f"{run}: attention warp", show(warp_with_flow(b["ref_image"][i:i + 1], flow)[0]), None))
        for ax, (title, img, point) in zip(axes[i], panels):
            ax.imshow(img)
            if point is not None:
                ax.plot(float(point[0]), float(point[1]), "o", ms=9, mfc="none", mec="lime", mew=2.5)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=300,
                   help="diffusion-only steps both runs share (the paper adds the loss in the last stage)")
    p.add_argument("--steps", type=int, default=300, help="steps of the compared stage")
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--lambda-leffa", type=float, default=1.0,
                   help="toy weight (paper 1e-3 over far longer training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/toy"))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = make_set(args.train_size, args.seed), make_set(16, args.seed + 1)
    results, flows = {}, {}
    pre = build_model(args.seed)
    print(f"shared stage: {args.pretrain_steps} steps, diffusion loss only")
    start = time.perf_counter()
    train_run(pre, train_set, args.pretrain_steps, 0.0, args.batch, args.lr, args.seed + 100, print)
    results["after the shared stage"] = {"end_point_error_px": round(end_point_error(
        attention_flows(pre.eval(), test_set), test_set), 3), "train_seconds": round(time.perf_counter() - start, 1)}
    init = pre.state_dict()
    for name, lam in (("without Leffa loss", 0.0), ("with Leffa loss", args.lambda_leffa)):
        model = build_model(args.seed)
        model.load_state_dict(init)
        print(f"{name} (λ = {lam}):")
        start = time.perf_counter()
        train_run(model, train_set, args.steps, lam, args.batch, args.lr, args.seed, print)
        flows[name] = attention_flows(model.eval(), test_set)
        results[name] = {"end_point_error_px": round(end_point_error(flows[name], test_set), 3),
                         "train_seconds": round(time.perf_counter() - start, 1)}
    results["untrained"] = {"end_point_error_px": round(end_point_error(
        attention_flows(build_model(args.seed).eval(), test_set), test_set), 3)}
    figure(args.out / "toy_attention.png", test_set[:3], {k: {n: f[:3] for n, f in v.items()} for k, v in flows.items()})
    summary = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "results": results}
    (args.out / "toy_results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"figure: {args.out / 'toy_attention.png'}")


if __name__ == "__main__":
    main()
