"""A CatVTON-style try-on model (Chong et al., "CatVTON: Concatenation Is All You Need for Virtual
Try-On with Diffusion Models", ICLR 2025): one SD1.5-inpainting UNet over the person and the
garment in one latent, the person above the garment (``ReferenceKeys.HEIGHT``, CatVTON's axis).
The garment is reached through self-attention over the concatenated tokens only: no reference
UNet, no text encoder (every ``attn2`` returns its input). The UNet keeps the inpainting layout,
9 input channels:

    [noisy latent (4), mask (1), masked latent (4)], each (B, C, 2h, w):
    noisy  = noise_t([person | garment])     mask = [try-on mask | 0]
    masked = [person with the mask blanked | garment]   (the garment zeroed: CFG's unconditional)

The Leffa loss trains it through ``leffa.reference_keys``: the person half's queries over the
garment half's keys. Trained with ``python -m training`` (``family = "concat"``); our
checkpoints hold ``vae.*`` and ``unet.*``. No published weights exist for this family.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from torch import nn

from errors import GenerationStopped
from leffa.model import CONFIG_ROOT, BaseModel, _explicit_upcast, _read_json
from leffa.pipeline import Guidance, LeffaPipeline, LeffaPipelineOutput, PipelineInputs, _output
from leffa.recording import AttentionRecorder, FlowRecorder
from leffa.reference_keys import ReferenceKeys, install_recording
from leffa.sampling import Sampler, make_scheduler, step_kwargs
from runtime.image_tensors import ImageInput, repaint_blend
from runtime.memory import FLOAT8, MemoryNeed, group_offload_peak, module_bytes, normalized_device
from runtime.placement import (Phase, Placement, compute_device, compute_dtype, enter_phase, idle_after,
                               place_modules)
from runtime.presets import MemoryPreset
from weightfiles.checkpoint import assign_state_dict, load_state_dict_file

IN_CHANNELS = 9  # noisy latent 4 + mask 1 + masked latent 4: SD1.5 inpainting's
CONCAT = ReferenceKeys.HEIGHT
MODULE_NAMES = ("vae", "unet")
PHASES = {Phase.ENCODE: frozenset({"vae"}), Phase.REFERENCE: frozenset(), Phase.DENOISE: frozenset({"unet"}),
          Phase.DECODE: frozenset({"vae"}), Phase.IDLE: frozenset()}


def phase_modules(phase: Phase) -> frozenset[str]:
    return PHASES[phase]


class ConcatModel(nn.Module):
    """VAE + one UNet (9 input channels); ``session`` records the person half's attention over the
    garment half (``leffa.reference_keys``)."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler_config: dict,
                 vae_upcast: bool = False):
        super().__init__()
        if unet.conv_in.in_channels != IN_CHANNELS:
            raise ValueError(f"the UNet must take {IN_CHANNELS} channels (SD inpainting), not {unet.conv_in.in_channels}")
        if unet.config.addition_embed_type is not None:
            raise ValueError("the concatenation model is built on SD1.5-inpainting UNets, without SDXL's "
                             f"added-condition embedding ({unet.config.addition_embed_type})")
        self.vae, self.unet = vae, unet
        self.scheduler_config, self.vae_upcast = dict(scheduler_config), vae_upcast
        self.session = install_recording(unet, CONCAT, skip_cross_attention=True)
        self.placement: Placement | None = None
        self._lock = threading.RLock()

    @property
    def levels(self) -> int:
        """How often the UNet halves the latent, plus one: each half of the latent must divide by
        2^(levels−1) so that the halves stay apart at every level."""
        return len(self.unet.config.block_out_channels)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config_dir(cls, base_dir: str | Path | BaseModel, *, device: torch.device | str = "cpu") -> ConcatModel:
        """Random-initialised from ``{unet,vae}/config.json`` and the scheduler config (``meta``: no weights)."""
        base = base_dir.config_dir if isinstance(base_dir, BaseModel) else Path(base_dir)
        vae_cfg = _read_json(base / "vae" / "config.json")
        with torch.device(device):
            vae = AutoencoderKL.from_config(vae_cfg)
            unet = UNet2DConditionModel.from_config(_read_json(base / "unet" / "config.json"))
        return cls(vae, unet, _read_json(base / "scheduler" / "scheduler_config.json"), _explicit_upcast(vae_cfg))

    @classmethod
    def from_base_weights(cls, folder: str | Path) -> ConcatModel:
        """From SD1.5-inpainting weights in diffusers' folder layout (``unet/``, ``vae/``, ``scheduler/``),
        unchanged: its UNet already takes the 9 channels."""
        folder = Path(folder)
        for sub in ("unet", "vae", "scheduler"):
            if not (folder / sub).is_dir():
                raise FileNotFoundError(f"{folder} is not a diffusers base-model folder: no {sub}/")
        return cls(AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                   UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                   _read_json(folder / "scheduler" / "scheduler_config.json"),
                   _explicit_upcast(_read_json(folder / "vae" / "config.json")))

    @classmethod
    def from_pretrained(cls, base_dir: str | Path | BaseModel, checkpoint: str | Path, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        memory: MemoryPreset = MemoryPreset.FAST) -> ConcatModel:
        """Build from the base configs and load our ``checkpoint`` (.safetensors/.pth) strictly."""
        model = cls.from_config_dir(base_dir, device="meta")
        assign_state_dict(model, load_state_dict_file(checkpoint), checkpoint)
        return model.place(device, dtype, memory=memory)

    # -- placement ------------------------------------------------------------------------------
    def place(self, device: torch.device | str, dtype: torch.dtype = torch.float32,
              memory: MemoryPreset = MemoryPreset.FAST) -> ConcatModel:
        """The UNet in ``dtype``, the VAE too unless its config asks for float32 (``force_upcast``);
        ``memory``: a preset of ``runtime.placement`` (the UNet offloaded block by block under ``low``)."""
        vae_dtype = torch.float32 if self.vae_upcast else dtype
        placement = Placement(normalized_device(device), dtype, phase_modules, MemoryPreset(memory),
                              dtypes={"vae": vae_dtype})
        self.placement = None
        self.placement = place_modules({n: getattr(self, n) for n in MODULE_NAMES}, placement, grouped=("unet",))
        return self

    @property
    def device(self) -> torch.device:
        return compute_device(self.placement, self.unet.conv_in.weight)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.placement, self.unet.conv_in.weight)

    def make_scheduler(self, sampler: Sampler = Sampler.DDPM) -> SchedulerMixin:
        return make_scheduler(self.scheduler_config, sampler)

    @contextmanager
    def attention_session(self, *, recorder: AttentionRecorder | FlowRecorder | None = None,
                          target_hw: tuple[int, int] | None = None) -> Iterator[None]:
        """Hold the model for one generation or training step (its lock), recording the person half's
        attention (latent size ``target_hw``) with ``recorder`` when one is given."""
        with self._lock:
            if recorder is not None:
                self.session.attach(recorder, target_hw)
            try:
                yield
            finally:
                self.session.detach()

    # -- the UNet's input -----------------------------------------------------------------------
    def check_latent(self, hw: tuple[int, int]) -> None:
        factor = 2 ** (self.levels - 1)
        if hw[0] % factor or hw[1] % factor:
            raise ValueError(f"a {hw[0]}x{hw[1]} latent (the image / 8) must divide by {factor} in both sides "
                             f"for this UNet, so that the person and the garment halves stay apart at every level; "
                             f"use images whose sides are multiples of {8 * factor}")


