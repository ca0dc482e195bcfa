"""The MCLD pose-transfer pipeline, as the published ``test.py`` runs it (their
``Pose2ImageIpMultiPipeline`` through ``MCLDPipelineLoader``), in diffusers' style.

Inputs (all at the model's size, 512×512 for the published model; images as PIL or (B, 3, H, W)
float tensors in [0, 1]):

* ``source``: the person to keep, resized to 512×512 (their dataset: ``Image.resize((512, 512))``);
  only its CLIP embedding is used (down blocks and mid block);
* ``texture``: the source person's UV texture map, 512×512: the reference UNet's input (through the
  VAE) and the second CLIP embedding (mid and up blocks);
* ``pose``: the target's DensePose image, channels R = V·255, G = U·255, B = part index I (as PIL
  reads their PNG), scaled to [0, 1]: the pose guider's input, not normalised;
* ``face_embedding``: (B, 512) ArcFace embedding of the source face, zeros when there is none.

The steps: 1. check the inputs; 2. encode the conditions (CLIP ×2, face tokens, texture latents, pose
features); 3. the reference pass (once, timestep 0); 4. the initial noise; 5. DDIM with CFG (v-prediction,
``mcld.model.SCHEDULER``); 6. decode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from errors import GenerationStopped, UserError
from mcld.model import VAE_SCALE, MCLDModel
from runtime.placement import Phase, enter_phase, idle_after

ImageInput = torch.Tensor | Image.Image | Sequence[Image.Image]
FACE_DIM = 512
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults (their pipeline's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PUBLISHED_SIZES = ((256, 176), (512, 352))  # (height, width) of the published DeepFashion results


class MCLDInputError(UserError, ValueError):
    """An input the pipeline cannot take (the message names it)."""


@dataclass
class MCLDPipelineOutput:
    """``images``: one PIL image per sample; ``tensors``: (B, 3, H, W) float32 in [0, 1] on the CPU."""

    images: list[Image.Image]
    tensors: torch.Tensor


@dataclass
class Conditions:
    """The encoded conditions, CFG rows first when guiding: ``prompt`` (rows, 2 + n, D) =
    [clip(source), clip(texture), face tokens]; ``pose`` (rows, C0, h, w); ``reference_latents`` and
    ``reference_prompt`` (B, ...): the reference pass's inputs."""

    prompt: torch.Tensor
    pose: torch.Tensor
    reference_latents: torch.Tensor
    reference_prompt: torch.Tensor


