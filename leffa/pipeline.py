"""Leffa inference pipeline (spec §4), in the style of diffusers' inpainting pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from errors import GenerationStopped, OptionError
from leffa.attention import AttentionFocus, run_reference_unet
from leffa.model import LeffaModel
from leffa.recording import AttentionRecorder
from leffa.sampling import FeatureCache, GuidanceInterval, Sampler, check_cache_interval, step_kwargs
from runtime.sampling import cache_refusal
from runtime.image_tensors import ImageInput, image_to_tensor, mask_to_tensor, repaint_blend
from runtime.placement import Phase, enter_phase, idle_after

OutputType = Literal["pil", "pt", "np"]


@dataclass
class LeffaPipelineOutput:
    """``images``: list of PIL images, float (B, 3, H, W) tensor in [0, 1] ("pt") or
    float (B, H, W, 3) array in [0, 1] ("np")."""

    images: list[Image.Image] | torch.Tensor | np.ndarray


@dataclass
class PipelineInputs:
    """The pipeline's inputs as tensors: images (B, 3, H, W) in [-1, 1], mask (B, 1, H, W) in {0, 1}."""

    src: torch.Tensor
    ref: torch.Tensor
    mask: torch.Tensor
    densepose: torch.Tensor


def _check_sizes(tensors: dict[str, torch.Tensor], factor: int) -> tuple[int, int, int]:
    ref_name, ref = next(iter(tensors.items()))
    b, _, h, w = ref.shape
    for name, t in tensors.items():
        if (t.shape[0], t.shape[2], t.shape[3]) != (b, h, w):
            raise ValueError(f"{name} is {tuple(t.shape)} but {ref_name} is {tuple(ref.shape)}: "
                             "batch size, height and width must match")
    if h % factor or w % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {h}x{w} "
                         f"(the VAE downsamples by {factor})")
    return b, h, w


def latent_conditioning(mask: torch.Tensor, masked_latents: torch.Tensor, densepose: torch.Tensor) -> torch.Tensor:
    """The generative UNet's extra input channels (spec §4.3, §4.7): [mask, masked-image latent,
    DensePose], mask and DensePose resized to the latent with nearest: (B, 1 + 4 + 3, h, w)."""
    hw = masked_latents.shape[-2:]
    to_latent = lambda x: F.interpolate(x, size=hw, mode="nearest").to(masked_latents.device, masked_latents.dtype)
    return torch.cat([to_latent(mask), masked_latents, to_latent(densepose)], dim=1)


