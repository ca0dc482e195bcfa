"""The Leffa loss for other models (leffa.reference_keys) and the CatVTON-style concatenation model
(leffa.concat): where the reference keys are, the recorded flow on hand-made attention, the loss of
a perfect warp, the recording processors computing what the stock ones do, and inference of the
new family through the engine and ``leffa infer``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from engine import registry
from engine.service import Engine
from engine.setup import ModelSetup, WeightSource
from errors import UserError
from leffa.attention import SkipAttnProcessor
from leffa.concat import CONCAT, ConcatModel, ConcatPipeline, conditioning, tiny_model
from leffa.flow import coordinate_grid
from leffa.loss import flow_loss
from leffa.model import CONFIG_ROOT
from leffa.recording import AttentionRecorder, FlowRecorder
from leffa.reference_keys import RecordingAttnProcessor, RecordingSession, ReferenceKeys, install_recording
from tests.conftest import make_inputs

H, W = 4, 6  # the target's token grid in the hand-made layers
LAYOUTS = list(ReferenceKeys)


def _tokens(layout: ReferenceKeys, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B, h·w, c) of each half -> the layer's (B, 2·h·w, c) tokens in ``layout``."""
    if layout is ReferenceKeys.APPENDED:
        return torch.cat([target, reference], dim=1)
    grid = lambda t: t.transpose(1, 2).reshape(t.shape[0], -1, H, W)  # (B, c, h, w)
    both = layout.latent(grid(target), grid(reference))  # (B, c, h', w')
    return both.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_inverts_the_layout(layout):
    target, reference = torch.randn(2, H * W, 5), torch.randn(2, H * W, 5)
    tokens = _tokens(layout, target, reference)[:, None]  # (B, heads=1, N, d)
    got_target, got_reference = layout.split(tokens, (H, W))
    assert torch.equal(got_target[:, 0], target) and torch.equal(got_reference[:, 0], reference)
    with pytest.raises(ValueError, match="are not two 4x5 grids"):
        layout.split(tokens, (H, 5))


def _flip_attention_layer(layout: ReferenceKeys, sharpness: float = 40.0):
    """An attention layer with identity q/k projections and hidden states built so that target token
    (y, x) attends to reference token (y, W−1−x) alone: the known flow is a horizontal flip."""
    n = H * W
    attn = Attention(query_dim=n, heads=1, dim_head=n)
    with torch.no_grad():
        for proj in (attn.to_q, attn.to_k):
            proj.weight.copy_(torch.eye(n))
    source = torch.arange(n).view(H, W).flip(1).flatten()  # target token i reads reference token source[i]
    eye = torch.eye(n)
    target = eye[source] * sharpness * math.sqrt(n)  # q_i · k_j · 1/√d = sharpness · [source[i] = j]
    return attn, _tokens(layout, target[None], eye[None]), source


@pytest.mark.parametrize("layout", LAYOUTS)
def test_recorded_flow_on_hand_made_attention_is_the_known_flow(layout):
    attn, tokens, source = _flip_attention_layer(layout)
    coords = coordinate_grid(H, W)
    known = coords[source].view(1, H, W, 2)  # x mirrored, y kept
    assert torch.equal(known[..., 0], -coords.view(1, H, W, 2)[..., 0])

    session = RecordingSession(layout)
    processor = RecordingAttnProcessor("layer.attn1", session)
    recorder, flows = AttentionRecorder(), FlowRecorder(tau=1.0, chunk=5)  # chunks of 5 queries: uneven
    recorder.begin((H, W))
    session.recorder, session.target_hw = recorder, (H, W)
    recorder.set_step(0)
    out = processor(attn, tokens)
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, tokens))  # it computes plain self-attention
    torch.testing.assert_close(recorder.flow(0, "layer.attn1"), known, atol=1e-6, rtol=0)
    with session.recording(flows, (H, W)):
        processor(attn, tokens)
    assert session.recorder is None
    torch.testing.assert_close(flows.flows["layer.attn1"], known, atol=1e-6, rtol=0)

    # the loss of that flow is zero where it warps the reference onto the target exactly
    ref = torch.rand(1, 3, 2 * H, 2 * W - 1)  # odd width: the flip maps pixel columns onto each other
    tgt, mask = ref.flip(-1), torch.ones(1, 1, 2 * H, 2 * W - 1)
    assert flow_loss(flows.flows, ref, tgt, mask, theta_resolution=0).item() < 1e-10
    assert flow_loss(flows.flows, ref, ref, mask, theta_resolution=0).item() > 1e-2


