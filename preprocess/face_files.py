"""The published face-analysis weight files that ``preprocess.face`` runs (torch-free, no model
code: the registry and ``leffa check`` read these). Sizes in bytes as published.

- ``ANTELOPEV2``: insightface's ``antelopev2`` pack (release v0.7, ``antelopev2.zip``), the two of
  its five models that MCLD's face embedding uses: SCRFD-10GF detection with five keypoints and the
  ResNet-100 ArcFace trained on Glint360K. The Hub mirror ``DIAMONIK7777/antelopev2`` (the one
  PuLID downloads; revision ba0c3e10f4548361eb9a63265d87ce1140ab5a05) has them at its root.
- ``BUFFALO_S``: the ``buffalo_s`` pack (SCRFD-500MF, MobileFaceNet on WebFace600K) that MCLD's
  ``evaluate.py`` scores faces with; mirrored under ``buffalo_s/`` in ``deepghs/insightface``.
  Its sizes are approximate (for messages only).
"""

from __future__ import annotations

from dataclasses import dataclass

from weightfiles.manifest import MB, HubFile


@dataclass(frozen=True)
class FacePack:
    """A detector and a recognizer that go together, with the detector's input size (W, H)."""

    detector: HubFile
    recognizer: HubFile
    det_size: tuple[int, int]

    @property
    def files(self) -> tuple[HubFile, HubFile]:
        return self.detector, self.recognizer


ANTELOPEV2_REPO = "DIAMONIK7777/antelopev2"
ANTELOPEV2 = FacePack(HubFile(ANTELOPEV2_REPO, "scrfd_10g_bnkps.onnx", 16_923_827, folder="antelopev2"),
                      HubFile(ANTELOPEV2_REPO, "glintr100.onnx", 260_665_334, folder="antelopev2"),
                      det_size=(640, 640))  # MCLD's prepare_dataset.py: det_size=(640, 640)

BUFFALO_S_REPO = "deepghs/insightface"
BUFFALO_S = FacePack(HubFile(BUFFALO_S_REPO, "buffalo_s/det_500m.onnx", int(2.5 * MB)),
                     HubFile(BUFFALO_S_REPO, "buffalo_s/w600k_mbf.onnx", int(13.6 * MB)),
                     det_size=(512, 352))  # MCLD's evaluate.py: det_size=(512, 352), i.e. W 512, H 352

# by the names ``leffa eval --faces`` takes
FACE_PACKS = {"antelopev2": ANTELOPEV2, "buffalo_s": BUFFALO_S}
