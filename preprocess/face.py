"""MCLD's face embedding (Liu et al., CVPR 2025): the raw 512-d ArcFace feature of the largest
face in a photo, zeros when there is none, as insightface's ``FaceAnalysis(name='antelopev2')``
with ``det_size=(640, 640)`` gives it to MCLD's ``prepare_dataset.py`` (``Face.embedding``, not
the normalised one). Re-implemented on onnxruntime, NumPy and OpenCV; insightface's numbers:

- detection (SCRFD): the photo scaled to fit ``det_size`` (W, H) keeping its aspect ratio, at
  the top left of a black canvas; (x − 127.5) / 128 per channel, RGB; per stride 8, 16, 32 and
  2 anchors per cell: scores, box distances (left, top, right, bottom) and 5 keypoint offsets in
  stride units from the cell's corner; scores ≥ 0.5 kept, then greedy NMS at IoU 0.4 (areas +1);
- the largest box (ties: the last one, as Python's stable ``sorted(...)[-1]``);
- alignment: the similarity transform (Umeyama, least squares) from its 5 keypoints to ArcFace's
  112×112 template, ``cv2.warpAffine`` bilinear with black borders;
- recognition (ArcFace): (x − 127.5) / 127.5 per channel, RGB, 112×112 -> 512 float32.

Photos are RGB here (insightface takes BGR and swaps): the networks see the same numbers.
The weight files are declared in ``preprocess/face_files.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from errors import UserError

EMBEDDING_SIZE = 512
CROP = 112  # ArcFace's input side
# the five keypoints (eyes, nose tip, mouth corners) of an aligned 112×112 ArcFace face
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)

DetectorNet = Callable[[np.ndarray], Sequence[np.ndarray]]  # (1, 3, H, W) float32 -> SCRFD's outputs in order
RecognizerNet = Callable[[np.ndarray], np.ndarray]  # (N, 3, 112, 112) float32 -> (N, 512)


class FaceModelError(UserError, RuntimeError):
    """A face model file that is missing, damaged or not the expected kind."""


@dataclass(frozen=True)
class DetectorConfig:
    det_size: tuple[int, int] = (640, 640)  # (W, H) of the detector's input canvas
    score_threshold: float = 0.5
    nms_threshold: float = 0.4


@dataclass(frozen=True)
class Face:
    box: np.ndarray  # (4,) float32 x1, y1, x2, y2 in photo pixels
    score: float
    keypoints: np.ndarray  # (5, 2) float32 x, y: eyes, nose, mouth corners

    @property
    def area(self) -> np.float32:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])  # float32, as insightface sorts


@dataclass(frozen=True)
class FaceResult:
    embedding: np.ndarray  # (512,) float32; zeros when no face was found
    box: tuple[float, float, float, float] | None = None
    keypoints: np.ndarray | None = None  # (5, 2)

    @property
    def found(self) -> bool:
        return self.box is not None


# ---- detection -------------------------------------------------------------------------------

def letterbox(image: np.ndarray, det_size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """(H, W, 3) uint8 -> the (det_H, det_W, 3) canvas and the scale, as SCRFD.detect builds them."""
    width, height = det_size
    ratio = float(image.shape[0]) / image.shape[1]
    if ratio > float(height) / width:
        new_h, new_w = height, int(height / ratio)
    else:
        new_w, new_h = width, int(width * ratio)
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    return canvas, float(new_h) / image.shape[0]


def anchor_centers(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """(height · width · anchors, 2) float32 x, y of the cells' top-left corners, row-major."""
    ys, xs = np.mgrid[:height, :width]
    centers = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
    return np.repeat(centers, anchors, axis=0)


def layout(n_outputs: int) -> tuple[tuple[int, ...], int]:
    """The strides and anchors per cell of an SCRFD model with keypoints, from its output count."""
    if n_outputs == 9:
        return (8, 16, 32), 2
    if n_outputs == 15:
        return (8, 16, 32, 64, 128), 1
    raise FaceModelError(f"the face detector has {n_outputs} outputs; an SCRFD model with keypoints has "
                         "9 or 15 (e.g. antelopev2's scrfd_10g_bnkps.onnx)")


