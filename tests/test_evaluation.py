"""The evaluation library (``leffa eval``'s engine): metric formulas against direct computations
and hand-checked values, the strict loaders of the published weight files (random weights with the
published names and shapes, ``fixtures/evaluation_weights.json``), the URL cache and its checksum,
the folders, and ``evaluate`` end to end on tiny images. CPU, no network."""

from __future__ import annotations

import hashlib
import json
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from errors import UserError
from evaluation.evaluate import EvalConfig, EvalResult, evaluate
from evaluation.faces import FaceScores, cosine_similarity, face_scores, face_similarity
from evaluation.folders import EvalInputError, Pair, list_images, pair_by_name, read_rgb, source_name
from evaluation.inception import UNUSED, FeatureMode, FIDInceptionV3, network_input
from evaluation.lpips import LPIPS, SPECS, Backbone, LinearLayers, LpipsNet
from evaluation.metrics import frechet_distance, kid, polynomial_kernel, psnr
from evaluation.ssim import SsimBorder, gaussian_window, ssim
from evaluation.weights import ALEXNET, INCEPTION, LPIPS_ALEX, LPIPS_SQUEEZE, SQUEEZENET, published_shapes
from weightfiles import urls
from weightfiles.checkpoint import CheckpointError
from weightfiles.hub import MissingWeightsError
from weightfiles.urls import UrlFile, resolve_urls

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "evaluation_weights.json").read_text())
OPTIONAL = ".num_batches_tracked"


# -- FID --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 40])  # fewer images than dimensions (singular covariance), and more
def test_fid_of_a_set_with_itself_is_zero(n):
    f = np.random.default_rng(0).normal(size=(n, 8))
    assert abs(frechet_distance(f, f)) < 1e-9


@pytest.mark.parametrize("n_real, n_fake", [(50, 60), (4, 5), (3, 20)])
def test_frechet_distance_matches_scipy_sqrtm(n_real, n_fake):
    """The formula as pytorch-fid and clean-fid compute it: ``sqrtm(Σ1 Σ2)``."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(n_real, 6))
    b = rng.normal(1.0, 2.0, size=(n_fake, 6)) @ rng.normal(size=(6, 6))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_covmean = np.trace(linalg.sqrtm(s1 @ s2)).real
    direct = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-7)


def test_frechet_distance_of_two_1d_gaussians_is_the_closed_form():
    # N(m1, s1²) vs N(m2, s2²): (m1 - m2)² + (s1 - s2)²; here means 1 and 3, variances (N - 1) 2 and 8
    real, fake = np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])
    assert frechet_distance(real, fake) == pytest.approx((1 - 3) ** 2 + (2**0.5 - 8**0.5) ** 2)


# -- KID --------------------------------------------------------------------------------------------------
def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² with k(a, b) = (a·b / d + 1)³, by loops."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return xx + yy - 2 * xy


def test_polynomial_kernel_by_hand():
    assert polynomial_kernel(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]]))[0, 0] == pytest.approx(6.5**3)


def test_kid_on_whole_sets_is_the_unbiased_mmd():
    """With subsets as large as the sets, every subset is the whole set: the direct MMD²."""
    rng = np.random.default_rng(2)
    real, fake = rng.uniform(size=(7, 4)), rng.uniform(0.2, 1.3, size=(7, 4))
    assert kid(real, fake, subsets=3, subset_size=100, seed=5) == pytest.approx(direct_mmd2(fake, real), rel=1e-12)


def test_kid_subsets_are_drawn_as_clean_fid_draws_them():
    """Subsets of m: the fake subset first, then the real one, from RandomState(seed)."""
    rng = np.random.default_rng(3)
    real, fake = rng.uniform(size=(9, 3)), rng.uniform(size=(8, 3))
    draws = np.random.RandomState(11)
    values = []
    for _ in range(4):
        x = fake[draws.choice(8, 5, replace=False)]
        y = real[draws.choice(9, 5, replace=False)]
        values.append(direct_mmd2(x, y))
    assert kid(real, fake, subsets=4, subset_size=5, seed=11) == pytest.approx(np.mean(values), rel=1e-12)
    assert kid(real, fake, subsets=4, subset_size=5, seed=11) != kid(real, fake, subsets=4, subset_size=5, seed=12)


def test_kid_and_fid_need_two_images():
    with pytest.raises(ValueError, match="at least 2"):
        kid(np.ones((1, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.ones((1, 3)), np.ones((5, 3)))


# -- PSNR -------------------------------------------------------------------------------------------------
def test_psnr_by_hand():
    real = np.zeros((4, 5, 3), np.uint8)
    assert psnr(real, real + 10) == pytest.approx(10 * math.log10(255**2 / 100))  # 28.1308 dB
    fake = real.copy()
    fake[0, 0, 0] = 255  # MSE = 255² / 60
    assert psnr(real, fake) == pytest.approx(10 * math.log10(60))
    assert psnr(real, real) == math.inf  # as scikit-image (with a warning there)
    with pytest.raises(ValueError, match="one shape"):
        psnr(real, real[:3])


def test_psnr_is_mcld_s_per_image_formula():
    """MCLD: scikit-image's PSNR with data_range 1 on float32 [0, 1] images (C, H, W), i.e.
    10 log10(1 / MSE) with the MSE's mean in float64."""
    rng = np.random.default_rng(0)
    real, fake = (rng.integers(0, 256, (64, 48, 3), dtype=np.uint8) for _ in range(2))
    a, b = (x.transpose(2, 0, 1).astype(np.float32) / 255 for x in (real, fake))
    theirs = 10 * np.log10(1 / np.mean((a - b) ** 2, dtype=np.float64))
    assert psnr(real, fake) == pytest.approx(theirs, abs=1e-4)


