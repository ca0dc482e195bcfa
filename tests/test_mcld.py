"""MCLD (``mcld/``, ``engine/adapters/mcld.py``) on tiny random models: strict loading of the authors'
checkpoint format, the pipeline's determinism, guidance, stop and input checks, the attention
processors' rules, the memory estimate, and the adapter end to end. Parity with the authors' code:
``benchmarks/parity_mcld.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from errors import GenerationStopped, UserError
from mcld.attention import CLIP_TOKENS, MCLDAttentionState, MultiFocalCrossAttention, ReferenceReader, Stage
from mcld.configs import published_config, tiny_config
from mcld.hub import tiny_model
from mcld.memory import estimate_memory, published_meta_model
from mcld.model import LEGACY_VAE_NAMES, MCLDModel, unused_reference_keys
from mcld.pipeline import MCLDInputError, MCLDPipeline, resize_as_published
from mcld.weights import MCLD_FILES, MCLDFiles
from runtime.presets import MemoryPreset
from weightfiles.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
S = 64  # the tiny model's size
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> MCLDModel:
    return tiny_model(0)


@pytest.fixture(scope="module")
def pipe(model) -> MCLDPipeline:
    return MCLDPipeline(model)


def _inputs(batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(batch, 3, S, S, generator=g) for _ in range(3)]
    return (*images, torch.randn(batch, 512, generator=g))


def _run(pipe, *inputs, seed=1, **options):
    options.setdefault("num_inference_steps", 2)
    return pipe(*inputs, generator=torch.Generator().manual_seed(seed), **options).tensors


# -- their checkpoint format ---------------------------------------------------------------------------
def _legacy_vae(state: dict) -> dict:
    """The VAE's attention named as before diffusers 0.14 (as sd-vae-ft-mse's file may be)."""
    out = {}
    for key, value in state.items():
        for old, new in LEGACY_VAE_NAMES.items():
            key = key.replace(new, old) if new in key and "mid_block.attentions" in key else key
        out[key] = value
    return out


def save_their_format(model: MCLDModel, root: Path) -> MCLDFiles:
    """The model's weights as the published files hold them (their key names and layout)."""
    root.mkdir(parents=True, exist_ok=True)
    c = model.config
    files = MCLDFiles(*(root / n for n in ("denoising_unet.pth", "reference_unet.pth", "pose_guider.pth",
                                          "image_projector.pth", "unet.json", "vae.json",
                                          "vae.safetensors", "clip.json", "clip.bin")))
    for part, path in (("denoising_unet", files.denoising_unet), ("reference_unet", files.reference_unet),
                       ("pose_guider", files.pose_guider), ("image_projector", files.image_projector)):
        torch.save(getattr(model, part).state_dict(), path)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _legacy_vae(model.vae.state_dict()).items()}, str(files.vae_weights))
    clip = dict(model.image_encoder.state_dict())
    clip["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # older transformers saved it
    torch.save(clip, files.clip_weights)
    for path, cfg in ((files.unet_config, c.unet), (files.vae_config, c.vae), (files.clip_config, c.clip)):
        Path(path).write_text(json.dumps({"_class_name": "x", **cfg}))
    return files


def _load(files: MCLDFiles) -> MCLDModel:
    c = tiny_config()
    return MCLDModel.from_files(files, pose_guider=c.pose_guider, projector=c.projector, image_size=S)


@pytest.fixture(scope="module")
def their_files(model, tmp_path_factory) -> MCLDFiles:
    return save_their_format(model, tmp_path_factory.mktemp("mcld"))


def test_their_format_loads_and_gives_the_same_images(model, pipe, their_files):
    saved = torch.load(their_files.denoising_unet)
    assert sum(".attn2.processor.to_k_ip." in k or ".attn2.processor.to_v_ip." in k for k in saved) == 20  # tiny
    assert not any(k.startswith(("conv_out.", "conv_norm_out.")) for k in torch.load(their_files.reference_unet))
    assert any(".query." in k for k in __import__("safetensors.torch").torch.load_file(str(their_files.vae_weights)))
    loaded = _load(their_files)
    inputs = _inputs()
    assert torch.equal(_run(MCLDPipeline(loaded), *inputs), _run(pipe, *inputs))


def _rewrite(files: MCLDFiles, tmp_path: Path, change) -> MCLDFiles:
    state = torch.load(files.denoising_unet)
    change(state)
    torch.save(state, tmp_path / "denoising_unet.pth")
    return MCLDFiles(tmp_path / "denoising_unet.pth", *files.as_tuple()[1:])


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"mid_block.extra.weight": torch.zeros(1)}), "1 unexpected keys: mid_block.extra.weight"),
    (lambda s: s.pop("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.weight"),
     "1 missing keys: up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.weight"),
    (lambda s: s.update({"conv_in.weight": torch.zeros(3, 3)}), "conv_in.weight: file (3, 3)"),
])
def test_a_file_that_does_not_fit_is_refused_naming_it(their_files, tmp_path, change, message):
    files = _rewrite(their_files, tmp_path, change)
    with pytest.raises(CheckpointError, match="denoising_unet.pth") as e:
        _load(files)
    assert message in str(e.value)


