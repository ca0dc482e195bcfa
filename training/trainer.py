"""Training and fine-tuning Leffa (paper §3.3–3.4), and the CatVTON-style concatenation model
(``family = "concat"``, ``leffa.concat``) with the same loss, on one GPU or many through Accelerate.

    python -m training --config configs/finetune_viton_hd.toml
    accelerate launch --num_processes 8 -m training --config ...     # several GPUs / nodes

Loss: the diffusion loss (Eq. 1) plus λ_leffa × the Leffa loss (Eq. 4–5) in the stages that
turn it on. Leffa's two UNets (or the concatenation model's one) train; the VAE is frozen.
Progressive stages (resolution, steps, Leffa loss on/off) come from the config. Checkpoints
(``{output_dir}/checkpoints/step-N/``) hold Accelerate's full state for resuming and
``{family}.safetensors`` (or ``.pth``): for Leffa the published key layout, which
``LeffaModel.from_pretrained`` and the app load unchanged; for the concatenation model
``vae.*``/``unet.*``, which ``ConcatModel.from_pretrained`` and ``leffa infer --model concat_tryon``
load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from engine.registry import Family
from errors import OptionError, UserError, enum_option
from leffa.attention import run_reference_unet
from leffa.concat import CONCAT, ConcatModel, conditioning
from leffa.loss import LAMBDA_LEFFA, TAU, THETA_RESOLUTION, THETA_TIMESTEP, diffusion_loss, flow_loss
from leffa.model import BaseModel, LeffaModel
from leffa.pipeline import latent_conditioning
from leffa.recording import AttentionRecorder, FlowRecorder


@dataclass
class Stage:
    steps: int
    resolution: tuple[int, int] = (1024, 768)  # (height, width), multiples of 8
    leffa_loss: bool = False
    batch_size: int | None = None  # None: the config's batch_size
    name: str = ""


@dataclass
class TrainConfig:
    output_dir: str
    data_root: str
    family: Family = Family.LEFFA  # what is trained: leffa, or concat (CatVTON-style, leffa.concat)
    data_layout: str = "viton_hd"  # a training.datasets.DatasetLayout value
    split: str = "train"
    paired: bool = True
    init: Literal["checkpoint", "base_weights", "random"] = "checkpoint"
    base: str = BaseModel.SD15_INPAINTING.value  # base config: a BaseModel value or a folder
    checkpoint: str | None = None  # init = checkpoint: a published or saved .pth/.safetensors of the family
    base_weights: str | None = None  # init = base_weights: a diffusers SD(XL)-inpainting folder (concat: SD1.5)
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    num_workers: int = 2
    seed: int = 0
    save_every: int = 1000
    save_format: Literal["safetensors", "pth"] = "safetensors"
    ref_dropout: float = 0.1  # drop the reference / garment (zero latent) so CFG's unconditional branch is learnt
    lambda_leffa: float = LAMBDA_LEFFA
    tau: float = TAU
    theta_resolution: float = THETA_RESOLUTION
    theta_timestep: int = THETA_TIMESTEP
    stages: list[Stage] = field(default_factory=list)


def _check_literal(cfg: TrainConfig) -> None:
    for name, hint in typing.get_type_hints(TrainConfig).items():
        if typing.get_origin(hint) is Literal and getattr(cfg, name) not in typing.get_args(hint):
            raise OptionError(f"{name} must be one of {', '.join(typing.get_args(hint))}; got {getattr(cfg, name)!r}")


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML config: top-level keys of ``TrainConfig`` and ``[[stages]]`` tables."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise OptionError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"{path} is not valid TOML: {e}") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise OptionError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    stage_keys = {f.name for f in dataclasses.fields(Stage)}
    stages = []
    for i, s in enumerate(raw.pop("stages", [])):
        bad = sorted(set(s) - stage_keys)
        if bad:
            raise OptionError(f"{path}: stage {i + 1}: unknown setting(s) {', '.join(bad)}")
        stages.append(Stage(**{**s, "resolution": tuple(s.get("resolution", (1024, 768)))}))
    try:
        cfg = TrainConfig(**raw, stages=stages)
    except TypeError as e:
        raise OptionError(f"{path}: {e}") from None
    _check_literal(cfg)
    cfg.family = enum_option(Family, cfg.family, "family")
    if cfg.family not in TRAINABLE:
        raise OptionError(f"{path}: family must be one of {', '.join(f.value for f in TRAINABLE)}; "
                          f"{cfg.family.value} is not trained here")
    from training.datasets import DatasetLayout

    enum_option(DatasetLayout, cfg.data_layout, "data_layout")
    if not stages:
        raise OptionError(f"{path}: no [[stages]]")
    for i, s in enumerate(stages):
        if s.steps < 1 or s.resolution[0] % 8 or s.resolution[1] % 8:
            raise OptionError(f"{path}: stage {i + 1}: steps must be >= 1 and the resolution multiples of 8")
    if cfg.init == "checkpoint" and not cfg.checkpoint:
        raise OptionError(f"{path}: init = 'checkpoint' needs checkpoint = '...'")
    if cfg.init == "base_weights" and not cfg.base_weights:
        raise OptionError(f"{path}: init = 'base_weights' needs base_weights = '...'")
    return cfg


TRAINABLE = {Family.LEFFA: LeffaModel, Family.CONCAT: ConcatModel}
Model = LeffaModel | ConcatModel


def build_model(cfg: TrainConfig) -> Model:
    cls = TRAINABLE[Family(cfg.family)]
    base = BaseModel(cfg.base) if cfg.base in {b.value for b in BaseModel} else Path(cfg.base)
    if cfg.init == "checkpoint":
        return cls.from_pretrained(base, cfg.checkpoint)
    if cfg.init == "base_weights":
        return cls.from_base_weights(cfg.base_weights)
    return cls.from_config_dir(base)


def trained_unets(model: Model) -> tuple[nn.Module, ...]:
    """What training updates: Leffa's generative and reference UNets, or the concatenation model's UNet."""
    return (model.unet, model.reference_unet) if isinstance(model, LeffaModel) else (model.unet,)


class _TrainingModule(nn.Module):
    """The trainable part as one module, so that DDP wraps one forward. The model's attention session
    (its lock, the recorder) lasts from ``forward`` to ``release``."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model
        self._session = ExitStack()

    def release(self) -> None:
        """End the attention session of the last forward pass (after ``backward``): drops the
        reference features and the recorder and frees the model for other users."""
        self._session.close()


