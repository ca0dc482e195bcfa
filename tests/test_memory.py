"""Memory presets, speed options, the app's memory-counting model cache and ZeroGPU Spaces
(runtime/, leffa/memory.py, leffa/speed.py, webapp/backend.py, engine/), on tiny models on the CPU; the CUDA checks
are skipped without a GPU.

Tolerances (images in [0, 1], float32 on the CPU unless said):
* ``fast``, ``balanced``, ``low``: equal to the unplaced float32 model (they move weights, never change them);
* ``low-fp8`` (weights rounded to float8 e4m3): max 0.08, mean 0.008 (measured 0.035 / 0.003);
* ``fuse_qkv``, ``channels_last``, ``compile``: max 1e-5 (measured 0 for fusing, about 1e-6 channels-last).
"""

from __future__ import annotations

import collections
import functools
import math
import pickle
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

from leffa import LeffaPipeline, MemoryPreset, SpeedOptions
from leffa.memory import estimate_memory, meta_model, phase_modules
from leffa.model import BaseModel
from leffa.speed import compile_unet
from runtime.memory import FreeMemory, MemoryNeed, NotEnoughMemoryError, available_host_memory, fits, free_memory
from runtime.placement import Phase
from runtime.presets import MEMORY_PRESETS
from tests.conftest import ROOT, make_inputs, tiny_model

STEPS = 2
EXACT_PRESETS = [MemoryPreset.FAST, MemoryPreset.BALANCED, MemoryPreset.LOW]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the presets move "
                                "weights between the GPU and the CPU; on the CPU the tests above run them)")


def _float8_on_cpu() -> bool:
    try:
        return bool(torch.ones(2).to(torch.float8_e4m3fn).to(torch.bfloat16).eq(1).all())
    except (RuntimeError, TypeError):
        return False


needs_float8 = pytest.mark.skipif(not _float8_on_cpu(), reason="this torch cannot cast to float8 on the CPU")


