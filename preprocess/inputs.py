"""One entry point from user photos to model inputs, shared by the app and the CLI.

``Preprocessor`` loads the parsing, pose and DensePose models lazily (once) and caches the
analysis of each person photo by content hash, so changing only steps, seed or guidance
never redoes preprocessing.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from errors import enum_option
from preprocess.appearance import PICTURE, AppearanceInputs
from preprocess.face import FaceResult
from preprocess.densepose import (DensePoseBackend, DensePoseInstance, DensePoseRCNN, iuv_image, iuv_pose_rgb,
                                  mcld_densepose, render_iuv)
from preprocess.framing import Box, Framing
from preprocess.images import (MODEL_SIZE, WHITE, binarize, canvas_placement, fit_to_canvas, load_garment, load_image,
                               load_label_image)
from preprocess.masks import GarmentType, TryOnModel, agnostic_mask
from preprocess.openpose import OpenPoseDetector, draw_keypoints
from preprocess.parsing import HumanParser, Parsing
from preprocess.weights import Analysis

PARSE_SIZE = (384, 512)  # (width, height) at which parsing, keypoints and masks are computed

ImageSource = str | Path | bytes | Image.Image


class FaceBackend(Protocol):
    """``preprocess.face.FaceEmbedder``, or a stand-in."""

    def embed(self, image: np.ndarray) -> FaceResult: ...


@dataclass
class TryOnInputs:
    person: Image.Image  # 768×1024 RGB: the pipeline's src_image
    garment: Image.Image  # 768×1024 RGB: ref_image
    mask: Image.Image  # 768×1024 L, 255 = generate
    densepose: Image.Image  # 768×1024 RGB rendering for the chosen model type
    # what the mask was computed from (None when the mask and DensePose image were given)
    parsing: Image.Image | None = None  # 384×512 colour label map
    keypoints: np.ndarray | None = None  # (18, 2) in pixels of the 384×512 person, (0, 0) = missing
    pose_image: Image.Image | None = None  # keypoints drawn on the 384×512 person
    framing: Framing | None = None  # the photo and the box of it that ``person`` shows (None: not kept)


@dataclass
class PoseInputs:
    reference: Image.Image  # the person whose appearance is kept: ref_image
    target: Image.Image  # the target-pose person: src_image (only its DensePose is used)
    mask: Image.Image  # all 255
    densepose: Image.Image  # the target's pose: Leffa's IUV rendering, or MCLD's IUV image (appearance.py)
    # the boxes the model saw of the two photos, when framed around their people
    reference_framing: Framing | None = None
    target_framing: Framing | None = None
    appearance: AppearanceInputs | None = None  # MCLD: the kept person's texture map and face identity


@dataclass
class PersonMask:
    person: Image.Image  # 768×1024 RGB
    mask: Image.Image  # 768×1024 L, 255 = generate
    parsing: Parsing
    keypoints: np.ndarray  # (18, 2) in pixels of the 384×512 person
    pose_image: Image.Image  # keypoints drawn on the 384×512 person
    framing: Framing | None = None  # the photo and the box of it that ``person`` shows (None: not kept)


@dataclass
class _Results:
    parsing: Parsing | None
    keypoints: np.ndarray | None
    densepose: list[DensePoseInstance] | None


def image_key(img: Image.Image) -> str:
    return hashlib.blake2b(img.tobytes() + repr((img.mode, img.size)).encode(), digest_size=16).hexdigest()


class Preprocessor:
    """Parsing + OpenPose + DensePose (and, for MCLD, DensePose R101, the texture map's regions and
    the face embedder), lazily built from the given factories."""

    def __init__(self, parser: Callable[[], HumanParser], pose: Callable[[], OpenPoseDetector],
                 densepose: Callable[[], DensePoseBackend], cache_size: int = 32, *,
                 densepose_r101: Callable[[], DensePoseBackend] | None = None,
                 texture_regions: Callable[[], np.ndarray] | None = None,
                 face: Callable[[], FaceBackend] | None = None):
        self._factories = {"parser": parser, "pose": pose, "densepose": densepose,
                           "densepose_r101": densepose_r101, "texture_regions": texture_regions, "face": face}
        self._models: dict[str, object] = {}
        self._cache: OrderedDict[tuple, _Results] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.RLock()

    @classmethod
    def from_checkpoints(cls, root: str | Path | None = None, device: str = "cpu",
                         revision: str | None = None) -> Preprocessor:
        """Models from the checkpoint folder / the Hub, each fetched on first use only."""
        from weightfiles.hub import resolve_files

        def files(analysis: Analysis) -> list[Path]:
            return resolve_files(analysis.files, root, revision)

        def parser():
            return HumanParser.from_files(*files(Analysis.PARSING), providers=_providers(device))

        def pose():
            return OpenPoseDetector.from_file(files(Analysis.KEYPOINTS)[0], device)

        def densepose():  # the .pkl, or its local .safetensors conversion (preprocess/weights.py)
            return DensePoseRCNN.from_checkpoint(files(Analysis.DENSEPOSE)[0], device)

        def densepose_r101():  # MCLD's R101-FPN-DL as MCLD runs it (score threshold 0.05, the best person)
            return mcld_densepose(files(Analysis.DENSEPOSE_R101)[0], device)

        def texture_regions():
            from preprocess.texture import part_regions

            return part_regions(files(Analysis.TEXTURE)[0])

        def face():
            from preprocess.face import FaceEmbedder

            return FaceEmbedder.from_files(*files(Analysis.FACE), providers=_providers(device))

        return cls(parser, pose, densepose, densepose_r101=densepose_r101, texture_regions=texture_regions, face=face)

    def _model(self, name: str):
        with self._lock:
            if name not in self._models:
                if self._factories[name] is None:
                    raise RuntimeError(f"this preprocessor was built without the {name} model")
                self._models[name] = self._factories[name]()
            return self._models[name]

    def _part(self, person: Image.Image, key: str, part: Analysis):
        """One analysis of a photo, cached by content."""
        with self._lock:
            if (key, part) in self._cache:
                self._cache.move_to_end((key, part))
                return self._cache[(key, part)]
        if part is Analysis.DENSEPOSE:
            result = self._model("densepose")(np.asarray(person))  # at 768×1024
        elif part is Analysis.DENSEPOSE_R101:
            result = self._model("densepose_r101")(np.asarray(person))
        elif part is Analysis.FACE:
            result = self._model("face").embed(np.asarray(person))
        else:
            small = person.resize(PARSE_SIZE, Image.Resampling.BICUBIC)
            result = (self._model("parser")(small) if part is Analysis.PARSING
                      else self._model("pose")(np.asarray(small)))
        with self._lock:
            self._cache[(key, part)] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result

    def _analyse(self, person: Image.Image, parts: tuple[Analysis, ...]) -> _Results:
        """Parsing/keypoints at 384×512 and DensePose at 768×1024, each cached per photo."""
        key = image_key(person)
        got = {part: self._part(person, key, part) for part in parts}
        return _Results(got.get(Analysis.PARSING), got.get(Analysis.KEYPOINTS), got.get(Analysis.DENSEPOSE))

    def people(self, photo: Image.Image, analysis: Analysis = Analysis.DENSEPOSE) -> list[Box]:
        """The people in ``photo``, as boxes in its pixels: the detections of ``analysis`` (a
        DensePose model: the one the request's model needs anyway) on a first low-resolution look
        (the photo fitted onto the canvas; cached like every analysis)."""
        look = fit_to_canvas(photo)
        (nw, nh), (cx, cy) = canvas_placement(photo.size)
        sx, sy = photo.width / nw, photo.height / nh
        from preprocess.openpose import NoPersonError

        try:
            instances = self._part(look, image_key(look), analysis)
        except NoPersonError:  # a backend that says so itself (the stand-ins): nobody is an answer here
            return []
        boxes = []
        for instance in instances:
            x, y, w, h = instance.box
            boxes.append(Box(max(0, math.floor((x - cx) * sx)), max(0, math.floor((y - cy) * sy)),
                             min(photo.width, math.ceil((x + w - cx) * sx)), min(photo.height, math.ceil((y + h - cy) * sy))))
        return [b for b in boxes if b.width > 0 and b.height > 0]

    def person_mask(self, person: ImageSource, model_type: str | TryOnModel, garment_type: str | GarmentType,
                    *, keep_fixed_regions: bool = False) -> PersonMask:
        """The try-on mask of a person photo, with what it was computed from."""
        variant = enum_option(TryOnModel, model_type, "model type")
        garment_type = enum_option(GarmentType, garment_type, "garment type")
        person_img = fit_to_canvas(load_image(person, name="person image"))
        a = self._analyse(person_img, (Analysis.PARSING, Analysis.KEYPOINTS))
        mask = agnostic_mask(a.parsing.labels, a.keypoints, garment_type, variant,
                             keep_fixed_regions=keep_fixed_regions)
        mask_img = binarize(Image.fromarray(mask).resize(MODEL_SIZE, Image.Resampling.BICUBIC))
        small = person_img.resize(PARSE_SIZE, Image.Resampling.BICUBIC)
        return PersonMask(person_img, mask_img, a.parsing, a.keypoints, draw_keypoints(small, a.keypoints))

    def tryon(self, person: ImageSource, garment: ImageSource, model_type: str | TryOnModel,
              garment_type: str | GarmentType, preprocess_garment: bool = False, *,
              densepose: ImageSource | None = None, keep_fixed_regions: bool = False) -> TryOnInputs:
        """Everything a try-on needs. ``densepose``: a ready DensePose image (skips the backend)."""
        variant = enum_option(TryOnModel, model_type, "model type")
        pm = self.person_mask(person, variant, garment_type, keep_fixed_regions=keep_fixed_regions)
        garment_img = load_garment(garment, cut_out=preprocess_garment)
        if densepose is not None:
            dp_img = load_label_image(densepose, "DensePose image")
        else:
            dp_img = variant.render_densepose(self._analyse(pm.person, (Analysis.DENSEPOSE,)).densepose, MODEL_SIZE)
        return TryOnInputs(pm.person, garment_img, pm.mask, dp_img, pm.parsing.image, pm.keypoints, pm.pose_image)

    def pose(self, reference: ImageSource, target: ImageSource, *,
             densepose: ImageSource | None = None) -> PoseInputs:
        """Pose transfer: keep ``reference``'s appearance, take ``target``'s pose."""
        ref_img = fit_to_canvas(load_image(reference, name="person image"))
        tgt_img = fit_to_canvas(load_image(target, name="target-pose image"))
        if densepose is not None:
            dp_img = load_label_image(densepose, "DensePose image")
        else:
            instances = self._analyse(tgt_img, (Analysis.DENSEPOSE,)).densepose
            if not instances:
                from preprocess.openpose import NoPersonError

                raise NoPersonError("no person detected in the target-pose photo")
            dp_img = render_iuv(instances, MODEL_SIZE)
        return PoseInputs(ref_img, tgt_img, Image.new("L", MODEL_SIZE, 255), dp_img)

    def _people_r101(self, picture: Image.Image, what: str) -> list[DensePoseInstance]:
        """MCLD's DensePose (R101-FPN-DL) of ``picture``, best first; ``NoPersonError`` for nobody."""
        from preprocess.openpose import NoPersonError

        try:
            instances = self._part(picture, image_key(picture), Analysis.DENSEPOSE_R101)
        except NoPersonError:  # a backend that says so itself (the stand-ins)
            instances = []
        if not instances:
            raise NoPersonError(f"no person detected in the {what}: use a photo of one person, whole or from the "
                                "waist up")
        return instances

    def appearance_pose(self, reference: ImageSource, target: ImageSource | None, *,
                        densepose: ImageSource | None = None, size: tuple[int, int] = PICTURE) -> PoseInputs:
        """MCLD's pose transfer: ``target``'s pose as an IUV image (or ``densepose``, an IUV image in
        their files' format), ``reference``'s texture map and face identity; both photos fitted
        onto ``size`` (framed already, or whole)."""
        from preprocess.texture import texture_map

        ref_img = fit_to_canvas(load_image(reference, name="person image"), size)
        tgt_img = (Image.new("RGB", size, WHITE) if target is None
                   else fit_to_canvas(load_image(target, name="target-pose image"), size))
        if densepose is not None:
            dp_img = load_label_image(densepose, "DensePose image", size)
        else:
            dp_img = iuv_pose_rgb(self._people_r101(tgt_img, "target-pose photo"), size[1], size[0])
        iuv = iuv_image(self._people_r101(ref_img, "person photo"), size[1], size[0])
        texture = texture_map(np.asarray(ref_img), iuv, self._model("texture_regions"))
        face = self._part(ref_img, image_key(ref_img), Analysis.FACE)
        appearance = AppearanceInputs(Image.fromarray(texture), face.embedding, face.box)
        return PoseInputs(ref_img, tgt_img, Image.new("L", size, 255), dp_img, appearance=appearance)


def _providers(device: str) -> list[str]:
    """onnxruntime's execution providers for ``device``."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
