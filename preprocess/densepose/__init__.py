"""DensePose (spec §5): DensePose R-CNN in plain PyTorch — R50-FPN s1x (Leffa) and R101-FPN-DL
s1x (MCLD) — and the images the published models were fed.

- ``render.py``: ``DensePoseInstance`` (box, part labels, U/V) and Leffa's three renderings;
- ``iuv.py``: MCLD's IUV image of the top person (``iuv_image``, ``iuv_pose_rgb``);
- ``model.py``: the detector and its inference steps (``DensePoseRCNN``, ``RCNNConfig``);
- ``backbone.py``: ResNet-50/101 + FPN; ``heads.py``: the DensePose heads (ConvX, DeepLab);
- ``ops.py``: anchors, box decoding, NMS, ROIAlign;
- ``extract.py``: head outputs -> per-person labels and U/V in image pixels;
- ``weights.py``: the published ``.pkl`` (restricted unpickling) or ``.safetensors``, strictly,
  and the architecture read off the file.
"""

from preprocess.densepose.iuv import MCLD_SCORE_THRESHOLD, iuv_image, iuv_pose_rgb, mcld_densepose, photo_iuv
from preprocess.densepose.render import (
    NUM_PARTS,
    DensePoseBackend,
    DensePoseInstance,
    part_colours,
    render_iuv,
    render_labels,
    render_segmentation,
)

_MODEL_NAMES = ("DensePoseRCNN", "RCNNConfig", "DensePoseHeadKind", "R50_FPN_S1X", "R101_FPN_DL_S1X")

__all__ = ["MCLD_SCORE_THRESHOLD", "NUM_PARTS", "R50_FPN_S1X", "R101_FPN_DL_S1X", "DensePoseBackend",
           "DensePoseHeadKind", "DensePoseInstance", "DensePoseRCNN", "RCNNConfig", "iuv_image", "iuv_pose_rgb",
           "mcld_densepose", "part_colours", "photo_iuv", "render_iuv", "render_labels", "render_segmentation"]


def __getattr__(name: str):
    """The network needs torch: the model's names import it on first use."""
    if name not in _MODEL_NAMES:
        raise AttributeError(f"module 'preprocess.densepose' has no attribute {name!r}")
    from preprocess.densepose import model

    return getattr(model, name)