def _run(model, accel=False, **kw):
    return LeffaPipeline(model)(**make_inputs(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                                ref_acceleration=accel, output_type="pt", **kw).images


@pytest.fixture(scope="module")
def plain_images(base_dirs):
    made = {}

    def images(variant: str) -> dict[bool, torch.Tensor]:
        if variant not in made:
            model = tiny_model(base_dirs[variant])
            made[variant] = {accel: _run(model, accel) for accel in (False, True)}
        return made[variant]

    return images


@pytest.fixture
def plain(plain_images, variant):
    """The images of the unplaced float32 model, without and with reference acceleration."""
    return plain_images(variant)


def test_preset_names_are_read_without_torch():
    """The CLI and the app list the presets before importing torch (their --help answers at once)."""
    code = ("import sys, cli.main, webapp.settings; from leffa.presets import MEMORY_PRESETS; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(MEMORY_PRESETS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "fast,balanced,low,low-fp8"
    assert MEMORY_PRESETS == tuple(p.value for p in MemoryPreset)


# -- the presets give the plain images ------------------------------------------------------------------
@pytest.mark.parametrize("preset", EXACT_PRESETS)
def test_presets_give_the_plain_images(base_dirs, variant, plain, preset):
    model = tiny_model(base_dirs[variant]).place("cpu", memory=preset)
    for accel in (False, True):
        assert torch.equal(_run(model, accel), plain[accel])
    assert model.placement.memory is preset and model.device == torch.device("cpu")


@pytest.mark.parametrize("preset", [MemoryPreset.BALANCED, MemoryPreset.LOW])
def test_presets_in_bfloat16_give_the_fast_bfloat16_images(base_dirs, variant, plain, preset):
    """The presets move weights and never change them, in half precision too; bfloat16 itself is
    within tests/test_pipeline.py's tolerance of float32 (mean 0.01, max 0.05)."""
    fast = tiny_model(base_dirs[variant]).place("cpu", torch.bfloat16)
    model = tiny_model(base_dirs[variant]).place("cpu", torch.bfloat16, memory=preset)
    for accel in (False, True):
        images = _run(model, accel)
        assert torch.equal(images, _run(fast, accel))
        diff = (images - plain[accel]).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.05


@needs_float8
def test_low_fp8_stays_close(base_dirs, variant, plain):
    model = tiny_model(base_dirs[variant]).place("cpu", torch.bfloat16, memory=MemoryPreset.LOW_FP8)
    assert model.unet.conv_in.weight.dtype == torch.float8_e4m3fn and model.dtype == torch.bfloat16
    for accel in (False, True):
        diff = (_run(model, accel) - plain[accel]).abs()
        assert diff.max() < 0.08 and diff.mean() < 0.008


def test_phases_run_only_their_modules():
    assert phase_modules(Phase.ENCODE) == phase_modules(Phase.DECODE) == {"vae"}
    assert phase_modules(Phase.REFERENCE, True) == {"reference_unet"}
    assert phase_modules(Phase.DENOISE, False) == {"unet", "reference_unet"}
    assert phase_modules(Phase.DENOISE, True) == {"unet"}  # the reference UNet left after its one pass
    assert phase_modules(Phase.IDLE) == set()


@pytest.mark.parametrize("accel, phases", [
    (False, [Phase.ENCODE, Phase.DENOISE, Phase.DECODE, Phase.IDLE]),
    (True, [Phase.ENCODE, Phase.REFERENCE, Phase.DENOISE, Phase.DECODE, Phase.IDLE])])
def test_balanced_offloads_what_each_phase_does_not_run(base_dirs, monkeypatch, accel, phases):
    """The pipeline enters each phase in order; entering one offloads (by accelerate's hooks) every
    module it does not run, and a module comes back when called."""
    model = tiny_model(base_dirs["sd15"]).place("cpu", memory=MemoryPreset.BALANCED)
    offloaded, entered = [], []
    for name, hook in model.placement.phase_hooks.items():
        monkeypatch.setattr(hook, "offload", lambda name=name: offloaded[-1].add(name))
    monkeypatch.setattr("runtime.placement._device_of", lambda module: torch.device("cuda"))  # all "on the device"
    enter = type(model.placement).enter

    def spy(self, phase, ref_acceleration=False):
        entered.append(phase)
        offloaded.append(set())
        enter(self, phase, ref_acceleration)

    monkeypatch.setattr(type(model.placement), "enter", spy)
    _run(model, accel)
    assert entered == phases
    assert offloaded == [{"vae", "unet", "reference_unet"} - phase_modules(p, accel) for p in phases]


def test_group_offloading_runs_the_whole_reference_unet(base_dirs, monkeypatch):
    """The reference UNet's early exit (an exception after its last feature) would skip the group
    hooks' post_forward: its last block and top-level group would stay onloaded. Under ``low`` it
    runs to the end, and every group is offloaded as often as onloaded."""
    from diffusers.hooks import group_offloading

    counts = collections.Counter()
    for method in ("onload_", "offload_"):
        original = getattr(group_offloading.ModuleGroup, method)

        def counted(self, original=original, method=method):
            counts[method, id(self)] += 1
            return original(self)

        monkeypatch.setattr(group_offloading.ModuleGroup, method, counted)

    def unbalanced(model) -> int:
        counts.clear()
        _run(model)
        return sum(counts["onload_", g] != counts["offload_", g] for _, g in list(counts))

    model = tiny_model(base_dirs["sd15"]).place("cpu", memory=MemoryPreset.LOW)
    assert not model.attn_state.reference_early_exit
    assert unbalanced(model) == 0
    model.attn_state.reference_early_exit = True  # what it would be without the preset's switch
    assert unbalanced(model) > 0
    assert tiny_model(base_dirs["sd15"]).place("cpu", memory=MemoryPreset.BALANCED).attn_state.reference_early_exit


def test_placing_again_changes_the_preset(base_dirs, variant, plain):
    model = tiny_model(base_dirs[variant])
    for preset in (MemoryPreset.LOW, MemoryPreset.BALANCED, MemoryPreset.FAST):
        model.place("cpu", memory=preset)
        assert torch.equal(_run(model), plain[False])
    model.place("cpu", memory=MemoryPreset.FAST)
    assert not hasattr(model.unet, "_hf_hook") and model.attn_state.reference_early_exit


@needs_float8
def test_float8_weights_stay_float8(base_dirs):
    model = tiny_model(base_dirs["sd15"]).place("cpu", torch.bfloat16, memory=MemoryPreset.LOW_FP8)
    model.place("cpu", torch.bfloat16, memory=MemoryPreset.LOW_FP8)  # again: fine
    with pytest.raises(ValueError, match="stored in float8.*load it again"):
        model.place("cpu", torch.bfloat16, memory=MemoryPreset.FAST)


def test_fast_placement_is_the_plain_to(base_dirs, variant):
    """``fast`` is what ``place`` always did: the same weights, no hooks, the early exit on."""
    model = tiny_model(base_dirs[variant]).place("cpu", torch.bfloat16)
    assert model.unet.dtype == torch.bfloat16 and model.vae.dtype == (torch.float32 if model.vae_upcast
                                                                       else torch.bfloat16)
    assert not hasattr(model.vae, "_hf_hook") and not hasattr(model.unet, "_diffusers_hook")
    assert model.attn_state.reference_early_exit


# -- speed options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("speed", [SpeedOptions(fuse_qkv=True), SpeedOptions(channels_last=True),
                                   SpeedOptions(fuse_qkv=True, channels_last=True)])
