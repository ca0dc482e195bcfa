"""The concatenation family's adapter: the CatVTON-style model of ``leffa.concat`` behind the engine.
It has no published weights: it runs an own checkpoint (``python -m training`` with
``family = "concat"``) or the tiny untrained model. The DensePose picture is not used."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from engine.adapters import GenerationCall, StepCallback
from engine.adapters.leffa import recorded_steps
from engine.options import GenerateOptions
from engine.registry import ModelEntry
from engine.setup import ModelSetup, WeightSource
from errors import UserError
from leffa.concat import ConcatModel, ConcatPipeline, estimate_memory, meta_model, tiny_model
from leffa.model import BaseModel
from leffa.recording import AttentionRecorder
from runtime.memory import MemoryNeed
from runtime.presets import MemoryPreset

BASE = BaseModel.SD15_INPAINTING


class Adapter:
    def __init__(self, entry: ModelEntry):
        self.entry = entry

    def load(self, setup: ModelSetup, source: WeightSource, device: str | None = None) -> ConcatPipeline:
        device = device or setup.device
        if source.tiny:
            model = tiny_model().place(device, setup.dtype, memory=setup.memory)
        elif source.checkpoint is not None:
            model = ConcatModel.from_pretrained(source.base_config or BASE, source.checkpoint, device=device,
                                                dtype=setup.dtype, memory=setup.memory)
        else:
            raise UserError(f"{self.entry.name} has no published weights: train one (python -m training with "
                            f'family = "concat") and pass its concat.safetensors with --checkpoint, or use --tiny')
        return ConcatPipeline(model.eval())

    def place(self, loaded: ConcatPipeline, device: str, setup: ModelSetup) -> None:
        loaded.model.place(device, setup.dtype, memory=setup.memory)

    def generate(self, loaded: ConcatPipeline, call: GenerationCall,
                 callback: StepCallback | None = None) -> tuple[list[Image.Image], AttentionRecorder | None]:
        """The generated images and, if asked, the person half's attention over the garment half (the
        middle and the last step, every layer; sample k is its batch row k)."""
        options, recorder = call.options, None
        if options.record_attention:
            recorder = AttentionRecorder(steps=recorded_steps(options.steps), dtype=torch.float16)
        out = loaded(*(call.batch(p) for p in (call.src, call.ref, call.mask)), generator=call.generators(),
                     attention_recorder=recorder, callback=callback, **_pipeline_options(options))
        return out.images, recorder

    def generate_batch(self, loaded: ConcatPipeline, inputs: dict[str, torch.Tensor], options: GenerateOptions,
                       generators: Sequence[torch.Generator]) -> list[Image.Image]:
        return loaded(inputs["src_image"], inputs["ref_image"], inputs["mask"], generator=list(generators),
                      **_pipeline_options(options)).images

    def memory_need(self, memory: MemoryPreset, device: str, dtype: torch.dtype, fuse_qkv: bool) -> MemoryNeed:
        """An SD1.5-sized model's need (no q/k/v fusion: the speed options are not applied to it)."""
        return estimate_memory(meta_model(BASE), memory, device, dtype)


def _pipeline_options(options: GenerateOptions) -> dict:
    """No rescaled guidance unless asked (``guidance_rescale`` None is the published Leffa quirk)."""
    return {"num_inference_steps": options.steps, "guidance_scale": options.guidance_scale,
            "guidance_rescale": options.guidance_rescale or 0.0, "repaint": options.repaint}
