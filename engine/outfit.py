"""Outfits: several garments in one try-on request, put on one after the other, each by the model
trained on its type (``registry.garment_entry``), each pass masked on the previous pass's result.
What is allowed is checked here, torch-free, before any work: the command line's parser and the
app's request read it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from engine import registry
from engine.registry import ModelEntry
from errors import OptionError
from preprocess.framing import Framing
from preprocess.inputs import ImageSource, TryOnInputs
from preprocess.masks import GarmentType, TryOnModel

if TYPE_CHECKING:  # pragma: no cover
    from engine.service import Generation

MAX_GARMENTS = 2  # an upper-body and a lower-body garment (a dress is one garment)


@dataclass(frozen=True)
class Garment:
    """One garment of a request: its photo and what it is."""

    image: ImageSource
    garment_type: GarmentType
    cut_out: bool = False  # a PNG cut-out: crop to its transparency


def check_outfit(types: Sequence[GarmentType | str], what: str = "garment") -> tuple[GarmentType, ...]:
    """The garment types of an outfit, checked: one or two garments, no two of a type, and a dress
    alone (it covers both the upper and the lower body). ``what`` names a garment in messages (the
    command line's ``--garment``)."""
    types = tuple(GarmentType(t) for t in types)
    if not 1 <= len(types) <= MAX_GARMENTS:
        raise OptionError(f"an outfit is 1 or {MAX_GARMENTS} garments (an upper-body and a lower-body one); "
                          f"got {len(types)}")
    if len(set(types)) < len(types):
        raise OptionError(f"an outfit has one garment of each type; got two {types[0].value} garments: make the "
                          f"second {what} a {'lower_body' if types[0] is GarmentType.UPPER_BODY else 'upper_body'} "
                          "one, or try them on one at a time")
    if len(types) > 1 and GarmentType.DRESSES in types:
        raise OptionError("a dress covers the upper and the lower body: try it on alone, without another garment")
    return types


def outfit_models(model_type: TryOnModel | str, types: Sequence[GarmentType],
                  model: str | ModelEntry | None = None) -> list[ModelEntry]:
    """The model of each garment's pass: ``model_type``'s when it knows the garment's type, else one
    that does (``registry.garment_entry``); or ``model`` for every garment (a try-on entry trained on
    their types, e.g. ``concat_tryon`` with an own checkpoint)."""
    if model is None:
        return [registry.garment_entry(model_type, t) for t in types]
    chosen = registry.entry(model)
    if chosen.task is not registry.Task.TRYON:
        raise OptionError(f"the {chosen.name} model is a {chosen.task.value} model, not a try-on one")
    unknown = [t.value for t in types if t not in chosen.garments]
    if unknown:
        raise OptionError(f"the {chosen.name} model puts on {', '.join(g.value for g in chosen.garments)} garments, "
                          f"not {', '.join(unknown)}: drop --model to let the garment type choose the model")
    return [chosen] * len(types)


@dataclass
class GarmentPass:
    """One garment put on one sample: the model that did it and what it saw (the first pass's
    inputs are the same for every sample; a later pass's were computed from the sample's own
    picture after the pass before)."""

    entry: ModelEntry
    garment_type: GarmentType
    inputs: TryOnInputs  # the person picture, the garment, the mask used, the DensePose image, ...


@dataclass
class TryOnSample:
    """One sample of a try-on: its ``answer`` (the request's view: the photo with every garment
    blended in, or the model's picture), the last pass's ``generation`` (its seed, picture and
    attention recording) and each garment's pass."""

    answer: Image.Image
    generation: Generation
    passes: list[GarmentPass]

    @property
    def seed(self) -> int:
        return self.generation.seed

    @property
    def mask(self) -> Image.Image:
        """Where the picture was generated: the union of the passes' masks."""
        return union_mask([p.inputs.mask for p in self.passes])


@dataclass
class TryOnResult:
    samples: list[TryOnSample]
    framing: Framing | None  # the photo and the box of it the model saw (None: the canvas)


def union_mask(masks: Sequence[Image.Image]) -> Image.Image:
    """255 where any of ``masks`` (L, one size) is more than half on."""
    on = np.logical_or.reduce([np.asarray(m.convert("L")) > 127 for m in masks])
    return Image.fromarray(on.astype(np.uint8) * 255, "L")