def test_speed_options_keep_the_images(base_dirs, variant, plain, speed):
    model = tiny_model(base_dirs[variant]).place("cpu", speed=speed)
    for accel in (False, True):
        assert (_run(model, accel) - plain[accel]).abs().max() < 1e-5
    if speed.fuse_qkv:
        fused = [m for m in model.unet.modules() if getattr(m, "fused_projections", False)]
        assert len(fused) == model.attn_state.num_layers and all(hasattr(m, "to_qkv") for m in fused)


def test_fused_model_saves_the_published_layout(base_dirs):
    """Fusing adds ``to_qkv`` beside ``to_q``/``to_k``/``to_v``; a state dict leaves it out, so a fused
    model's checkpoint loads strictly into a plain one."""
    plain = tiny_model(base_dirs["sd15"])
    fused = tiny_model(base_dirs["sd15"]).place("cpu", speed=SpeedOptions(fuse_qkv=True))
    assert any(n.endswith("to_qkv.weight") for n, _ in fused.named_parameters())
    saved = fused.state_dict()
    assert list(saved) == list(plain.state_dict())
    plain.load_state_dict(saved)  # strict


def test_fused_qkv_with_an_offloading_preset(base_dirs, variant, plain):
    model = tiny_model(base_dirs[variant]).place("cpu", memory=MemoryPreset.LOW, speed=SpeedOptions(fuse_qkv=True))
    assert (_run(model) - plain[False]).abs().max() < 1e-5


