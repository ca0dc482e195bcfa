"""Parity of our MCLD pipeline (``mcld/``) with the authors' code (the oracle), on tiny random weights.

Not run by CI: the authors' code and its pinned libraries are never a dependency of this project.
Set-up, outside the repository (the default PyPI torch wheel bundles CUDA libraries, about 3 GB,
and runs on the CPU; ``--isolated`` keeps a local CPU wheel index out of it):

    python3 -m venv /work/oracle/mcld-venv
    /work/oracle/mcld-venv/bin/pip install --isolated torch==2.13.0 torchvision==0.28.0 diffusers==0.24.0 \\
        transformers==4.46.3 huggingface_hub==0.25.0 omegaconf einops accelerate opencv-python-headless pandas
    mkdir -p /work/oracle/mcld
    git -C MIRROR archive HEAD src ip_adapter validation configs train.py test.py | tar -x -C /work/oracle/mcld
    # (or a clone of https://github.com/jqliu09/MCLD; data/ is not needed)

Usage, from the repository root with the project's venv:

    .venv/bin/python -m benchmarks.parity_mcld --oracle-python /work/oracle/mcld-venv/bin/python \\
        --oracle-tree /work/oracle/mcld

What it does:

1. makes seeded random weights of a tiny MCLD (``mcld.configs.tiny_config`` at 128×128, the small
   networks' widths below; four UNet blocks, which their ``from_pretrained_2d`` hard-codes) and saves
   them as the authors' code reads them: ``denoising_unet.pth``, ``reference_unet.pth``,
   ``pose_guider.pth``, ``image_proj_model.pth`` (their loader's name; the Hub's is
   ``image_projector.pth``), diffusers folders for the base UNet (``unet/config.json`` +
   ``diffusion_pytorch_model.safetensors``) and the VAE, a transformers folder for the CLIP encoder
   (``pytorch_model.bin``), and a ``train.yaml`` whose ``inference_config`` is their
   ``configs/inference/inference_v3.yaml`` (as ``test.py`` runs);
2. runs their ``MCLDPipelineLoader`` + ``Pose2ImageIpMultiPipeline`` in the oracle venv (a subprocess;
   ``mlflow`` and ``av``, which ``train.py`` imports, are stub packages; ``validation/pipeline_loader.py``
   is copied once to ``pipeline_loader_cpu.py`` in the oracle tree with ``"cuda"`` -> ``"cpu"`` and the
   tiny Resampler/PoseGuider widths) on random 8-bit images, as ``test.py`` calls it (CLIP inputs
   ``× 255``, the face embedding (B, 1, 512));
3. loads the same files with ``MCLDModel.from_files`` (the strict loader: this also checks their
   checkpoint format) and runs ``MCLDPipeline`` in this venv;
4. compares the images in [0, 1] and the 256×176 results as ``test.py`` saves them, prints a Markdown
   table and exits 1 when a threshold is missed.

Cases: the published setting (20 steps, guidance 3.5, a batch of two, through their loader's
``forward``) and guidance off (4 steps, a zero face embedding, their pipeline called directly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mcld.configs import tiny_config
from mcld.model import MCLDModel
from mcld.pipeline import MCLDPipeline, resize_as_published
from mcld.weights import MCLDFiles

SIZE = 128
SEED = 1234
MAX_ABS_DIFF = 2 / 255  # images in [0, 1], CPU float32
MAX_SAVED_DIFF = 2  # the 256×176 uint8 results
CASES = {  # name: (batch, steps, guidance, zero face, through their loader's forward)
    "published (20 steps, CFG 3.5, B=2)": (2, 20, 3.5, False, True),
    "no CFG (4 steps, zero face, B=1)": (1, 4, 1.0, True, False),
}


def parity_config():
    return replace(tiny_config(), image_size=SIZE, projector=replace(tiny_config().projector, ff_mult=4))


# -- 1. their files ---------------------------------------------------------------------------------
def make_files(root: Path, oracle_tree: Path) -> MCLDFiles:
    """Random weights (seeded), saved in the authors' layout under ``root``."""
    config = parity_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = MCLDModel.from_config(config)  # PyTorch's default initialisation: activations O(1)
    (root / "ckpt").mkdir(parents=True)
    for part, name in (("denoising_unet", "denoising_unet"), ("reference_unet", "reference_unet"),
                       ("pose_guider", "pose_guider"), ("image_projector", "image_proj_model")):
        torch.save(getattr(model, part).state_dict(), root / "ckpt" / f"{name}.pth")
    unet_dir, vae_dir, clip_dir = root / "base" / "unet", root / "vae", root / "image_encoder"
    for d in (unet_dir, vae_dir, clip_dir):
        d.mkdir(parents=True)
    from safetensors.torch import save_file

    stock = {k: v for k, v in model.denoising_unet.state_dict().items() if ".processor." not in k}
    save_file({k: v.contiguous() for k, v in stock.items()}, unet_dir / "diffusion_pytorch_model.safetensors")
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config.unet}))
    save_file({k: v.contiguous() for k, v in model.vae.state_dict().items()},
              vae_dir / "diffusion_pytorch_model.safetensors")
    (vae_dir / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config.vae}))
    torch.save(model.image_encoder.state_dict(), clip_dir / "pytorch_model.bin")
    (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip_vision_model",
                                                      "architectures": ["CLIPVisionModelWithProjection"],
                                                      **config.clip}))
    (root / "train.yaml").write_text(textwrap.dedent(f"""\
        data:
          texture_unet_condition: True
        pretrained_base_model_path: "{root / 'base'}"
        pretrained_vae_path: "{vae_dir}"
        image_encoder_path: "{clip_dir}"
        inference_config: "{oracle_tree / 'configs/inference/inference_v3.yaml'}"
        """))
    (root / "config.json").write_text(json.dumps({"pose_guider": asdict(config.pose_guider),
                                                  "projector": asdict(config.projector)}))
    return MCLDFiles(root / "ckpt/denoising_unet.pth", root / "ckpt/reference_unet.pth", root / "ckpt/pose_guider.pth",
                     root / "ckpt/image_proj_model.pth", unet_dir / "config.json", vae_dir / "config.json",
                     vae_dir / "diffusion_pytorch_model.safetensors", clip_dir / "config.json",
                     clip_dir / "pytorch_model.bin")


