"""The MCLD family's adapter: ``mcld/`` behind the engine.

A generation's inputs (``GenerationCall``): ``ref``, the kept person's picture; ``texture``, its UV
texture map; ``densepose``, the target's DensePose image in MCLD's channel order (R = V·255,
G = U·255, B = part index); ``face_embedding``, 512 floats (zeros when no face was found). The
pictures are resized to 512×512 as their dataset does (``mcld.inputs``; then to the tiny model's
64×64, the DensePose image with nearest), and the answer is the published results' 352×512
(``test.py``'s resize, ``mcld.pipeline.resize_as_published``).

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
from mcld.inputs import ANSWER_SIZE, model_image
from mcld.pipeline import FACE_DIM, MCLDPipeline, resize_as_published
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
                 callback: StepCallback | None = None) -> tuple[list[Image.Image], None]:
        """The generated pictures, one per seed (352×512); MCLD records no attention."""
        if call.texture is None:
            raise UserError(f"{self.entry.name} needs the kept person's texture map")
        size, n = loaded.model.config.image_size, len(call.seeds)

        def fitted(picture: Image.Image, resample: int) -> Image.Image:
            return _fit(model_image(picture), size, resample)

        source, pose = (call.batch(tuple(fitted(p, resample) for p in call.per_sample(pictures)))
                        for pictures, resample in ((call.ref, Image.BICUBIC), (call.densepose, Image.NEAREST)))
        texture = call.batch(fitted(call.texture, Image.BICUBIC))
        face = np.zeros(FACE_DIM, np.float32) if call.face_embedding is None else call.face_embedding
        out = loaded(source, texture, pose, np.repeat(np.asarray(face, np.float32).reshape(1, -1), n, axis=0),
                     generator=call.generators(), callback=callback, **_pipeline_options(call.options))
        return _answers(out.tensors), None

    def generate_batch(self, loaded: MCLDPipeline, inputs: dict[str, torch.Tensor], options: GenerateOptions,
                       generators: Sequence[torch.Generator]) -> list[Image.Image]:
        missing = [k for k in BATCH_KEYS if k not in inputs]
        if missing:
            raise ValueError(f"{self.entry.name}: a batch needs {', '.join(BATCH_KEYS)}; missing {', '.join(missing)}")
        size = loaded.model.config.image_size
        images = {k: _resized(inputs[k], size, "nearest" if k == "pose" else "bicubic") for k in BATCH_KEYS[:3]}
        out = loaded(images["source"], images["texture"], images["pose"], inputs["face"], generator=list(generators),
                     **_pipeline_options(options))
        return _answers(out.tensors)

    def memory_need(self, memory: MemoryPreset, device: str, dtype: torch.dtype, fuse_qkv: bool) -> MemoryNeed:
        """The published model's need (no q/k/v fusion: MCLD's processors take the separate projections)."""
        return estimate_memory(published_meta_model(), memory, device, dtype)


def _answers(tensors: torch.Tensor) -> list[Image.Image]:
    """The published results' 352×512 pictures (``test.py``'s 512-high resize)."""
    h, w = ANSWER_SIZE[::-1]
    pixels = resize_as_published(tensors, (h, w)).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def _resized(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """A batch at the model's size (only the tiny model's differs from the inputs' 512)."""
    if images.shape[-2:] == (size, size):
        return images
    return torch.nn.functional.interpolate(images, (size, size), mode=mode).clamp(0, 1)


def _fit(image: Image.Image, size: int, resample: int) -> Image.Image:
    image = image.convert("RGB")
    return image if image.size == (size, size) else image.resize((size, size), resample)


def _pipeline_options(options: GenerateOptions) -> dict:
    return {"num_inference_steps": options.steps, "guidance_scale": options.guidance_scale}