def test_generative_unet_compiles_without_graph_breaks(base_dirs, variant):
    """One graph for the whole generative UNet: no break per layer."""
    from leffa.attention import run_reference_unet

    model = tiny_model(base_dirs[variant])
    for speed in (SpeedOptions(), SpeedOptions(fuse_qkv=True)):
        model.place("cpu", speed=speed)
        run_reference_unet(model.reference_unet, model.attn_state, torch.randn(2, 4, 8, 6), torch.tensor(500))
        x = torch.randn(2, 12, 8, 6)
        with torch.no_grad():
            explained = torch._dynamo.explain(model.unet)(x, torch.tensor(500), encoder_hidden_states=None,
                                                          return_dict=False)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_unet_keeps_the_images_and_does_not_recompile_per_image(base_dirs, plain_images):
    """dynamo (the ``eager`` backend: the tracing, not inductor's code generation) on the generative
    UNet: the same images; with reference acceleration two graphs (K/V cache empty, filled) however
    many images follow."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plain = plain_images("sd15")
    model = tiny_model(base_dirs["sd15"])
    compile_unet(model, backend="eager")
    assert (_run(model) - plain[False]).abs().max() < 1e-5
    for _ in range(2):  # the second image compiles nothing new
        assert (_run(model, accel=True) - plain[True]).abs().max() < 1e-5
    assert counters["stats"]["unique_graphs"] == 3  # plain, cache empty, cache filled
    assert list(model.state_dict()) == list(tiny_model(base_dirs["sd15"]).state_dict())  # names unchanged


@pytest.mark.slow
def test_inductor_compiled_unet_keeps_the_images(base_dirs, variant, plain):
    model = tiny_model(base_dirs[variant]).place("cpu", speed=SpeedOptions(compile=True))
    assert (_run(model) - plain[False]).abs().max() < 1e-4


# -- memory estimates and free memory ---------------------------------------------------------------------
GB = 10**9


def test_estimates_follow_the_presets():
    sd15, sdxl = meta_model(BaseModel.SD15_INPAINTING), meta_model(BaseModel.SDXL_INPAINTING)
    fast = estimate_memory(sd15, MemoryPreset.FAST, "cuda", torch.float16)
    weights = sum(p.numel() for p in sd15.parameters()) * 2
    assert fast.resident == weights and fast.host == 0 and fast.peak > weights
    peaks = [estimate_memory(sd15, p, "cuda", torch.float16).peak for p in MemoryPreset]
    assert peaks == sorted(peaks, reverse=True)  # each preset needs less GPU memory than the one before
    low = estimate_memory(sd15, MemoryPreset.LOW, "cuda", torch.float16)
    assert low.resident == 0 and low.host >= weights
    # the targets: try-on under 6 GB and pose transfer under 8 GB with "low"
    assert low.peak < 6 * GB
    assert estimate_memory(sdxl, MemoryPreset.LOW, "cuda", torch.float16).peak < 8 * GB
    # on the CPU the weights are in the one memory whatever the preset
    on_cpu = {estimate_memory(sd15, p, "cpu", torch.float32) for p in EXACT_PRESETS}
    assert len(on_cpu) == 1 and next(iter(on_cpu)).host == 0


def test_estimate_counts_the_fused_projections(base_dirs):
    """``fuse_qkv`` adds what fusing a model adds: the estimate of an unfused model with it is the
    estimate of the fused model."""
    plain = tiny_model(base_dirs["sdxl"])
    fused = tiny_model(base_dirs["sdxl"]).place("cpu", speed=SpeedOptions(fuse_qkv=True))
    for preset in MemoryPreset:
        ahead = estimate_memory(plain, preset, "cuda", torch.float16, fuse_qkv=True)
        assert ahead == estimate_memory(fused, preset, "cuda", torch.float16)
        unfused = estimate_memory(plain, preset, "cuda", torch.float16)
        assert ahead.resident + ahead.host > unfused.resident + unfused.host  # the weights held somewhere


def test_free_memory_on_the_cpu(monkeypatch):
    free = free_memory("cpu")
    assert free.device == free.host > 0
    import runtime.memory

    def no_meminfo(*a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(runtime.memory, "open", no_meminfo, raising=False)
    assert available_host_memory() > 0  # from os.sysconf


def test_fits_counts_the_largest_working_memory():
    need = MemoryNeed(resident=4 * GB, peak=5 * GB)
    assert fits(need, FreeMemory(5 * GB, 100 * GB))
    assert not fits(need, FreeMemory(5 * GB, 100 * GB), others_working=2 * GB)  # a loaded model needs 2 GB to run
    assert not fits(MemoryNeed(0, 1 * GB, host=8 * GB), FreeMemory(10 * GB, 4 * GB))  # offloaded weights need RAM


# -- the app's model cache counts memory ---------------------------------------------------------------
class FakeMemory:
    """A device with ``total`` bytes; each loaded model holds its resident bytes; models need
    ``sizes[kind]`` resident and 1 GB more while generating (``fast``), nothing resident and their
    size + 0.5 GB while generating (``balanced``), or half their size (``low``, ``low-fp8``)."""

    def __init__(self, total, sizes):
        self.total, self.sizes, self.loaded, self.measured = total, sizes, {}, 0

    def need(self, model, preset):  # model: a registry entry (from the cache) or a ModelKind
        from engine.registry import entry
        from leffa.hub import ModelKind

        size = self.sizes[ModelKind(entry(model).name)]
        return {MemoryPreset.FAST: MemoryNeed(size, size + GB),
                MemoryPreset.BALANCED: MemoryNeed(0, size + GB // 2)}.get(preset, MemoryNeed(0, size // 2))

    def free(self):
        self.measured += 1
        return FreeMemory(self.total - sum(self.loaded.values()), 100 * GB)


def _cache(memory, preset=MemoryPreset.FAST, max_models=3):
    from engine.cache import MemoryBudget, ModelCache
    from leffa.hub import ModelKind, tiny_model as tiny

    def load(entry):  # the cache passes the registry entry
        kind = ModelKind(entry.name)
        memory.loaded[kind] = memory.need(kind, preset).resident
        return tiny(kind)

    cache = ModelCache(load, max_models, MemoryBudget(preset, memory.need, memory.free, "cuda"))
    real_drop = cache._drop_oldest

    def drop():
        memory.loaded.pop(cache.loaded()[0])
        real_drop()

    cache._drop_oldest = drop
    return cache, ModelKind


def test_cache_drops_least_recently_used_until_a_model_fits():
    memory = FakeMemory(12 * GB, {})
    cache, kind = _cache(memory)
    memory.sizes.update({kind.VITON_HD: 4 * GB, kind.DRESS_CODE: 4 * GB, kind.POSE_TRANSFER: 9 * GB})
    cache.get(kind.VITON_HD)
    cache.get(kind.DRESS_CODE)  # 4 + 4 + 1 GB working: fits in 12
    assert cache.loaded() == [kind.VITON_HD, kind.DRESS_CODE]
    cache.get(kind.VITON_HD)  # now the most recent
    cache.get(kind.POSE_TRANSFER)  # needs 10 GB: both try-on models go, the least recent first
    assert cache.loaded() == [kind.POSE_TRANSFER]
    cache.get(kind.VITON_HD)  # 9 + 4 + 1: too much beside the pose model, which goes
    assert cache.loaded() == [kind.VITON_HD]


def test_cache_refuses_what_cannot_fit_alone_and_names_a_preset_that_would():
    memory = FakeMemory(8 * GB, {})
    cache, kind = _cache(memory)
    memory.sizes.update({kind.VITON_HD: 3 * GB, kind.POSE_TRANSFER: 10 * GB})
    cache.get(kind.VITON_HD)
    with pytest.raises(NotEnoughMemoryError) as info:
        cache.get(kind.POSE_TRANSFER)
    message = str(info.value)
    assert "pose_transfer" in message and "--memory fast" in message
    assert "about 11.0 GB of CUDA memory and 8.0 GB are free once the other models are dropped" in message
    assert "It would fit with --memory low (about 5.0 GB) or --memory low-fp8 (about 5.0 GB)." in message
    assert cache.loaded() == [kind.VITON_HD]  # not dropped for nothing


def test_cache_refuses_before_dropping_for_max_models():
    """With room for one model only, a model that cannot fit is refused and the loaded one kept."""
    memory = FakeMemory(8 * GB, {})
    cache, kind = _cache(memory, max_models=1)
    memory.sizes.update({kind.VITON_HD: 3 * GB, kind.POSE_TRANSFER: 10 * GB})
    cache.get(kind.VITON_HD)
    with pytest.raises(NotEnoughMemoryError, match="once the other models are dropped"):
        cache.get(kind.POSE_TRANSFER)
    assert cache.loaded() == [kind.VITON_HD]


def test_cache_refuses_when_memory_stays_short_once_all_are_dropped():
    """Memory held elsewhere (a generation still running, another process): after dropping every
    model the free memory is measured again, and a model that still does not fit is refused."""
    memory = FakeMemory(12 * GB, {})
    cache, kind = _cache(memory)
    memory.sizes.update({kind.VITON_HD: 4 * GB, kind.POSE_TRANSFER: 9 * GB})
    cache.get(kind.VITON_HD)
    # dropped, but its memory is not given back (a generation still holds the pipeline)
    cache._drop_oldest = functools.partial(type(cache)._drop_oldest, cache)
    with pytest.raises(NotEnoughMemoryError, match=r"needs about 10.0 GB of CUDA memory and 8.0 GB are free"):
        cache.get(kind.POSE_TRANSFER)
    assert cache.loaded() == [] and kind.POSE_TRANSFER not in memory.loaded  # never loaded


def test_cache_keeps_max_models_as_a_bound():
    memory = FakeMemory(100 * GB, {})
    cache, kind = _cache(memory, max_models=1)
    memory.sizes.update({k: GB for k in kind})
    cache.get(kind.VITON_HD)
    cache.get(kind.DRESS_CODE)
    assert cache.loaded() == [kind.DRESS_CODE]


def test_estimated_budget_measures_and_estimates():
    from leffa.hub import ModelKind
    from engine.cache import estimated_budget

    budget = estimated_budget(MemoryPreset.LOW, "cpu", torch.float32)
    assert budget.free().device > 0
    need = budget.need(ModelKind.POSE_TRANSFER, MemoryPreset.FAST)
    assert need.resident == estimate_memory(meta_model(BaseModel.SDXL_INPAINTING), MemoryPreset.FAST, "cpu",
                                            torch.float32).resident


# -- settings --------------------------------------------------------------------------------------------
def test_app_settings_for_memory_and_speed(monkeypatch):
    from webapp.backend import model_setup
    from webapp.settings import parse_args

    monkeypatch.setenv("LEFFA_MEMORY", "low")
    monkeypatch.setenv("LEFFA_FUSE_QKV", "1")
    s = parse_args(["--compile", "--device", "cpu"])
    assert (s.memory, s.fuse_qkv, s.channels_last, s.compile) == ("low", True, False, True)
    setup = model_setup(s)
    assert setup.memory is MemoryPreset.LOW and setup.speed == SpeedOptions(True, False, True)
    assert parse_args(["--memory", "balanced"]).memory == "balanced"
    monkeypatch.setenv("LEFFA_MEMORY", "huge")
    with pytest.raises(SystemExit):
        parse_args([])
    monkeypatch.setenv("LEFFA_MEMORY", "fast")
    monkeypatch.setenv("LEFFA_DTYPE", "bfloat16")
    assert model_setup(parse_args(["--device", "cpu"])).dtype == torch.bfloat16
    monkeypatch.setenv("LEFFA_DTYPE", "float64")  # not silently the automatic dtype
    with pytest.raises(SystemExit):
        parse_args([])


# -- Hugging Face Spaces with on-demand GPUs ---------------------------------------------------------------
class StandInSpaces(types.ModuleType):
    """Records what the app asks of ``spaces``: ``GPU(duration=...)`` and each decorated call. As the
    real package's ZeroGPU worker, the call's arguments and result cross a process boundary pickled."""

    def __init__(self, zero_gpu: bool = True):
        super().__init__("spaces")
        self.calls = []
        self.config = types.ModuleType("spaces.config")
        self.config.Config = types.SimpleNamespace(zero_gpu=zero_gpu)

    def install(self, monkeypatch) -> StandInSpaces:
        monkeypatch.setitem(sys.modules, "spaces", self)
        monkeypatch.setitem(sys.modules, "spaces.config", self.config)
        return self

    def GPU(self, duration):  # noqa: N802 (the package's name)
        def decorate(fn):
            def on_gpu(*args, **kwargs):
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                self.calls.append(("enter", duration(*args, **kwargs)))
                try:
                    return pickle.loads(pickle.dumps(fn(*args, **kwargs)))
                finally:
                    self.calls.append(("exit",))

            return on_gpu

        return decorate


def test_on_spaces_generations_run_inside_spaces_gpu(monkeypatch):
    from leffa.hub import ModelKind
    from engine.adapters import GenerationCall
    from engine.options import GenerateOptions
    from webapp.backend import build_engine
    from webapp.settings import parse_args

    spaces = StandInSpaces().install(monkeypatch)
    engine = build_engine(parse_args(["--tiny", "--device", "cpu", "--memory", "balanced"]))
    assert engine.gpu is not None and engine.gpu.setup.device == "cpu"
    pipe = engine.models.get(ModelKind.VITON_HD)
    assert pipe.model.placement.device == torch.device("cpu")  # loaded onto the CPU, outside the GPU call
    assert pipe.model.placement.memory is MemoryPreset.BALANCED  # the tiny app follows --memory too
    placed = []
    real_place = pipe.model.place
    monkeypatch.setattr(pipe.model, "place", lambda device, *a, **k: (placed.append(
        (str(device), len(spaces.calls))), real_place(device, *a, **k))[1])
    images = [Image.new("RGB", (48, 64), "gray"), Image.new("RGB", (48, 64), "red"), Image.new("L", (48, 64), 255),
              Image.new("RGB", (48, 64), "blue")]
    (gen,) = engine.generate(ModelKind.VITON_HD, *images, GenerateOptions(steps=3, record_attention=True))
    assert gen.image.size == (48, 64) and gen.recorder.steps() == [1, 2]  # the recording came back too
    call = GenerationCall(ModelKind.VITON_HD, *images, GenerateOptions(steps=3), (42,))
    assert spaces.calls == [("enter", engine.gpu.seconds(call)), ("exit",)]
    assert placed == [("cpu", 1), ("cpu", 1)]  # onto the setup's device inside the call, back to the CPU after
    call30 = GenerationCall(ModelKind.POSE_TRANSFER, *images, GenerateOptions(steps=30), (42,))
    assert engine.gpu.seconds(call30) == math.ceil(20 + 30 * 0.5 * 1.5)  # SDXL, balanced
    call4 = GenerationCall(ModelKind.POSE_TRANSFER, *images, GenerateOptions(steps=30), (1, 2, 3, 4))
    assert engine.gpu.seconds(call4) == math.ceil(20 + 30 * 0.5 * 4 * 1.5)  # a batch of 4: each step 4 times


def test_on_spaces_the_app_loads_the_tryon_model_at_start(monkeypatch):
    import app
    import webapp.ui
    from leffa.hub import ModelKind

    launched = []
    monkeypatch.setattr(webapp.ui, "launch", lambda demo, settings: launched.append(demo))
    monkeypatch.setattr(webapp.ui, "create_demo", lambda engine: engine)
    StandInSpaces().install(monkeypatch)
    app.main(["--tiny", "--device", "cpu"])
    assert launched[0].models.loaded() == [ModelKind.VITON_HD]


def test_without_spaces_nothing_changes(monkeypatch):
    import app
    import webapp.ui
    from webapp.backend import build_engine
    from webapp.settings import parse_args

    StandInSpaces(zero_gpu=False).install(monkeypatch)  # installed, but not a ZeroGPU Space
    assert build_engine(parse_args(["--tiny"])).gpu is None
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError
    engine = build_engine(parse_args(["--tiny"]))
    assert engine.gpu is None
    launched = []
    monkeypatch.setattr(webapp.ui, "launch", lambda demo, settings: launched.append(demo))
    monkeypatch.setattr(webapp.ui, "create_demo", lambda engine: engine)
    app.main(["--tiny"])
    assert launched[0].models.loaded() == []  # loaded on first use, as before


# -- on a CUDA GPU -----------------------------------------------------------------------------------------
def _peak(model, accel=False):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    images = _run(model, accel)
    return images, torch.cuda.max_memory_allocated()


@needs_cuda
@pytest.mark.parametrize("variant_name", ["sd15", "sdxl"])
def test_cuda_presets_give_the_fast_images_with_less_memory(base_dirs, variant_name):
    fast_model = tiny_model(base_dirs[variant_name]).place("cuda", torch.float16)
    peaks = {}
    for accel in (False, True):
        fast, peaks[MemoryPreset.FAST] = _peak(fast_model, accel)
        for preset in (MemoryPreset.BALANCED, MemoryPreset.LOW):
            model = tiny_model(base_dirs[variant_name]).place("cuda", torch.float16, memory=preset)
            images, peaks[preset] = _peak(model, accel)
            assert torch.equal(images, fast), preset
            assert next(model.unet.parameters()).device.type == "cpu"  # back on the CPU when idle
        model = tiny_model(base_dirs[variant_name]).place("cuda", torch.bfloat16, memory=MemoryPreset.LOW_FP8)
        images, peaks[MemoryPreset.LOW_FP8] = _peak(model, accel)
        assert (images - fast).abs().max() < 0.1
    assert peaks[MemoryPreset.LOW] < peaks[MemoryPreset.FAST]


@needs_cuda
def test_cuda_balanced_keeps_only_the_running_modules_on_the_gpu(base_dirs):
    model = tiny_model(base_dirs["sd15"]).place("cuda", torch.float16, memory=MemoryPreset.BALANCED)
    seen = collections.defaultdict(set)
    for name in ("unet", "reference_unet"):
        getattr(model, name).register_forward_pre_hook(lambda module, args, name=name: seen[name].update(
            n for n in ("vae", "unet", "reference_unet")
            if next(getattr(model, n).parameters()).device.type == "cuda"))
    _run(model, accel=True)
    assert seen["reference_unet"] == {"reference_unet"}  # its one pass: the VAE has left
    assert seen["unet"] == {"unet"}  # the loop: the reference UNet has left too
    seen.clear()
    _run(model, accel=False)
    assert seen["unet"] == {"unet", "reference_unet"}


@needs_cuda
@pytest.mark.parametrize("speed", [SpeedOptions(), SpeedOptions(fuse_qkv=True)])
def test_cuda_attention_runs_on_the_flash_kernel(base_dirs, speed):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.backends.cuda.is_flash_attention_available():
        pytest.skip("this GPU or build has no FlashAttention kernel")
    for variant_name in ("sd15", "sdxl"):
        model = tiny_model(base_dirs[variant_name]).place("cuda", torch.float16, speed=speed)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # any attention that cannot use it raises
            for accel in (False, True):
                assert torch.isfinite(_run(model, accel)).all()


@needs_cuda
def test_cuda_compiled_unet_keeps_the_images(base_dirs):
    plain = _run(tiny_model(base_dirs["sd15"]).place("cuda", torch.float16))
    model = tiny_model(base_dirs["sd15"]).place("cuda", torch.float16, speed=SpeedOptions(True, True, True))
    assert (_run(model) - plain).abs().max() < 0.02  # float16, other kernels
