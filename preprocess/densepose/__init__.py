"""DensePose (spec §5): DensePose R-CNN R50-FPN s1x in plain PyTorch and the renderings the
published Leffa models were fed.

- ``render.py``: ``DensePoseInstance`` (box, part labels, U/V) and the three renderings;
- ``model.py``: the network and its inference steps (``DensePoseRCNN``);
- ``ops.py``: anchors, box decoding, NMS, ROIAlign;
- ``extract.py``: head outputs -> per-person labels and U/V in image pixels;
- ``weights.py``: the published ``.pkl`` (restricted unpickling) or ``.safetensors``, strictly.
"""

from preprocess.densepose.render import (NUM_PARTS, DensePoseBackend, DensePoseInstance, part_colours, render_iuv,
                                         render_labels, render_segmentation)

__all__ = ["NUM_PARTS", "DensePoseBackend", "DensePoseInstance", "DensePoseRCNN", "RCNNConfig", "part_colours",
           "render_iuv", "render_labels", "render_segmentation"]


def __getattr__(name: str):
    """The network needs torch: ``DensePoseRCNN`` and ``RCNNConfig`` import it on first use."""
    if name not in ("DensePoseRCNN", "RCNNConfig"):
        raise AttributeError(f"module 'preprocess.densepose' has no attribute {name!r}")
    from preprocess.densepose import model

    return getattr(model, name)
