"""Reading DensePose weights: detectron2's model-zoo ``.pkl`` without running pickle's code, or a
``.safetensors`` conversion of it; strict name and shape checks.

A model-zoo file is ``pickle.dump({"model": {name: numpy array}, "__author__": ...})``, written by
Python 3 with numpy 1.x (its arrays name ``numpy.core.multiarray._reconstruct``). ``read_pkl``
unpickles with an allow-list of exactly what such a file needs (numpy array, dtype and scalar
reconstruction, and ``_codecs.encode`` with latin-1 for protocol-2 bytes); any other global is
refused before it is imported or called.
"""

from __future__ import annotations

import argparse
import codecs
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from preprocess.densepose.backbone import RESNET_BLOCKS
from preprocess.densepose.heads import DensePoseHeadKind
from preprocess.densepose.model import RCNNConfig
from weightfiles.checkpoint import CheckpointError, check_state_dict, unreadable

try:  # numpy ≥ 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray

# detectron2 buffers that older checkpoints carry but this model computes itself: allowed in a
# file only if they hold exactly the values the model uses
DERIVED_BUFFERS = ("pixel_mean", "pixel_std", "proposal_generator.anchor_generator.cell_anchors.")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; only the latin-1 codec."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refused: _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_ALLOWED = {
    **{(module, "_reconstruct"): _multiarray._reconstruct
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _multiarray.scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: not part of a weights file") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: not part of a weights file")


def read_pkl(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``model`` dict of a detectron2 ``.pkl`` as float tensors, executing nothing else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, UnicodeDecodeError, LookupError) as e:
        raise unreadable(path, "the DensePose weights", e, "a detectron2 weights file") from None
    state = data.get("model") if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a detectron2 weights file (expected a dict with a 'model' dict)")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, np.ndarray)
                                                 and v.dtype.kind in "fiu")]
    if bad:
        raise CheckpointError(f"{path}: entries that are not numeric arrays: {', '.join(map(str, bad[:5]))}")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.pkl`` (detectron2) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"DensePose weights not found: {path}")
    if path.suffix.lower() == ".pkl":
        return read_pkl(path)
    if path.suffix.lower() == ".safetensors":
        from weightfiles.checkpoint import load_state_dict_file

        return load_state_dict_file(path)
    raise CheckpointError(f"{path}: unsupported DensePose weights format {path.suffix!r} (use .pkl or .safetensors)")


# the published chart models this package runs (detectron2's DensePose model zoo)
R50_FPN_S1X_PATH = "densepose/model_final_162be9.pkl"
R101_FPN_DL_S1X_URL = ("https://dl.fbaipublicfiles.com/densepose/densepose_rcnn_R_101_FPN_DL_s1x/165712116/"
                       "model_final_844d15.pkl")
R101_FPN_DL_S1X_PATH = "densepose/model_final_844d15.pkl"
# float32 parameters and buffers of the architecture (4 bytes each, 85_206_562 values) plus the
# pickle's framing: an estimate, not the published file's measured size (whose extra entries,
# if any, the strict loader would refuse)
R101_FPN_DL_S1X_APPROX_BYTES = 340_900_000
# detectron2's model-zoo names end in the first 6 hex digits of the file's MD5 (MODEL_ZOO.md:
# "any model on this page contains its md5 prefix in its file name"): 844d15
R101_FPN_DL_S1X_MD5_PREFIX = "844d15"

_RES4 = "backbone.bottom_up.res4."
_ASPP = "roi_heads.densepose_head.ASPP."


def config_from_state(state: dict[str, torch.Tensor], path: str | Path = "") -> RCNNConfig:
    """The architecture of a DensePose R-CNN state dict: ResNet depth from the number of res4
    blocks (6: R50, 23: R101), the DensePose head from its ASPP entries (DeepLab) or their
    absence (ConvX). Anything else is a ``CheckpointError`` naming ``path``."""
    blocks = {int(k[len(_RES4):].split(".", 1)[0]) for k in state if k.startswith(_RES4)}
    depth = next((d for d, b in RESNET_BLOCKS.items() if blocks == set(range(b[2]))), None)
    if depth is None:
        found = f"{len(blocks)} res4 blocks" if blocks else f"no {_RES4}* entries"
        raise CheckpointError(f"{path}: not a DensePose R-CNN R50/R101-FPN weights file ({found}; "
                              f"R50 has {RESNET_BLOCKS[50][2]}, R101 {RESNET_BLOCKS[101][2]})")
    head = DensePoseHeadKind.DEEPLAB if any(k.startswith(_ASPP) for k in state) else DensePoseHeadKind.CONV_X
    return RCNNConfig(depth=depth, dp_head=head)


def _expected_derived(model: nn.Module) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    out = {"pixel_mean": torch.tensor(cfg.pixel_mean).view(3, 1, 1),
           "pixel_std": torch.tensor(cfg.pixel_std).view(3, 1, 1)}
    for i, cell in enumerate(model.proposal_generator._cells):
        out[f"{DERIVED_BUFFERS[2]}{i}"] = cell
    return out


def checked_state(state: dict[str, torch.Tensor], model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """``state`` (read from ``path``) checked against ``model``: every name present, none
    unknown, every shape equal (a ``CheckpointError`` names the file and the first offenders).
    Values are cast to float32; derived buffers of older detectron2 versions are checked, then
    dropped."""
    state = dict(state)
    derived = _expected_derived(model)
    for name in [k for k in state if k.startswith(DERIVED_BUFFERS)]:
        value = state.pop(name)
        want = derived.get(name)
        if want is None or value.shape != want.shape or not torch.allclose(value.float(), want, atol=1e-3):
            raise CheckpointError(f"{path}: {name} does not hold the values of DensePose {model.cfg.name}")
    expected = model.state_dict()
    check_state_dict(expected, state, path)
    return {k: state[k].to(torch.float32) for k in expected}


def load_weights(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights for ``model`` from ``path``, checked (``checked_state``)."""
    return checked_state(read_weights(path), model, path)


def convert(src: str | Path, dst: str | Path | None = None) -> Path:
    """Check ``src`` (a ``.pkl``) against the model it describes and write it as ``.safetensors``,
    atomically."""
    from safetensors.torch import save_file

    from preprocess.densepose.model import DensePoseRCNN

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    state = read_weights(src)
    with torch.device("meta"):
        model = DensePoseRCNN(config_from_state(state, src))
    state = {k: v.contiguous() for k, v in checked_state(state, model, src).items()}
    tmp = dst.with_name(dst.name + ".partial")
    try:
        save_file(state, str(tmp), metadata={"source": src.name, "format": "pt"})
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preprocess.densepose",
                                     description="DensePose weights tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="check a detectron2 .pkl and write it as .safetensors "
                                       "(later loads then skip the pickle)")
    c.add_argument("pkl", type=Path, help="e.g. ckpts/densepose/model_final_162be9.pkl (R50-FPN) or "
                                          "model_final_844d15.pkl (R101-FPN-DL)")
    c.add_argument("--out", type=Path, default=None, help="default: the same path with .safetensors")
    args = parser.parse_args(argv)
    try:
        out = convert(args.pkl, args.out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