# -- face similarity --------------------------------------------------------------------------------------
def colour_embed(image: np.ndarray) -> np.ndarray | None:
    """A stand-in face embedder: the mean colour, or no face for a dark image."""
    mean = image.reshape(-1, 3).mean(0)
    return None if mean.max() < 20 else mean


def test_cosine_similarity_by_hand():
    assert cosine_similarity([1, 0], [0, 2]) == 0.0
    assert cosine_similarity([1, 1], [2, 2]) == pytest.approx(1.0)
    assert cosine_similarity(np.array([3, 4], np.float32), [-3, -4]) == pytest.approx(-1.0)


def test_face_similarity_resizes_the_other_image_and_needs_two_faces():
    sizes = []

    def embed(image):
        sizes.append(image.shape)
        return colour_embed(image)

    generated, other = np.full((32, 24, 3), (200, 0, 0), np.uint8), np.full((64, 48, 3), (100, 100, 0), np.uint8)
    cosine, distance = face_similarity(generated, other, embed)
    assert sizes == [(32, 24, 3), (32, 24, 3)]  # the other image at the generated one's size
    assert cosine == pytest.approx(1 / math.sqrt(2)) and distance == pytest.approx(math.hypot(100, 100))
    assert face_similarity(generated, np.zeros_like(other), embed) is None
    assert face_similarity(np.zeros_like(generated), other, embed) is None


def test_face_scores_over_pose_transfer_pairs(tmp_path):
    red, dark = np.full((8, 6, 3), (200, 0, 0), np.uint8), np.zeros((8, 6, 3), np.uint8)
    real = [save(tmp_path / "real", f"{n}.png", im) for n, im in
            (("a", red), ("b", np.full((8, 6, 3), (0, 200, 0), np.uint8)), ("c", dark))]
    fakes = [save(tmp_path / "fake", f"{n}.png", red) for n in ("a___b", "b___a", "a___c", "c___a", "x___a")]
    pairs = pair_by_name(real, fakes)
    assert [source_name(p.fake) for p in pairs] == ["a", "b", "a", "c", "x"]
    scores = face_scores(pairs, real, colour_embed, progress=False)
    # targets: b (cos 0), a (1), c (no face), a (1), a (1); sources: a (1), b (0), a (1), c (no face), x (absent)
    assert scores == FaceScores(face_sim_target=pytest.approx(0.75), face_dist_target=pytest.approx(200 * 2**0.5 / 4),
                                face_pairs_target=4, face_sim_source=pytest.approx(2 / 3), face_pairs_source=3)
    none = face_scores([Pair(real[2], real[2])], real, colour_embed, progress=False)
    assert none == FaceScores(None, None, 0, None, 0)


