"""Model construction, key layout and strict checkpoint loading."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from leffa import BaseModel, CheckpointError, LeffaModel
from leffa.model import expand_conv_in
from tests.conftest import tiny_model


def _stock_state_dict(base_dir, device="cpu") -> dict[str, torch.Tensor]:
    """What the original implementation saves: stock diffusers models under three prefixes,
    conv_in widened to 12 and 4 input channels (spec §1–2); built without our classes."""
    cfg = lambda sub: json.loads((base_dir / sub / "config.json").read_text())
    sd = {}
    with torch.device(device):
        vae = AutoencoderKL.from_config(cfg("vae"))
        for prefix, in_ch in (("unet", 12), ("unet_encoder", 4)):
            unet = UNet2DConditionModel.from_config(cfg("unet"))
            old = unet.conv_in
            unet.conv_in = torch.nn.Conv2d(in_ch, old.out_channels, 3, padding=1)
            sd.update({f"{prefix}.{k}": v for k, v in unet.state_dict().items()})
    sd.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    return sd


@pytest.mark.parametrize("base", list(BaseModel))
def test_full_size_key_layout(base):
    """Full-size models on the meta device have exactly the published key set and shapes."""
    ours = LeffaModel.from_config_dir(base, device="meta").state_dict()
    stock = _stock_state_dict(base.config_dir, device="meta")
    assert ours.keys() == stock.keys()
    assert {k.split(".")[0] for k in ours} == {"vae", "unet", "unet_encoder"}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in stock.items()}
    assert ours["unet.conv_in.weight"].shape == (320, 12, 3, 3)
    assert ours["unet_encoder.conv_in.weight"].shape == (320, 4, 3, 3)
    assert ours["unet.conv_out.weight"].shape == (4, 320, 3, 3)
    # unused cross-attention weights, sized for the text encoder, are still there
    text_dim = 2048 if base is BaseModel.SDXL_INPAINTING else 768
    assert ours["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1] == text_dim
    has_add = any(k.startswith("unet.add_embedding.") for k in ours)
    assert has_add == (base is BaseModel.SDXL_INPAINTING)
    # float32 size of the published files: 7.2 GB (SD1.5) and 20.9 GB (SDXL), spec §1
    gigabytes = sum(v.numel() for v in ours.values()) * 4 / 1e9
    assert gigabytes == pytest.approx(20.9 if base is BaseModel.SDXL_INPAINTING else 7.2, abs=0.05)


def test_sdxl_text_time_is_off_at_run_time(base_dirs):
    model = tiny_model(base_dirs["sdxl"])
    assert model.is_sdxl
    assert "unet.add_embedding.linear_1.weight" in model.state_dict()
    assert model.unet.config.addition_embed_type is None
    assert model.make_scheduler().config.rescale_betas_zero_snr
    assert not tiny_model(base_dirs["sd15"]).make_scheduler().config.rescale_betas_zero_snr


def test_variant_comes_from_config_not_path(base_dirs, tmp_path):
    """A folder named like SD1.5 holding an SDXL config is still built as SDXL."""
    misleading = tmp_path / "stable-diffusion-inpainting"
    import shutil

    shutil.copytree(base_dirs["sdxl"], misleading)
    assert LeffaModel.from_config_dir(misleading).is_sdxl


def test_expand_conv_in_keeps_old_channels():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2,
                                up_block_types=("UpBlock2D",) * 2, layers_per_block=1,
                                norm_num_groups=8, in_channels=9, sample_size=8)
    old_w, old_b = unet.conv_in.weight.clone(), unet.conv_in.bias.clone()
    expand_conv_in(unet, 12)
    assert unet.conv_in.weight.shape[1] == 12 and unet.config.in_channels == 12
    assert torch.equal(unet.conv_in.weight[:, :9], old_w)
    assert torch.all(unet.conv_in.weight[:, 9:] == 0)
    assert torch.equal(unet.conv_in.bias, old_b)


@pytest.mark.parametrize("fmt", [".pth", ".safetensors"])
def test_round_trip(base_dirs, variant, tmp_path, fmt):
    model = tiny_model(base_dirs[variant], seed=1)
    path = tmp_path / f"ckpt{fmt}"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, path) if fmt == ".pth" else save_file(sd, str(path))
    loaded = LeffaModel.from_pretrained(base_dirs[variant], path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32


def test_loads_state_dict_saved_from_original_layout(base_dirs, variant, tmp_path):
    """A state dict built from stock diffusers modules, as the authors' model saves it."""
    torch.manual_seed(3)
    sd = _stock_state_dict(base_dirs[variant])
    path = tmp_path / "virtual_tryon.pth"
    torch.save(sd, path)
    model = LeffaModel.from_pretrained(base_dirs[variant], path)
    got = model.state_dict()
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.mark.parametrize("base, vae_dtype", [(BaseModel.SD15_INPAINTING, torch.float16),
                                             (BaseModel.SDXL_INPAINTING, torch.float32)])
