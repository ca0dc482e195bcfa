"""From the photos a request gives to the model's inputs, for each task: which analyses must be
computed (what was not given), and the inputs themselves, from the given images or through the
shared ``Preprocessor``. The app, the command line and ``leffa infer --preprocess`` all come here."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from errors import OptionError
from preprocess.images import MODEL_SIZE, WHITE, fit_to_canvas, load_garment, load_image, load_label_image
from preprocess.inputs import ImageSource, PoseInputs, Preprocessor, TryOnInputs
from preprocess.masks import GarmentType, TryOnModel
from preprocess.weights import MASK_ANALYSES, Analysis

PreprocessorFactory = Callable[[], Preprocessor]  # built on first need: a request with every input given needs none


def tryon_analyses(mask_given: bool, densepose_given: bool) -> tuple[Analysis, ...]:
    """What a try-on computes from the person photo: nothing when its mask and DensePose image are
    both given; else the mask (``Preprocessor.tryon`` always makes it; a given mask replaces it
    afterwards) and the DensePose image unless given."""
    if mask_given and densepose_given:
        return ()
    return MASK_ANALYSES + (() if densepose_given else (Analysis.DENSEPOSE,))


def pose_analyses(densepose_given: bool) -> tuple[Analysis, ...]:
    """What a pose transfer computes: the target photo's DensePose, unless its image is given."""
    return () if densepose_given else (Analysis.DENSEPOSE,)


def check_size(analyses: tuple[Analysis, ...], size: tuple[int, int]) -> None:
    """Our preprocessing works at the models' size only."""
    if analyses and tuple(size) != MODEL_SIZE:
        raise OptionError("automatic preprocessing works at 768x1024: give the mask and DensePose image "
                          "(and for pose transfer the DensePose image), or generate at 768x1024")


def tryon_inputs(preprocessor: PreprocessorFactory, person: ImageSource, garment: ImageSource,
                 variant: TryOnModel, garment_type: GarmentType, cut_out: bool = False,
                 keep_fixed_regions: bool = False, mask: ImageSource | None = None,
                 densepose: ImageSource | None = None, size: tuple[int, int] = MODEL_SIZE) -> TryOnInputs:
    """The try-on's inputs at ``size``: ``mask`` and ``densepose``, when given, replace the computed ones."""
    analyses = tryon_analyses(mask is not None, densepose is not None)
    check_size(analyses, size)
    if not analyses:
        return TryOnInputs(fit_to_canvas(load_image(person, name="person image"), size),
                           load_garment(garment, size, cut_out=cut_out),
                           load_label_image(mask, "mask", size, binary=True),
                           load_label_image(densepose, "DensePose image", size))
    inputs = preprocessor().tryon(person, garment, variant, garment_type, cut_out, densepose=densepose,
                                  keep_fixed_regions=keep_fixed_regions)
    if mask is not None:
        inputs.mask = load_label_image(mask, "mask", size, binary=True)
    return inputs


def pose_inputs(preprocessor: PreprocessorFactory, person: ImageSource, target: ImageSource | None,
                densepose: ImageSource | None = None, size: tuple[int, int] = MODEL_SIZE) -> PoseInputs:
    """The pose transfer's inputs at ``size``: the target pose from ``densepose`` when given (then
    the target photo is not needed: the mask covers the whole picture, so the model never sees its
    pixels, and a white picture stands in), else from the ``target`` photo's DensePose."""
    if densepose is not None:
        return PoseInputs(fit_to_canvas(load_image(person, name="person image"), size), Image.new("RGB", size, WHITE),
                          Image.new("L", size, 255), load_label_image(densepose, "DensePose image", size))
    check_size(pose_analyses(False), size)
    if target is None:
        raise ValueError("a pose transfer needs the target-pose photo or its DensePose image")
    return preprocessor().pose(person, target)
