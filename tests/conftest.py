"""Tiny SD1.5-like and SDXL-like Leffa models (the diffusers ``get_dummy_components`` way)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leffa.model import BaseModel, LeffaModel

TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [8, 8, 16, 16],  # 4 levels: downsamples by 8 like the real VAE
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64,
}
TINY_UNETS = {
    # cross-attention blocks at the top level, like SD1.5
    "sd15": {
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1, "attention_head_dim": 4, "cross_attention_dim": 24,
        "in_channels": 9, "out_channels": 4, "norm_num_groups": 8, "sample_size": 8,
    },
    # SDXL features: text_time embedding, linear projection, several transformer layers
    "sdxl": {
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4],
        "use_linear_projection": True, "cross_attention_dim": 40,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 40,
        "layers_per_block": 1, "in_channels": 9, "out_channels": 4, "norm_num_groups": 8,
        "sample_size": 8,
    },
}


def write_base_dir(root: Path, variant: str) -> Path:
    """A base-config folder like the Hub's, with tiny configs."""
    real = BaseModel.SDXL_INPAINTING if variant == "sdxl" else BaseModel.SD15_INPAINTING
    for sub, name, cfg in (("unet", "config.json", TINY_UNETS[variant]),
                           ("vae", "config.json", {**TINY_VAE, **({"force_upcast": True} if variant == "sdxl" else {})}),
                           ("scheduler", "scheduler_config.json",
                            json.loads((real.config_dir / "scheduler" / "scheduler_config.json").read_text()))):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("base")
    return {v: write_base_dir(root / v, v) for v in TINY_UNETS}


@pytest.fixture(params=["sd15", "sdxl"])
def variant(request) -> str:
    return request.param


def param_fingerprint(model) -> torch.Tensor:
    """One float64 sum per parameter tensor of the trained UNets: equal iff the weights are, in practice."""
    from training.trainer import trained_unets

    return torch.stack([p.detach().double().sum() for u in trained_unets(model) for p in u.parameters()])


def tiny_model(base_dir: Path, seed: int = 0) -> LeffaModel:
    torch.manual_seed(seed)
    model = LeffaModel.from_config_dir(base_dir).eval()
    # conv_in's extra channels start at zero; make them matter so the tests see them
    with torch.no_grad():
        for u in (model.unet, model.reference_unet):
            u.conv_in.weight.normal_(0, 0.2)
    return model


@pytest.fixture
def model(base_dirs, variant) -> LeffaModel:
    return tiny_model(base_dirs[variant])


def make_inputs(batch: int = 1, height: int = 64, width: int = 48, seed: int = 0) -> dict:
    """Synthetic tensors in the pipeline's conventions: images in [-1, 1], a {0,1} mask."""
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.rand(batch, 3, height, width, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, height, width)
    mask[:, :, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1
    return {"src_image": img(), "ref_image": img(), "mask": mask, "densepose": img()}


# -- tiny dataset trees of the three layouts (training/datasets.py), for training and inference ------
TREE_W, TREE_H = 48, 64


def solid_image(path: Path, rgb, size=(TREE_W, TREE_H), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, rgb).save(path)


def _with_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def viton_tree(root: Path, n: int = 2) -> Path:
    """VITON-HD: train and test splits of ``n`` people (random photos, red garments, a box mask);
    ``test_pairs.txt`` swaps the garments of the first two."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(n):
            name = f"{i:05d}_00.jpg"
            Image.fromarray(rng.integers(0, 255, (TREE_H, TREE_W, 3), dtype=np.uint8)).save(
                _with_parent(root / split / "image" / name))
            solid_image(root / split / "cloth" / name, (200, 30, 30))
            mask = np.zeros((TREE_H, TREE_W), np.uint8)
            mask[16:48, 12:36] = 255
            Image.fromarray(mask).save(_with_parent(root / split / "agnostic-mask" / f"{i:05d}_00_mask.png"))
            solid_image(root / split / "image-densepose" / name, (10, 20, 30))
    (root / "test_pairs.txt").write_text("00000_00.jpg 00001_00.jpg\n00001_00.jpg 00000_00.jpg\n")
    return root


def dress_code_tree(root: Path) -> Path:
    """DressCode: one person in upper_body (000001), one in dresses (000002); ``test_pairs.txt``
    gives the first the second's dress."""
    for cat, sid in (("upper_body", "000001"), ("dresses", "000002")):
        solid_image(root / cat / "images" / f"{sid}_0.jpg", (90, 90, 90))
        solid_image(root / cat / "images" / f"{sid}_1.jpg", (0, 0, 200))
        solid_image(root / cat / "masks" / f"{sid}_0.png", 255, mode="L")
        solid_image(root / cat / "dense" / f"{sid}_5.png", (3, 3, 3))
    (root / "test_pairs.txt").write_text("000001_0.jpg 000002_1.jpg\n")
    return root


def deepfashion_tree(root: Path, split: str = "train", names=("a", "b"), pairs=(("a", "b"),)) -> Path:
    """DeepFashion: ``names`` people (grey) and their DensePose; ``pairs`` of (source, target)."""
    for name in names:
        solid_image(root / split / "images" / f"{name}.jpg", (50, 50, 50))
        solid_image(root / split / "densepose" / f"{name}.png", (1, 2, 3))
    (root / f"{split}_pairs.txt").write_text("".join(f"{s}.jpg {t}.jpg\n" for s, t in pairs))
    return root


# -- the web app in --tiny mode, for the gradio_client and browser tests ----------------------------
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))}
    log = open(tmp_path_factory.mktemp("log") / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, "app.py", "--tiny", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                proc.kill()
                pytest.fail(f"app did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=20)




def pytest_collection_modifyitems(items):
    """Every test that needs the app server (directly or through ``client`` / ``page``) is slow."""
    for item in items:
        if "app_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
