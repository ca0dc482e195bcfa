"""MCLD's published weight files (torch-free: the engine's registry and ``leffa check`` read them).

MCLD's own four checkpoints are on the Hub repo ``Lotior/mcld``; the parts it did not train come
from the repos its loader names (their ``validation/pipeline_loader.py`` and ``configs/train/train.yaml``):
the SD1.5 UNet configuration (both UNets are built from it), the VAE ``stabilityai/sd-vae-ft-mse`` and
the CLIP image encoder of ``lambdalabs/sd-image-variations-diffusers``.

Sizes are for messages only. Those of the ``Lotior/mcld`` files are computed from the parameter
shapes in float32 (their loader's dtype; the Hub listing could not be read here), the others are the
published sizes.

The projector: the authors' README lists ``image_projector.pth`` (the Hub's name, used here) while
their loader reads ``ckpt_dir + 'image_proj_model.pth'``; both hold the same state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from weightfiles.manifest import GB, MB, HubFile

REPO = "Lotior/mcld"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
VAE_REPO = "stabilityai/sd-vae-ft-mse"
CLIP_REPO = "lambdalabs/sd-image-variations-diffusers"
KB = 1000
File = HubFile | Path | str

# Each repo in its own folder of the checkpoint folder (ckpts/mcld/denoising_unet.pth, ckpts/sd-vae-ft-mse/...).
# SD1.5 UNet (686 keys) + the 32 IP-Adapter projections (``...attn2.processor.to_k_ip/to_v_ip.weight``)
DENOISING_UNET = HubFile(REPO, "denoising_unet.pth", int(3.51 * GB), folder="mcld")
# SD1.5 UNet without conv_norm_out/conv_out (682 keys)
REFERENCE_UNET = HubFile(REPO, "reference_unet.pth", int(3.44 * GB), folder="mcld")
POSE_GUIDER = HubFile(REPO, "pose_guider.pth", int(4.35 * MB), folder="mcld")
IMAGE_PROJECTOR = HubFile(REPO, "image_projector.pth", 321 * MB, folder="mcld")  # their loader: image_proj_model.pth
UNET_CONFIG = HubFile(SD15_REPO, "unet/config.json", 1 * KB, folder="stable-diffusion-v1-5")
VAE_CONFIG = HubFile(VAE_REPO, "config.json", 1 * KB, folder="sd-vae-ft-mse")
VAE_WEIGHTS = HubFile(VAE_REPO, "diffusion_pytorch_model.safetensors", 335 * MB, folder="sd-vae-ft-mse")
CLIP_CONFIG = HubFile(CLIP_REPO, "image_encoder/config.json", 5 * KB, folder="sd-image-variations-diffusers")
CLIP_WEIGHTS = HubFile(CLIP_REPO, "image_encoder/pytorch_model.bin", int(1.22 * GB),
                       folder="sd-image-variations-diffusers")


@dataclass(frozen=True)
class MCLDFiles:
    """Every file an MCLD model is built from, by role (``HubFile``s here; paths once resolved)."""

    denoising_unet: File
    reference_unet: File
    pose_guider: File
    image_projector: File
    unet_config: File
    vae_config: File
    vae_weights: File
    clip_config: File
    clip_weights: File

    def as_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)

    @classmethod
    def from_tuple(cls, items) -> MCLDFiles:
        return cls(*items)


PUBLISHED = MCLDFiles(DENOISING_UNET, REFERENCE_UNET, POSE_GUIDER, IMAGE_PROJECTOR, UNET_CONFIG, VAE_CONFIG,
                      VAE_WEIGHTS, CLIP_CONFIG, CLIP_WEIGHTS)
MCLD_FILES: tuple[HubFile, ...] = PUBLISHED.as_tuple()
