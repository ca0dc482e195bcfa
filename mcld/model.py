"""The MCLD model: its six parts, built from stock modules and loaded strictly from the published files.

* ``denoising_unet``: a stock SD1.5 ``UNet2DConditionModel`` (theirs is a 3D UNet built from the same
  2D weights with its motion modules off: the same parameters and the same computation on one frame),
  with MCLD's processors (``mcld.attention``) and 32 IP-Adapter projections;
* ``reference_unet``: the same UNet without ``conv_norm_out``/``conv_out`` (the published file has
  none: only its transformer blocks' features are used);
* ``pose_guider``, ``image_projector`` (``mcld.modules``); the VAE; the CLIP image encoder.

``from_files`` checks every file against the model (``weightfiles.checkpoint``): a missing, unexpected
or mis-shaped key is refused with the file named. Keys a published file holds that inference never
reads are listed in ``UNUSED_KEYS`` and dropped; nothing else is.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from mcld.attention import MCLDAttentionState, install_processors
from mcld.memory import mcld_placement, place_model
from mcld.modules import (
    PUBLISHED_POSE_GUIDER,
    PUBLISHED_PROJECTOR,
    PoseGuider,
    PoseGuiderConfig,
    ProjectorConfig,
    Resampler,
)
from mcld.weights import MCLDFiles
from runtime.placement import Placement, compute_device
from runtime.presets import MemoryPreset
from weightfiles.checkpoint import CheckpointError, check_state_dict, load_state_dict_file

VAE_SCALE = 0.18215  # the published pipeline's own constant (encode: ×, decode: × 1 / it)
UNET_BLOCKS = {  # what their 3D UNet's loader sets whatever the config says
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
# Keys a published file may hold that no parameter reads: the CLIP encoder's position ids (a constant
# buffer that older transformers saved). Anything else unexpected is refused.
UNUSED_KEYS = {"image_encoder": ("vision_model.embeddings.position_ids",)}
# published scheduler: their configs/inference/inference_v3.yaml, which test.py's loader reads through
# configs/train/train.yaml's inference_config (training used beta_schedule "scaled_linear" instead)
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
             "clip_sample": False, "steps_offset": 1, "prediction_type": "v_prediction",
             "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@dataclass(frozen=True)
class MCLDConfig:
    """The architecture: the diffusers UNet and VAE configs, the transformers CLIP vision config (all
    as their JSON dicts), the two small networks, the image size and the IP-Adapter scale."""

    unet: dict
    vae: dict
    clip: dict
    pose_guider: PoseGuiderConfig = PUBLISHED_POSE_GUIDER
    projector: ProjectorConfig = PUBLISHED_PROJECTOR
    image_size: int = 512  # square, as published
    ip_scale: float = 0.5
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER))

    @classmethod
    def from_files(cls, unet_config: Path, vae_config: Path, clip_config: Path,
                   pose_guider: PoseGuiderConfig = PUBLISHED_POSE_GUIDER, projector: ProjectorConfig = PUBLISHED_PROJECTOR,
                   image_size: int = 512) -> MCLDConfig:
        """The three published config files, and the parts their files do not describe (their code's
        constants: published by default)."""
        return cls(_read_json(unet_config), _read_json(vae_config), _read_json(clip_config), pose_guider, projector,
                   image_size)


def _read_json(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"config not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# the VAE's attention names before diffusers 0.14 (sd-vae-ft-mse's file may use them)
LEGACY_VAE_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _modern_vae_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in LEGACY_VAE_NAMES.items():
            if old in key:
                key = key.replace(old, new)
                value = value.squeeze(-1).squeeze(-1) if value.ndim == 4 else value  # 1x1 conv -> linear
        out[key] = value
    return out



def unused_reference_keys(reference_unet: nn.Module) -> list[str]:
    """The reference UNet's keys that are loaded but never reach an image: inference reads only the
    inputs of its self-attention layers, so its last transformer block after ``norm1`` (``attn1``,
    ``norm2``, ``attn2``, ``norm3``, ``ff``) and that transformer's ``proj_out`` compute nothing used
    (the published pipeline runs them too)."""
    last = [n for n, _ in reference_unet.named_modules() if n.startswith("up_blocks.") and n.endswith(".attn1")][-1]
    block, transformer = last.rsplit(".", 1)[0], last.split(".transformer_blocks.")[0]
    return [k for k in reference_unet.state_dict()
            if (k.startswith(block + ".") and not k.startswith(block + ".norm1."))
            or k.startswith(transformer + ".proj_out.")]

class MCLDModel(nn.Module):
    PARTS = ("vae", "image_encoder", "image_projector", "pose_guider", "reference_unet", "denoising_unet")

    def __init__(self, config: MCLDConfig, vae: AutoencoderKL, image_encoder: CLIPVisionModelWithProjection,
                 image_projector: Resampler, pose_guider: PoseGuider, reference_unet: UNet2DConditionModel,
                 denoising_unet: UNet2DConditionModel):
        super().__init__()
        self.config = config
        self.vae, self.image_encoder, self.image_projector = vae, image_encoder, image_projector
        self.pose_guider, self.reference_unet, self.denoising_unet = pose_guider, reference_unet, denoising_unet
        self.attn_state = MCLDAttentionState()
        self.placement: Placement | None = None
        self._lock = threading.RLock()
        # the reference UNet's tail is not part of the model (the published file lacks it)
        reference_unet.conv_norm_out, reference_unet.conv_out = None, nn.Identity()
        install_processors(denoising_unet, reference_unet, self.attn_state,
                           config.projector.num_queries, config.ip_scale)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: MCLDConfig, device: torch.device | str = "cpu") -> MCLDModel:
        """Random weights (``device="meta"``: the structure only, for loading or sizing)."""
        unet_config = _public(config.unet)
        for key, value in UNET_BLOCKS.items():
            got = unet_config.get(key, value)  # SD1.5's config leaves mid_block_type to the default
            if (list(got) if isinstance(got, (list, tuple)) else got) != value:
                raise ValueError(f"the UNet config's {key} must be {value} (SD1.5's), got {got}")
        if config.pose_guider.out_channels != unet_config["block_out_channels"][0]:
            raise ValueError("the pose guider's out_channels must be the UNet's block_out_channels[0]")
        with torch.device(device):
            return cls(config, vae=AutoencoderKL.from_config(_public(config.vae)),
                       image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(_public(config.clip))),
                       image_projector=Resampler(config.projector), pose_guider=PoseGuider(config.pose_guider),
                       reference_unet=UNet2DConditionModel.from_config(unet_config),
                       denoising_unet=UNet2DConditionModel.from_config(unet_config))

    @classmethod
    def from_files(cls, files: MCLDFiles, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   memory: MemoryPreset = MemoryPreset.FAST, pose_guider: PoseGuiderConfig = PUBLISHED_POSE_GUIDER,
                   projector: ProjectorConfig = PUBLISHED_PROJECTOR, image_size: int = 512) -> MCLDModel:
        """Build on the meta device from the three config files (``pose_guider``, ``projector``,
        ``image_size``: what no file describes, published by default), load every weight file strictly
        (tensors assigned in place, memory-mapped where the format allows), then ``place``."""
        config = MCLDConfig.from_files(Path(files.unet_config), Path(files.vae_config), Path(files.clip_config),
                                       pose_guider, projector, image_size)
        model = cls.from_config(config, device="meta")
        for part, path in model.weight_files(files).items():
            model.load_part(part, path)
        embeddings = model.image_encoder.vision_model.embeddings  # its position ids: a buffer no file holds
        embeddings.register_buffer("position_ids", torch.arange(embeddings.position_ids.shape[-1])[None],
                                   persistent=False)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"no values loaded for {left[:5]}")
        return model.place(device, dtype, memory=memory)

    @staticmethod
    def weight_files(files: MCLDFiles) -> dict[str, Path]:
        return {"denoising_unet": Path(files.denoising_unet), "reference_unet": Path(files.reference_unet),
                "pose_guider": Path(files.pose_guider), "image_projector": Path(files.image_projector),
                "vae": Path(files.vae_weights), "image_encoder": Path(files.clip_weights)}

    def load_part(self, part: str, path: str | Path) -> None:
        """Load ``part``'s weights from ``path`` strictly (``CheckpointError`` naming the file)."""
        module: nn.Module = getattr(self, part)
        state = load_state_dict_file(path)
        if part == "vae":
            state = _modern_vae_names(state)
        for key in UNUSED_KEYS.get(part, ()):
            state.pop(key, None)
        check_state_dict(module.state_dict(), state, source=path)
        module.load_state_dict(state, strict=True, assign=True)

    # -- placement, scheduler, one generation at a time ---------------------------------------------
    def modules_by_name(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.PARTS}

    def place(self, device: torch.device | str, dtype: torch.dtype = torch.float32,
              memory: MemoryPreset = MemoryPreset.FAST) -> MCLDModel:
        """Every part on ``device`` in ``dtype`` under the ``memory`` preset (``mcld.memory``)."""
        self.placement = place_model(self, mcld_placement(device, dtype, memory))
        return self

    @property
    def device(self) -> torch.device:
        return compute_device(self.placement, self.denoising_unet.conv_in.weight)

    @property
    def dtype(self) -> torch.dtype:
        placement = self.placement
        return placement.dtype if placement is not None else self.denoising_unet.conv_in.weight.dtype

    def make_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.config.scheduler)

    @contextmanager
    def session(self) -> Iterator[MCLDAttentionState]:
        """One generation: the model's lock, the processors' state cleared before and after."""
        with self._lock:
            self.attn_state.clear()
            try:
                yield self.attn_state
            finally:
                self.attn_state.clear()
