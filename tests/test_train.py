"""Training on CPU with tiny models: gradients, a short run that learns, checkpoints, resume,
config errors, base-weight initialisation and the dataset layouts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from leffa import LeffaModel
from leffa.attention import self_attention_layers
from training.datasets import DatasetError, LeffaDataset
from leffa.loss import flow_loss
from leffa.recording import FlowRecorder
from leffa.concat import ConcatModel
from training.trainer import (LeffaTrainingModule, TrainConfig, build_model, load_config, train, training_module,
                              training_step)
from tests.conftest import (ROOT, TREE_H, TREE_W, deepfashion_tree, dress_code_tree, free_port, make_inputs,
                            param_fingerprint, tiny_model, viton_tree)

W, H = TREE_W, TREE_H


# -- datasets -------------------------------------------------------------------------------------
def test_viton_hd_dataset(tmp_path):
    root = viton_tree(tmp_path / "vitonhd")
    ds = LeffaDataset("viton_hd", root, "train", paired=True, size=(W, H))
    assert len(ds) == 2
    item = ds[0]
    assert item["src_image"].shape == (3, H, W) and item["ref_image"].shape == (3, H, W)
    assert item["mask"].shape == (1, H, W) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert -1 <= item["src_image"].min() and item["src_image"].max() <= 1
    assert ds.samples[0].reference.name == ds.samples[0].target.name  # paired
    unpaired = LeffaDataset("viton_hd", root, "test", paired=False, size=(W, H))
    assert unpaired.samples[0].reference.name == "00001_00.jpg"
    ds.size = (24, 32)  # a later stage at another resolution
    assert ds[1]["densepose"].shape == (3, 32, 24)


def test_dress_code_dataset(tmp_path):
    root = dress_code_tree(tmp_path / "dresscode")
    ds = LeffaDataset("dress_code", root, paired=True, size=(W, H))
    assert len(ds) == 2 and ds[1]["mask"].min() == 1
    unpaired = LeffaDataset("dress_code", root, "test", paired=False, size=(W, H))
    s = unpaired.samples[0]
    assert s.target.parent.parent.name == "upper_body" and s.reference.parent.parent.name == "dresses"


def test_deepfashion_dataset(tmp_path):
    root = deepfashion_tree(tmp_path / "deepfashion")
    item = LeffaDataset("deepfashion", root, size=(W, H))[0]
    assert item["mask"].min() == 1  # pose transfer generates everything


def test_dataset_errors_name_the_path(tmp_path):
    root = viton_tree(tmp_path / "v")
    (root / "train" / "cloth" / "00001_00.jpg").unlink()
    with pytest.raises(DatasetError, match=r"missing file\(s\): .*cloth/00001_00.jpg"):
        LeffaDataset("viton_hd", root)
    shutil.rmtree(root / "train" / "agnostic-mask")
    with pytest.raises(DatasetError, match="missing folder.*agnostic-mask"):
        LeffaDataset("viton_hd", root)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        LeffaDataset("viton_hd", tmp_path / "nope")
    with pytest.raises(DatasetError, match="missing pairs file"):
        LeffaDataset("viton_hd", viton_tree(tmp_path / "w"), "train", paired=False)
    with pytest.raises(ValueError):
        LeffaDataset("vitonhd", root)
    with pytest.raises(DatasetError, match="none of the DressCode folders"):
        LeffaDataset("dress_code", tmp_path / "w")


# -- gradients ------------------------------------------------------------------------------------
def test_leffa_loss_reaches_both_unets(base_dirs):
    model = tiny_model(base_dirs["sd15"]).train()
    module = LeffaTrainingModule(model)
    inputs = make_inputs(batch=2)
    g = torch.Generator().manual_seed(0)
    noisy, ref = torch.randn(2, 4, 8, 6, generator=g), torch.randn(2, 4, 8, 6, generator=g)
    cond = torch.randn(2, 8, 8, 6, generator=g)
    rec = FlowRecorder(tau=2.0)
    module(noisy, torch.tensor([100, 200]), cond, ref, rec)
    assert set(rec.flows) == set(self_attention_layers(model.unet))
    loss = flow_loss(rec.flows, inputs["ref_image"], inputs["src_image"], inputs["mask"], torch.tensor([100, 200]))
    loss.backward()
    module.release()
    for unet in (model.unet, model.reference_unet):
        grads = [p.grad for p in unet.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0
    assert model.unet.conv_in.weight.grad.abs().sum() > 0 and model.reference_unet.conv_in.weight.grad.abs().sum() > 0


# -- training runs --------------------------------------------------------------------------------
def _config(tmp_path, root, base_dir, ckpt, stages, **kw) -> TrainConfig:
    text = "\n".join([
        f'output_dir = "{tmp_path / "run"}"', f'data_root = "{root}"', 'data_layout = "viton_hd"',
        'init = "checkpoint"', f'checkpoint = "{ckpt}"', f'base = "{base_dir}"', "num_workers = 0",
        "learning_rate = 1e-3", "ref_dropout = 0.0", "lambda_leffa = 0.5", "save_every = 2",
        *(f"{k} = {json.dumps(v)}" for k, v in kw.items()), "",
        *(f"[[stages]]\nsteps = {s}\nresolution = [{H}, {W}]\nleffa_loss = {str(leffa).lower()}\n"
          for s, leffa in stages)])
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


def _eval_loss(model, cfg, dataset) -> float:
    """The loss on a fixed batch, noise and timesteps."""
    batch = {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in dataset[0]}
    module = training_module(model).eval()
    with torch.no_grad():
        loss, _ = training_step(module, model.vae, model.make_scheduler(), batch, cfg, True,
                                torch.Generator().manual_seed(123))
    module.release()
    return loss.item()


@pytest.mark.parametrize("family", ["leffa", "concat"])
def test_training_learns_saves_and_resumes(tmp_path, base_dirs, family):
    """Both families: the loss falls, the Leffa loss runs in its stage, the weights saved load
    strictly, and a longer config resumes from the last checkpoint."""
    root = viton_tree(tmp_path / "data")
    ckpt = tmp_path / "init.pth"
    cls = _init(family, ckpt, base_dirs["sd15"])
    cfg = _config(tmp_path, root, base_dirs["sd15"], ckpt, [(4, False), (8, True)], batch_size=2, family=family)
    assert type(build_model(cfg)) is cls
    dataset = LeffaDataset("viton_hd", root, size=(W, H))
    before = _eval_loss(cls.from_pretrained(base_dirs["sd15"], ckpt), cfg, dataset)
    logs = []
    path = train(cfg, log=logs.append)
    assert path.name == f"{family}.safetensors" and path.parent.name == "step-12"
    trained = cls.from_pretrained(base_dirs["sd15"], path)  # strict load of what we saved
    after = _eval_loss(trained, cfg, dataset)
    assert after < before
    assert any('"leffa"' in line for line in logs)  # the second stage used the Leffa loss
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step-12"

    # resume: one more stage continues from step 12, not from scratch
    cfg2 = _config(tmp_path, root, base_dirs["sd15"], ckpt, [(4, False), (8, True), (2, True)], batch_size=2,
                   family=family)
    logs2 = []
    path2 = train(cfg2, log=logs2.append)
    assert any("resumed from step-12 at step 12" in line for line in logs2)
    assert not any("stage 1/3" in line for line in logs2)
    assert path2.parent.name == "step-14" and path2.name == f"{family}.safetensors"


def _init(family: str, path, base_dir):
    """A tiny model of ``family`` saved at ``path``; its class."""
    if family == "concat":
        _concat_init(path, base_dir)
        return ConcatModel
    torch.save(tiny_model(base_dir).state_dict(), path)
    return LeffaModel


def test_pth_checkpoints_and_gradient_checkpointing(tmp_path, base_dirs):
    root = viton_tree(tmp_path / "data")
    ckpt = tmp_path / "init.pth"
    torch.save(tiny_model(base_dirs["sdxl"]).state_dict(), ckpt)
    cfg = _config(tmp_path, root, base_dirs["sdxl"], ckpt, [(2, True)], save_format="pth",
                  gradient_checkpointing=True, gradient_accumulation_steps=2)
    path = train(cfg, log=lambda *_: None)
    assert path.suffix == ".pth"
    LeffaModel.from_pretrained(base_dirs["sdxl"], path)


def test_config_errors(tmp_path):
    def write(text):
        p = tmp_path / "c.toml"
        p.write_text(text)
        return p

    base = 'output_dir = "o"\ndata_root = "d"\ninit = "random"\n'
    with pytest.raises(ValueError, match="unknown setting.*learning_rat"):
        load_config(write(base + "learning_rat = 1\n[[stages]]\nsteps = 1\n"))
    with pytest.raises(ValueError, match="no \\[\\[stages\\]\\]"):
        load_config(write(base))
    with pytest.raises(ValueError, match="mixed_precision must be one of no, fp16, bf16"):
        load_config(write(base + 'mixed_precision = "fp8"\n[[stages]]\nsteps = 1\n'))
    with pytest.raises(ValueError, match="needs checkpoint"):
        load_config(write('output_dir = "o"\ndata_root = "d"\n[[stages]]\nsteps = 1\n'))
    with pytest.raises(ValueError, match="multiples of 8"):
        load_config(write(base + "[[stages]]\nsteps = 1\nresolution = [100, 60]\n"))
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(write("this is = = not toml"))
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_init_from_base_weights(tmp_path, base_dirs):
    """A diffusers SD-inpainting folder: conv_in widened with the old weights kept."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    src = base_dirs["sd15"]
    folder = tmp_path / "sd-inpainting"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((src / "unet/config.json").read_text()))
    unet.save_pretrained(folder / "unet")
    AutoencoderKL.from_config(json.loads((src / "vae/config.json").read_text())).save_pretrained(folder / "vae")
    shutil.copytree(src / "scheduler", folder / "scheduler")
    model = LeffaModel.from_base_weights(folder)
    assert model.unet.conv_in.weight.shape[1] == 12 and model.reference_unet.conv_in.weight.shape[1] == 4
    torch.testing.assert_close(model.unet.conv_in.weight[:, :9], unet.conv_in.weight)
    assert model.unet.conv_in.weight[:, 9:].abs().sum() == 0
    torch.testing.assert_close(model.reference_unet.conv_in.weight, unet.conv_in.weight[:, :4])
    with pytest.raises(FileNotFoundError, match="no vae/"):
        shutil.rmtree(folder / "vae")
        LeffaModel.from_base_weights(folder)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["leffa", "concat"])
