"""Cheaper denoising, training-free (issue 24): the sampler, guidance in an interval of noise levels,
and the generative UNet's deep features reused between steps. The defaults reproduce the published
30 DDPM steps with guidance at every step, bit for bit.

* ``Sampler``: which diffusers scheduler steps the latents. DDPM (Ho et al. 2020) is the published
  one. DDIM (Song et al. 2021), DPM-Solver++ 2M (Lu et al. 2022) and UniPC (Zhao et al. 2023) reach a
  similar image in far fewer steps; all four read the base model's scheduler config (its betas), and
  SDXL's zero-SNR rescaling (spec §4.5).
* ``GuidanceInterval`` (Kynkäänniemi et al., "Applying guidance in a limited interval improves sample
  and distribution quality in diffusion models", NeurIPS 2024): classifier-free guidance only at the
  steps whose timestep lies in ``[start, end]`` (fractions of the training schedule, t / 1000); the
  other steps run the conditional branch alone, one UNet row instead of two. ``(0, 1)`` is plain CFG.
* ``FeatureCache`` (DeepCache, Ma et al., CVPR 2024): every ``interval``-th step runs the whole
  generative UNet and keeps what its deep path hands to the last up block; the steps between recompute
  only the shallow path (``conv_in``, the first down block, the last up block, the output convs) and
  reuse it. ``interval`` 1 runs every step whole.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from runtime.sampling import GuidanceInterval, Sampler, check_cache_interval

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import SchedulerMixin, UNet2DConditionModel

__all__ = ["FeatureCache", "GuidanceInterval", "Sampler", "check_cache_interval", "make_scheduler", "step_kwargs"]


_SCHEDULERS = {
    Sampler.DDPM: (DDPMScheduler, {}),
    Sampler.DDIM: (DDIMScheduler, {}),
    Sampler.DPM_SOLVER: (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler.UNIPC: (UniPCMultistepScheduler, {"solver_order": 2}),
}


def make_scheduler(config: dict[str, Any], sampler: Sampler = Sampler.DDPM, zero_snr: bool = False) -> SchedulerMixin:
    """``sampler``'s scheduler from a base model's scheduler config (its betas and timestep spacing),
    with zero-SNR rescaled betas where the model was trained with them (SDXL, spec §4.5)."""
    cls, extra = _SCHEDULERS[Sampler(sampler)]
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config(cfg, rescale_betas_zero_snr=zero_snr, **extra)


def step_kwargs(scheduler: SchedulerMixin, generator) -> dict[str, Any]:
    """The generator for schedulers that draw noise (DDPM; DDIM and DPM-Solver take one), none for
    those whose ``step`` has no such argument (UniPC)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


class FeatureCache:
    """DeepCache on a diffusers ``UNet2DConditionModel`` (module docstring). ``run`` is called once per
    denoising step with the step's index; it runs the whole UNet on steps ``0, interval, 2·interval``
    ... and keeps the input of the last up block, and only the shallow path on the others.

    The shallow path repeats ``UNet2DConditionModel.forward`` for a model with no class, text or
    addition embeddings (Leffa's UNets; ``check_unet``)."""

    def __init__(self, unet: UNet2DConditionModel, interval: int):
        self.unet, self.interval = unet, check_cache_interval(interval)
        if self.interval > 1:
            self.check_unet(unet)
        self.deep: torch.Tensor | None = None  # (B, C, h, w): what up_blocks[-2] hands the last up block

    @staticmethod
    def check_unet(unet: UNet2DConditionModel) -> None:
        """The shallow path supports UNets of two or more blocks with only a timestep embedding."""
        c = unet.config
        odd = {"class_embed_type": c.class_embed_type, "addition_embed_type": c.addition_embed_type,
               "center_input_sample": c.center_input_sample or None, "time_cond_proj_dim": c.time_cond_proj_dim}
        odd = {k: v for k, v in odd.items() if v is not None}
        if odd or len(unet.up_blocks) < 2:
            raise NotImplementedError(f"the feature cache supports UNets with two or more blocks and no extra "
                                      f"embeddings, got {odd or len(unet.up_blocks)}")

    def run(self, step: int, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.interval == 1:
            return self.unet(sample, timestep, encoder_hidden_states=None, return_dict=False)[0]
        rows, deep = sample.shape[0], self.deep
        if not self.reuses(step, self.interval, rows, None if deep is None else deep.shape[0]):
            return self.full(sample, timestep)
        # a step outside the guidance interval runs the conditional rows alone: the second half of
        # the [unconditional; conditional] batch the features were kept from
        return self.shallow(sample, timestep, deep[-rows:])

    @staticmethod
    def reuses(step: int, interval: int, rows: int, kept_rows: int | None) -> bool:
        """Whether step ``step`` (of ``rows`` batch rows) runs the shallow path: not on every
        ``interval``-th step, and only with kept features whose rows fit it (as many, or a guided
        step's twice as many for a step that runs the conditional rows alone)."""
        return interval > 1 and step % interval != 0 and kept_rows in (rows, 2 * rows)

    def full(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The whole UNet, keeping the last up block's input."""
        last = self.unet.up_blocks[-1]

        def keep(module, args, kwargs):
            self.deep = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        handle = last.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            return self.unet(sample, timestep, encoder_hidden_states=None, return_dict=False)[0]
        finally:
            handle.remove()

    def shallow(self, sample: torch.Tensor, timestep: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """The shallow path with the kept deep features: ``conv_in`` and the first down block give the
        last up block's skip connections (all but the first block's downsampled output, which fed the
        deep path)."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        h = unet.conv_in(sample)
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        if getattr(first, "has_cross_attention", False):
            _, res = first(hidden_states=h, temb=emb, encoder_hidden_states=None)
        else:
            _, res = first(hidden_states=h, temb=emb)
        skips = ((h,) + tuple(res))[: len(last.resnets)]
        if getattr(last, "has_cross_attention", False):
            out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=None)
        else:
            out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        return unet.conv_out(out)
