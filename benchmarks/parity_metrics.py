"""Parity and speed of ``evaluation/`` against the reference tools: pytorch-fid, clean-fid,
torchmetrics (the Leffa authors' SSIM and LPIPS) and lpips.

Not run by CI: the references need torchvision, which this project never installs. Set-up,
outside the repository (any venv whose torch has a matching torchvision):

    /work/oracle/venv/bin/pip install --no-deps pytorch-fid lpips clean-fid torchmetrics lightning-utilities

Run it from the repository root with that venv's python:

    PYTHONPATH=$PWD /work/oracle/venv/bin/python benchmarks/parity_metrics.py [--speed]

What it does, offline:

1. writes seeded random weights in the published formats (pytorch-fid's FID Inception;
   torchvision's SqueezeNet 1.1 and AlexNet, files in their format made from our modules; LPIPS'
   linear layers are the real files that the lpips package ships) into a temporary ``$TORCH_HOME/hub/checkpoints``, where pytorch-fid,
   lpips and torchmetrics look for them before downloading, and passes the same folder to ours
   as ``weights_dir``;
2. writes synthetic photos (smooth colour fields with edges and noise, two sizes, PNG and JPEG)
   and distorted copies of them;
3. compares, on the same files: pool3 features with pytorch-fid's ``get_activations``; clean-fid
   features with clean-fid's own folder reader, resizer and ``InceptionV3W.forward`` (its
   normalisation), where the network inside is pytorch-fid's (clean-fid's TorchScript file,
   NVIDIA's copy of the same TF graph, is not on PyPI); FID with both tools' formula and KID with
   clean-fid's ``kernel_distance`` after ``np.random.seed(seed)``; SSIM with torchmetrics
   (reflect borders; the valid variant against the interior of its SSIM map); LPIPS (squeeze and
   alex) backbone taps and distances with torchmetrics and lpips;
4. prints a Markdown table of the largest differences and exits 1 if one is over its threshold.
   FID on 12 images differs from the tools' by ~1e-5 relative: their ``sqrtm(Σ1 Σ2)`` is inexact on
   such rank-deficient covariances (ours is exact); at VITON-HD's 2032 images, 5e-9.

``--clean-fid-torchscript FILE --inception FILE`` instead compares clean-fid's real network
(NVIDIA's TorchScript ``inception-2015-12-05.pt``, its ``layers`` as clean-fid runs them) with ours
on the real pytorch-fid file, on the same clean-fid input: the check that the two published files
hold the same TF graph, which is why ours computes clean-fid's features from pytorch-fid's file.
``--speed`` instead measures images per second of our feature extraction (both Inception inputs)
and of SSIM + LPIPS pairs (``--device``, CPU by default), at 192×256 and 768×1024.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import cleanfid.fid as cleanfid_fid
    import lpips as lpips_pkg
    from cleanfid.inception_torchscript import InceptionV3W
    from pytorch_fid import fid_score
    from pytorch_fid import inception as pfid_inception
    from torchmetrics.image import StructuralSimilarityIndexMeasure
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
except ImportError as e:
    sys.exit(f"{e}: run this with a venv that has pytorch-fid, clean-fid, lpips and torchmetrics (see the docstring)")

from evaluation.evaluate import EvalConfig, evaluate, inception_features, paired_scores
from evaluation.folders import Pair, list_images, read_rgb
from evaluation.inception import FeatureMode, FIDInceptionV3, network_input
from evaluation.lpips import LPIPS, SPECS, Backbone, LpipsNet
from evaluation.metrics import frechet_distance, kid
from evaluation.ssim import SsimBorder, ssim
from evaluation.weights import ALEXNET, INCEPTION, LPIPS_ALEX, LPIPS_SQUEEZE, SQUEEZENET

FEATURE_TOL = 1e-4  # absolute, on features of magnitude O(1)
METRIC_TOL = 1e-6  # relative, on FID, KID, SSIM, LPIPS


# -- reference networks with random weights in the published formats -------------------------------------
def pytorch_fid_network() -> torch.nn.Module:
    """pytorch-fid's FID Inception (``fid_inception_v3`` without its download), seeded random
    weights with O(1) activations."""
    net = pfid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", pfid_inception.FIDInceptionA(192, 32)),
                        ("Mixed_5c", pfid_inception.FIDInceptionA(256, 64)),
                        ("Mixed_5d", pfid_inception.FIDInceptionA(288, 64)),
                        ("Mixed_6b", pfid_inception.FIDInceptionC(768, 128)),
                        ("Mixed_6c", pfid_inception.FIDInceptionC(768, 160)),
                        ("Mixed_6d", pfid_inception.FIDInceptionC(768, 160)),
                        ("Mixed_6e", pfid_inception.FIDInceptionC(768, 192)),
                        ("Mixed_7b", pfid_inception.FIDInceptionE_1(1280)),
                        ("Mixed_7c", pfid_inception.FIDInceptionE_2(2048))]:
        setattr(net, name, block)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5, generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.01, generator=g)
                m.bias.zero_()
    return net.eval()


def backbone_file(net: LpipsNet) -> dict[str, torch.Tensor]:
    """A random file in the format of torchvision's SqueezeNet 1.1 / AlexNet (without importing
    torchvision): our ``Backbone`` has the same names, with PyTorch's default initialisation
    (seeded), plus the classifier entries the published file carries."""
    torch.manual_seed(0)
    state = Backbone(net).state_dict()
    g = torch.Generator().manual_seed(1)
    return {**state, **{k: torch.randn(shape, generator=g) * 0.01 for k, shape in SPECS[net].unused.items()}}


def write_weights(folder: Path) -> None:
    """The five published files, random where the real ones are not at hand."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(pytorch_fid_network().state_dict(), folder / INCEPTION.name)
    for net, file in ((LpipsNet.SQUEEZE, SQUEEZENET), (LpipsNet.ALEX, ALEXNET)):
        torch.save(backbone_file(net), folder / file.name)
    for file in (LPIPS_SQUEEZE, LPIPS_ALEX):  # the real ones, as the lpips package ships them
        shutil.copy(Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / file.name, folder / file.name)


