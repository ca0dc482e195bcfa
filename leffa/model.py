"""The Leffa model: a VAE, a generative UNet and a reference UNet (spec §1–2).

All three are stock diffusers models; Leffa's behaviour comes from the attention
processors in ``leffa.attention``. State-dict keys are those of the published ``.pth``
files: ``vae.*``, ``unet.*`` (generative) and ``unet_encoder.*`` (reference).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from torch import nn

from leffa.attention import AttentionFocus, LeffaAttentionState, install_processors
from leffa.memory import leffa_placement, place_model
from leffa.sampling import Sampler, make_scheduler
from runtime.placement import Placement, compute_device, compute_dtype
from runtime.presets import MemoryPreset
from weightfiles.checkpoint import assign_state_dict, load_state_dict_file

if TYPE_CHECKING:  # pragma: no cover
    from leffa.recording import AttentionRecorder, FlowRecorder
    from runtime.speed import SpeedOptions

CONFIG_ROOT = Path(__file__).parent / "configs"
GENERATIVE_IN_CHANNELS = 12  # 4 noisy latent + 1 mask + 4 masked-image latent + 3 DensePose
REFERENCE_IN_CHANNELS = 4  # reference image latent


class BaseModel(str, Enum):
    """The two base architectures; values are the base-config folder names (as on the Hub)."""

    SD15_INPAINTING = "stable-diffusion-inpainting"
    SDXL_INPAINTING = "stable-diffusion-xl-1.0-inpainting-0.1"

    @property
    def config_dir(self) -> Path:
        return CONFIG_ROOT / self.value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing base config {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def expand_conv_in(unet: UNet2DConditionModel, in_channels: int) -> None:
    """Replace ``conv_in`` by one with ``in_channels`` inputs (spec §2).

    The old kernel is copied into the first input channels, the rest zero-initialised
    and the bias kept, so the new conv computes exactly what the old one did on the old
    channels.
    """
    old = unet.conv_in
    new = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size,
                    padding=old.padding, device=old.weight.device, dtype=old.weight.dtype)
    if old.weight.device.type != "meta":
        with torch.no_grad():
            new.weight.zero_()
            keep = min(in_channels, old.in_channels)
            new.weight[:, :keep] = old.weight[:, :keep]
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


def _explicit_upcast(vae_config: dict) -> bool:
    """Whether a VAE config file itself sets ``force_upcast`` (not diffusers' default)."""
    return bool(vae_config.get("force_upcast", False))


# our module name -> the published checkpoints' name (state-dict key prefixes); the one place
# where the reference UNet is called ``unet_encoder``
CHECKPOINT_NAMES = {"reference_unet.": "unet_encoder."}


def _renamed(state_dict: dict, prefix: str, mapping: dict[str, str]) -> None:
    """Rename ``prefix + old`` keys to ``prefix + new`` in place, keeping the order."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        for old, new in mapping.items():
            if key.startswith(prefix + old):
                key = prefix + new + key[len(prefix + old):]
                break
        state_dict[key] = value


def _to_checkpoint_names(module, state_dict, prefix, local_metadata) -> None:
    """The published layout: ``unet_encoder``, and without the fused ``to_qkv`` projections that
    ``SpeedOptions(fuse_qkv=True)`` adds (copies of ``to_q``/``to_k``/``to_v``, which stay)."""
    for key in [k for k in state_dict if ".to_qkv." in k]:
        del state_dict[key]
    _renamed(state_dict, prefix, CHECKPOINT_NAMES)


def _from_checkpoint_names(module, state_dict, prefix, *args) -> None:
    _renamed(state_dict, prefix, {new: old for old, new in CHECKPOINT_NAMES.items()})


class LeffaModel(nn.Module):
    """VAE + generative UNet (``unet``) + reference UNet (``reference_unet``; ``unet_encoder`` in the
    published checkpoints: ``state_dict`` and ``load_state_dict`` use that name, see ``CHECKPOINT_NAMES``)."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel,
                 reference_unet: UNet2DConditionModel, scheduler_config: dict, vae_upcast: bool = False):
        """``vae_upcast``: keep the VAE in float32 when the UNets run in half precision (the base
        VAE config's explicit ``force_upcast``: only SDXL's VAE, which overflows in float16)."""
        super().__init__()
        for name, u, c in (("unet", unet, GENERATIVE_IN_CHANNELS),
                           ("reference_unet", reference_unet, REFERENCE_IN_CHANNELS)):
            if u.conv_in.in_channels != c:
                raise ValueError(f"{name}.conv_in must take {c} channels, not {u.conv_in.in_channels}")
        self.vae, self.unet, self.reference_unet = vae, unet, reference_unet
        self.scheduler_config = dict(scheduler_config)
        self.vae_upcast = vae_upcast
        # SDXL variant: built with the text_time embedding (its weights are in the
        # checkpoint) but run without it: no time ids, no pooled text (spec §2.4).
        self.is_sdxl = unet.config.addition_embed_type == "text_time"
        for u in (unet, reference_unet):
            if u.config.addition_embed_type == "text_time":
                u.register_to_config(addition_embed_type=None)
        self.attn_state = LeffaAttentionState()
        self.placement: Placement | None = None  # set by place()
        self._lock = threading.RLock()
        install_processors(unet, reference_unet, self.attn_state)
        self.register_state_dict_post_hook(_to_checkpoint_names)
        self.register_load_state_dict_pre_hook(_from_checkpoint_names)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_config_dir(cls, base_dir: str | Path | BaseModel, *,
                        device: torch.device | str = "cpu") -> LeffaModel:
        """Random-initialised model from ``{unet,vae}/config.json`` and the scheduler config.

        ``device="meta"`` builds the structure without allocating any weights.
        """
        base = base_dir.config_dir if isinstance(base_dir, BaseModel) else Path(base_dir)
        unet_cfg = _read_json(base / "unet" / "config.json")
        vae_cfg = _read_json(base / "vae" / "config.json")
        sched_cfg = _read_json(base / "scheduler" / "scheduler_config.json")
        with torch.device(device):
            vae = AutoencoderKL.from_config(vae_cfg)
            unet = UNet2DConditionModel.from_config(unet_cfg)
            reference_unet = UNet2DConditionModel.from_config(unet_cfg)
        expand_conv_in(unet, GENERATIVE_IN_CHANNELS)
        expand_conv_in(reference_unet, REFERENCE_IN_CHANNELS)
        return cls(vae, unet, reference_unet, sched_cfg, vae_upcast=_explicit_upcast(vae_cfg))

    @classmethod
    def from_base_weights(cls, folder: str | Path) -> LeffaModel:
        """Start training from SD1.5-/SDXL-inpainting base weights in diffusers' folder layout
        (``unet/``, ``vae/``, ``scheduler/``): the base UNet twice, conv_in widened (spec §2)."""
        folder = Path(folder)
        for sub in ("unet", "vae", "scheduler"):
            if not (folder / sub).is_dir():
                raise FileNotFoundError(f"{folder} is not a diffusers base-model folder: no {sub}/")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        reference_unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        expand_conv_in(unet, GENERATIVE_IN_CHANNELS)
        expand_conv_in(reference_unet, REFERENCE_IN_CHANNELS)
        return cls(vae, unet, reference_unet, _read_json(folder / "scheduler" / "scheduler_config.json"),
                   vae_upcast=_explicit_upcast(_read_json(folder / "vae" / "config.json")))

    @classmethod
    def from_pretrained(cls, base_dir: str | Path | BaseModel, checkpoint: str | Path, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        memory: MemoryPreset = MemoryPreset.FAST,
                        speed: SpeedOptions | None = None) -> LeffaModel:
        """Build from the base configs, then load ``checkpoint`` (.pth or .safetensors) strictly,
        and ``place`` it.

        The model is built on the ``meta`` device and the checkpoint's tensors are assigned
        in place (memory-mapped), so loading needs no second copy of the weights.
        """
        model = cls.from_config_dir(base_dir, device="meta")
        assign_state_dict(model, load_state_dict_file(checkpoint), checkpoint)
        return model.place(device, dtype, memory=memory, speed=speed)

    # -- placement and scheduler --------------------------------------------------------
    def place(self, device: torch.device | str, dtype: torch.dtype = torch.float32,
              vae_dtype: torch.dtype | None = None, memory: MemoryPreset = MemoryPreset.FAST,
              speed: SpeedOptions | None = None) -> LeffaModel:
        """Run on ``device``, the UNets in ``dtype``. The VAE runs in ``vae_dtype``; by default,
        as the original: in ``dtype``, except float32 for a base whose VAE config asks for
        ``force_upcast`` (SDXL). The SD1.5 VAE config does not, so it runs in float16 as theirs
        did (diffusers would upcast it: its ``force_upcast`` defaults to true).

        ``memory``: where the weights live while generating (``leffa.memory``: ``fast`` keeps
        everything on ``device``; the others keep weights in CPU memory and bring them as the
        pipeline's phases need them). ``speed``: opt-in faster steps (``leffa.speed``). Placing
        again replaces the memory preset (except float8 weights, which stay rounded)."""
        if vae_dtype is None:
            vae_dtype = torch.float32 if self.vae_upcast else dtype
        # torch's own ``to`` (runtime.placement): diffusers' override warns about float32-only modules on
        # every dtype cast, even when a model has none (as these)
        for module in (self.unet, self.reference_unet, self.vae):
            assert not module._keep_in_fp32_modules, type(module).__name__
        self.placement = place_model(self, leffa_placement(device, dtype, vae_dtype, memory), speed)
        return self

    @contextmanager
    def attention_session(self, *, recorder: AttentionRecorder | FlowRecorder | None = None,
                          cache_reference_kv: bool = False,
                          attention_focus: AttentionFocus | None = None) -> Iterator[LeffaAttentionState]:
        """Hold the model for one generation or one training step: takes the model's lock (so
        pipelines and trainers sharing this model never interleave), sets the processors' shared
        state from the arguments and clears it on exit, whatever happens. With an
        ``attention_focus``, the caller tells the state the denoising step (``state.set_step``)."""
        with self._lock:
            state = self.attn_state
            state.clear()
            state.recorder, state.cache_reference_kv = recorder, cache_reference_kv
            state.attention_focus = attention_focus
            try:
                yield state
            finally:
                state.clear()

    @property
    def device(self) -> torch.device:
        """Where the model computes: its weights' device, or the placement's under a preset whose
        weights rest on the CPU (``leffa.memory``)."""
        return compute_device(self.placement, self.unet.conv_in.weight)

    @property
    def dtype(self) -> torch.dtype:
        """The UNets' compute dtype: their weights' (``low-fp8`` stores them in float8)."""
        return compute_dtype(self.placement, self.unet.conv_in.weight)

    def make_scheduler(self, sampler: Sampler = Sampler.DDPM) -> SchedulerMixin:
        """``sampler``'s scheduler (the published DDPM by default) from the base scheduler config;
        zero-SNR rescaled betas for SDXL (spec §4.5)."""
        return make_scheduler(self.scheduler_config, sampler, zero_snr=self.is_sdxl)
