"""The published weight files of the photo analyses (the Hub repo ``franciszzj/Leffa``'s layout;
sizes as published, for messages). Torch-free: the registry and ``leffa check`` read them."""

from __future__ import annotations

from enum import Enum

from weightfiles.manifest import MB, HubFile

REPO = "franciszzj/Leffa"  # the Leffa authors publish the preprocessing models beside theirs


class Analysis(str, Enum):
    """What preprocessing computes from a person photo, each from its own model."""

    PARSING = "parsing"  # SCHP human parsing (ATR + LIP) at 384×512: the try-on mask
    KEYPOINTS = "keypoints"  # OpenPose body keypoints at 384×512: the try-on mask
    DENSEPOSE = "densepose"  # DensePose R-CNN at 768×1024

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
MASK_ANALYSES = (Analysis.PARSING, Analysis.KEYPOINTS)  # what the try-on mask is computed from


def analysis_files(analyses) -> list[HubFile]:
    """The files of ``analyses``, in order, each once."""
    return list(dict.fromkeys(f for a in analyses for f in a.files))
