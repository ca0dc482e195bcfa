"""Memory and time of one training step, Leffa against the CatVTON-style concatenation model
(``leffa.concat``), at the same size: the same base UNet config, images and batch, each with and
without the Leffa loss. Each setting runs in its own process (so one's peak does not hide
another's), two steps of ``training.trainer.training_step`` + backward + AdamW; the second is measured.

    python -m benchmarks.bench_train_memory                          # the toy's UNets and images (128x96, batch 8)
    python -m benchmarks.bench_train_memory --model sd15 --size 192x256 --batch 1 --no-optimizer
    python -m benchmarks.bench_train_memory --model sd15 --device cuda --size 768x1024 --batch 1

Printed per setting: the trained parameters, the activations saved for the backward pass (every
tensor autograd keeps but the weights, each storage counted once: what the forward pass leaves for
the backward, deterministic), the peak above the loaded model over both steps (gradients, AdamW's
moments, activations; CUDA: ``max_memory_allocated``; CPU: the process's peak resident memory above
its resident memory before the first step, which also counts the allocator's slack), and the second
step's seconds. ``--no-optimizer`` leaves out AdamW (its two
moments per parameter are the same for both families per parameter trained) so that SD1.5 widths
fit in a small machine's memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MiB = 2**20


def _rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _model(family: str, model: str):
    from engine.registry import Family
    from leffa.model import CONFIG_ROOT, BaseModel
    from training.trainer import TRAINABLE

    torch.manual_seed(0)
    if model == "toy":
        from experiments.toy_flow import build_model, make_set

        return build_model(0, make_set(8, 0), Family(family))
    base = CONFIG_ROOT / "tiny" if model == "tiny" else BaseModel.SD15_INPAINTING
    return TRAINABLE[Family(family)].from_config_dir(base)


def _batch(batch: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Random images in [-1, 1] and a box mask over the middle half."""
    w, h = size
    g = torch.Generator().manual_seed(0)
    image = lambda: torch.rand(batch, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, h, w)
    mask[:, :, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    return {"src_image": image(), "ref_image": image(), "mask": mask, "densepose": image()}


def measure(args) -> dict:
    """One setting, in this process: the second of two steps."""
    from engine.registry import Family
    from training.trainer import TrainConfig, trained_unets, training_module, training_step

    device = torch.device(args.device)
    model = _model(args.family, args.model).to(device)
    model.vae.requires_grad_(False)
    if args.gradient_checkpointing:
        for unet in trained_unets(model):
            unet.enable_gradient_checkpointing()
    params = [p for u in trained_unets(model) for p in u.parameters()]
    cfg = TrainConfig(output_dir="", data_root="", family=Family(args.family), ref_dropout=0.0)
    module, scheduler = training_module(model).train(), model.make_scheduler()
    optimizer = None if args.no_optimizer else torch.optim.AdamW(params, lr=1e-5)
    batch = {k: v.to(device) for k, v in _batch(args.batch, args.size).items()}
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t: torch.Tensor):
        if isinstance(t, torch.Tensor) and t.device.type == device.type:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                saved[ptr] = t.untyped_storage().nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss()

    result = {}
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        measured = step == 1
        if measured:
            saved.clear()
            start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss, parts = training_step(module, model.vae, scheduler, batch, cfg, args.leffa, g)
        loss.backward()
        module.release()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated, as in a run
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # Linux: KiB
    result.update(seconds=time.perf_counter() - start, saved_for_backward=sum(saved.values()),
                  peak_above_before=max(peak, 0), trained_params=sum(p.numel() for p in params),
                  losses={k: round(v, 4) for k, v in parts.items()})
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["toy", "tiny", "sd15"], default="toy",
                   help="toy: experiments.toy_flow's UNets; tiny: the shipped tiny config; sd15: SD1.5 widths")
    p.add_argument("--size", default="96x128", help="WxH of the images (default the toy's 96x128)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-optimizer", action="store_true", help="forward and backward only (no AdamW moments)")
    p.add_argument("--one", nargs=2, metavar=("FAMILY", "LEFFA"), help=argparse.SUPPRESS)  # a child process
    args = p.parse_args(argv)
    args.size = tuple(int(v) for v in args.size.split("x"))
    if args.one:
        args.family, args.leffa = args.one[0], args.one[1] == "1"
        print(json.dumps(measure(args)))
        return
    rows = []
    for family in ("leffa", "concat"):
        for leffa in (False, True):
            cmd = [sys.executable, "-m", "benchmarks.bench_train_memory", *(argv or sys.argv[1:]),
                   "--one", family, str(int(leffa))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append((family, leffa, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"{args.model} UNets, {args.size[0]}x{args.size[1]}, batch {args.batch}, {args.device}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
          f"{', no optimizer' if args.no_optimizer else ''}\n")
    print("| family | Leffa loss | trained parameters | saved for backward (MiB) | peak above the model (MiB) | s/step |")
    print("|---|---|---|---|---|---|")
    for family, leffa, r in rows:
        print(f"| {family} | {'on' if leffa else 'off'} | {r['trained_params'] / 1e6:.1f} M | "
              f"{r['saved_for_backward'] / MiB:.1f} | {r['peak_above_before'] / MiB:.1f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