def test_two_processes_stay_in_sync(tmp_path, base_dirs, family):
    """Accelerate's multi-process path (gloo on CPU, as NCCL on GPUs): two processes with
    different batches and noise end every step with identical weights, report once, and save
    a checkpoint that loads strictly; for both families."""
    root = viton_tree(tmp_path / "data", n=4)
    ckpt = tmp_path / "init.pth"
    cls = _init(family, ckpt, base_dirs["sd15"])
    init = cls.from_pretrained(base_dirs["sd15"], ckpt)
    _config(tmp_path, root, base_dirs["sd15"], ckpt, [(1, False), (2, True)], batch_size=1, family=family)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "LEFFA_TEST_OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "tests.dist_train",
                           "--config", str(tmp_path / "config.toml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("2 process(es) (MULTI_CPU)") == 2  # two stages, reported by one process
    assert proc.stdout.count("saved ") == 3  # step 1 (end of stage 1), 2 (save_every) and 3
    rank0, rank1 = (torch.load(tmp_path / f"fingerprint-rank{r}.pt") for r in (0, 1))
    assert len(rank0["batches"]) == 3 and not torch.equal(rank0["batches"], rank1["batches"])  # own shards
    rank0 = rank0["params"]
    assert torch.equal(rank0, rank1["params"])  # gradients were averaged across the processes
    assert not torch.equal(rank0, param_fingerprint(init))
    trained = cls.from_pretrained(base_dirs["sd15"], tmp_path / f"run/checkpoints/step-3/{family}.safetensors")
    torch.testing.assert_close(param_fingerprint(trained), rank0, rtol=0, atol=0)


# -- the concatenation family (leffa.concat) ---------------------------------------------------------
def _concat_init(path, base_dir, seed: int = 0) -> ConcatModel:
    torch.manual_seed(seed)
    model = ConcatModel.from_config_dir(base_dir)
    torch.save(model.state_dict(), path)
    return model


def test_concat_leffa_loss_reaches_the_unet_through_its_self_attention(base_dirs):
    model = _concat_init(os.devnull, base_dirs["sd15"]).train()
    cfg = TrainConfig(output_dir="", data_root="", family="concat", lambda_leffa=1.0, ref_dropout=0.0)
    batch = make_inputs(batch=2)
    module = training_module(model)
    g = lambda: torch.Generator().manual_seed(0)
    loss, parts = training_step(module, model.vae, model.make_scheduler(), batch, cfg, True, g())
    module.release()
    assert parts["leffa"] > 0
    # the same step without the Leffa loss: the difference of the gradients is the Leffa loss's own
    (parts["leffa"] * 0 + loss).backward()
    with_leffa = {n: p.grad.clone() for n, p in model.unet.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss0, _ = training_step(module, model.vae, model.make_scheduler(), batch, cfg, False, g())
    module.release()
    loss0.backward()
    changed = [n for n, p in model.unet.named_parameters()
               if p.grad is not None and not torch.allclose(with_leffa[n], p.grad)]
    assert any("attn1.to_q" in n for n in changed) and any("attn1.to_k" in n for n in changed)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(config):
    cfg = load_config(config)
    assert cfg.stages and cfg.family in ("leffa", "concat")


def test_concat_config_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('output_dir = "o"\ndata_root = "d"\ninit = "random"\nfamily = "mcld"\n[[stages]]\nsteps = 1\n')
    with pytest.raises(ValueError, match="family must be one of leffa, concat; mcld is not trained here"):
        load_config(p)
    p.write_text('output_dir = "o"\ndata_root = "d"\ninit = "random"\nfamily = "catvton"\n[[stages]]\nsteps = 1\n')
    with pytest.raises(ValueError, match="family must be one of leffa, mcld, concat; got 'catvton'"):
        load_config(p)


def test_concat_trained_checkpoint_runs_in_leffa_infer(tmp_path, base_dirs):
    """What a user trained, seen through ``leffa infer --model concat_tryon --checkpoint``."""
    from cli.main import main
    from training.inference import MANIFEST

    root = viton_tree(tmp_path / "data")
    ckpt = tmp_path / "concat.pth"
    _concat_init(ckpt, base_dirs["sd15"])
    out = tmp_path / "out"
    args = ["infer", "--dataset", str(root), "--layout", "viton_hd", "--out", str(out), "--model", "concat_tryon",
            "--checkpoint", str(ckpt), "--base-config", str(base_dirs["sd15"]), "--size", f"{W}x{H}", "--steps", "2",
            "--num-workers", "0"]
    assert main(args) == 0
    images = sorted(out.glob("*.png"))
    assert [p.name for p in images] == ["00000_00.png", "00001_00.png"]
    assert json.loads((out / MANIFEST).read_text())["settings"]["model"] == "concat_tryon"
    assert main([*args[:args.index("--checkpoint")], "--steps", "2", "--size", f"{W}x{H}", "--num-workers", "0",
                 "--checkpoint-dir", str(tmp_path / "none")]) == 2  # no published weights: refused


def test_concat_gradient_checkpointing_gives_the_same_gradients(base_dirs):
    """The recorder stays attached through the backward pass, where checkpointed blocks run again."""
    cfg = TrainConfig(output_dir="", data_root="", family="concat", lambda_leffa=1.0, ref_dropout=0.0)
    batch = make_inputs(batch=2)
    grads = []
    for checkpointing in (False, True):
        model = _concat_init(os.devnull, base_dirs["sd15"]).train()
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        module = training_module(model)
        loss, _ = training_step(module, model.vae, model.make_scheduler(), batch, cfg, True,
                                torch.Generator().manual_seed(0))
        loss.backward()
        module.release()
        grads.append(torch.cat([p.grad.flatten() for p in model.unet.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