def test_vae_dtype_follows_the_original_with_the_shipped_configs(base, vae_dtype):
    """The original runs the SD1.5 VAE in float16 (its config sets no force_upcast, though
    diffusers defaults that to true); only the SDXL VAE, whose config asks for it, is upcast."""
    model = LeffaModel.from_config_dir(base, device="meta").place("meta", torch.float16)
    assert model.unet.dtype == torch.float16 and model.reference_unet.dtype == torch.float16
    assert model.vae.dtype == vae_dtype
    assert model.place("meta", torch.float16, vae_dtype=torch.float32).vae.dtype == torch.float32  # explicit
    assert model.place("meta", torch.float32).vae.dtype == torch.float32


def test_place_upcasts_vae_when_config_says(base_dirs):
    model = tiny_model(base_dirs["sdxl"]).place("cpu", torch.bfloat16)
    assert model.unet.dtype == torch.bfloat16 and model.reference_unet.dtype == torch.bfloat16
    assert model.vae.dtype == torch.float32  # force_upcast
    model = tiny_model(base_dirs["sd15"]).place("cpu", torch.bfloat16)  # tiny SD VAE: no upcast
    assert model.vae.dtype == torch.bfloat16


# -- bad checkpoints ------------------------------------------------------------------------
def _save(model, path, edit=None):
    sd = dict(model.state_dict())
    if edit:
        edit(sd)
    torch.save(sd, path)
    return path


def test_missing_checkpoint(base_dirs, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        LeffaModel.from_pretrained(base_dirs["sd15"], tmp_path / "nope.pth")


def test_truncated_checkpoint(base_dirs, tmp_path):
    path = _save(tiny_model(base_dirs["sd15"]), tmp_path / "cut.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: cannot read checkpoint.*truncated"):
        LeffaModel.from_pretrained(base_dirs["sd15"], path)


@pytest.mark.parametrize("name,content", [("junk.pth", b"not a checkpoint at all"),
                                          ("junk.safetensors", b"\x00" * 64)])
def test_garbage_checkpoint(base_dirs, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{name}: cannot read checkpoint"):
        LeffaModel.from_pretrained(base_dirs["sd15"], tmp_path / name)


def test_not_a_state_dict(base_dirs, tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="plain state dict"):
        LeffaModel.from_pretrained(base_dirs["sd15"], tmp_path / "list.pth")


def test_wrong_extension(base_dirs, tmp_path):
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint format"):
        LeffaModel.from_pretrained(base_dirs["sd15"], tmp_path / "w.ckpt")


def test_key_mismatches_are_named(base_dirs, tmp_path):
    model = tiny_model(base_dirs["sd15"])

    def edit(sd):
        sd.pop("unet.conv_out.bias")
        sd["unet.extra.weight"] = torch.zeros(1)
        sd["unet_encoder.conv_in.weight"] = torch.zeros(32, 9, 3, 3)

    path = _save(model, tmp_path / "bad.pth", edit)
    with pytest.raises(CheckpointError) as info:
        LeffaModel.from_pretrained(base_dirs["sd15"], path)
    msg = str(info.value)
    assert "bad.pth" in msg
    assert "1 missing keys: unet.conv_out.bias" in msg
    assert "1 unexpected keys: unet.extra.weight" in msg
    assert "unet_encoder.conv_in.weight: file (32, 9, 3, 3) vs model (32, 4, 3, 3)" in msg


def test_wrong_variant_checkpoint(base_dirs, tmp_path):
    """An SDXL checkpoint given to the SD1.5 base fails with a key report, not a crash."""
    path = _save(tiny_model(base_dirs["sdxl"]), tmp_path / "pose_transfer.pth")
    with pytest.raises(CheckpointError, match=r"pose_transfer\.pth does not fit this model: \d+ unexpected keys: unet.add_embedding"):
        LeffaModel.from_pretrained(base_dirs["sd15"], path)