def make_inputs(root: Path) -> None:
    """Random 8-bit images and face embeddings per case, saved for both sides."""
    rng = np.random.default_rng(SEED)
    for i, (batch, _, _, zero_face, _) in enumerate(CASES.values()):
        for name in ("source", "texture", "pose"):
            for b in range(batch):
                base = rng.integers(0, 256, (SIZE // 16, SIZE // 16, 3), dtype=np.uint8)
                noise = rng.integers(-20, 21, (SIZE, SIZE, 3))
                big = np.kron(base, np.ones((16, 16, 1), dtype=np.uint8)).astype(int) + noise
                Image.fromarray(big.clip(0, 255).astype(np.uint8)).save(root / f"case{i}_{name}{b}.png")
        face = np.zeros((batch, 512), np.float32) if zero_face else rng.standard_normal((batch, 512)).astype(np.float32)
        np.save(root / f"case{i}_face.npy", face)


def load_case(root: Path, i: int, batch: int) -> tuple[list[list[Image.Image]], np.ndarray]:
    images = [[Image.open(root / f"case{i}_{n}{b}.png").convert("RGB") for b in range(batch)]
              for n in ("source", "texture", "pose")]
    return images, np.load(root / f"case{i}_face.npy")


# -- 2. theirs ----------------------------------------------------------------------------------------
ORACLE = r'''
import json, sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
torch.set_num_threads(1)
root, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
from validation.pipeline_loader_cpu import MCLDPipelineLoader
from src.pipelines.pipeline_pose2img_mcld import Pose2ImageIpMultiPipeline
from test import postprocess_image
loader = MCLDPipelineLoader(str(root / "train.yaml"), num_tokens=16, image_proj_model=True)
loader.init_model(str(root / "ckpt") + "/", pipe_class=Pose2ImageIpMultiPipeline)
results = {}
for i, (batch, steps, guidance, _, via_forward) in enumerate(cases):
    to_tensor = lambda img: torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float() / 255  # ToTensor's
    load = lambda n: torch.stack([to_tensor(Image.open(root / f"case{i}_{n}{b}.png")) for b in range(batch)])
    source, texture, pose = load("source"), load("texture"), load("pose")  # [0, 1], as their dataset (do_normalize False)
    face = torch.from_numpy(np.load(root / f"case{i}_face.npy"))[:, None]  # (B, 1, 512)
    loader.generator = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    if via_forward:  # test.py's inference_func
        out = loader.forward(texture, pose, source * 255, width=SIZE, height=SIZE, clip_image2=texture * 255, face_emb=face)
    else:
        out = loader.pipe(texture, pose, SIZE, SIZE, steps, guidance, generator=loader.generator, clip_image=source * 255,
                          clip_image2=texture * 255, face_emb=face).images[:, :, 0]
    seconds = time.perf_counter() - start
    torch.save({"images": out.float(), "saved": postprocess_image(out, (256, 176)), "seconds": seconds},
               root / f"theirs{i}.pt")
'''


def patch_loader(oracle_tree: Path) -> None:
    """``validation/pipeline_loader_cpu.py`` in the oracle tree: their loader on the CPU with the tiny
    widths of the two networks whose sizes it hard-codes."""
    source = (oracle_tree / "validation/pipeline_loader.py").read_text()
    p, g = parity_config().projector, parity_config().pose_guider
    for old, new in (('"cuda"', '"cpu"'), ("dim=1280,", f"dim={p.dim},"), ("depth=4,", f"depth={p.depth},"),
                     ("dim_head=64,", f"dim_head={p.dim_head},"), ("heads=20,", f"heads={p.heads},"),
                     ("PoseGuider(320, block_out_channels=(16, 32, 96, 256))",
                      f"PoseGuider({g.out_channels}, block_out_channels={tuple(g.widths)})")):
        if old not in source:
            raise SystemExit(f"their pipeline_loader.py has changed: {old!r} not found")
        source = source.replace(old, new)
    (oracle_tree / "validation/pipeline_loader_cpu.py").write_text(source)


def run_theirs(root: Path, python: str, oracle_tree: Path) -> None:
    stubs = root / "stubs"
    for name in ("mlflow", "av"):  # imported by train.py / src.utils, unused by inference
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text("")
    patch_loader(oracle_tree)
    script = root / "oracle.py"
    script.write_text(ORACLE.replace("SEED", str(SEED)).replace("SIZE", str(SIZE)))
    env = {**os.environ, "PYTHONPATH": f"{oracle_tree}{os.pathsep}{stubs}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cases = json.dumps([list(c) for c in CASES.values()])
    done = subprocess.run([python, str(script), str(root), cases], cwd=oracle_tree, env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the oracle failed:\n{done.stderr[-4000:]}")


# -- 3. ours -----------------------------------------------------------------------------------------
def run_ours(root: Path, files: MCLDFiles) -> dict[int, dict]:
    config = parity_config()
    model = MCLDModel.from_files(files, pose_guider=config.pose_guider, projector=config.projector, image_size=SIZE)
    pipe, results = MCLDPipeline(model), {}
    for i, (batch, steps, guidance, _, _) in enumerate(CASES.values()):
        (source, texture, pose), face = load_case(root, i, batch)
        start = time.perf_counter()
        out = pipe(source, texture, pose, face, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(SEED))
        results[i] = {"images": out.tensors, "saved": resize_as_published(out.tensors, (256, 176)),
                      "seconds": time.perf_counter() - start}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--oracle-python", default="/work/oracle/mcld-venv/bin/python")
    parser.add_argument("--oracle-tree", type=Path, default=Path("/work/oracle/mcld"))
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        files = make_files(root, args.oracle_tree.resolve())
        make_inputs(root)
        run_theirs(root, args.oracle_python, args.oracle_tree.resolve())
        ours = run_ours(root, files)
        failed = False
        print("| case | max abs diff (0–1) | mean abs diff | saved 256×176: max diff (0–255) | image std | "
              "theirs s | ours s |\n|---|---|---|---|---|---|---|")
        for i, name in enumerate(CASES):
            theirs = torch.load(root / f"theirs{i}.pt", weights_only=True)
            diff = (theirs["images"] - ours[i]["images"]).abs()
            saved = (theirs["saved"].mul(255).round().int() - ours[i]["saved"].int()).abs().max().item()
            ok = diff.max().item() <= MAX_ABS_DIFF and saved <= MAX_SAVED_DIFF
            failed |= not ok
            print(f"| {name} | {diff.max().item():.2e} | {diff.mean().item():.2e} | {saved} | "
                  f"{ours[i]['images'].std().item():.3f} | {theirs['seconds']:.2f} | {ours[i]['seconds']:.2f} |"
                  + ("" if ok else " **FAIL**"))
        print(f"\nthresholds: max abs diff <= {MAX_ABS_DIFF:.4f} (2/255), saved results <= {MAX_SAVED_DIFF}; "
              f"CPU float32, {SIZE}×{SIZE}, torch {torch.__version__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