def test_recording_processors_compute_what_the_stock_ones_do():
    model = tiny_model()
    stock = ConcatModel.from_config_dir(CONFIG_ROOT / "tiny").eval()
    stock.load_state_dict(model.state_dict())
    stock.unet.set_attn_processor({k: SkipAttnProcessor() if k.endswith("attn2.processor") else AttnProcessor2_0()
                                   for k in stock.unet.attn_processors})
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 9, 16, 6, generator=g), torch.tensor([10, 900])
    rec = AttentionRecorder()
    with torch.no_grad(), model.attention_session(recorder=rec, target_hw=(8, 6)):
        rec.set_step(0)
        got = model.unet(x, t, encoder_hidden_states=None).sample
    torch.testing.assert_close(got, stock.unet(x, t, encoder_hidden_states=None).sample, atol=1e-5, rtol=1e-5)
    assert rec.layers() and all(rec.grid(name) == (4, 3) for name in rec.layers())  # the person half's grid
    attention = rec.attention(0, rec.layers()[0])
    assert attention.shape == (2, 12, 12)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 12))


def test_install_recording_on_any_unet_keeps_other_processors():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(ConcatModel.from_config_dir(CONFIG_ROOT / "tiny", device="meta").unet.config)
    session = install_recording(unet, ReferenceKeys.WIDTH)
    kinds = {k.rsplit(".", 2)[-2]: type(p).__name__ for k, p in unet.attn_processors.items()}
    assert kinds == {"attn1": "RecordingAttnProcessor", "attn2": "AttnProcessor2_0"}
    assert session.keys is ReferenceKeys.WIDTH and session.recorder is None


def test_concat_latent_and_conditioning():
    person, garment = torch.randn(2, 4, 8, 6), torch.randn(2, 4, 8, 6)
    both = CONCAT.latent(person, garment)
    assert both.shape == (2, 4, 16, 6) and torch.equal(CONCAT.target_half(both), person)
    mask = torch.zeros(2, 1, 64, 48)
    mask[:, :, 16:48] = 1
    cond = conditioning(mask, person, garment)
    assert cond.shape == (2, 5, 16, 6)
    assert cond[:, 0, 8:].abs().sum() == 0 and cond[:, 0, 2:6].min() == 1  # the garment half is kept
    assert torch.equal(cond[:, 1:, 8:], garment) and conditioning(mask, person, None)[:, 1:, 8:].abs().sum() == 0
    with pytest.raises(ValueError, match="appended reference tokens"):
        ReferenceKeys.APPENDED.latent(person, garment)


def test_model_checks():
    model = tiny_model()
    with pytest.raises(ValueError, match="must divide by 2 in both sides"):
        model.check_latent((8, 5))
    with pytest.raises(ValueError, match="must take 9 channels"):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config({**model.unet.config, "in_channels": 4})
        ConcatModel(model.vae, unet, model.scheduler_config)


def test_pipeline_is_reproducible_records_and_checks_sizes():
    pipe = ConcatPipeline(tiny_model())
    inputs = make_inputs(batch=2)
    run = lambda seed, **kw: pipe(inputs["src_image"], inputs["ref_image"], inputs["mask"], num_inference_steps=2,
                                  generator=torch.Generator().manual_seed(seed), output_type="pt", **kw)
    rec = AttentionRecorder(steps=[1])
    a, b, c = run(0, attention_recorder=rec).images, run(0).images, run(1).images
    assert a.shape == (2, 3, 64, 48) and torch.equal(a, b) and not torch.equal(a, c)
    assert rec.steps() == [1] and rec.records[(1, rec.layers()[0])].q.shape[0] == 2  # the conditional rows
    kept = run(0, repaint=True).images
    outside = (inputs["mask"] < 0.5).expand_as(kept)
    torch.testing.assert_close(kept[outside][:100], ((inputs["src_image"] + 1) / 2).expand_as(kept)[outside][:100],
                               atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="must divide by 2"):
        pipe(torch.zeros(1, 3, 64, 40), torch.zeros(1, 3, 64, 40), torch.zeros(1, 1, 64, 40), num_inference_steps=1)


def test_save_and_load_our_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "concat.safetensors")
    loaded = ConcatModel.from_pretrained(CONFIG_ROOT / "tiny", tmp_path / "concat.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    state = dict(model.state_dict())
    state.pop("unet.conv_in.bias")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="conv_in.bias"):
        ConcatModel.from_pretrained(CONFIG_ROOT / "tiny", tmp_path / "broken.safetensors")