class LeffaTrainingModule(_TrainingModule):
    """Leffa's two UNets."""

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, ref_latents: torch.Tensor,
                recorder: FlowRecorder | AttentionRecorder | None = None) -> torch.Tensor:
        """Noise prediction (B, 4, h, w). ``cond`` = [mask, masked-image latent, DensePose] (8 ch).

        ``recorder``: a ``FlowRecorder`` for the Leffa loss, or an ``AttentionRecorder`` (with
        its step set) to inspect the attention of one forward pass.

        The reference features and the recorder stay in the model's attention state until
        ``release()`` after the backward pass: with gradient checkpointing, a generative block
        is recomputed then and must read (and record) exactly what it did in the forward pass.
        """
        self.release()  # a forward pass without release() (e.g. evaluation) ends here
        state = self._session.enter_context(self.model.attention_session(recorder=recorder))
        if recorder is not None:
            recorder.begin(tuple(noisy.shape[-2:]))
        run_reference_unet(self.model.reference_unet, state, ref_latents, timesteps)
        return self.model.unet(torch.cat([noisy, cond], dim=1), timesteps, encoder_hidden_states=None).sample


class ConcatTrainingModule(_TrainingModule):
    """The concatenation model's UNet (``leffa.concat``)."""

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                recorder: FlowRecorder | AttentionRecorder | None = None) -> torch.Tensor:
        """Noise prediction (B, 4, 2h, w) over [person | garment] (``leffa.concat.CONCAT``); ``cond`` =
        ``leffa.concat.conditioning`` (5 ch). ``recorder`` records the person half's attention over the
        garment half, until ``release()`` (as ``LeffaTrainingModule``)."""
        self.release()
        target_hw = tuple(CONCAT.target_half(noisy).shape[-2:])
        self._session.enter_context(self.model.attention_session(recorder=recorder, target_hw=target_hw))
        return self.model.unet(torch.cat([noisy, cond], dim=1), timesteps, encoder_hidden_states=None).sample


