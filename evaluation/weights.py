"""The published weight files of the evaluation networks, and their strict loader.

Each file is used exactly as its tool publishes it (URL, file name, SHA-256 as published; the
torchvision and pytorch-fid names carry the first 8 hex digits of that SHA-256, torch.hub's
convention):

- ``pt_inception-2015-12-05-6726825d.pth``: pytorch-fid's port of TensorFlow's 2015-12-05
  Inception-v3 (``FID_WEIGHTS_URL`` in pytorch-fid's ``inception.py``);
- ``squeezenet1_1-b8a52dc0.pth`` / ``alexnet-owt-7be5be79.pth``: torchvision's ImageNet weights
  (``SqueezeNet1_1_Weights`` / ``AlexNet_Weights.IMAGENET1K_V1``), the LPIPS backbones;
- ``squeeze.pth`` / ``alex.pth``: LPIPS v0.1's linear layers (richzhang/PerceptualSimilarity
  ``lpips/weights/v0.1/``, the same bytes that the lpips and torchmetrics packages ship).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from weightfiles.checkpoint import REDOWNLOAD, CheckpointError, check_state_dict, load_state_dict_file
from weightfiles.urls import UrlFile

_LPIPS_V01 = ("https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/"
              "c33f89e9f46522a584cf41d8880eb0afa982708b/lpips/weights/v0.1/")  # last commit that changed them

INCEPTION = UrlFile(
    "pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", 95_628_359)
SQUEEZENET = UrlFile(
    "squeezenet1_1-b8a52dc0.pth", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
    "b8a52dc049b60e4b6ab68ad0df457362afab8b6304b2febdc1650a5dab4d7e7b", 4_958_839)
ALEXNET = UrlFile(
    "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02", 244_408_911)
LPIPS_SQUEEZE = UrlFile(
    "squeeze.pth", _LPIPS_V01 + "squeeze.pth",
    "4a5350f23600cb79923ce65bb07cbf57dca461329894153e05a1346bd531cf76", 10_811)
LPIPS_ALEX = UrlFile(
    "alex.pth", _LPIPS_V01 + "alex.pth",
    "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0", 6_009)

# batch-norm step counters: in a file or not depending on the torch that saved it; unused at inference
OPTIONAL_SUFFIX = ".num_batches_tracked"
REFETCH = "delete it and evaluate again: the published file is downloaded again, with its checksum"


def published_shapes(module: nn.Module, unused: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Size]:
    """Every entry of the published file: the module's own, plus the ``unused`` ones (a
    classifier head the metric does not run), without the optional counters."""
    own = {k: v.shape for k, v in module.state_dict().items() if not k.endswith(OPTIONAL_SUFFIX)}
    return {**own, **{k: torch.Size(s) for k, s in unused.items()}}


def load_published(module: nn.Module, path: str | Path,
                   unused: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Load ``path`` into ``module`` strictly: the names and shapes of the published file, no
    more, no fewer (``CheckpointError`` naming the file otherwise). The ``unused`` entries are
    checked and then dropped."""
    unused = unused or {}
    expected = published_shapes(module, unused)
    try:
        state = {k: v for k, v in load_state_dict_file(path).items() if not k.endswith(OPTIONAL_SUFFIX)}
        check_state_dict({k: torch.empty(s, device="meta") for k, s in expected.items()}, state, path)
    except CheckpointError as e:  # the advice for these files, not for the Leffa checkpoints
        text = str(e)
        raise CheckpointError(text.replace(REDOWNLOAD, REFETCH) if REDOWNLOAD in text else f"{text}; {REFETCH}") \
            from None
    own = {k: v.float() for k, v in state.items() if k not in unused}
    missing, unexpected = module.load_state_dict(own, strict=False)
    assert not unexpected and all(k.endswith(OPTIONAL_SUFFIX) for k in missing), (missing, unexpected)