def test_corrupt_and_missing_files_are_refused_naming_them(their_files, tmp_path):
    corrupt = tmp_path / "pose_guider.pth"
    corrupt.write_bytes(Path(their_files.pose_guider).read_bytes()[:300])
    parts = their_files.as_tuple()
    with pytest.raises(CheckpointError, match=r"pose_guider\.pth: cannot read"):
        _load(MCLDFiles(*parts[:2], corrupt, *parts[3:]))
    with pytest.raises(CheckpointError, match=r"config not found: .*nowhere\.json"):
        _load(MCLDFiles(*parts[:4], tmp_path / "nowhere.json", *parts[5:]))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"bad\.json: not a readable JSON config"):
        _load(MCLDFiles(*parts[:5], tmp_path / "bad.json", *parts[6:]))


def test_the_published_architecture_has_their_keys():
    meta = published_meta_model()
    unet = meta.denoising_unet.state_dict()
    ip = [k for k in unet if ".processor." in k]
    assert len(ip) == 32 and all(k.endswith(("attn2.processor.to_k_ip.weight", "attn2.processor.to_v_ip.weight"))
                                 for k in ip)
    reference = meta.reference_unet.state_dict()
    assert set(unet) - set(ip) - set(reference) == {"conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight",
                                                     "conv_out.bias"}
    assert len(meta.pose_guider.state_dict()) == 16 and len(meta.image_projector.state_dict()) == 51
    assert meta.image_projector.state_dict()["latents"].shape == (1, 16, 1280)
    assert meta.pose_guider.state_dict()["conv_out.weight"].shape == (320, 256, 3, 3)


def test_the_reference_tail_listed_as_unused_is_unused(pipe, model):
    published = unused_reference_keys(published_meta_model().reference_unet)
    prefix = "up_blocks.3.attentions.2."
    assert all(k.startswith(prefix) for k in published) and len(published) == 20
    assert {k[len(prefix):].replace("transformer_blocks.0.", "").split(".")[0] for k in published} == {
        "proj_out", "attn1", "norm2", "attn2", "norm3", "ff"}
    inputs = _inputs()
    before = _run(pipe, *inputs)
    params = dict(model.reference_unet.named_parameters())
    keys = unused_reference_keys(model.reference_unet)
    saved = {k: params[k].detach().clone() for k in keys}
    try:
        for k in keys:
            params[k].data.normal_()
        assert torch.equal(_run(pipe, *inputs), before)
        norm1 = keys[0].split(".attn1.")[0] + ".norm1.weight"
        params[norm1].data.mul_(2)  # the recorded feature itself
        assert not torch.equal(_run(pipe, *inputs), before)
        params[norm1].data.div_(2)
    finally:
        for k in keys:
            params[k].data.copy_(saved[k])


