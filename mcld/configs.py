"""The published architecture (the values of the three config files ``mcld.weights`` lists, for sizing a
model before they are downloaded; loading reads the files themselves) and the tiny one (tests, ``--tiny``)."""

from __future__ import annotations

from mcld.model import MCLDConfig
from mcld.modules import PoseGuiderConfig, ProjectorConfig

DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3


def published_config() -> MCLDConfig:
    """stable-diffusion-v1-5 ``unet/config.json``, sd-vae-ft-mse ``config.json``, sd-image-variations
    ``image_encoder/config.json`` (the values that shape the model)."""
    unet = {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False, "cross_attention_dim": 768, "down_block_types": DOWN,
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "out_channels": 4, "sample_size": 64, "up_block_types": UP}
    vae = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
           "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4}
    clip = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
            "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-05, "num_channels": 3}
    return MCLDConfig(unet, vae, clip)


def tiny_config() -> MCLDConfig:
    """The same architecture at toy widths, 64×64 images (latents 8×8): two steps in well under a
    second on a CPU. Four UNet blocks, as the published loader hard-codes."""
    unet = {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "attention_head_dim": 2,
            "cross_attention_dim": 16, "norm_num_groups": 8, "down_block_types": DOWN, "up_block_types": UP,
            "sample_size": 8}
    vae = {"block_out_channels": [8, 8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "norm_num_groups": 4,
           "latent_channels": 4, "sample_size": 64}
    clip = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
            "image_size": 224, "patch_size": 56, "projection_dim": 16, "hidden_act": "quick_gelu"}
    return MCLDConfig(unet, vae, clip, pose_guider=PoseGuiderConfig(out_channels=16, widths=(4, 4, 8, 8)),
                      projector=ProjectorConfig(dim=32, depth=1, dim_head=8, heads=4, num_queries=16,
                                                embedding_dim=512, output_dim=16, ff_mult=2),
                      image_size=64)