# -- SSIM -------------------------------------------------------------------------------------------------
def pattern(h: int = 20, w: int = 24, c: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic image in [0, 1] and a distorted copy (gamma, shift, a dark square)."""
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    x = torch.stack([0.5 + 0.4 * torch.sin(0.3 * i + k) * torch.cos(0.2 * j - k) for k in range(c)])[None]
    y = x.clone() ** 1.5
    y = torch.roll(y, 1, dims=3)
    y[..., 4:9, 6:12] *= 0.5
    return x.float(), y.float()


def literal_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s SSIM by its definition: Gaussian-weighted statistics of each 11×11 window
    inside the image, float64, averaged over channels and windows."""
    g = gaussian_window().double().numpy()
    w = np.outer(g, g)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(x.shape[0]):
        for r in range(x.shape[1] - 10):
            for c in range(x.shape[2] - 10):
                a, b = x[ch, r:r + 11, c:c + 11], y[ch, r:r + 11, c:c + 11]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
                cov = (w * a * b).sum() - ma * mb
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("border", list(SsimBorder))
def test_ssim_of_identical_images_is_one(border):
    x, _ = pattern()
    assert ssim(x, x, border=border).item() == pytest.approx(1.0, abs=1e-6)


def test_ssim_of_constant_images_by_hand():
    # no variance: SSIM = (2ab + C1) / (a² + b² + C1)
    a, b = 0.5, 0.25
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    assert ssim(x, y).item() == pytest.approx((2 * a * b + 1e-4) / (a * a + b * b + 1e-4), rel=1e-5)


def test_ssim_matches_the_literal_definition():
    x, y = pattern()
    valid = literal_ssim(x[0].double().numpy(), y[0].double().numpy())
    assert ssim(y, x, border=SsimBorder.VALID).item() == pytest.approx(valid, abs=1e-5)
    padded = [np.pad(t[0].double().numpy(), ((0, 0), (5, 5), (5, 5)), mode="reflect") for t in (x, y)]
    assert ssim(y, x, border=SsimBorder.REFLECT).item() == pytest.approx(literal_ssim(*padded), abs=1e-5)


def test_ssim_matches_torchmetrics():
    # StructuralSimilarityIndexMeasure(data_range=1.0)(y, x) with torchmetrics 1.9.0 (reflect borders);
    # the valid value is the mean of its SSIM map without the 5-pixel border (torchmetrics ≤ 1.4.1)
    x, y = pattern()
    assert ssim(y, x).item() == pytest.approx(0.782688558101654, abs=1e-6)
    assert ssim(y, x, border=SsimBorder.VALID).item() == pytest.approx(0.7474503517150879, abs=1e-6)


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 10, 30), torch.zeros(1, 3, 10, 30), border=SsimBorder.VALID)


# -- LPIPS ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net", list(LpipsNet))
def test_lpips_of_identical_images_is_zero(net):
    torch.manual_seed(0)
    model = LPIPS(net).eval()
    for weight in model.linear.parameters():
        weight.data.abs_()  # non-negative, as the published ones are
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x, x), torch.zeros(2))
        d = model(x, x.flip(-1))
    assert d.shape == (2,) and (d > 0).all()


# -- the published weight files ---------------------------------------------------------------------------
def random_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the published names and shapes; O(1) activations (He-scaled
    convolutions, unit batch-norm statistics)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith(OPTIONAL):
            state[name] = torch.tensor(0)
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = torch.ones(shape)
        elif len(shape) >= 2:
            state[name] = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        else:
            state[name] = torch.zeros(shape)
        if name.startswith("lin"):
            state[name] = state[name].abs()  # LPIPS' channel weights are non-negative
    return state


def ours(file: UrlFile) -> tuple[torch.nn.Module, dict]:
    """Our module for a published file, and the file's entries that the module does not run."""
    return {INCEPTION: (FIDInceptionV3(), UNUSED),
            SQUEEZENET: (Backbone(LpipsNet.SQUEEZE), SPECS[LpipsNet.SQUEEZE].unused),
            ALEXNET: (Backbone(LpipsNet.ALEX), SPECS[LpipsNet.ALEX].unused),
            LPIPS_SQUEEZE: (LinearLayers(SPECS[LpipsNet.SQUEEZE].channels), {}),
            LPIPS_ALEX: (LinearLayers(SPECS[LpipsNet.ALEX].channels), {})}[file]


