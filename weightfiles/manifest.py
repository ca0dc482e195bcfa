"""Which published files each part of the system uses, and which a task needs (the Hub repo
``franciszzj/Leffa``'s layout; sizes as published, for messages only).

``Component`` names the files of one model (the parsers, OpenPose, DensePose, each Leffa
model); ``WeightSet`` groups them by task for ``leffa download`` and the start-up report.
"""

from __future__ import annotations

from enum import Enum

MB, GB = 1000**2, 1000**3


class Component(Enum):
    """The models whose weights are published; values are their files in the Hub repo."""

    PARSING = ("humanparsing/parsing_atr.onnx", "humanparsing/parsing_lip.onnx")  # SCHP human parsers
    OPENPOSE = ("openpose/body_pose_model.pth",)
    DENSEPOSE = ("densepose/model_final_162be9.pkl",)
    VITON_HD = ("virtual_tryon.pth",)  # Leffa try-on, VITON-HD
    DRESS_CODE = ("virtual_tryon_dc.pth",)  # Leffa try-on, DressCode
    POSE_TRANSFER = ("pose_transfer.pth",)  # Leffa pose transfer, SDXL-sized

    @property
    def files(self) -> tuple[str, ...]:
        return self.value


PUBLISHED_SIZES = {
    "humanparsing/parsing_atr.onnx": 255 * MB,
    "humanparsing/parsing_lip.onnx": 255 * MB,
    "openpose/body_pose_model.pth": 200 * MB,
    "densepose/model_final_162be9.pkl": 255 * MB,
    "virtual_tryon.pth": int(7.2 * GB),
    "virtual_tryon_dc.pth": int(7.2 * GB),
    "pose_transfer.pth": int(20.9 * GB),
}

# published files that may be replaced by a local conversion (``python -m preprocess.densepose convert``)
CONVERSIONS = {"densepose/model_final_162be9.pkl": "densepose/model_final_162be9.safetensors"}



def components_for(model: Component, *, compute_mask: bool, compute_densepose: bool) -> tuple[Component, ...]:
    """What a generation with the Leffa ``model`` needs: the parsers and OpenPose when the
    try-on mask is computed, DensePose when the DensePose image is computed, and the model."""
    return ((Component.PARSING, Component.OPENPOSE) if compute_mask else ()) \
        + ((Component.DENSEPOSE,) if compute_densepose else ()) + (model,)


class WeightSet(str, Enum):
    """What ``leffa download`` fetches: the files one task needs from two photos, or all."""

    TRYON = "tryon"  # VITON-HD try-on: parsing, OpenPose, DensePose and its Leffa model
    TRYON_DC = "tryon-dc"  # DressCode try-on
    POSE = "pose"  # pose transfer: DensePose and its Leffa model
    ALL = "all"

    @property
    def components(self) -> tuple[Component, ...]:
        if self is WeightSet.ALL:
            return tuple(Component)
        if self is WeightSet.POSE:
            return components_for(Component.POSE_TRANSFER, compute_mask=False, compute_densepose=True)
        model = Component.VITON_HD if self is WeightSet.TRYON else Component.DRESS_CODE
        return components_for(model, compute_mask=True, compute_densepose=True)


def files_of(components) -> list[str]:
    """The files of ``components``, in order, each once."""
    return list(dict.fromkeys(f for c in components for f in c.files))


def human_size(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / MB:.0f} MB"


def download_size(files) -> str:
    """About how much downloading ``files`` (paths in the Hub repo) takes, for messages."""
    return human_size(sum(PUBLISHED_SIZES.get(f, 0) for f in files))
