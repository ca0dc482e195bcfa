"""The Leffa family's adapter: the published models of ``leffa/`` behind the engine."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from engine.adapters import GenerationCall, StepCallback
from engine.options import GenerateOptions
from engine.registry import ModelEntry
from engine.setup import ModelSetup, WeightSource
from engine.weights import download_command
from leffa.hub import load_model, tiny_model
from leffa.memory import estimate_memory, meta_model
from leffa.model import LeffaModel
from leffa.pipeline import LeffaPipeline
from leffa.recording import AttentionRecorder
from leffa.sampling import GuidanceInterval, Sampler
from leffa.weights import ModelKind
from runtime.memory import MemoryNeed
from runtime.presets import MemoryPreset


class Adapter:
    def __init__(self, entry: ModelEntry):
        self.entry = entry
        self.kind = ModelKind(entry.name)

    def load(self, setup: ModelSetup, source: WeightSource, device: str | None = None) -> LeffaPipeline:
        device = device or setup.device
        placing = {"memory": setup.memory, "speed": setup.speed}
        if source.tiny:
            model = tiny_model(self.kind).place(device, setup.dtype, **placing)
        elif source.checkpoint is not None:
            model = LeffaModel.from_pretrained(source.base_config or self.kind.base, source.checkpoint,
                                               device=device, dtype=setup.dtype, **placing)
        else:
            model = load_model(self.kind, source.checkpoint_dir, revision=source.revision, device=device,
                               dtype=setup.dtype, suggest=download_command, **placing)
        return LeffaPipeline(model.eval())

    def place(self, loaded: LeffaPipeline, device: str, setup: ModelSetup) -> None:
        loaded.model.place(device, setup.dtype, memory=setup.memory)  # its speed options stay

    def generate(self, loaded: LeffaPipeline, call: GenerationCall,
                 callback: StepCallback | None = None) -> tuple[list[Image.Image], AttentionRecorder | None]:
        """The generated images, and the attention recording if asked (the middle and the last step,
        every layer, float16 on the CPU; sample k is its batch row k)."""
        options, recorder = call.options, None
        if options.record_attention:
            recorder = AttentionRecorder(steps=recorded_steps(options.steps, options.cache_interval),
                                         dtype=torch.float16)
        out = loaded(*(call.batch(p) for p in (call.src, call.ref, call.mask, call.densepose)),
                     generator=call.generators(), attention_recorder=recorder, callback=callback,
                     **_pipeline_options(options))
        return out.images, recorder

    def generate_batch(self, loaded: LeffaPipeline, inputs: dict[str, torch.Tensor], options: GenerateOptions,
                       generators: Sequence[torch.Generator]) -> list[Image.Image]:
        out = loaded(inputs["src_image"], inputs["ref_image"], inputs["mask"], inputs["densepose"],
                     generator=list(generators), **_pipeline_options(options))
        return out.images

    def memory_need(self, memory: MemoryPreset, device: str, dtype: torch.dtype, fuse_qkv: bool) -> MemoryNeed:
        return estimate_memory(meta_model(self.kind.base), memory, device, dtype, fuse_qkv=fuse_qkv)


def recorded_steps(steps: int, cache_interval: int = 1) -> list[int]:
    """The steps whose attention is recorded: the middle and the last, or with the feature cache the
    last whole steps before them (a cached step runs only the outer blocks' attention layers)."""
    return sorted({(steps // 2) // cache_interval * cache_interval, (steps - 1) // cache_interval * cache_interval})


def _pipeline_options(options: GenerateOptions) -> dict:
    return {"num_inference_steps": options.steps, "guidance_scale": options.guidance_scale,
            "guidance_rescale": options.guidance_rescale, "ref_acceleration": options.ref_acceleration,
            "repaint": options.repaint, "attention_focus": options.attention_focus,
            "sampler": options.sampler or Sampler.DDPM,
            "guidance_interval": GuidanceInterval(*options.guidance_interval),
            "cache_interval": options.cache_interval}