# -- synthetic images -------------------------------------------------------------------------------------
def photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([np.sin(xx * rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(2, 9))
                    for _ in range(3)], -1) * 90 + 128
    img[int(h * rng.uniform(0.2, 0.6)):, int(w * rng.uniform(0.2, 0.6)):] -= 60  # an edge
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def distort(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageFilter

    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2))), np.float32)
    return np.clip(blurred + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def write_images(root: Path, n: int, size: tuple[int, int]) -> tuple[Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    real, fake = root / "real", root / "fake"
    real.mkdir(parents=True)
    fake.mkdir(parents=True)
    for i in range(n):
        img = photo(rng, *size)
        ext = ".jpg" if i % 2 else ".png"  # real JPEGs decode as the tools decode them
        Image.fromarray(img).save(real / f"{i:05d}_00{ext}", quality=95)
        Image.fromarray(distort(rng, img)).save(fake / f"{i:05d}_00.png")
    return real, fake


# -- comparisons ------------------------------------------------------------------------------------------
def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


class CleanFidLayers(torch.nn.Module):
    """What clean-fid's ``InceptionV3W.forward`` calls (``self.layers``), here pytorch-fid's network
    (the random file in ``$TORCH_HOME``) without its own resizing and normalisation:
    (B, 3, 299, 299) -> (B, 2048, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.net = pfid_inception.InceptionV3([3], resize_input=False, normalize_input=False)

    def forward(self, x):
        return self.net(x)[0]


def clean_fid_features(folder: Path) -> np.ndarray:
    """clean-fid's "clean" features of ``folder``: its reader and resizer, its ``InceptionV3W.forward``."""
    model = InceptionV3W.__new__(InceptionV3W)
    torch.nn.Module.__init__(model)
    model.layers, model.resize_inside = CleanFidLayers().eval(), False
    return cleanfid_fid.get_folder_features(str(folder), model, num_workers=0, batch_size=8, device="cpu",
                                            mode="clean", verbose=False)


def torchmetrics_lpips(net: LpipsNet, real: torch.Tensor, fake: torch.Tensor):
    metric = LearnedPerceptualImagePatchSimilarity(net_type=net.value, reduction="none")
    inner = metric.net
    taps = inner.net(inner.scaling_layer(fake * 2 - 1))
    return metric(real * 2 - 1, fake * 2 - 1).double(), [t.double() for t in taps]


def parity(root: Path) -> list[tuple[str, float, float]]:
    """Rows (what, difference, threshold)."""
    weights = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    write_weights(weights)
    real_dir, fake_dir = write_images(root, 12, (192, 256))
    rows = []
    files = list_images(fake_dir, "generated")
    size = (192, 256)

    ours = FIDInceptionV3.from_file(weights / INCEPTION.name)
    feats = inception_features(files, ours, size, 5, progress=False)
    reference = pfid_inception.InceptionV3([3]).eval()  # loads the random file from $TORCH_HOME
    theirs = fid_score.get_activations(files, reference, batch_size=5, dims=2048, device="cpu", num_workers=0)
    rows.append(("Inception pool3, pytorch-fid input (max abs)", max_abs(feats[FeatureMode.PYTORCH_FID], theirs),
                 FEATURE_TOL))
    rows.append(("  feature magnitude (max abs, for scale)", float(np.abs(theirs).max()), float("inf")))
    clean = clean_fid_features(fake_dir)
    rows.append(("Inception pool3, clean-fid input (max abs)", max_abs(feats[FeatureMode.CLEAN_FID], clean),
                 FEATURE_TOL))

    result = evaluate(real_dir, fake_dir, paired=True, weights_dir=weights, progress=False)
    pfid = fid_score.calculate_fid_given_paths([str(real_dir), str(fake_dir)], 5, "cpu", 2048, num_workers=0)
    rows.append(("PyTorch-FID, folders (relative)", rel(result.pytorch_fid, pfid), 1e-4))
    real_clean = clean_fid_features(real_dir)
    rows.append(("Clean-FID, folders (relative)", rel(result.clean_fid, cleanfid_fid.fid_from_feats(real_clean, clean)),
                 1e-4))
    f64 = {name: a.astype(np.float64) for name, a in (("real", real_clean), ("fake", clean))}
    np.random.seed(EvalConfig().seed)
    ref_kid = cleanfid_fid.kernel_distance(f64["real"], f64["fake"])
    rows.append(("Clean-KID, folders (relative)", rel(result.clean_kid, ref_kid), 1e-4))
    rows.append(("KID vs clean-fid's on the same features, float64 (relative)", rel(kid(real_clean, clean), ref_kid),
                 1e-9))
    np.random.seed(EvalConfig().seed)
    ref_kid32 = cleanfid_fid.kernel_distance(real_clean, clean)  # clean-fid's own float32 arithmetic
    rows.append(("  clean-fid's float32 rounding: its KID on its float32 features (relative, for scale)",
                 rel(ref_kid32, ref_kid), float("inf")))
    # the formulas alone, on the same features
    rows.append(("Fréchet distance vs clean-fid's, same 12 features (relative; its sqrtm is inexact at rank 11)",
                 rel(frechet_distance(real_clean, clean), cleanfid_fid.fid_from_feats(real_clean, clean)), 1e-4))
    # VITON-HD's size: 2032 images, fewer than the 2048 dimensions (singular covariances)
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(256, 2048)) / 16
    a, b = (np.maximum(rng.normal(size=(2032, 256)) @ mix + rng.normal(0, 0.3, (2032, 2048)) + shift, 0)
            for shift in (0.0, 0.02))
    pfid = fid_score.calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    rows.append(("Fréchet distance vs pytorch-fid's, 2032 × 2048 features (relative)", rel(frechet_distance(a, b), pfid),
                 METRIC_TOL))
    np.random.seed(3)
    ref_kid = cleanfid_fid.kernel_distance(f64["real"], f64["fake"], num_subsets=20, max_subset_size=7)
    rows.append(("KID formula vs clean-fid's, 20 subsets of 7, float64 (relative)",
                 rel(kid(real_clean, clean, 20, 7, seed=3), ref_kid), 1e-9))

    pairs = [Pair(r, f) for r, f in zip(list_images(real_dir, "real"), files)]
    real = torch.stack([torch.from_numpy(read_rgb(p.real)).permute(2, 0, 1) for p in pairs]).float() / 255
    fake = torch.stack([torch.from_numpy(read_rgb(p.fake)).permute(2, 0, 1) for p in pairs]).float() / 255
    tm_ssim = StructuralSimilarityIndexMeasure(data_range=1.0, reduction="none", return_full_image=True)
    per_image, full_map = tm_ssim(fake, real)
    rows.append(("SSIM reflect vs torchmetrics (max abs per image)", max_abs(ssim(fake, real), per_image), 1e-5))
    rows.append(("SSIM valid vs torchmetrics' map interior (max abs)",
                 max_abs(ssim(fake, real, border=SsimBorder.VALID), full_map[..., 5:-5, 5:-5].mean((1, 2, 3))), 1e-5))
    rows.append(("SSIM, folders vs torchmetrics (absolute)", abs(result.ssim - float(per_image.double().mean())), 1e-6))
    for net in LpipsNet:
        model = LPIPS.from_files(net, weights / net.files[0].name, weights / net.files[1].name)
        tm, taps = torchmetrics_lpips(net, real, fake)
        ours_taps = model.backbone((fake * 2 - 1 - model.shift) / model.scale)
        rows.append((f"LPIPS {net.value} backbone taps (max abs)", max(max_abs(a, b) for a, b in zip(ours_taps, taps)),
                     FEATURE_TOL))
        with torch.no_grad():
            d = model(real * 2 - 1, fake * 2 - 1)
            lp = lpips_pkg.LPIPS(net=net.value, verbose=False)(real * 2 - 1, fake * 2 - 1).flatten()
        rows.append((f"LPIPS {net.value} vs torchmetrics (max abs per pair)", max_abs(d, tm), 1e-6))
        rows.append((f"LPIPS {net.value} vs lpips 0.1.4 (max abs per pair; eps placement differs)", max_abs(d, lp), 1e-5))
    rows.append(("LPIPS squeeze, folders vs torchmetrics (absolute)",
                 abs(result.lpips - float(torchmetrics_lpips(LpipsNet.SQUEEZE, real, fake)[0].mean())), 1e-6))
    return rows


def speed(root: Path, device: str) -> None:
    weights = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    inception = FIDInceptionV3.from_file(weights / INCEPTION.name, device)
    lpips = LPIPS.from_files(LpipsNet.SQUEEZE, weights / SQUEEZENET.name, weights / LPIPS_SQUEEZE.name, device)
    print(f"\nspeed on {device} ({torch.get_num_threads()} threads), images per second:\n")
    print("| size (W×H) | Inception features (both inputs) | SSIM + LPIPS pairs |\n|---|---|---|")
    for w, h, n in ((192, 256, 32), (768, 1024, 16)):
        real_dir, fake_dir = write_images(root / f"{w}x{h}", n, (w, h))
        files = list_images(fake_dir, "generated")
        inception_features(files[:4], inception, (w, h), 8, progress=False)  # warm-up
        t = time.perf_counter()
        inception_features(files, inception, (w, h), 8, progress=False)
        feat_rate = n / (time.perf_counter() - t)
        pairs = [Pair(r, f) for r, f in zip(list_images(real_dir, "real"), files)]
        t = time.perf_counter()
        paired_scores(pairs, lpips, (w, h), 8, SsimBorder.REFLECT, progress=False)
        pair_rate = n / (time.perf_counter() - t)
        print(f"| {w}×{h} | {feat_rate:.1f} | {pair_rate:.1f} |")


def torchscript_parity(torchscript: Path, inception: Path) -> list[tuple[str, float, float]]:
    """With the two real files: clean-fid's network (NVIDIA's TorchScript ``layers``) against ours
    on pytorch-fid's weights, on the same clean-fid input: are they one network?"""
    layers = torch.jit.load(str(torchscript), map_location="cpu").eval().layers
    ours = FIDInceptionV3.from_file(inception)
    rng = np.random.default_rng(1)
    images = [photo(rng, 192, 256) for _ in range(4)]
    x = torch.stack([network_input(im, FeatureMode.CLEAN_FID) for im in images])
    with torch.no_grad():
        theirs, mine = layers(x).reshape(len(x), -1), ours(x)
    return [("clean-fid's TorchScript vs ours on pytorch-fid's weights (max abs)", max_abs(mine, theirs), FEATURE_TOL),
            ("  feature magnitude (max abs, for scale)", float(theirs.abs().max()), float("inf"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", action="store_true", help="measure our throughput instead")
    parser.add_argument("--device", default="cpu", help="for --speed")
    parser.add_argument("--clean-fid-torchscript", type=Path, metavar="FILE",
                        help="the real inception-2015-12-05.pt, to compare with ours on --inception")
    parser.add_argument("--inception", type=Path, metavar="FILE", help=f"the real {INCEPTION.name}")
    args = parser.parse_args()
    if args.clean_fid_torchscript:
        if not args.inception:
            parser.error("--clean-fid-torchscript needs --inception")
        rows = torchscript_parity(args.clean_fid_torchscript, args.inception)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCH_HOME"] = str(Path(tmp) / "torch")  # the tools' caches: our random files, no downloads
        os.environ["HF_HUB_OFFLINE"] = "1"
        if args.speed:
            write_weights(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints")
            speed(Path(tmp) / "speed", args.device)
            return 0
        if not args.clean_fid_torchscript:
            rows = parity(Path(tmp) / "parity")
    print("| comparison | difference | threshold |\n|---|---|---|")
    for what, diff, tol in rows:
        print(f"| {what} | {diff:.3g} | {tol:.0e} |")
    failed = [what for what, diff, tol in rows if not diff <= tol]
    if failed:
        print("\nover threshold: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