def decode(outputs: Sequence[np.ndarray], canvas_hw: tuple[int, int], threshold: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SCRFD's outputs -> scores (N, 1), boxes (N, 4) and keypoints (N, 5, 2) on the canvas,
    the anchors with score ≥ ``threshold``, stride by stride."""
    strides, anchors = layout(len(outputs))
    outputs = [o[0] if o.ndim == 3 else o for o in outputs]  # batched exports: (1, K, C)
    n = len(strides)
    scores, boxes, points = [], [], []
    for i, stride in enumerate(strides):
        score, dist, kps = outputs[i], outputs[i + n] * stride, outputs[i + 2 * n] * stride
        centers = anchor_centers(canvas_hw[0] // stride, canvas_hw[1] // stride, stride, anchors)
        keep = np.where(score >= threshold)[0]
        box = np.concatenate([centers - dist[:, :2], centers + dist[:, 2:4]], axis=1)
        scores.append(score[keep])
        boxes.append(box[keep])
        points.append((np.tile(centers, 5) + kps).reshape(-1, 5, 2)[keep])
    return np.vstack(scores), np.vstack(boxes), np.vstack(points)


def nms(dets: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS on (N, 5) x1, y1, x2, y2, score; insightface's +1 pixel areas."""
    x1, y1, x2, y2, score = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = score.argsort()[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = w * h / (areas[i] + areas[rest] - w * h)
        order = rest[overlap <= threshold]
    return keep


def detector_input(canvas: np.ndarray, mean: float = 127.5, std: float = 128.0) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 (x − mean) / std, as cv2.dnn.blobFromImage."""
    size = (canvas.shape[1], canvas.shape[0])
    return cv2.dnn.blobFromImage(canvas, 1.0 / std, size, (mean,) * 3, swapRB=False)


def detect_faces(image: np.ndarray, net: DetectorNet,
                 config: DetectorConfig = DetectorConfig()) -> list[Face]:
    """The faces in an (H, W, 3) uint8 RGB photo, in insightface's order (NMS's, by score)."""
    canvas, scale = letterbox(image, config.det_size)
    scores, boxes, points = decode(net(detector_input(canvas)), canvas.shape[:2], config.score_threshold)
    order = scores.ravel().argsort()[::-1]
    dets = np.hstack((boxes / scale, scores)).astype(np.float32, copy=False)[order]
    points = (points / scale)[order]
    keep = nms(dets, config.nms_threshold)
    return [Face(dets[k, :4], float(dets[k, 4]), points[k]) for k in keep]


def largest(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box (the last of equals, as ``sorted(..., key=area)[-1]``)."""
    if not faces:
        return None
    areas = np.array([f.area for f in faces])
    return faces[len(faces) - 1 - int(np.argmax(areas[::-1]))]


# ---- alignment and recognition ---------------------------------------------------------------

def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (3, 3) similarity transform (rotation, uniform scale, translation) taking the points
    ``src`` (N, 2) closest to ``dst`` (N, 2) in least squares (Umeyama, PAMI 1991), computed in
    the points' dtype as scikit-image's ``SimilarityTransform.estimate`` does."""
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n  # (2, 2)
    signs = np.ones(dim)
    if np.linalg.det(cov) < 0:
        signs[-1] = -1
    u, s, vt = np.linalg.svd(cov)
    rank = np.count_nonzero(s > s.max() * dim * np.finfo(float).eps)
    out = np.eye(dim + 1)
    if rank == 0:
        return out * np.nan
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        out[:dim, :dim] = u @ vt
    elif rank == dim - 1:
        out[:dim, :dim] = u @ np.diag(np.r_[signs[:-1], -1.0]) @ vt
    else:
        out[:dim, :dim] = u @ np.diag(signs) @ vt
    scale = 1.0 / src_c.var(axis=0).sum() * (s @ signs)
    out[:dim, dim] = dst_mean - scale * (out[:dim, :dim] @ src_mean.T)
    out[:dim, :dim] *= scale
    return out


def alignment_matrix(keypoints: np.ndarray) -> np.ndarray:
    """(5, 2) keypoints -> the (2, 3) affine map of the photo onto ArcFace's 112×112 crop."""
    return umeyama(keypoints, ARCFACE_TEMPLATE)[:2]


def align(image: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """The (112, 112, 3) aligned face crop (insightface's ``face_align.norm_crop``)."""
    return cv2.warpAffine(image, alignment_matrix(keypoints), (CROP, CROP), borderValue=0.0)


def recognizer_input(crops: Sequence[np.ndarray]) -> np.ndarray:
    """(112, 112, 3) uint8 RGB crops -> (N, 3, 112, 112) float32 (x − 127.5) / 127.5."""
    return cv2.dnn.blobFromImages(list(crops), 1.0 / 127.5, (CROP, CROP), (127.5,) * 3, swapRB=False)


# ---- the embedder ----------------------------------------------------------------------------

def _session(path: str | Path, providers: Sequence[str] | None, role: str):
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors  # its own exception types

    names = ("Fail", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "InvalidArgument", "RuntimeException")
    load_errors = (*(getattr(ort_errors, n) for n in names), OSError)
    path = Path(path)
    if not path.is_file():
        raise FaceModelError(f"the face {role} model {path} does not exist; download it "
                             "(the files: preprocess/face_files.py)")
    try:
        providers = list(providers or ["CPUExecutionProvider"])
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except load_errors as e:
        raise FaceModelError(f"cannot load the face {role} model {path} ({type(e).__name__}: {e}); "
                             "delete it and download it again") from None


@dataclass(frozen=True)
class OnnxNet:
    """An onnxruntime session as a function of its one input, returning every output in order."""

    session: object
    path: str

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.session.get_inputs()[0].name: x})

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(W, H) when the model's input has a fixed size (insightface then ignores det_size)."""
        h, w = self.session.get_inputs()[0].shape[2:4]
        return (w, h) if isinstance(h, int) and isinstance(w, int) else None


