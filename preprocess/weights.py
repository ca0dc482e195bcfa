"""The published weight files of the photo analyses (the Hub repo ``franciszzj/Leffa``'s layout;
sizes as published, for messages). Torch-free: the registry and ``leffa check`` read them."""

from __future__ import annotations

from enum import Enum

from preprocess.face_files import ANTELOPEV2
from weightfiles.manifest import MB, HubFile

REPO = "franciszzj/Leffa"  # the Leffa authors publish the preprocessing models beside theirs


class Analysis(str, Enum):
    """What preprocessing computes from a person photo, each from its own model."""

    PARSING = "parsing"  # SCHP human parsing (ATR + LIP) at 384×512: the try-on mask
    KEYPOINTS = "keypoints"  # OpenPose body keypoints at 384×512: the try-on mask
    DENSEPOSE = "densepose"  # DensePose R-CNN R50-FPN at 768×1024 (Leffa)
    DENSEPOSE_R101 = "densepose-r101"  # DensePose R-CNN R101-FPN-DL (MCLD): the target pose and the texture map
    TEXTURE = "texture"  # the texture map of the kept person, from its DensePose R101 (MCLD)
    FACE = "face"  # antelopev2 face detection + ArcFace identity embedding (MCLD)

    @property
    def files(self) -> tuple[HubFile, ...]:
        return ANALYSIS_FILES[self]


ANALYSIS_FILES = {
    Analysis.PARSING: (HubFile(REPO, "humanparsing/parsing_atr.onnx", 255 * MB),
                       HubFile(REPO, "humanparsing/parsing_lip.onnx", 255 * MB)),
    Analysis.KEYPOINTS: (HubFile(REPO, "openpose/body_pose_model.pth", 200 * MB),),
    # the .pkl, or its local conversion (python -m preprocess.densepose convert)
    Analysis.DENSEPOSE: (HubFile(REPO, "densepose/model_final_162be9.pkl", 255 * MB,
                                 conversion="densepose/model_final_162be9.safetensors"),),
}
# MCLD's DensePose model (detectron2's model zoo; not on the Hub). The model zoo publishes no checksum
# (its file names hold an MD5 prefix); the strict loader checks every name and shape. Size estimated
# from the architecture's parameters.
DENSEPOSE_R101_URL = "https://dl.fbaipublicfiles.com/densepose/densepose_rcnn_R_101_FPN_DL_s1x/165712116/model_final_844d15.pkl"
ANALYSIS_FILES[Analysis.DENSEPOSE_R101] = (
    HubFile("detectron2 model zoo", "densepose/model_final_844d15.pkl", 341 * MB,
            conversion="densepose/model_final_844d15.safetensors", url=DENSEPOSE_R101_URL),)
# MCLD's atlas regions (preprocess.texture): data of their repository, which has no licence, so fetched
# from it at a fixed commit and checked
MCLD_COMMIT = "6279ff7c601c11dff5e075410ed34df2973da088"
ANALYSIS_FILES[Analysis.TEXTURE] = (
    HubFile("github.com/jqliu09/MCLD", "mcld/texture_bg_200.png", 33138,
            url=f"https://raw.githubusercontent.com/jqliu09/MCLD/{MCLD_COMMIT}/preprocess_data/texture_bg_200.png",
            sha256="fc221ee00aa0886ca417a7486072da5c73332cdd522dc9e9a42e39799e4ed322"),)
ANALYSIS_FILES[Analysis.FACE] = ANTELOPEV2.files
MASK_ANALYSES = (Analysis.PARSING, Analysis.KEYPOINTS)  # what the try-on mask is computed from


def analysis_files(analyses) -> list[HubFile]:
    """The files of ``analyses``, in order, each once."""
    return list(dict.fromkeys(f for a in analyses for f in a.files))