# -- the engine and leffa infer --------------------------------------------------------------------
def test_engine_runs_the_tiny_model_and_refuses_missing_weights(tmp_path):
    entry = registry.entry("concat_tryon")
    assert entry.family is registry.Family.CONCAT and not entry.published
    assert entry not in registry.for_task(registry.Task.TRYON)  # the tabs offer published models
    engine = Engine.create(ModelSetup(), WeightSource(tiny=True))
    inputs = make_inputs(batch=1)
    pictures = [Image_of(inputs[k][0]) for k in ("src_image", "ref_image", "densepose")]
    mask = Image_of(inputs["mask"][0] * 2 - 1)
    options = engine.check(entry.name, _options(steps=2, record_attention=True, samples=2))
    out = engine.generate(entry.name, pictures[0], pictures[1], mask, pictures[2], options)
    assert [g.seed for g in out] == [42, 43] and out[0].image.size == (48, 64)
    assert not np.array_equal(np.asarray(out[0].image), np.asarray(out[1].image))
    assert out[0].recorder is not None and out[1].row == 1
    published = Engine.create(ModelSetup(), WeightSource(checkpoint_dir=tmp_path))
    with pytest.raises(UserError, match="no published weights.*--checkpoint"):
        published.models.get(entry.name)


def Image_of(t: torch.Tensor):
    from PIL import Image

    return Image.fromarray(((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8).squeeze())


def _options(**kw):
    from engine.options import GenerateOptions

    return GenerateOptions(**kw)


def test_init_from_sd_inpainting_base_weights_keeps_the_unet(tmp_path):
    """``init = "base_weights"``: a diffusers SD1.5-inpainting folder, its UNet unchanged."""
    import shutil

    model = tiny_model()
    model.unet.save_pretrained(tmp_path / "base" / "unet")
    model.vae.save_pretrained(tmp_path / "base" / "vae")
    shutil.copytree(CONFIG_ROOT / "tiny" / "scheduler", tmp_path / "base" / "scheduler")
    loaded = ConcatModel.from_base_weights(tmp_path / "base")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    shutil.rmtree(tmp_path / "base" / "vae")
    with pytest.raises(FileNotFoundError, match="no vae/"):
        ConcatModel.from_base_weights(tmp_path / "base")


def test_training_memory_benchmark_measures_both_families():
    """``benchmarks/bench_train_memory`` on the tiny configs: the Leffa loss's recording adds saved
    activations, and the concatenation model trains one UNet where Leffa trains two."""
    import argparse

    from benchmarks.bench_train_memory import measure

    args = argparse.Namespace(model="tiny", size=(48, 64), batch=1, device="cpu", gradient_checkpointing=False,
                              no_optimizer=False)
    got = {(family, leffa): measure(argparse.Namespace(**vars(args), family=family, leffa=leffa))
           for family in ("leffa", "concat") for leffa in (False, True)}
    for family in ("leffa", "concat"):
        assert got[family, True]["saved_for_backward"] > got[family, False]["saved_for_backward"] > 0
        assert "leffa" in got[family, True]["losses"] and "leffa" not in got[family, False]["losses"]
    assert got["concat", False]["trained_params"] < 0.6 * got["leffa", False]["trained_params"]


def test_the_leffa_loss_keeps_no_attention_map_for_the_backward_pass():
    """O(n·d): among the tensors autograd keeps, the recording adds queries, keys, flows and the
    loss's warps, never a (rows × reference tokens) attention map (the flow is computed in chunks
    under checkpointing)."""
    from collections import Counter

    from training.trainer import TrainConfig, training_module, training_step

    model = tiny_model().train()
    batch = make_inputs(batch=2, height=224, width=160)  # the attention layers' person half: 14×10 tokens
    cfg = TrainConfig(output_dir="", data_root="", family="concat", ref_dropout=0.0)
    shapes = {}
    for leffa in (False, True):
        saved = Counter()

        def keep(t, saved=saved):
            saved[tuple(t.shape)] += 1
            return t

        module = training_module(model)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            training_step(module, model.vae, model.make_scheduler(), batch, cfg, leffa, torch.Generator().manual_seed(0))
        module.release()
        shapes[leffa] = saved
    added = shapes[True] - shapes[False]
    n = 14 * 10
    assert any(n in shape for shape in added)  # the recording kept the layers' queries / keys
    # an attention map over the reference is the one tensor whose last dimension is its token count
    # (queries and keys end in the head width, flows in 2)
    assert not [shape for shape in added if shape and shape[-1] == n], added