class FaceEmbedder:
    """The face embedding of photos: ``embed`` -> ``FaceResult``; calling it -> the (512,)
    embedding or ``None`` without a face (``evaluation``'s ``FaceEmbed``)."""

    def __init__(self, detector: DetectorNet, recognizer: RecognizerNet,
                 config: DetectorConfig = DetectorConfig()):
        self.detector, self.recognizer, self.config = detector, recognizer, config

    @classmethod
    def from_files(cls, detector_path: str | Path, recognizer_path: str | Path,
                   providers: Sequence[str] | None = None,
                   det_size: tuple[int, int] = (640, 640)) -> FaceEmbedder:
        detector = OnnxNet(_session(detector_path, providers, "detector"), str(detector_path))
        recognizer = OnnxNet(_session(recognizer_path, providers, "recognizer"), str(recognizer_path))
        layout(len(detector.session.get_outputs()))  # FaceModelError if it is no keypoint SCRFD
        shape = recognizer.session.get_inputs()[0].shape
        if len(recognizer.session.get_outputs()) != 1 or list(shape[1:]) != [3, CROP, CROP]:
            raise FaceModelError(f"the face recognizer {recognizer_path} is not an ArcFace model "
                                 f"(input (N, 3, 112, 112), one output); its input is {shape}")
        config = DetectorConfig(det_size=detector.fixed_size or tuple(det_size))
        return cls(detector, lambda x: recognizer(x)[0], config)

    def faces(self, image: np.ndarray) -> list[Face]:
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            got = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"a photo is an (H, W, 3) uint8 RGB array; got {got!r}")
        return detect_faces(image, self.detector, self.config)

    def embed(self, image: np.ndarray) -> FaceResult:
        """The raw ArcFace embedding of the largest face of an (H, W, 3) uint8 RGB photo."""
        face = largest(self.faces(image))
        if face is None:
            return FaceResult(np.zeros(EMBEDDING_SIZE, np.float32))
        feature = np.asarray(self.recognizer(recognizer_input([align(image, face.keypoints)])))
        return FaceResult(feature.reshape(-1).astype(np.float32, copy=False),
                          tuple(float(v) for v in face.box), face.keypoints)

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        result = self.embed(image)
        return result.embedding if result.found else None