def to_unit_tensor(x: ImageInput, name: str) -> torch.Tensor:
    """PIL image(s) (RGB) or a (B, 3, H, W) / (3, H, W) tensor in [0, 1] -> (B, 3, H, W) float32."""
    if isinstance(x, Image.Image):
        x = [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(i, Image.Image) for i in x):
        arrays = [np.asarray(i.convert("RGB"), dtype=np.uint8) for i in x]
        if len({a.shape for a in arrays}) > 1:
            raise MCLDInputError(f"{name}: the images differ in size")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255).contiguous()
    if not isinstance(x, torch.Tensor):
        raise MCLDInputError(f"{name} must be a PIL image, a list of them or a tensor, not {type(x).__name__}")
    t = x[None] if x.ndim == 3 else x
    if t.ndim != 4 or t.shape[1] != 3:
        raise MCLDInputError(f"{name} must be (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    if not t.is_floating_point() or not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise MCLDInputError(f"{name} must be a float tensor with values in [0, 1]")
    return t.float().contiguous()  # one memory layout: the same numbers from PIL images and tensors


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> CLIP's input (B, 3, size, size), as their ``CLIPImageProcessor`` call
    computes it from ``image × 255``: whole numbers 0–255 (exact for images read from 8-bit files),
    PIL bicubic resize of the shorter side to ``size``, centre crop, ÷255, CLIP's mean and std."""
    out = []
    for image in images:
        u8 = (image * 255).to(torch.uint8).permute(1, 2, 0).numpy()  # truncation, as their uint8 cast
        pil = Image.fromarray(u8)
        w, h = pil.size
        scale = size / min(w, h)
        pil = pil.resize((max(size, int(w * scale)), max(size, int(h * scale))), Image.BICUBIC)
        left, top = (pil.width - size) // 2, (pil.height - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float64) / 255).float().permute(2, 0, 1))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (torch.stack(out) - mean) / std


def resize_as_published(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, 512, 512) in [0, 1] -> (B, 3, *size) uint8, as their ``test.py`` saves the results
    (``PUBLISHED_SIZES``): bicubic with antialias, ×255, clamped, truncated to uint8."""
    resized = F.interpolate(images.float(), size, mode="bicubic", antialias=True)
    return (resized * 255).clamp(0, 255).to(torch.uint8)


class MCLDPipeline:
    """Example::

        model = load_model("ckpts")                     # mcld.hub
        out = MCLDPipeline(model)(source, texture, pose, face, generator=torch.Generator().manual_seed(42))
        out.images[0].save("result.png")
    """

    def __init__(self, model: MCLDModel):
        self.model = model
        self.scheduler = model.make_scheduler()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def __call__(self, source: ImageInput, texture: ImageInput, pose: ImageInput,
                 face_embedding: torch.Tensor | np.ndarray, *, num_inference_steps: int = 20,
                 guidance_scale: float = 3.5, generator: torch.Generator | list[torch.Generator] | None = None,
                 callback: Callable[[int, int], bool | None] | None = None) -> MCLDPipelineOutput:
        """Generate the source person in the target pose. ``guidance_scale`` > 1 runs classifier-free
        guidance (the unconditional rows: zero prompts and no reference features); ``generator`` is the
        only source of randomness (the initial noise; DDIM with eta 0 adds none); ``callback(step,
        total)`` after each step, ``False`` stops (``GenerationStopped``)."""
        model = self.model
        with model.session() as state, idle_after(model):
            # 1. Check the inputs.
            source_t, texture_t, pose_t, face = self.check_inputs(source, texture, pose, face_embedding,
                                                                  num_inference_steps, guidance_scale, generator)
            guided = guidance_scale > 1.0
            # 2. Encode the conditions.
            cond = self.encode_conditions(source_t, texture_t, pose_t, face, guided)
            # 3. The reference pass: its features stay for every step.
            self.run_reference(cond)
            # 4. Timesteps and initial noise.
            timesteps, latents = self.prepare_latents(source_t.shape[0], num_inference_steps, generator)
            # 5. Denoise.
            state.uncond_rows = source_t.shape[0] if guided else 0
            state.pose = cond.pose
            latents = self.denoise(latents, timesteps, cond.prompt, guidance_scale, callback)
            # 6. Decode.
            images = self.decode(latents).cpu()
        arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return MCLDPipelineOutput([Image.fromarray(a) for a in arrays], images)

    def check_inputs(self, source, texture, pose, face_embedding, steps: int, guidance_scale: float, generator):
        if not isinstance(steps, int) or steps < 1:
            raise MCLDInputError(f"num_inference_steps must be a whole number >= 1, got {steps!r}")
        if not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise MCLDInputError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        size = self.model.config.image_size
        tensors = [to_unit_tensor(x, n) for x, n in ((source, "source"), (texture, "texture"), (pose, "pose"))]
        b = tensors[0].shape[0]
        for t, name in zip(tensors, ("source", "texture", "pose")):
            if t.shape[-2:] != (size, size):
                raise MCLDInputError(f"{name} must be {size}×{size} (this model's size), got "
                                     f"{t.shape[-1]}×{t.shape[-2]}")
            if t.shape[0] != b:
                raise MCLDInputError(f"{name} has {t.shape[0]} images but source has {b}")
        face = torch.as_tensor(np.asarray(face_embedding, dtype=np.float32))
        face = face[None] if face.ndim == 1 else face
        if tuple(face.shape) != (b, FACE_DIM) or not torch.isfinite(face).all():
            raise MCLDInputError(f"face_embedding must be ({b}, {FACE_DIM}) finite numbers (zeros when there is "
                                 f"no face), got {tuple(face.shape)}")
        if isinstance(generator, list) and len(generator) != b:
            raise MCLDInputError(f"{len(generator)} generators for {b} samples")
        return (*tensors, face)

    def _phase(self, phase: Phase) -> None:
        enter_phase(self.model, phase)

    def encode_clip(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1, D) image embeddings."""
        encoder = self.model.image_encoder
        pixels = clip_pixels(images, self.model.config.clip.get("image_size", 224))
        return encoder(pixels.to(self.device, encoder.dtype)).image_embeds[:, None]

    def encode_conditions(self, source: torch.Tensor, texture: torch.Tensor, pose: torch.Tensor,
                          face: torch.Tensor, guided: bool) -> Conditions:
        self._phase(Phase.ENCODE)
        model, device, dtype = self.model, self.device, self.model.dtype
        clip_source, clip_texture = self.encode_clip(source), self.encode_clip(texture)  # (B, 1, D)
        face_tokens = model.image_projector(face[:, None].to(device, dtype))  # (B, n, D)
        prompt = torch.cat([clip_source, clip_texture.to(clip_source.dtype), face_tokens.to(clip_source.dtype)], 1)
        vae = model.vae
        posterior = vae.encode((texture * 2 - 1).to(device, vae.dtype)).latent_dist
        reference_latents = posterior.mean * VAE_SCALE  # (B, 4, h, w): the mean, not a sample
        pose_features = model.pose_guider(pose.to(device, model.pose_guider.dtype))  # (B, C0, h, w)
        if guided:
            prompt = torch.cat([torch.zeros_like(prompt), prompt])
            pose_features = torch.cat([pose_features] * 2)
        return Conditions(prompt.to(dtype), pose_features.to(dtype), reference_latents.to(dtype),
                          clip_source.to(dtype))

    def run_reference(self, cond: Conditions) -> None:
        """The reference UNet on the texture latents at timestep 0, prompted with the source's CLIP
        embedding; its writers keep every self-attention input (``mcld.attention``)."""
        self._phase(Phase.REFERENCE)
        state, latents = self.model.attn_state, cond.reference_latents
        t = torch.zeros((), dtype=torch.long, device=self.device)
        state.recording = True
        try:
            self.model.reference_unet(latents, t, encoder_hidden_states=cond.reference_prompt, return_dict=False)
        finally:
            state.recording = False

    def prepare_latents(self, batch: int, steps: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The timesteps and the initial noise, drawn in float32 (the same noise in every dtype)."""
        self.scheduler.set_timesteps(steps, device=self.device)
        f = 2 ** (len(self.model.vae.config.block_out_channels) - 1)
        s = self.model.config.image_size // f
        shape = (batch, self.model.vae.config.latent_channels, s, s)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return self.scheduler.timesteps, latents * self.scheduler.init_noise_sigma

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt: torch.Tensor, guidance_scale: float,
                callback: Callable[[int, int], bool | None] | None) -> torch.Tensor:
        """DDIM steps (eta 0) on float32 latents, the UNet in the model's dtype."""
        self._phase(Phase.DENOISE)
        unet, dtype = self.model.denoising_unet, self.model.dtype
        guided = prompt.shape[0] != latents.shape[0]
        for i, t in enumerate(timesteps):
            x = torch.cat([latents] * 2) if guided else latents
            x = self.scheduler.scale_model_input(x, t).to(dtype)
            v = unet(x, t, encoder_hidden_states=prompt, return_dict=False)[0].float()
            if guided:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = self.scheduler.step(v, t, latents, eta=0.0, return_dict=False)[0]
            if callback is not None and callback(i + 1, len(timesteps)) is False:
                raise GenerationStopped(f"stopped after step {i + 1} of {len(timesteps)}")
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) -> (B, 3, H, W) float32 in [0, 1]."""
        self._phase(Phase.DECODE)
        vae = self.model.vae
        images = vae.decode((latents * (1 / VAE_SCALE)).to(vae.dtype)).sample
        return (images / 2 + 0.5).clamp(0, 1).float()
