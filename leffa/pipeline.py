"""Leffa inference pipeline (spec §4), in the style of diffusers' inpainting pipeline."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageFilter

from leffa.attention import run_reference_unet
from leffa.model import LeffaModel
from leffa.recording import AttentionRecorder

ImageInput = torch.Tensor | Image.Image | Sequence[Image.Image]
OutputType = Literal["pil", "pt", "np"]


@dataclass
class LeffaPipelineOutput:
    """``images``: list of PIL images, float (B, 3, H, W) tensor in [0, 1] ("pt") or
    float (B, H, W, 3) array in [0, 1] ("np")."""

    images: list[Image.Image] | torch.Tensor | np.ndarray


# -- input conversion and validation ------------------------------------------------------
def _pil_list(x: ImageInput) -> list[Image.Image] | None:
    if isinstance(x, Image.Image):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(i, Image.Image) for i in x):
        return list(x)
    return None


def image_to_tensor(x: ImageInput, name: str) -> torch.Tensor:
    """PIL image(s) or a (B, 3, H, W) / (3, H, W) tensor in [-1, 1] -> (B, 3, H, W) float."""
    pil = _pil_list(x)
    if pil is not None:
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in pil]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"{name}: the images of a batch must have the same size")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a PIL image, a list of them or a tensor, got {type(x).__name__}")
    t = x.unsqueeze(0) if x.ndim == 3 else x
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [-1, 1], got {t.dtype}")
    lo, hi = t.min().item(), t.max().item()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"{name}: values must lie in [-1, 1] (found {lo:.3g}..{hi:.3g}); "
                         "scale uint8 images with x / 127.5 - 1")
    return t.float()


def mask_to_tensor(x: ImageInput) -> torch.Tensor:
    """PIL mask(s) (binarised at 128) or a {0, 1} tensor -> (B, 1, H, W) float, 1 = generate."""
    pil = _pil_list(x)
    if pil is not None:
        arrays = [(np.asarray(im.convert("L")) >= 128).astype(np.float32) for im in pil]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("mask: the masks of a batch must have the same size")
        return torch.from_numpy(np.stack(arrays))[:, None]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mask: expected a PIL image, a list of them or a tensor, got {type(x).__name__}")
    t = x
    while t.ndim < 4:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"mask: expected shape (B, 1, H, W), (1, H, W) or (H, W), got {tuple(x.shape)}")
    if not torch.all((t == 0) | (t == 1)):
        raise ValueError("mask: values must be 0 (keep) or 1 (generate); binarise it first, "
                         "e.g. (mask > 0.5).float()")
    return t.float()


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


def repaint_blend(person: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste the generated region back onto the person with a feathered mask (spec §4.11).

    person, generated: (B, 3, H, W) in [0, 1]; mask: (B, 1, H, W) in {0, 1}. The mask is
    blurred with PIL's Gaussian of radius k = H // 100 rounded up to odd (11 at 1024 px).
    """
    k = person.shape[-2] // 100
    k += 1 - k % 2
    soft = []
    for m in mask[:, 0].cpu().numpy():
        im = Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(k))
        soft.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    alpha = torch.stack(soft)[:, None].to(person.device, person.dtype)
    return person * (1 - alpha) + generated * alpha


def rescale_guidance(eps: torch.Tensor, eps_cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Rescaled CFG (Lin et al. 2023, §3.4): match the std of the conditional prediction."""
    dims = list(range(1, eps.ndim))
    rescaled = eps * (eps_cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * eps


def _one_at_a_time(method):
    """Serialise calls: the model's attention state holds one generation at a time."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


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
        self._lock = threading.Lock()
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
        vae = self.model.vae
        x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def _run_reference(self, ref_latents: torch.Tensor, t: torch.Tensor) -> None:
        """Run the reference UNet; its processors store every layer's reference feature."""
        run_reference_unet(self.model.unet_encoder, self.model.attn_state, ref_latents, t)

    @_one_at_a_time
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
        callback: Callable[[int, int], None] | None = None,
        attention_recorder: AttentionRecorder | None = None,
    ) -> LeffaPipelineOutput:
        """Generate.

        Args:
            src_image: the person (try-on) or the target-pose person (pose transfer).
                (B, 3, H, W) in [-1, 1] or PIL; H, W multiples of 8.
            ref_image: the garment (try-on) or the person to keep (pose transfer).
            mask: 1 where the image is generated, 0 where ``src_image`` is kept.
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
            callback: called as ``callback(step, total)`` after each denoising step.
            attention_recorder: opt-in attention recording (see ``leffa.recording``).
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        rescale = guidance_scale if guidance_rescale is None else guidance_rescale
        model, device, dtype = self.model, self.device, self.model.dtype

        # 1. Check and convert the inputs.
        src = image_to_tensor(src_image, "src_image")
        ref = image_to_tensor(ref_image, "ref_image")
        pose = image_to_tensor(densepose, "densepose")
        mask_t = mask_to_tensor(mask)
        batch, height, width = _check_sizes({"src_image": src, "ref_image": ref, "mask": mask_t,
                                             "densepose": pose}, self.vae_scale_factor)
        f = self.vae_scale_factor
        latent_shape = (batch, model.vae.config.latent_channels, height // f, width // f)
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents must have shape {latent_shape}, got {tuple(latents.shape)}")

        # 2. Encode the masked person and the reference (spec §4.1–2).
        masked = src * (mask_t < 0.5)
        masked_latents = self._encode(masked, generator).to(dtype)
        ref_latents = self._encode(ref, generator).to(dtype)

        # 3. Mask and DensePose at latent size, nearest (spec §4.3).
        latent_hw = latent_shape[2:]
        cond = latent_conditioning(mask_t, masked_latents, pose)

        # 4. Timesteps and initial noise (spec §4.4–5).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma

        # 5. CFG batch: [unconditional, conditional]; the unconditional reference is zeros.
        ref_batch = torch.cat([torch.zeros_like(ref_latents), ref_latents])
        cond = cond.repeat(2, 1, 1, 1)

        state = model.attn_state
        state.recorder = attention_recorder
        state.cache_reference_kv = ref_acceleration
        if attention_recorder is not None:
            attention_recorder.begin(latent_hw, batch=slice(batch, 2 * batch))
        try:
            # 6. Reference acceleration: one reference pass at timesteps[n // 2] (spec §4.9).
            if ref_acceleration:
                self._run_reference(ref_batch, timesteps[num_inference_steps // 2])

            # 7. Denoising loop (spec §4.7–8).
            for i, t in enumerate(timesteps):
                if attention_recorder is not None:
                    attention_recorder.set_step(i)
                if not ref_acceleration:
                    self._run_reference(ref_batch, t)
                x = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
                eps = model.unet(torch.cat([x, cond], dim=1), t, encoder_hidden_states=None,
                                 return_dict=False)[0]
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                if rescale > 0:
                    eps = rescale_guidance(eps, eps_cond, rescale)
                latents = self.scheduler.step(eps, t, latents, generator=generator,
                                              return_dict=False)[0]
                if callback is not None:
                    callback(i + 1, len(timesteps))
        finally:
            state.clear()
            if attention_recorder is not None:
                attention_recorder.set_step(None)

        # 8. Decode and optionally repaint (spec §4.10–11).
        images = self._decode(latents)
        if repaint:
            images = repaint_blend(((src + 1) / 2).to(images.device), images, mask_t.to(images.device))
        images = images.cpu()
        if output_type == "pt":
            return LeffaPipelineOutput(images=images)
        arrays = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return LeffaPipelineOutput(images=arrays)
        return LeffaPipelineOutput(images=[Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays])