def rescale_guidance(eps: torch.Tensor, eps_cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Rescaled CFG (Lin et al. 2023, §3.4): match the std of the conditional prediction."""
    dims = list(range(1, eps.ndim))
    rescaled = eps * (eps_cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * eps


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: scale ``g``, rescale strength, and the steps it applies to."""

    scale: float
    rescale: float
    interval: GuidanceInterval = GuidanceInterval()

    def combine(self, eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
        eps = eps_uncond + self.scale * (eps_cond - eps_uncond)
        return rescale_guidance(eps, eps_cond, self.rescale) if self.rescale > 0 else eps


# -- the pipeline -------------------------------------------------------------------------
class LeffaPipeline:
    """Virtual try-on / pose transfer with a ``LeffaModel``.

    Example::

        model = LeffaModel.from_pretrained(BaseModel.SD15_INPAINTING, "ckpts/virtual_tryon.pth")
        pipe = LeffaPipeline(model)
        out = pipe(person, garment, mask, densepose, generator=torch.Generator().manual_seed(42))
        out.images[0].save("result.png")
    """

    def __init__(self, model: LeffaModel):
        self.model = model
        self.scheduler = model.make_scheduler()
        self.vae_scale_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)  # 8

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _encode(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        vae = self.model.vae
        x = images.to(self.device, vae.dtype)
        posterior = vae.encode(x).latent_dist
        return posterior.sample(generator) * vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        enter_phase(self.model, Phase.DECODE)
        vae = self.model.vae
        x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (x / 2 + 0.5).clamp(0, 1).float()  # in the VAE's dtype, as the original

    def run_reference(self, ref_latents: torch.Tensor, t: torch.Tensor) -> None:
        """Run the reference UNet; its processors store every layer's reference feature. It stops
        after the last feature it captures (the UNet's tail would be unused work); a subclass may
        run it differently (``benchmarks/literal.py`` runs all of it, as the original does)."""
        run_reference_unet(self.model.reference_unet, self.model.attn_state, ref_latents, t)

    @torch.no_grad()
    def __call__(
        self,
        src_image: ImageInput,
        ref_image: ImageInput,
        mask: ImageInput,
        densepose: ImageInput,
        *,
        num_inference_steps: int = 30,
        guidance_scale: float = 2.5,
        guidance_rescale: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        ref_acceleration: bool = False,
        repaint: bool = False,
        output_type: OutputType = "pil",
        callback: Callable[[int, int], bool | None] | None = None,
        attention_recorder: AttentionRecorder | None = None,
        attention_focus: AttentionFocus | None = None,
        sampler: Sampler = Sampler.DDPM,
        guidance_interval: GuidanceInterval = GuidanceInterval(),
        cache_interval: int = 1,
    ) -> LeffaPipelineOutput:
        """Generate.

        Args:
            src_image: the person (try-on) or the target-pose person (pose transfer).
                (B, 3, H, W) in [-1, 1] or PIL; H, W multiples of 8.
            ref_image: the garment (try-on) or the person to keep (pose transfer).
            mask: 1 where the image is generated, 0 where ``src_image`` is kept (tensors binarised at
                0.5, PIL masks at 128, as the original).
            densepose: the DensePose rendering of ``src_image`` (spec §5), in [-1, 1] or PIL.
            num_inference_steps: DDPM steps.
            guidance_scale: classifier-free guidance scale ``g`` (the unconditional branch
                uses an all-zero reference latent). Guidance always runs, as in the original.
            guidance_rescale: strength of rescaled CFG. ``None`` (default) reproduces the
                published behaviour, which uses ``g`` itself; ``0`` turns it off.
            generator: the source of all randomness (VAE posterior sample, initial noise,
                DDPM noise): the same seed gives the same image.
            latents: initial noise (B, 4, H/8, W/8) to use instead of drawing it.
            ref_acceleration: run the reference UNet once, at ``timesteps[n // 2]``, and
                reuse its features at every step (faster, slightly lower quality).
            repaint: paste the result back onto ``src_image`` outside a feathered mask.
            output_type: "pil", "pt" (float (B, 3, H, W) in [0, 1]) or "np".
            callback: called as ``callback(step, total)`` after each denoising step; returning
                ``False`` stops the run (``GenerationStopped`` is raised, nothing is decoded).
            attention_recorder: opt-in attention recording (see ``leffa.recording``); with a
                focus it records the focused attention.
            attention_focus: experimental, off by default: sharpen (or flatten) the attention
                over the reference in chosen layers and steps (``leffa.attention.AttentionFocus``).
            sampler: the scheduler that steps the latents (``leffa.sampling.Sampler``); the
                published DDPM by default. The multistep solvers need far fewer steps.
            guidance_interval: guide only at the steps whose timestep lies in it (fractions of
                the training schedule); the conditional prediction alone, one UNet row instead of
                two, elsewhere. The default ``(0, 1)`` guides every step.
            cache_interval: run the whole generative UNet every ``cache_interval`` steps and only
                its shallow blocks in between, reusing the deep features (DeepCache); 1 = off.
        """
        self.check_inputs(num_inference_steps, output_type)
        sampler, cache_interval = Sampler(sampler), check_cache_interval(cache_interval)
        if not isinstance(guidance_interval, GuidanceInterval):
            guidance_interval = GuidanceInterval(*guidance_interval)
        placement = self.model.placement
        refusal = None if cache_interval == 1 or placement is None else cache_refusal(placement.memory)
        if refusal is not None:
            raise OptionError(refusal)
        rescale = guidance_scale if guidance_rescale is None else guidance_rescale
        # one generation at a time per model (its attention state and this scheduler)
        # under an offloading memory preset, each phase brings what it runs (leffa.memory)
        with self.model.attention_session(recorder=attention_recorder, cache_reference_kv=ref_acceleration,
                                          attention_focus=attention_focus), idle_after(self.model):
            self.scheduler = self.model.make_scheduler(sampler)
            # 1. Check and convert the inputs.
            inputs = self.prepare_inputs(src_image, ref_image, mask, densepose)
            if latents is not None and tuple(latents.shape) != self.latent_shape(inputs):
                raise ValueError(f"latents must have shape {self.latent_shape(inputs)}, got {tuple(latents.shape)}")
            # 2.–3. Encode the masked person and the reference; the extra input channels.
            ref_latents, cond = self.prepare_conditioning(inputs, generator)
            # 4. Timesteps and initial noise.
            timesteps, latents = self.prepare_latents(inputs, num_inference_steps, generator, latents)
            # 5.–7. Reference passes and the denoising loop.
            guidance = Guidance(guidance_scale, rescale, guidance_interval)
            latents = self.denoise(latents, timesteps, ref_latents, cond, guidance, generator, ref_acceleration,
                                   callback, attention_recorder, FeatureCache(self.model.unet, cache_interval))
            # 8. Decode and optionally repaint (spec §4.10–11).
            images = self._decode(latents)
            if repaint:
                images = repaint_blend(((inputs.src + 1) / 2).to(images.device), images, inputs.mask.to(images.device))
            return _output(images.cpu(), output_type)

    @staticmethod
    def check_inputs(num_inference_steps: int, output_type: str) -> None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")

    def prepare_inputs(self, src_image: ImageInput, ref_image: ImageInput, mask: ImageInput,
                       densepose: ImageInput) -> PipelineInputs:
        """The four inputs as tensors of one batch size and size (a multiple of the VAE's factor)."""
        src = image_to_tensor(src_image, "src_image")
        ref = image_to_tensor(ref_image, "ref_image")
        pose = image_to_tensor(densepose, "densepose")
        mask_t = mask_to_tensor(mask)
        _check_sizes({"src_image": src, "ref_image": ref, "mask": mask_t, "densepose": pose}, self.vae_scale_factor)
        return PipelineInputs(src, ref, mask_t, pose)

    def latent_shape(self, inputs: PipelineInputs) -> tuple[int, int, int, int]:
        b, _, h, w = inputs.src.shape
        f = self.vae_scale_factor
        return b, self.model.vae.config.latent_channels, h // f, w // f

    def prepare_conditioning(self, inputs: PipelineInputs,
                             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG batch of reference latents, [zeros; reference] (spec §4.6), and the generative
        UNet's extra channels [mask, masked-person latent, DensePose], duplicated (spec §4.1–3)."""
        enter_phase(self.model, Phase.ENCODE)
        dtype = self.model.dtype
        masked_latents = self._encode(inputs.src * (inputs.mask < 0.5), generator).to(dtype)
        ref_latents = self._encode(inputs.ref, generator).to(dtype)
        cond = latent_conditioning(inputs.mask, masked_latents, inputs.densepose)
        return torch.cat([torch.zeros_like(ref_latents), ref_latents]), cond.repeat(2, 1, 1, 1)

    def prepare_latents(self, inputs: PipelineInputs, num_inference_steps: int, generator: torch.Generator | None,
                        latents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and the initial noise × ``init_noise_sigma`` (spec §4.4–5)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        if latents is None:
            latents = randn_tensor(self.latent_shape(inputs), generator=generator, device=self.device, dtype=self.model.dtype)
        return self.scheduler.timesteps, latents.to(self.device, self.model.dtype) * self.scheduler.init_noise_sigma

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, ref_latents: torch.Tensor,
                cond: torch.Tensor, guidance: Guidance, generator: torch.Generator | None,
                ref_acceleration: bool, callback: Callable[[int, int], bool | None] | None,
                recorder: AttentionRecorder | None, cache: FeatureCache) -> torch.Tensor:
        """Steps 5–7: the reference passes and the denoising loop (spec §4.7–9). A step outside the
        guidance interval runs the conditional rows alone: the second half of the CFG batch."""
        model, scheduler = self.model, self.scheduler
        batch = latents.shape[0]
        cond_rows = slice(batch, 2 * batch)
        extra = step_kwargs(scheduler, generator)
        num_train = scheduler.config.num_train_timesteps
        if recorder is not None:
            recorder.begin(tuple(latents.shape[-2:]), batch=cond_rows)
        try:
            if ref_acceleration:  # one reference pass at timesteps[n // 2] (spec §4.9)
                enter_phase(model, Phase.REFERENCE)
                self.run_reference(ref_latents, timesteps[len(timesteps) // 2])
            enter_phase(model, Phase.DENOISE, ref_acceleration)
            for i, t in enumerate(timesteps):
                guided = guidance.interval.guides(t, num_train)
                model.attn_state.set_step(i, len(timesteps))
                model.attn_state.reference_rows = None if guided or not ref_acceleration else cond_rows
                if recorder is not None:
                    recorder.set_step(i)
                    recorder.keep_rows(cond_rows if guided else slice(None))
                if not ref_acceleration:
                    self.run_reference(ref_latents if guided else ref_latents[cond_rows], t)
                if guided:
                    x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                    eps = cache.run(i, torch.cat([x, cond], dim=1), t)
                    eps = guidance.combine(*eps.chunk(2))
                else:
                    x = scheduler.scale_model_input(latents, t)
                    eps = cache.run(i, torch.cat([x, cond[cond_rows]], dim=1), t)
                latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
                if callback is not None and callback(i + 1, len(timesteps)) is False:
                    raise GenerationStopped(f"stopped after step {i + 1} of {len(timesteps)}")
        finally:
            if recorder is not None:
                recorder.set_step(None)
            model.attn_state.reference_rows = None
        return latents


def _output(images: torch.Tensor, output_type: OutputType) -> LeffaPipelineOutput:
    """(B, 3, H, W) in [0, 1] on the CPU as ``output_type``."""
    if output_type == "pt":
        return LeffaPipelineOutput(images=images)
    arrays = images.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return LeffaPipelineOutput(images=arrays)
    return LeffaPipelineOutput(images=[Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays])