def training_module(model: Model) -> _TrainingModule:
    return LeffaTrainingModule(model) if isinstance(model, LeffaModel) else ConcatTrainingModule(model)


@torch.no_grad()
def encode_batch(vae, batch: dict, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled VAE latents (sampled, in this order) of the target, of the target with the mask
    region blanked (the inpainting input), and of the reference."""
    src, mask = batch["src_image"], batch["mask"]
    sf = vae.config.scaling_factor
    return tuple(vae.encode(x.to(vae.dtype)).latent_dist.sample(generator) * sf
                 for x in (src, src * (mask < 0.5), batch["ref_image"]))


def training_step(module: _TrainingModule, vae, scheduler, batch: dict, cfg: TrainConfig, use_leffa: bool,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch: (loss, {"diffusion": ..., "leffa": ...}). Leffa denoises the person, its reference
    UNet reading the garment; the concatenation model denoises [person | garment] in one latent, the
    garment also in the conditioning. Either way a dropped garment is a zero latent where the model
    reads it, and the Leffa loss sees the person's queries over the garment's keys."""
    src, ref, mask, pose = (batch[k] for k in ("src_image", "ref_image", "mask", "densepose"))
    device = src.device
    latents, masked, ref_latents = encode_batch(vae, batch, generator)
    b = latents.shape[0]
    dropped = torch.rand(b, generator=generator).to(device) < cfg.ref_dropout
    kept_ref = torch.where(dropped[:, None, None, None], torch.zeros_like(ref_latents), ref_latents)
    concat = Family(cfg.family) is Family.CONCAT
    if concat:
        latents = CONCAT.latent(latents, ref_latents)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    recorder = FlowRecorder(tau=cfg.tau) if use_leffa else None
    if concat:
        pred = module(noisy, t, conditioning(mask, masked, kept_ref), recorder)
    else:
        pred = module(noisy, t, latent_conditioning(mask, masked, pose), kept_ref, recorder)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    loss = diffusion_loss(pred, target)
    parts = {"diffusion": loss.item()}
    if recorder is not None:
        # a dropped reference has nothing to align with: gate it out like a large timestep
        gated_t = torch.where(dropped, torch.full_like(t, cfg.theta_timestep), t)
        leffa = flow_loss(recorder.flows, ref.float(), src.float(), mask.float(), gated_t,
                          theta_resolution=cfg.theta_resolution, theta_timestep=cfg.theta_timestep)
        loss = loss + cfg.lambda_leffa * leffa
        parts["leffa"] = leffa.item()
    return loss, parts


@dataclass
class _Progress:
    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def weights_name(cfg: TrainConfig) -> str:
    """The exported weights' file name in a checkpoint folder: ``leffa.safetensors``, ``concat.pth``, ..."""
    return f"{Family(cfg.family).value}.{cfg.save_format}"


def _save_weights(model: Model, folder: Path, name: str) -> Path:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = folder / name
    tmp = folder / f".{name}.tmp"
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp))
    else:
        torch.save(state, tmp)
    tmp.replace(path)
    return path


@dataclass
class _Run:
    """What a training run holds between steps (Accelerate objects, the model, the progress)."""

    accelerator: object  # accelerate.Accelerator
    model: Model
    module: nn.Module  # the family's training module, wrapped by Accelerate
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    scheduler: object  # the noise scheduler
    progress: _Progress
    ckpt_dir: Path
    generator: torch.Generator | None = None

    @property
    def latest(self) -> Path:
        return self.ckpt_dir / "latest"


