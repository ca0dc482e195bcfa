"""DensePose (spec §5): DensePose R-CNN R50-FPN s1x in plain PyTorch and the renderings the
published Leffa models were fed.

- ``render.py``: ``DensePoseInstance`` (box, part labels, U/V) and the three renderings;
- ``model.py``: the network and its inference steps (``DensePoseRCNN``);
- ``ops.py``: anchors, box decoding, NMS, ROIAlign;
- ``extract.py``: head outputs -> per-person labels and U/V in image pixels;
- ``weights.py``: the published ``.pkl`` (restricted unpickling) or ``.safetensors``, strictly.

The names below import their module on first use (the renderings need no torch).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DensePoseRCNN": "preprocess.densepose.model",
    "RCNNConfig": "preprocess.densepose.model",
    **{name: "preprocess.densepose.render" for name in (
        "NUM_PARTS", "DensePoseBackend", "DensePoseInstance", "part_colours", "render_iuv", "render_labels",
        "render_segmentation")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'preprocess.densepose' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