def test_weights_declare_the_published_files_without_torch():
    code = ("import sys, mcld.weights as w; assert 'torch' not in sys.modules; "
            "print(len(w.MCLD_FILES), sorted({f.repo for f in w.MCLD_FILES}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.startswith("9 ") and "Lotior/mcld" in out and "stabilityai/sd-vae-ft-mse" in out
    assert {f.path for f in MCLD_FILES} >= {"denoising_unet.pth", "reference_unet.pth", "pose_guider.pth",
                                            "image_projector.pth", "image_encoder/pytorch_model.bin"}


def test_load_model_lists_every_missing_file(tmp_path, monkeypatch):
    from mcld.hub import load_model
    from weightfiles.hub import MissingWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "mcld").mkdir()
    (tmp_path / "mcld/pose_guider.pth").write_bytes(b"")
    with pytest.raises(MissingWeightsError) as e:
        load_model(tmp_path)
    message = str(e.value)
    assert all(f.local in message for f in MCLD_FILES if f.path != "pose_guider.pth")
    assert "mcld/pose_guider.pth" not in message.split("(")[0]
    assert (f"hf download Lotior/mcld denoising_unet.pth reference_unet.pth image_projector.pth --local-dir "
            f"{tmp_path / 'mcld'}") in message


# -- the pipeline ------------------------------------------------------------------------------------
def test_same_seed_same_image_other_seed_other_image(pipe):
    inputs = _inputs(batch=2)
    first, again, other = _run(pipe, *inputs, seed=1), _run(pipe, *inputs, seed=1), _run(pipe, *inputs, seed=2)
    assert first.shape == (2, 3, S, S) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, again) and not torch.allclose(first, other, atol=1e-3)
    out = pipe(*inputs, num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert len(out.images) == 2 and out.images[0].size == (S, S)


def test_every_condition_changes_the_image(pipe):
    base = _inputs()
    reference = _run(pipe, *base)
    for i in range(4):
        changed = list(base)
        changed[i] = torch.rand_like(changed[i]) if i < 3 else torch.zeros_like(changed[i])
        # the tiny pose guider's effect is small (about 1e-4) but the run is deterministic: 0 if ignored
        assert (_run(pipe, *changed) - reference).abs().max() > 1e-6, f"input {i} has no effect"


def test_guidance_off_and_on(pipe):
    inputs = _inputs()
    off, on, on_again = (_run(pipe, *inputs, guidance_scale=g) for g in (1.0, 3.5, 3.5))
    assert torch.equal(on, on_again) and not torch.allclose(off, on, atol=1e-4)


def test_a_callback_sees_every_step_and_can_stop(pipe, model):
    seen = []
    _run(pipe, *_inputs(), num_inference_steps=3, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(GenerationStopped, match="after step 1 of 3"):
        _run(pipe, *_inputs(), num_inference_steps=3, callback=lambda i, n: False)
    assert not model.attn_state.features and model.attn_state.pose is None  # cleared after a stop too


@pytest.mark.parametrize("change, message", [
    (lambda x: (torch.rand(1, 3, 32, 32), *x[1:]), r"source must be 64×64 \(this model's size\), got 32×32"),
    (lambda x: (x[0], torch.rand(2, 3, S, S), *x[2:]), "texture has 2 images but source has 1"),
    (lambda x: (*x[:2], torch.rand(1, 1, S, S), x[3]), r"pose must be \(B, 3, H, W\)"),
    (lambda x: (x[0] * 255, *x[1:]), r"source must be a float tensor with values in \[0, 1\]"),
    (lambda x: (*x[:3], torch.zeros(1, 128)), r"face_embedding must be \(1, 512\)"),
    (lambda x: (*x[:3], torch.full((1, 512), float("nan"))), "face_embedding must be"),
    (lambda x: ("photo.png", *x[1:]), "source must be a PIL image"),
])
def test_bad_inputs_are_refused_clearly(pipe, change, message):
    with pytest.raises(MCLDInputError, match=message):
        _run(pipe, *change(_inputs()))
    with pytest.raises(UserError, match="num_inference_steps"):
        _run(pipe, *_inputs(), num_inference_steps=0)


def test_pil_inputs_match_tensors(pipe):
    source, texture, pose, face = _inputs()
    pil = [Image.fromarray((t[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for t in (source, texture, pose)]
    as_tensors = [torch.from_numpy(np.array(p)).permute(2, 0, 1)[None].float() / 255 for p in pil]
    assert torch.equal(_run(pipe, *pil, face.numpy()), _run(pipe, *as_tensors, face))


def test_resize_as_published_truncates_like_their_test_script():
    images = torch.full((1, 3, 512, 512), 0.5)  # 127.5 -> 127 (truncated, not rounded)
    for size in ((256, 176), (512, 352)):
        out = resize_as_published(images, size)
        assert out.dtype == torch.uint8 and out.shape == (1, 3, *size) and (out == 127).all()


def test_one_reference_pass_at_timestep_0_kept_in_float16(model, pipe):
    calls = []
    hook = model.reference_unet.register_forward_pre_hook(lambda m, args: calls.append(args[1].clone()))
    try:
        _run(pipe, *_inputs(), num_inference_steps=3)
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0].item() == 0
    source, texture, pose, face = _inputs()
    with model.session() as state:
        pipe.run_reference(pipe.encode_conditions(source, texture, pose, face, guided=True))
        assert len(state.features) == 10 and all(f.dtype == torch.float16 and f.shape[0] == 1
                                                 for f in state.features.values())


def test_the_published_scheduler(pipe):
    """configs/inference/inference_v3.yaml (test.py's), not the training config's scaled_linear betas."""
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.prediction_type, config.timestep_spacing) == ("linear", "v_prediction",
                                                                                        "trailing")
    assert config.rescale_betas_zero_snr and not config.clip_sample and type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.scheduler.set_timesteps(20)
    assert pipe.scheduler.timesteps.tolist() == list(range(999, 0, -50))


def test_half_precision_runs_close_to_float32(pipe):
    model = tiny_model(0).place("cpu", torch.bfloat16)
    inputs = _inputs()
    half = _run(MCLDPipeline(model), *inputs)
    assert half.dtype == torch.float32 and (half - _run(pipe, *inputs)).abs().max() < 0.1


# -- the attention rules -------------------------------------------------------------------------------
def test_unconditional_rows_attend_without_reference_features(model):
    name, attn = next((n[:-len(".attn1")], m) for n, m in model.denoising_unet.named_modules() if n.endswith("attn1"))
    state = MCLDAttentionState()
    reader = ReferenceReader(state, name)
    x = torch.randn(2, 5, attn.to_q.in_features)
    state.features[name] = torch.randn(1, 7, attn.to_q.in_features).half()

    def plain(rows):  # self-attention alone
        q, k, v = (p(rows).view(len(rows), 5, attn.heads, -1).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(len(rows), 5, -1)
        return attn.to_out[0](out)

    state.uncond_rows = 1
    guided = reader(attn, x)
    assert torch.allclose(guided[:1], plain(x[:1]), atol=1e-6)  # the unconditional row: no features
    assert not torch.allclose(guided[1:], plain(x[1:]), atol=1e-3)  # the conditional row: with them
    state.uncond_rows = 0
    assert torch.allclose(reader(attn, x[1:]), guided[1:], atol=1e-6)


@pytest.mark.parametrize("stage, ignored", [(Stage.DOWN, 1), (Stage.UP, 0), (Stage.MID, None)])
def test_each_stage_attends_to_its_clip_token(model, stage, ignored):
    attn = next(m for n, m in model.denoising_unet.named_modules() if n.endswith("attn2"))
    processor = MultiFocalCrossAttention(attn.to_q.out_features, attn.to_k.in_features, stage, 16, 0.5)
    torch.manual_seed(0)
    x, prompt = torch.randn(1, 4, attn.to_q.in_features), torch.randn(1, CLIP_TOKENS + 16, attn.to_k.in_features)
    out = processor(attn, x, prompt)
    for token in (0, 1, CLIP_TOKENS + 3):
        changed = prompt.clone()
        changed[:, token] += 1
        same = torch.allclose(processor(attn, x, changed), out, atol=1e-6)
        assert same == (token == ignored), (stage, token)
    with pytest.raises(ValueError, match="2 \\+ 16 tokens"):
        processor(attn, x, prompt[:, :5])


# -- placement, memory, the tiny model -------------------------------------------------------------------
@pytest.mark.parametrize("memory", [MemoryPreset.BALANCED, MemoryPreset.LOW])
def test_offloading_presets_compute_the_same(pipe, memory):
    model = tiny_model(0).place("cpu", torch.float32, memory=memory)
    inputs = _inputs()
    assert torch.equal(_run(MCLDPipeline(model), *inputs), _run(pipe, *inputs))


def test_tiny_model_depends_on_its_seed_only():
    state = torch.random.get_rng_state()
    a, b, c = tiny_model(0), tiny_model(0), tiny_model(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.pose_guider.conv_in.weight, b.pose_guider.conv_in.weight)
    assert not torch.equal(a.pose_guider.conv_in.weight, c.pose_guider.conv_in.weight)


def test_memory_estimate_of_the_published_model():
    meta = published_meta_model()
    fp32 = estimate_memory(meta, MemoryPreset.FAST, "cpu", torch.float32)
    fp16 = estimate_memory(meta, MemoryPreset.FAST, "cuda", torch.float16)
    assert 8.5e9 < fp32.resident < 9.2e9 and fp32.peak > fp32.resident  # the six parts, 2.2 G parameters
    assert abs(fp16.resident - fp32.resident / 2) < 1e6
    balanced = estimate_memory(meta, MemoryPreset.BALANCED, "cuda", torch.float16)
    low = estimate_memory(meta, MemoryPreset.LOW, "cuda", torch.float16)
    assert balanced.resident == 0 and balanced.host == fp16.resident and low.peak < balanced.peak < fp16.peak
    assert published_config().image_size == 512


# -- the engine's adapter -------------------------------------------------------------------------------
def test_the_adapter_end_to_end_through_a_tiny_setup():
    from engine import registry
    from engine.adapters import GenerationCall
    from engine.options import GenerateOptions
    from engine.setup import ModelSetup, WeightSource

    entry = registry.entry("mcld")
    adapter = entry.adapter()
    loaded = adapter.load(ModelSetup(), WeightSource(tiny=True))
    rng = np.random.default_rng(0)
    picture = lambda: Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    call = GenerationCall("mcld", picture(), picture(), Image.new("L", (512, 512), 255), picture(),
                          GenerateOptions(steps=2, guidance_scale=3.5), seeds=(3,), texture=picture(),
                          face_embedding=rng.standard_normal(512).astype(np.float32))
    seen = []
    (image,), recording = adapter.generate(loaded, call, callback=lambda i, n: seen.append(i))
    (again,), _ = adapter.generate(loaded, call)
    assert image.size == (352, 512) and recording is None and seen == [1, 2]
    assert np.array_equal(np.asarray(image), np.asarray(again))
    source, texture, pose, face = _inputs(batch=2)
    batch = adapter.generate_batch(loaded, {"source": source, "texture": texture, "pose": pose, "face": face},
                                   GenerateOptions(steps=2), [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert len(batch) == 2 and batch[0].size == (352, 512)
    with pytest.raises(UserError, match="texture map"):
        adapter.generate(loaded, GenerationCall(**{**call.__dict__, "texture": None}))
    with pytest.raises(UserError, match="own checkpoint"):
        adapter.load(ModelSetup(), WeightSource(checkpoint=Path("x.pth")))
    need = adapter.memory_need(MemoryPreset.FAST, "cpu", torch.float32, fuse_qkv=False)
    assert need.resident > 8e9
    assert asdict(tiny_config().pose_guider)["out_channels"] == tiny_config().unet["block_out_channels"][0]