def conditioning(mask: torch.Tensor, masked_person: torch.Tensor, garment: torch.Tensor | None) -> torch.Tensor:
    """The UNet's extra channels (B, 5, 2h, w): [mask | 0] and [masked person | garment] (None: the
    garment zeroed, CFG's unconditional branch). ``mask`` at image or latent size, nearest."""
    mask = nn.functional.interpolate(mask.to(masked_person), size=masked_person.shape[-2:], mode="nearest")
    garment = torch.zeros_like(masked_person) if garment is None else garment.to(masked_person)
    return torch.cat([CONCAT.latent(mask, torch.zeros_like(mask)), CONCAT.latent(masked_person, garment)], dim=1)


class ConcatPipeline(LeffaPipeline):
    """Try-on with a ``ConcatModel``: the Leffa pipeline's input checks, encoding and decoding; its own
    conditioning and loop (CFG's unconditional branch zeroes the garment, as CatVTON's)."""

    model: ConcatModel

    @torch.no_grad()
    def __call__(self, src_image: ImageInput, ref_image: ImageInput, mask: ImageInput,
                 densepose: ImageInput | None = None, *, num_inference_steps: int = 30, guidance_scale: float = 2.5,
                 guidance_rescale: float = 0.0, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, repaint: bool = False, output_type="pil",
                 callback: Callable[[int, int], bool | None] | None = None,
                 attention_recorder: AttentionRecorder | None = None) -> LeffaPipelineOutput:
        """Generate. ``src_image`` the person, ``ref_image`` the garment, ``mask`` 1 where the
        person is generated (as ``LeffaPipeline``); ``densepose`` is not used (the family takes
        none). ``latents``: initial noise (B, 4, 2·H/8, W/8). ``attention_recorder`` records the
        person half's attention over the garment half (its conditional rows)."""
        self.check_inputs(num_inference_steps, output_type)
        self.scheduler = self.model.make_scheduler()
        with self.model.attention_session(), idle_after(self.model):
            # 1. Check and convert the inputs (the person stands in for the unused DensePose).
            inputs = self.prepare_inputs(src_image, ref_image, mask, src_image if densepose is None else densepose)
            shape = self.latent_shape(inputs)
            self.model.check_latent((shape[2] // 2, shape[3]))
            if latents is not None and tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            # 2.–3. Encode; the unconditional and conditional rows of the extra channels.
            cond = self.prepare_conditioning(inputs, generator)
            # 4. Timesteps and initial noise over both halves.
            timesteps, latents = self.prepare_latents(inputs, num_inference_steps, generator, latents)
            # 5. The denoising loop.
            latents = self.denoise(latents, timesteps, cond, Guidance(guidance_scale, guidance_rescale), generator,
                                   callback, attention_recorder)
            # 6. Decode the person half; optionally repaint.
            images = self._decode(CONCAT.target_half(latents))
            if repaint:
                images = repaint_blend(((inputs.src + 1) / 2).to(images.device), images, inputs.mask.to(images.device))
            return _output(images.cpu(), output_type)

    def latent_shape(self, inputs: PipelineInputs) -> tuple[int, int, int, int]:
        """Both halves: (B, 4, 2h, w) (the initial noise of ``prepare_latents`` covers both)."""
        b, c, h, w = super().latent_shape(inputs)
        return b, c, 2 * h, w

    def prepare_conditioning(self, inputs: PipelineInputs, generator) -> torch.Tensor:  # type: ignore[override]
        """[unconditional; conditional] extra channels (2B, 5, 2h, w)."""
        enter_phase(self.model, Phase.ENCODE)
        dtype = self.model.dtype
        masked = self._encode(inputs.src * (inputs.mask < 0.5), generator).to(dtype)
        garment = self._encode(inputs.ref, generator).to(dtype)
        return torch.cat([conditioning(inputs.mask, masked, None), conditioning(inputs.mask, masked, garment)])

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,  # type: ignore[override]
                guidance: Guidance, generator, callback, recorder: AttentionRecorder | None) -> torch.Tensor:
        model, scheduler = self.model, self.scheduler
        batch = latents.shape[0]
        extra = step_kwargs(scheduler, generator)
        enter_phase(model, Phase.DENOISE)
        if recorder is not None:
            model.session.attach(recorder, (latents.shape[2] // 2, latents.shape[3]))
            recorder.keep_rows(slice(batch, 2 * batch))
        try:
            for i, t in enumerate(timesteps):
                if recorder is not None:
                    recorder.set_step(i)
                x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                eps = model.unet(torch.cat([x, cond], dim=1), t, encoder_hidden_states=None, return_dict=False)[0]
                latents = scheduler.step(guidance.combine(*eps.chunk(2)), t, latents, **extra, return_dict=False)[0]
                if callback is not None and callback(i + 1, len(timesteps)) is False:
                    raise GenerationStopped(f"stopped after step {i + 1} of {len(timesteps)}")
        finally:
            if recorder is not None:
                recorder.set_step(None)
            model.session.detach()
        return latents


# -- memory ---------------------------------------------------------------------------------------
def estimate_memory(model: ConcatModel, memory: MemoryPreset, device: torch.device | str, dtype: torch.dtype,
                    size: tuple[int, int] = (768, 1024)) -> MemoryNeed:
    """What ``model`` (a meta build will do) needs under ``memory`` at ``size`` (the person's). The
    working memory is Leffa's SD1.5 estimate (``leffa.memory``): one UNet over twice the tokens
    attends over as many keys as Leffa's generative UNet over its own and the reference's."""
    from leffa.memory import activation_bytes

    vae_dtype = torch.float32 if model.vae_upcast else dtype
    storage = FLOAT8 if memory.float8 else dtype
    vae, unet = module_bytes(model.vae, vae_dtype), module_bytes(model.unet, storage)
    act_vae, act_unet = activation_bytes(False, dtype, vae_dtype, size)
    if torch.device(device).type == "cpu" or memory is MemoryPreset.FAST:
        return MemoryNeed(vae + unet, vae + unet + max(act_vae, act_unet))
    if memory is MemoryPreset.BALANCED:
        return MemoryNeed(0, max(vae + act_vae, unet + act_unet), vae + unet)
    return MemoryNeed(0, max(vae + act_vae, group_offload_peak(model.unet, storage) + act_unet), vae + 2 * unet)


@lru_cache(maxsize=2)
def meta_model(base: BaseModel | str) -> ConcatModel:
    """The structure without weights (for ``estimate_memory``; built once per base)."""
    return ConcatModel.from_config_dir(base, device="meta")


def tiny_model() -> ConcatModel:
    """A tiny untrained model (``--tiny``): the same code paths, no files; the same weights on every
    load, drawn in a forked CPU random state (the caller's global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ConcatModel.from_config_dir(CONFIG_ROOT / "tiny").eval()