@pytest.mark.parametrize("file", [INCEPTION, SQUEEZENET, ALEXNET, LPIPS_SQUEEZE, LPIPS_ALEX], ids=lambda f: f.name)
def test_our_networks_have_the_published_names_and_shapes(file):
    module, unused = ours(file)
    want = {k: list(s) for k, s in FIXTURE[file.name].items() if not k.endswith(OPTIONAL)}
    assert {k: list(s) for k, s in published_shapes(module, unused).items()} == want


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """The files ``evaluate`` needs by default (Inception, SqueezeNet, LPIPS' squeeze), random."""
    root = tmp_path_factory.mktemp("metrics_weights")
    for seed, file in enumerate((INCEPTION, SQUEEZENET, LPIPS_SQUEEZE)):
        torch.save(random_state(FIXTURE[file.name], seed), root / file.name)
    return root


def test_loaders_read_files_in_the_published_format(weights_dir, tmp_path):
    model = FIDInceptionV3.from_file(weights_dir / INCEPTION.name)
    assert model.Mixed_7c.branch_pool.bn.running_var.eq(1).all()
    # the same file without the batch-norm counters (older torch): accepted too
    state = {k: v for k, v in torch.load(weights_dir / SQUEEZENET.name).items() if not k.endswith(OPTIONAL)}
    torch.save(state, tmp_path / SQUEEZENET.name)
    lpips = LPIPS.from_files(LpipsNet.SQUEEZE, tmp_path / SQUEEZENET.name, weights_dir / LPIPS_SQUEEZE.name)
    assert torch.equal(lpips.backbone.features[0].weight, state["features.0.weight"])


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("features.3.squeeze.weight"), "1 missing keys: features.3.squeeze.weight"),
    (lambda s: s.update({"features.99.weight": torch.zeros(1)}), "1 unexpected keys: features.99.weight"),
    (lambda s: s.pop("classifier.1.bias"), "missing keys: classifier.1.bias"),
    (lambda s: s.update({"features.0.weight": torch.zeros(64, 3, 5, 5)}), r"features.0.weight: file \(64, 3, 5, 5\)"),
])
def test_loaders_refuse_other_names_and_shapes(weights_dir, tmp_path, change, message):
    state = torch.load(weights_dir / SQUEEZENET.name)
    change(state)
    path = tmp_path / SQUEEZENET.name
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=message) as e:
        LPIPS.from_files(LpipsNet.SQUEEZE, path, weights_dir / LPIPS_SQUEEZE.name)
    assert str(path) in str(e.value) and "downloaded again" in str(e.value)


def test_loaders_refuse_a_truncated_file(weights_dir, tmp_path):
    path = tmp_path / INCEPTION.name
    path.write_bytes((weights_dir / INCEPTION.name).read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated, corrupt") as e:
        FIDInceptionV3.from_file(path)
    assert str(path) in str(e.value) and isinstance(e.value, UserError)
    assert "downloaded again" in str(e.value) and "leffa download" not in str(e.value)


# -- downloads --------------------------------------------------------------------------------------------
TINY = UrlFile("tiny.pth", "https://example.invalid/tiny.pth", hashlib.sha256(b"published bytes").hexdigest(), 15)


def test_offline_missing_weights_name_the_files_and_their_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as e:
        resolve_urls([INCEPTION, LPIPS_SQUEEZE], tmp_path)
    text = str(e.value)
    for file in (INCEPTION, LPIPS_SQUEEZE):
        assert file.name in text and file.url in text
    assert "HF_HUB_OFFLINE" in text and "--weights-dir" in text and isinstance(e.value, UserError)


def test_no_network_is_the_same_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(urls, "offline", lambda: False)

    def no_network(url, dst, progress):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urls, "_fetch", no_network)
    with pytest.raises(MissingWeightsError, match="download failed: URLError") as e:
        resolve_urls([TINY, INCEPTION], tmp_path)
    assert TINY.url in str(e.value) and INCEPTION.url in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_downloads_are_checked_against_the_published_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(urls, "offline", lambda: False)
    fetched = []

    def fetch(payload):
        def write(url, dst, progress):
            fetched.append(url)
            dst.write_bytes(payload)
        return write

    monkeypatch.setattr(urls, "_fetch", fetch(b"a proxy's error page"))
    with pytest.raises(MissingWeightsError, match="SHA-256") as e:
        resolve_urls([TINY], tmp_path)
    assert TINY.sha256 in str(e.value) and list(tmp_path.iterdir()) == []  # nothing left behind

    monkeypatch.setattr(urls, "_fetch", fetch(b"published bytes"))
    assert resolve_urls([TINY], tmp_path) == [tmp_path / "tiny.pth"]
    assert (tmp_path / "tiny.pth").read_bytes() == b"published bytes" and len(fetched) == 2
    resolve_urls([TINY], tmp_path)  # cached: no second download
    assert len(fetched) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth"]


