"""The MCLD family's adapter: ``mcld/`` behind the engine.

A generation's inputs (``GenerationCall``): ``ref``, the kept person's picture; ``texture``, its UV
texture map; ``densepose``, the target's DensePose image in MCLD's channel order (R = V·255,
G = U·255, B = part index); ``face_embedding``, 512 floats (zeros when no face was found). All three
images are the model's size (512×512); other sizes (the tiny model's 64×64) are resized to it, the
DensePose image with nearest (its blue channel holds labels), and the answer back to ``ref``'s size.

``generate_batch`` (``leffa infer``) takes a dict of (B, C, H, W) tensors: ``"source"``, ``"texture"``
and ``"pose"`` (float in [0, 1]; the pose as above, /255) and ``"face"`` ((B, 512) float).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from engine.adapters import GenerationCall, StepCallback
from engine.options import GenerateOptions
from engine.registry import ModelEntry
from engine.setup import ModelSetup, WeightSource
from engine.weights import download_command
from errors import UserError
from mcld.hub import load_model, tiny_model
from mcld.memory import estimate_memory, published_meta_model
from mcld.pipeline import FACE_DIM, MCLDPipeline
from mcld.weights import MCLDFiles
from runtime.memory import MemoryNeed
from runtime.presets import MemoryPreset

BATCH_KEYS = ("source", "texture", "pose", "face")


class Adapter:
    def __init__(self, entry: ModelEntry):
        self.entry = entry

    def load(self, setup: ModelSetup, source: WeightSource, device: str | None = None) -> MCLDPipeline:
        """The published files, or the tiny model; an own checkpoint is refused (MCLD is nine files)."""
        device = device or setup.device
        if source.tiny:
            model = tiny_model().place(device, setup.dtype, memory=setup.memory)
        elif source.checkpoint is not None:
            raise UserError(f"{self.entry.name}: an own checkpoint is not supported (MCLD is "
                            f"{len(MCLDFiles.__dataclass_fields__)} files): put them in the checkpoint folder instead")
        else:
            model = load_model(source.checkpoint_dir, revision=source.revision, device=device, dtype=setup.dtype,
                               memory=setup.memory, suggest=download_command)
        return MCLDPipeline(model.eval())

    def place(self, loaded: MCLDPipeline, device: str, setup: ModelSetup) -> None:
        loaded.model.place(device, setup.dtype, memory=setup.memory)

    def generate(self, loaded: MCLDPipeline, call: GenerationCall,
                 callback: StepCallback | None = None) -> tuple[Image.Image, None]:
        """The generated picture (``ref``'s size); MCLD records no attention."""
        if call.texture is None:
            raise UserError(f"{self.entry.name} needs the kept person's texture map")
        size = loaded.model.config.image_size
        source, texture = _fit(call.ref, size, Image.BICUBIC), _fit(call.texture, size, Image.BICUBIC)
        pose = _fit(call.densepose, size, Image.NEAREST)
        face = np.zeros(FACE_DIM, np.float32) if call.face_embedding is None else call.face_embedding
        out = loaded(source, texture, pose, np.asarray(face, np.float32).reshape(1, -1),
                     generator=torch.Generator().manual_seed(call.seed), callback=callback,
                     **_pipeline_options(call.options))
        image = out.images[0]
        return (image if image.size == call.ref.size else image.resize(call.ref.size, Image.BICUBIC)), None

    def generate_batch(self, loaded: MCLDPipeline, inputs: dict[str, torch.Tensor], options: GenerateOptions,
                       generators: Sequence[torch.Generator]) -> list[Image.Image]:
        missing = [k for k in BATCH_KEYS if k not in inputs]
        if missing:
            raise ValueError(f"{self.entry.name}: a batch needs {', '.join(BATCH_KEYS)}; missing {', '.join(missing)}")
        out = loaded(inputs["source"], inputs["texture"], inputs["pose"], inputs["face"], generator=list(generators),
                     **_pipeline_options(options))
        return out.images

    def memory_need(self, memory: MemoryPreset, device: str, dtype: torch.dtype, fuse_qkv: bool) -> MemoryNeed:
        """The published model's need (no q/k/v fusion: MCLD's processors take the separate projections)."""
        return estimate_memory(published_meta_model(), memory, device, dtype)


def _fit(image: Image.Image, size: int, resample: int) -> Image.Image:
    image = image.convert("RGB")
    return image if image.size == (size, size) else image.resize((size, size), resample)


def _pipeline_options(options: GenerateOptions) -> dict:
    return {"num_inference_steps": options.steps, "guidance_scale": options.guidance_scale}
