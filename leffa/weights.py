"""The published Leffa models and their weight files (the Hub repo ``franciszzj/Leffa``; sizes
as published, for messages). Torch-free: the engine's registry and ``leffa check`` read them
before anything heavy is imported; ``leffa.hub.load_model`` loads them."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from weightfiles.manifest import GB, HubFile

if TYPE_CHECKING:  # pragma: no cover
    from leffa.model import BaseModel

REPO = "franciszzj/Leffa"


class ModelKind(str, Enum):
    """The three published Leffa models (values: their checkpoint file stems on the Hub)."""

    VITON_HD = "virtual_tryon"  # try-on, VITON-HD (upper body)
    DRESS_CODE = "virtual_tryon_dc"  # try-on, DressCode (upper, lower, dresses)
    POSE_TRANSFER = "pose_transfer"  # DeepFashion, SDXL-sized

    @property
    def file(self) -> HubFile:
        """Its published checkpoint."""
        return CHECKPOINT_FILES[self]

    @property
    def checkpoint(self) -> str:
        return self.file.path

    @property
    def is_sdxl(self) -> bool:
        return self is ModelKind.POSE_TRANSFER

    @property
    def base(self) -> BaseModel:
        """Its base architecture (the shipped config folder its checkpoint fits)."""
        from leffa.model import BaseModel

        return BaseModel.SDXL_INPAINTING if self.is_sdxl else BaseModel.SD15_INPAINTING


CHECKPOINT_FILES = {
    ModelKind.VITON_HD: HubFile(REPO, "virtual_tryon.pth", int(7.2 * GB)),
    ModelKind.DRESS_CODE: HubFile(REPO, "virtual_tryon_dc.pth", int(7.2 * GB)),
    ModelKind.POSE_TRANSFER: HubFile(REPO, "pose_transfer.pth", int(20.9 * GB)),
}