def test_the_weights_folder_comes_from_the_argument_or_the_environment(tmp_path, monkeypatch):
    (tmp_path / "tiny.pth").write_bytes(b"a user's own copy")  # no checksum for files put there
    monkeypatch.setenv("LEFFA_METRICS_DIR", str(tmp_path))
    assert resolve_urls([TINY]) == [tmp_path / "tiny.pth"]
    monkeypatch.delenv("LEFFA_METRICS_DIR")
    assert urls.metrics_dir() == Path(torch.hub.get_dir()) / "checkpoints"
    assert urls.metrics_dir(tmp_path / "x") == tmp_path / "x"


# -- inputs -----------------------------------------------------------------------------------------------
def test_network_inputs_of_a_flat_image_by_hand():
    image = np.full((40, 30, 3), 200, np.uint8)
    assert network_input(image, FeatureMode.PYTORCH_FID).shape == (3, 299, 299)
    assert torch.allclose(network_input(image, FeatureMode.PYTORCH_FID), torch.tensor(2 * 200 / 255 - 1))
    assert torch.allclose(network_input(image, FeatureMode.CLEAN_FID), torch.tensor((200 - 128) / 128))


def save(folder: Path, name: str, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name)
    return folder / name


def test_folders_pair_by_name_and_say_what_is_wrong(tmp_path):
    img = np.zeros((8, 6, 3), np.uint8)
    for name in ("00001_00.jpg", "00002_00.jpg", "00003_00.jpg"):
        save(tmp_path / "real", name, img)
    for name in ("00001_00.png", "00002_00.png"):
        save(tmp_path / "fake", name, img)
    (tmp_path / "fake" / "notes.txt").write_text("not an image")
    real, fake = list_images(tmp_path / "real", "real"), list_images(tmp_path / "fake", "generated")
    assert [(p.real.name, p.fake.name) for p in pair_by_name(real, fake)] == [
        ("00001_00.jpg", "00001_00.png"), ("00002_00.jpg", "00002_00.png")]
    save(tmp_path / "fake", "09999_00.png", img)
    with pytest.raises(EvalInputError, match="1 generated images have no real image .*09999_00.png"):
        pair_by_name(real, list_images(tmp_path / "fake", "generated"))
    save(tmp_path / "fake", "00001_00.jpg", img)
    with pytest.raises(EvalInputError, match="several images named 00001_00"):
        list_images(tmp_path / "fake", "generated")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="has no images"):
        list_images(tmp_path / "empty", "real")
    with pytest.raises(EvalInputError, match="does not exist"):
        list_images(tmp_path / "nowhere", "real")


def test_unreadable_images_are_named(tmp_path):
    bad = tmp_path / "00001_00.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(EvalInputError, match="cannot read the image .*00001_00.png") as e:
        read_rgb(bad)
    assert isinstance(e.value, UserError)


