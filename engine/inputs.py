"""From the photos a request gives to the model's inputs, for each task: which analyses must be
computed (what was not given), and the inputs themselves, from the given images or through the
shared ``Preprocessor``. The app, the command line and ``leffa infer --preprocess`` all come here."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from PIL import Image

from engine.options import ResultView
from errors import OptionError
from preprocess.appearance import PICTURE as APPEARANCE_PICTURE
from preprocess.framing import Framing, canvas_box, crop_to_model, frame_person
from preprocess.images import MODEL_SIZE, WHITE, fit_to_canvas, load_garment, load_image, load_label_image
from preprocess.inputs import ImageSource, PoseInputs, Preprocessor, TryOnInputs
from preprocess.masks import GarmentType
from preprocess.weights import MASK_ANALYSES, Analysis

if TYPE_CHECKING:  # pragma: no cover
    from engine.registry import ModelEntry

PreprocessorFactory = Callable[[], Preprocessor]  # built on first need: a request with every input given needs none


def tryon_analyses(entry: ModelEntry, mask_given: bool, densepose_given: bool) -> tuple[Analysis, ...]:
    """What a try-on with ``entry`` computes from the person photo: the entry's analyses, less the
    DensePose image when it is given; and nothing at all when the mask is given too (else the mask
    is computed anyway, ``Preprocessor.tryon`` always makes it, and the given one replaces it)."""
    needed = tuple(a for a in entry.analyses if not (a is Analysis.DENSEPOSE and densepose_given))
    return () if mask_given and set(needed) <= set(MASK_ANALYSES) else needed


def pose_analyses(entry: ModelEntry, densepose_given: bool) -> tuple[Analysis, ...]:
    """What a pose transfer with ``entry`` computes: its analyses of the target photo, less the
    DensePose image when it is given."""
    return tuple(a for a in entry.analyses if not (a is Analysis.DENSEPOSE and densepose_given))


def check_size(analyses: tuple[Analysis, ...], size: tuple[int, int], entry: ModelEntry | None = None) -> None:
    """Our preprocessing works at the models' size only; a model that conditions on appearance
    works at its own picture size only."""
    if entry is not None and needs_appearance(entry) and tuple(size) != MODEL_SIZE:
        raise OptionError(f"{entry.name} generates at its own size: drop --size (it is for the Leffa models)")
    if analyses and tuple(size) != MODEL_SIZE:
        raise OptionError("automatic preprocessing works at 768x1024: give the mask and DensePose image yourself "
                          "(--mask, --densepose; for pose transfer --densepose), or generate at 768x1024 (drop --size)")


def check_pose_target(target, densepose) -> None:
    if target is None and densepose is None:
        raise OptionError("a pose transfer needs the photo of a person in the target pose, or its DensePose image")


def framed_person(preprocessor: PreprocessorFactory, photo: Image.Image, size: tuple[int, int] = MODEL_SIZE,
                  what: str = "person photo", finder: Analysis = Analysis.DENSEPOSE) -> tuple[Image.Image, Framing]:
    """The model's picture of ``photo`` framed around its largest person (found by the DensePose
    model ``finder``), and the framing."""
    framing = frame_person(photo, lambda p: preprocessor().people(p, finder), what)
    return crop_to_model(photo, framing.box, size), framing


def needs_appearance(entry: ModelEntry) -> bool:
    """Whether ``entry`` conditions on the kept person's texture map and face (MCLD), not on the
    photo itself: what its analyses say."""
    return Analysis.FACE in entry.analyses


def picture_size(entry: ModelEntry) -> tuple[int, int]:
    """The picture photos are framed or fitted into for ``entry`` (width, height)."""
    return APPEARANCE_PICTURE if needs_appearance(entry) else MODEL_SIZE


def tryon_inputs(preprocessor: PreprocessorFactory, entry: ModelEntry, person: ImageSource, garment: ImageSource,
                 garment_type: GarmentType, cut_out: bool = False, keep_fixed_regions: bool = False, *,
                 mask: ImageSource | None = None, densepose: ImageSource | None = None,
                 size: tuple[int, int] = MODEL_SIZE, view: ResultView = ResultView.CANVAS) -> TryOnInputs:
    """The inputs of a try-on with ``entry`` at ``size``: ``mask`` and ``densepose``, when given,
    replace the computed ones. With a ``view`` around the person the photo is framed around its
    largest person first (``preprocess.framing``), unless a mask or DensePose image is given (they
    were made for the whole photo: then it is fitted whole, as on the canvas); ``framing`` tells
    what of the photo the model saw (kept for the photo view)."""
    analyses = tryon_analyses(entry, mask is not None, densepose is not None)
    check_size(analyses, size)
    around_person = view.around_person and mask is None and densepose is None
    photo = load_image(person, name="person image") if around_person or view is ResultView.PHOTO else person
    photo_in, framing = framed_person(preprocessor, photo, size) if around_person else (photo, None)
    if not analyses:
        inputs = TryOnInputs(fit_to_canvas(load_image(photo_in, name="person image"), size),
                             load_garment(garment, size, cut_out=cut_out),
                             load_label_image(mask, "mask", size, binary=True),
                             load_label_image(densepose, "DensePose image", size))
    else:
        inputs = preprocessor().tryon(photo_in, garment, entry.mask_variant, garment_type, cut_out,
                                      densepose=densepose, keep_fixed_regions=keep_fixed_regions)
        if mask is not None:
            inputs.mask = load_label_image(mask, "mask", size, binary=True)
    if framing is None and view is ResultView.PHOTO:
        framing = Framing(photo, canvas_box(photo.size, size))
    inputs.framing = framing
    return inputs


def pose_inputs(preprocessor: PreprocessorFactory, entry: ModelEntry, person: ImageSource,
                target: ImageSource | None, *, densepose: ImageSource | None = None,
                size: tuple[int, int] = MODEL_SIZE, view: ResultView = ResultView.CANVAS) -> PoseInputs:
    """The inputs of a pose transfer with ``entry`` at ``size``: the target pose from ``densepose``
    when given, else from the ``target`` photo's DensePose. With a DensePose image the target photo
    is optional: the mask covers the whole picture, so the model never sees its pixels (a white
    picture stands in). With a ``view`` around the person both photos are framed around their
    people first (the answer is the model's picture: the person's pose changes, so there is no
    photo to paste it back into)."""
    check_pose_target(target, densepose)
    if view is ResultView.PHOTO:
        raise OptionError("pose transfer answers with the model's picture: ask for the framed or the canvas result")
    analyses = pose_analyses(entry, densepose is not None)
    check_size(analyses, size, entry)
    if not analyses:
        source = (Image.new("RGB", size, WHITE) if target is None
                  else fit_to_canvas(load_image(target, name="target-pose image"), size))
        return PoseInputs(fit_to_canvas(load_image(person, name="person image"), size), source,
                          Image.new("L", size, 255), load_label_image(densepose, "DensePose image", size))
    if needs_appearance(entry):
        return appearance_inputs(preprocessor, entry, person, target, densepose, view)
    if not view.around_person:
        return preprocessor().pose(person, target)
    (reference, reference_framing), (target_in, target_framing) = (
        framed_person(preprocessor, load_image(source, name=what.replace("photo", "image")), size, what)
        for source, what in ((person, "person photo"), (target, "target-pose photo")))
    inputs = preprocessor().pose(reference, target_in)
    inputs.reference_framing, inputs.target_framing = reference_framing, target_framing
    return inputs


def appearance_inputs(preprocessor: PreprocessorFactory, entry: ModelEntry, person: ImageSource,
                      target: ImageSource | None, densepose: ImageSource | None, view: ResultView) -> PoseInputs:
    """A pose transfer's inputs for a model that conditions on appearance (MCLD): both photos framed
    around their people (or fitted whole, ``view``) into its picture; the target's pose from its
    photo or from ``densepose`` (an IUV image as MCLD's files hold it)."""
    size, finder = picture_size(entry), Analysis.DENSEPOSE_R101  # the people found by the model it runs anyway
    framings = {}
    if view.around_person:
        framed = {}
        for key, source, what in (("reference", person, "person photo"), ("target", target, "target-pose photo")):
            if source is None or (key == "target" and densepose is not None):
                framed[key] = source
                continue
            framed[key], framings[key] = framed_person(
                preprocessor, load_image(source, name=what.replace("photo", "image")), size, what, finder)
        person, target = framed["reference"], framed["target"]
    inputs = preprocessor().appearance_pose(person, target, densepose=densepose, size=size)
    inputs.reference_framing, inputs.target_framing = framings.get("reference"), framings.get("target")
    return inputs
