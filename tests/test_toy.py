"""The toy reproduction (experiments/toy_flow.py): its data agree with the loss's and the
metric's conventions, and the script runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from experiments import toy_flow
from leffa.flow import resize_flow
from leffa.loss import flow_loss


@pytest.fixture(scope="module")
def samples():
    return toy_flow.make_set(4, seed=3)


def test_true_warp_has_zero_loss_and_zero_error(samples):
    b = toy_flow.batch_of(samples)
    true = resize_flow(b["true_flow"], (16, 12))  # an affine field survives the token grid exactly
    assert flow_loss([true], b["ref_image"], b["src_image"], b["mask"]).item() < 1e-4
    assert toy_flow.end_point_error(true, samples) < 1e-3
    centre = torch.zeros_like(true)  # uniform attention
    assert flow_loss([centre], b["ref_image"], b["src_image"], b["mask"]).item() > 0.01
    assert toy_flow.end_point_error(centre, samples) > 10


def test_garment_mask_and_print_opacity():
    opaque, faint = toy_flow.make_set(1, 5, print_alpha=255)[0], toy_flow.make_set(1, 5, print_alpha=0)[0]
    assert torch.equal(opaque["mask"], faint["mask"])  # same garment and transform, other prints
    assert not torch.equal(opaque["ref_image"], faint["ref_image"])
    assert 0.1 < opaque["mask"].mean() < 0.9


@pytest.mark.slow
@pytest.mark.parametrize("family", ["leffa", "concat"])
def test_script_runs_end_to_end(tmp_path, family):
    report = toy_flow.main(["--steps", "2", "--seeds", "0", "1", "--train-size", "8", "--test-size", "3",
                            "--batch", "2", "--out", str(tmp_path), "--family", family])
    suffix = "" if family == "leffa" else "_concat"
    saved = json.loads((tmp_path / f"toy_results{suffix}.json").read_text())
    assert saved["mean_over_seeds"] == report["mean_over_seeds"]
    assert set(saved["per_seed"]) == {"0", "1"}
    runs = saved["per_seed"]["0"]
    assert list(runs) == ["untrained", "diffusion loss only", "+ Leffa loss (λ = 1)"]
    for run in runs.values():
        assert 0 < run["end_point_error_px"] < 100 and run["diffusion_loss"] > 0
    assert (tmp_path / f"toy_attention{suffix}.png").stat().st_size > 10_000


def test_evaluation_heatmap_and_flow_agree(samples):
    """The figure's heatmap is the attention whose coordinate mean is the flow."""
    model = toy_flow.build_model(0, samples)
    ev = toy_flow.evaluate(model, samples)
    assert len(ev.layers) == 3  # down 0 and up 1 (×2) run at the 16×12 latent grid
    flow = ev.flow()
    assert flow.shape == (4, 16, 12, 2)
    heat = ev.heatmap(2, x=5 / 11, y=7 / 15)  # the token in row 7, column 5
    assert heat.shape == (16, 12) and abs(heat.sum().item() - 1) < 1e-5
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 12), indexing="ij")
    mean = torch.stack([(heat * xs).sum(), (heat * ys).sum()])
    torch.testing.assert_close(mean, flow[2, 7, 5], atol=1e-5, rtol=0)


def test_attention_near_source(samples):
    """One-hot attention on each query's true source scores 1; the untrained model's nearly
    uniform attention scores about the area share of the radius."""
    from leffa.recording import AttentionRecord

    ev = toy_flow.evaluate(toy_flow.build_model(0, samples), samples)
    assert 0.02 < toy_flow.attention_near_source(ev, samples) < 0.1

    b = toy_flow.batch_of(samples)
    h, w = 16, 12
    # outside the mask the source may lie off the garment image: clamp (those queries do not count)
    source = ((resize_flow(b["true_flow"], (16, 12)).reshape(len(samples), h * w, 2) + 1) / 2).clamp(0, 1)
    nearest = (source[..., 1] * (h - 1)).round().long() * w + (source[..., 0] * (w - 1)).round().long()
    q = 100 * F.one_hot(nearest, h * w).float()[:, None]  # (B, 1 head, n, d = n)
    k = torch.eye(h * w).expand(len(samples), 1, h * w, h * w)
    rec = toy_flow.AttentionRecorder()
    rec.records[(0, "layer")] = AttentionRecord(q, k, 1.0, (h, w))
    one_hot = toy_flow.Evaluation(rec, ["layer"], 0.0)
    assert toy_flow.attention_near_source(one_hot, samples) == pytest.approx(1.0)
    assert toy_flow.end_point_error(one_hot.flow(), samples) < 6  # at most half a token's diagonal


# -- experiments/toy_sampling.py: the samplers' quality on the trained toy ---------------------------------
def test_sampling_presets_are_chosen_by_the_rule():
    from experiments.toy_sampling import UNTRAINED, choose_presets

    def row(name, passes, ssim, std=0.002, whole=None, to_published=0.95):
        return {"setting": name, "passes": passes, "whole": passes if whole is None else whole,
                "seconds_per_image": passes / 100, "truth_ssim": ssim, "truth_ssim_std": std,
                "published_ssim": to_published}

    rows = [row(UNTRAINED, 60, 0.2), row("ddpm 30", 60, 0.60, to_published=1.0), row("a", 20, 0.599),
            row("b", 10, 0.59), row("c", 6, 0.50), row("d", 20, 0.61, whole=10), row("e", 8, 0.62, to_published=0.9)]
    # Fast: fewest passes within the published spread (0.598 or better) and close to the published image
    # (e: not), ties by whole passes; Preview: within 3 spreads or 0.02 (0.58) of the truth
    assert choose_presets(rows) == {"Published": "ddpm 30", "Fast": "d", "Preview": "e"}


@pytest.mark.slow
def test_sampling_experiment_runs_end_to_end(tmp_path):
    from experiments import toy_sampling

    report = toy_sampling.main(["--vae-steps", "2", "--train-steps", "2", "--train-size", "8", "--test-size", "2",
                                "--batch", "2", "--seeds", "0", "--settings", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "sampling_results.json").read_text())
    assert saved["rows"] == report["rows"]
    assert [r["setting"] for r in saved["rows"]] == [toy_sampling.UNTRAINED, "ddpm 30", "ddpm 15", "ddpm 10"]
    published = saved["rows"][1]
    assert published["published_ssim"] == 1.0 and published["passes"] == 60 and published["whole"] == 60
    assert saved["rows"][2]["passes"] == 30 and saved["rows"][3]["passes"] == 20 and 0 < saved["rows"][3]["truth_ssim"] < 1
    assert set(saved["presets"]) == {"Published", "Fast", "Preview"} and 0 < saved["vae_round_trip"]["truth_ssim"] < 1
    # the saved toy (its VAE's scaling factor included) gives the same images again
    again = toy_sampling.main(["--model", str(tmp_path / "sampling_model.pt"), "--test-size", "2", "--seeds", "0",
                               "--settings", "1", "--out", str(tmp_path / "again")])
    assert again["rows"][1]["truth_ssim"] == published["truth_ssim"]
