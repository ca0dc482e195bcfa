"""The runtime library (runtime/): its place below the model libraries, its torch-free presets, and
placement driven by the phases a model declares, on a small model that is not Leffa."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from runtime.memory import free_accelerator_memory
from runtime.placement import Phase, Placement, enter_phase, idle_after, place_modules
from runtime.presets import DTYPE_NAMES, MemoryPreset
from tests.conftest import ROOT

def test_runtime_sits_below_every_library():
    """Its allowed imports (tests/test_architecture.py checks every import against them): the bottom only."""
    from tests.test_architecture import ALLOWED, LIBRARIES

    assert ALLOWED["runtime"] == {"errors", "weightfiles"}
    assert all("runtime" in ALLOWED[library] for library in LIBRARIES)


def test_presets_are_read_without_torch():
    code = ("import sys, runtime.presets as p; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(','.join(p.MEMORY_PRESETS), ','.join(p.DTYPE_NAMES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["fast,balanced,low,low-fp8", "float32,float16,bfloat16"]
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in DTYPE_NAMES)


def test_leffa_keeps_its_names():
    """What moved is still importable from where it was."""
    import leffa
    import leffa.image_tensors
    import leffa.memory
    import leffa.presets
    import runtime.image_tensors
    import runtime.speed

    assert leffa.MemoryPreset is leffa.presets.MemoryPreset is MemoryPreset
    assert leffa.SpeedOptions is runtime.speed.SpeedOptions
    assert leffa.image_tensors.repaint_blend is runtime.image_tensors.repaint_blend
    assert leffa.memory.Placement is Placement and leffa.memory.Phase is Phase


# -- placement of a model that is not Leffa -------------------------------------------------------------
class TwoPartModel(nn.Module):
    """An encoder (encodes and decodes, as a VAE) and a denoiser, under names Leffa does not use."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(6, 6)
        self.denoiser = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
        self.placement: Placement | None = None

    def modules_by_name(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "denoiser": self.denoiser}


PHASES = {Phase.ENCODE: {"encoder"}, Phase.DENOISE: {"denoiser"}, Phase.DECODE: {"encoder"}, Phase.IDLE: set()}


def phase_modules(phase: Phase) -> frozenset[str]:
    return frozenset(PHASES[phase])


def place(model: TwoPartModel, memory: MemoryPreset) -> TwoPartModel:
    placement = Placement(torch.device("cpu"), torch.float32, phase_modules, memory)
    model.placement = place_modules(model.modules_by_name(), placement)
    return model


@torch.no_grad()
def generate(model: TwoPartModel, x: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """The phases in order, as a pipeline enters them."""
    with idle_after(model):
        enter_phase(model, Phase.ENCODE)
        h = model.encoder(x)
        enter_phase(model, Phase.DENOISE)
        for _ in range(steps):
            h = h - 0.1 * model.denoiser(h)
        enter_phase(model, Phase.DECODE)
        return model.encoder(h)


def test_a_model_declaring_its_own_phases_moves_only_their_modules(monkeypatch):
    model = place(TwoPartModel(), MemoryPreset.BALANCED)
    hooks = model.placement.phase_hooks
    assert set(hooks) == {"encoder", "denoiser"} and hasattr(model.denoiser, "_hf_hook")
    offloaded, entered = [], []
    for name, hook in hooks.items():
        monkeypatch.setattr(hook, "offload", lambda name=name: offloaded[-1].add(name))
    monkeypatch.setattr("runtime.placement._device_of", lambda module: torch.device("cuda"))  # all "on the device"
    enter = Placement.enter

    def spy(self, phase, *options):
        entered.append(phase)
        offloaded.append(set())
        enter(self, phase, *options)

    monkeypatch.setattr(Placement, "enter", spy)
    generate(model, torch.randn(2, 6))
    assert entered == [Phase.ENCODE, Phase.DENOISE, Phase.DECODE, Phase.IDLE]
    assert offloaded == [{"denoiser"}, {"encoder"}, {"denoiser"}, {"encoder", "denoiser"}]


def test_balanced_gives_the_fast_result():
    x = torch.randn(2, 6)
    fast = generate(place(TwoPartModel(), MemoryPreset.FAST), x)
    assert torch.equal(generate(place(TwoPartModel(), MemoryPreset.BALANCED), x), fast)
    assert torch.equal(generate(TwoPartModel(), x), fast)  # unplaced: the phases do nothing


def test_placing_again_replaces_the_hooks_and_casts_per_module():
    model = place(TwoPartModel(), MemoryPreset.BALANCED)
    placement = Placement(torch.device("cpu"), torch.bfloat16, phase_modules, MemoryPreset.FAST,
                          dtypes={"encoder": torch.float64})
    model.placement = place_modules(model.modules_by_name(), placement)
    assert not hasattr(model.encoder, "_hf_hook") and placement.phase_hooks == {}
    assert model.encoder.weight.dtype == torch.float64 and model.denoiser[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("memory", [MemoryPreset.LOW, MemoryPreset.LOW_FP8])
def test_low_moves_the_modules_not_grouped_by_phase(memory):
    """Under ``low`` the modules not grouped move by phase; none grouped here."""
    model = place(TwoPartModel(), memory)
    assert set(model.placement.phase_hooks) == {"encoder", "denoiser"}
    assert model.denoiser[0].weight.dtype == torch.float32  # float8 only for grouped modules


def test_free_accelerator_memory_collects_and_empties_the_cuda_cache_only_with_cuda(monkeypatch):
    import runtime.memory

    calls = []
    monkeypatch.setattr(runtime.memory.gc, "collect", lambda: calls.append("collect") or 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    free_accelerator_memory()
    assert calls == ["collect"]  # safe on a machine without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    free_accelerator_memory()
    assert calls == ["collect", "collect", "empty_cache"]