def _setup(cfg: TrainConfig, log) -> _Run:
    """Accelerate, the model (VAE frozen), AdamW over its UNets, and a resume from the latest
    checkpoint when there is one."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        project_dir=str(out),
        # attn2 weights (no text encoder) and the reference UNet's unused tail get no gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    model = build_model(cfg)
    model.vae.requires_grad_(False).eval()
    model.vae.to(accelerator.device)
    unets = trained_unets(model)
    if cfg.gradient_checkpointing:
        for unet in unets:
            unet.enable_gradient_checkpointing()
    module = training_module(model)
    params = [p for u in unets for p in u.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    module, optimizer = accelerator.prepare(module, optimizer)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)
    run = _Run(accelerator, model, module, optimizer, params, model.make_scheduler(), progress, out / "checkpoints")
    if run.latest.is_file():
        accelerator.load_state(str(run.ckpt_dir / run.latest.read_text().strip()))
        if accelerator.is_main_process:
            log(f"resumed from {run.latest.read_text().strip()} at step {progress.step}")
    run.generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index + progress.step)
    return run


def _save_checkpoint(run: _Run, cfg: TrainConfig, log) -> Path:
    """The full state (for resuming) and the weights in the published layout; ``latest`` last."""
    accelerator = run.accelerator
    folder = run.ckpt_dir / f"step-{run.progress.step}"
    accelerator.save_state(str(folder))
    path = folder / weights_name(cfg)
    if accelerator.is_main_process:
        path = _save_weights(accelerator.unwrap_model(run.module).model, folder, path.name)
        tmp = run.ckpt_dir / ".latest.tmp"
        tmp.write_text(folder.name)
        tmp.replace(run.latest)
    log(f"saved {path}")
    accelerator.wait_for_everyone()
    return path


def _run_stage(run: _Run, cfg: TrainConfig, index: int, stage: Stage, start: int, end: int, log) -> Path | None:
    """Train until step ``end``; the last checkpoint saved, if any."""
    from torch.utils.data import DataLoader

    from training.datasets import LeffaDataset

    accelerator, progress, saved = run.accelerator, run.progress, None
    h, w = stage.resolution
    if isinstance(run.model, ConcatModel):
        factor = 2 ** (len(run.model.vae.config.block_out_channels) - 1)
        run.model.check_latent((h // factor, w // factor))
    data = LeffaDataset(cfg.data_layout, cfg.data_root, cfg.split, cfg.paired, size=(w, h))
    loader = accelerator.prepare(DataLoader(data, batch_size=stage.batch_size or cfg.batch_size, shuffle=True,
                                            num_workers=cfg.num_workers, drop_last=True))
    log(f"stage {index + 1}/{len(cfg.stages)} {stage.name!r}: {h}x{w}, steps {start}..{end}, "
        f"Leffa loss {'on' if stage.leffa_loss else 'off'}, {len(data)} samples, "
        f"{accelerator.num_processes} process(es) ({accelerator.distributed_type.value})")
    run.module.train()
    while progress.step < end:
        for batch in loader:
            with accelerator.accumulate(run.module):
                loss, parts = training_step(run.module, run.model.vae, run.scheduler, batch, cfg, stage.leffa_loss,
                                            run.generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad()
            accelerator.unwrap_model(run.module).release()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} at step {progress.step}")
            if accelerator.sync_gradients:
                progress.step += 1
                if progress.step % 10 == 0 or progress.step == end:
                    log(json.dumps({"step": progress.step, "loss": round(loss.item(), 6),
                                    **{k: round(v, 6) for k, v in parts.items()}}))
                if progress.step % cfg.save_every == 0 or progress.step == end:
                    saved = _save_checkpoint(run, cfg, log)
            if progress.step >= end:
                break
    return saved


def train(cfg: TrainConfig, log=print) -> Path:
    """Run (or resume) every stage; return the last exported weights file."""
    run = _setup(cfg, log)
    if not run.accelerator.is_main_process:
        log = lambda *_: None  # noqa: E731 -- one process reports
    saved, end = None, 0
    for i, stage in enumerate(cfg.stages):
        start, end = end, end + stage.steps
        if run.progress.step < end:
            saved = _run_stage(run, cfg, i, stage, start, end, log) or saved
    run.accelerator.end_training()
    return saved or run.ckpt_dir / run.latest.read_text().strip() / weights_name(cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="TOML config (see configs/)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except UserError as e:
        print(f"error: {e}")
        return 2
    path = train(cfg)
    print(f"final weights: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