def test_real_images_are_resized_to_the_generated_size_with_lanczos(tmp_path):
    rng = np.random.default_rng(0)
    path = save(tmp_path, "a.png", rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    want = np.asarray(Image.open(path).resize((24, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(read_rgb(path, (24, 32)), want)
    assert read_rgb(path, (48, 64)).shape == (64, 48, 3)


# -- evaluate ---------------------------------------------------------------------------------------------
def photos(folder: Path, n: int, seed: int, size=(32, 40)) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, (1, 1, 3)) * np.ones((size[1], size[0], 3))
        noise = rng.normal(0, 40, base.shape)
        save(folder, f"{i:05d}_00.png", np.clip(base + noise, 0, 255).astype(np.uint8))
    return folder


def test_evaluate_a_folder_against_itself(weights_dir, tmp_path):
    real = photos(tmp_path / "real", 2, 0)
    result = evaluate(real, real, paired=True, weights_dir=weights_dir, progress=False)
    assert isinstance(result, EvalResult) and (result.n_real, result.n_fake) == (2, 2)
    assert abs(result.pytorch_fid) < 1e-6 and abs(result.clean_fid) < 1e-6
    assert result.ssim == pytest.approx(1.0, abs=1e-6) and result.lpips == 0.0 and result.psnr == math.inf
    assert math.isfinite(result.clean_kid) and result.face_sim_target is None and not result.has_faces


def test_evaluate_reports_markdown_and_json(weights_dir, tmp_path):
    real, fake = photos(tmp_path / "real", 3, 0, (48, 64)), photos(tmp_path / "fake", 2, 1)  # real resized
    config = EvalConfig(kid_subsets=5, seed=3)
    result = evaluate(real, fake, paired=True, config=config, weights_dir=weights_dir, progress=False)
    assert result.pytorch_fid > 0 and result.clean_fid > 0 and 0 < result.lpips and result.ssim < 1
    real_images = {p.stem: read_rgb(p, (32, 40)) for p in list_images(real, "real")}
    want = np.mean([psnr(real_images[p.stem], read_rgb(p)) for p in list_images(fake, "generated")])
    assert result.psnr == pytest.approx(want) and 5 < result.psnr < 30
    table = result.to_markdown()
    assert table.splitlines()[0] == "| PyTorch-FID | Clean-FID | Clean-KID ×10³ | SSIM | LPIPS | PSNR |"
    assert f"{result.psnr:.4f}" in table and "Face" not in table
    assert f"{result.clean_kid * 1000:.4f}" in table and "2 generated images" in table
    data = json.loads(result.to_json())
    assert data["clean_kid_x1000"] == pytest.approx(result.clean_kid * 1000)
    assert data["config"] == {"batch_size": 16, "lpips_net": "squeeze", "ssim_border": "reflect",
                              "kid_subsets": 5, "kid_subset_size": 1000, "seed": 3}
    unpaired = EvalResult("r", "f", False, 3, 2, 1.0, 2.0, 3e-3)
    assert unpaired.to_markdown().splitlines()[:3] == [
        "| PyTorch-FID | Clean-FID | Clean-KID ×10³ |", "|---|---|---|", "| 1.0000 | 2.0000 | 3.0000 |"]


def test_evaluate_adds_face_similarity_with_an_embedder(weights_dir, tmp_path):
    real, fake = photos(tmp_path / "real", 3, 0), photos(tmp_path / "fake", 2, 1)
    seen = []

    def embed(image):
        seen.append(image.shape)
        return colour_embed(image)

    config = EvalConfig(kid_subsets=2)
    result = evaluate(real, fake, paired=True, config=config, weights_dir=weights_dir, progress=False, face_embed=embed)
    assert seen and set(seen) == {(40, 32, 3)}  # generated and real at the generated size
    assert result.face_pairs_target == 2 and result.face_pairs_source == 0 and result.face_sim_source is None
    assert -1 <= result.face_sim_target <= 1 and result.face_dist_target > 0
    table = result.to_markdown()
    assert table.splitlines()[0].endswith("| PSNR | Face sim. (target) | Face sim. (source) |")
    assert table.splitlines()[2].endswith(f"| {result.face_sim_target:.4f} | n/a |")
    assert "over the 2 of 2 pairs with a face in both images (0 with their source)" in table
    assert json.loads(result.to_json())["face_pairs_target"] == 2
    with pytest.raises(EvalInputError, match="needs paired images"):
        evaluate(real, fake, paired=False, weights_dir=weights_dir, face_embed=embed)


@pytest.mark.parametrize("paired, net, files", [
    (False, LpipsNet.SQUEEZE, [INCEPTION]),
    (True, LpipsNet.SQUEEZE, [INCEPTION, SQUEEZENET, LPIPS_SQUEEZE]),
    (True, LpipsNet.ALEX, [INCEPTION, ALEXNET, LPIPS_ALEX])])
def test_evaluate_fetches_only_the_files_it_needs(tmp_path, monkeypatch, paired, net, files):
    asked = []

    def resolve(wanted, root, progress):
        asked.extend(wanted)
        raise MissingWeightsError("stop here")

    monkeypatch.setattr("evaluation.evaluate.resolve_urls", resolve)
    real = photos(tmp_path / "real", 2, 0)
    with pytest.raises(MissingWeightsError):
        evaluate(real, real, paired=paired, config=EvalConfig(lpips_net=net))
    assert asked == files


def test_evaluate_checks_its_inputs_before_loading_weights(tmp_path):
    real = photos(tmp_path / "real", 2, 0)
    with pytest.raises(EvalInputError, match="at least 2 images"):
        evaluate(real, photos(tmp_path / "one", 1, 1), paired=False, weights_dir=tmp_path / "none")
    fake = photos(tmp_path / "fake", 2, 1)
    save(fake, "00001_00.png", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(EvalInputError, match="must all have one size"):
        evaluate(real, fake, paired=False, weights_dir=tmp_path / "none")


# -- the command line: leffa eval ------------------------------------------------------------------
def test_cli_choices_are_the_enums():
    from cli.main import LPIPS_NETS, SSIM_BORDERS

    assert LPIPS_NETS == tuple(n.value for n in LpipsNet)
    assert SSIM_BORDERS == tuple(b.value for b in SsimBorder)


def test_leffa_eval_prints_the_table_and_writes_json(weights_dir, tmp_path, capsys):
    from cli.main import main

    real, fake = photos(tmp_path / "real", 3, 0), photos(tmp_path / "fake", 3, 1)
    out = tmp_path / "scores.json"
    assert main(["eval", "--real", str(real), "--fake", str(fake), "--paired", "--json", str(out),
                 "--weights-dir", str(weights_dir), "--device", "cpu", "--seed", "3"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == "| PyTorch-FID | Clean-FID | Clean-KID ×10³ | SSIM | LPIPS | PSNR |"
    data = json.loads(out.read_text())
    assert data["config"]["seed"] == 3 and data["n_fake"] == 3 and f"{data['ssim']:.4f}" in table
    assert not list(tmp_path.glob(".*.tmp"))


def test_leffa_eval_reports_user_errors(tmp_path, capsys):
    from cli.main import main

    real = photos(tmp_path / "real", 2, 0)
    assert main(["eval", "--real", str(real), "--fake", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["eval", "--real", str(real), "--fake", str(real), "--json", str(tmp_path / "no" / "x.json")]) == 2
    assert "give a file name in an existing folder" in capsys.readouterr().err


def test_leffa_infer_names_pair_with_their_ground_truth(tmp_path):
    """Every name ``leffa infer`` writes pairs with the real image evaluation must compare it with."""
    from training.datasets import DatasetLayout, Sample
    from training.inference import output_name

    img = np.zeros((8, 6, 3), np.uint8)
    people = [save(tmp_path / "real", f"{n}.jpg", img) for n in ("id_01", "id_02", "id_03")]
    tryon = Sample(target=people[0], reference=tmp_path / "cloth" / "c.jpg", mask=None, densepose=None)
    pose = Sample(target=people[2], reference=people[1], mask=None, densepose=None)
    fakes = [save(tmp_path / "fake", output_name(layout, sample), img)
             for layout, sample in ((DatasetLayout.VITON_HD, tryon), (DatasetLayout.DEEPFASHION, pose))]
    assert [p.fake.name for p in pair_by_name(people, fakes)] == ["id_01.png", "id_02___id_03.png"]
    assert [p.real.name for p in pair_by_name(people, fakes)] == ["id_01.jpg", "id_03.jpg"]
