"""Parity and speed of our plain-PyTorch DensePose R-CNN against detectron2's (the oracle).

Not run by CI: it needs detectron2's Python sources and its DensePose project, which are
never a dependency of this project. Set-up, outside the repository:

    python3 -m venv /work/oracle/venv
    /work/oracle/venv/bin/pip install --isolated torch torchvision fvcore iopath pycocotools omegaconf \
        hydra-core scipy opencv-python-headless pillow numpy safetensors \
        cloudpickle termcolor yacs tabulate tqdm matplotlib packaging av
    # (--isolated: PyPI's default builds, not a local wheel index; the DensePose project
    # imports av and cloudpickle even for inference)
    git clone https://github.com/facebookresearch/detectron2 /work/oracle/detectron2
    # (or, from a bare mirror: git --git-dir=MIRROR archive HEAD | tar -x -C /work/oracle/detectron2)

No build step and no ``pip install`` of detectron2: it runs from its Python sources, the
checkout and its ``projects/DensePose`` on ``PYTHONPATH`` (ROIAlign and NMS come from
torchvision; the C++ extension is not needed for inference). Run it from the repository root
with that venv's python (so ``import preprocess`` works):

    D2=/work/oracle/detectron2
    PYTHONPATH=$D2:$D2/projects/DensePose /work/oracle/venv/bin/python -m benchmarks.parity_densepose --detectron2 $D2
    PYTHONPATH=$D2:$D2/projects/DensePose /work/oracle/venv/bin/python -m benchmarks.parity_densepose --detectron2 $D2 \
        --model r101-dl    # MCLD's DensePose R101-FPN-DL s1x
    PYTHONPATH=$D2:$D2/projects/DensePose /work/oracle/venv/bin/python -m benchmarks.parity_densepose --detectron2 $D2 --bench
    # on a GPU: add --device cuda

What it does:

1. builds detectron2's ``densepose_rcnn_R_50_FPN_s1x`` (``--model r50``, the default) or
   ``densepose_rcnn_R_101_FPN_DL_s1x`` (``--model r101-dl``; score threshold 0.5, CPU) with
   seeded random weights (GroupNorm affine parameters drawn too), calibrated on synthetic images (not the test images) so that
   activations stay O(1) (every FrozenBN gets an image's per-channel statistics; other layers
   are rescaled to unit spread), proposals and detections are large boxes (a planted "FPN
   level" signal), a handful pass the 0.5 threshold with distinct scores, and the part labels
   and U/V are non-trivial;
2. saves them as a detectron2 model-zoo ``.pkl`` (``{"model": {name: float32 ndarray},
   "__author__": ...}``);
3. runs detectron2's ``DefaultPredictor`` + ``DensePoseResultExtractor`` and ours
   (``DensePoseRCNN.from_checkpoint``) on a few images of different sizes, pairs the instances
   by box (each detectron2 box with an unpaired box of ours within 1 px), compares instance
   counts, unpaired instances, paired boxes and scores, the top instance's part labels and U/V,
   the three Leffa renderings and MCLD's IUV image (``preprocess.densepose.iuv_image``), prints
   a Markdown table and exits 1 if a threshold is missed;
4. with ``--bench``: load time, seconds per 768x1024 photo (median after a warm-up) and peak
   RSS of each implementation, each measured in its own subprocess.

``--only-detectron2`` runs the detectron2 half alone (weights, instance counts);
``--reuse-weights`` skips making the ``.pkl`` (about a minute) when it exists;
``--device cuda`` runs both models on the GPU (the weights are still made on the CPU);
``--detections 100`` makes weights that find about 100 people per photo (NMS and ordering
under load: many near-equal scores and overlaps).

On the CPU the two are meant to agree to the bit (score diff 0, every rendering 100 %): ours
convolves in NCHW as detectron2 does (NHWC gives features ~1e-4 off), its ROIAlign repeats
torchvision's float32 arithmetic, and its batched NMS shifts groups apart exactly when
torchvision does. On CUDA, cuDNN's and torchvision's kernels round differently from ours, so
expect score differences of ~1e-6 and, rarely, a swapped near-tie.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # --model: detectron2 config
    "r50": "projects/DensePose/configs/densepose_rcnn_R_50_FPN_s1x.yaml",
    "r101-dl": "projects/DensePose/configs/densepose_rcnn_R_101_FPN_DL_s1x.yaml",
}
SCORE_THRESHOLD = 0.5
BENCH_SIZE = (768, 1024)  # W, H

# thresholds
MAX_BOX_DIFF_PX = 1
MIN_LABELS_EQUAL = 99.0  # %
MAX_UV_DIFF = 0.01  # mean absolute difference over the top instance's pixels


# --------------------------------------------------------------------------- detectron2


def check_detectron2_importable(d2: Path) -> None:
    """detectron2 and its DensePose project must come from ``d2`` (via PYTHONPATH, see above)."""
    try:
        import densepose
        import detectron2
    except ImportError as e:
        sys.exit(f"{e}: put {d2} and {d2 / 'projects' / 'DensePose'} on PYTHONPATH")
    for module, root in ((detectron2, d2), (densepose, d2 / "projects" / "DensePose")):
        if not Path(module.__file__).resolve().is_relative_to(root.resolve()):
            sys.exit(f"{module.__name__} is imported from {module.__file__}, not from {root}")


def detectron2_cfg(d2: Path, weights: str = "", device: str = "cpu", model: str = "r50"):
    from densepose import add_densepose_config
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_densepose_config(cfg)
    cfg.merge_from_file(str(d2 / MODELS[model]))
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = SCORE_THRESHOLD
    cfg.MODEL.DEVICE = device
    return cfg


def detectron2_predictor(d2: Path, weights: Path, device: str = "cpu", model: str = "r50"):
    from detectron2.engine import DefaultPredictor

    return DefaultPredictor(detectron2_cfg(d2, weights, device, model))


@dataclass
class Found:
    """One detected person, in the form of ``preprocess.densepose.DensePoseInstance``."""

    box: tuple[int, int, int, int]
    labels: np.ndarray
    uv: np.ndarray
    score: float


def run_detectron2(predictor, rgb: np.ndarray) -> list[Found]:
    """detectron2's instances in an RGB image, best score first."""
    from densepose.vis.extractor import DensePoseResultExtractor

    with torch.no_grad():
        found = predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["instances"].to("cpu")
    if len(found) == 0:
        return []
    results, boxes_xywh = DensePoseResultExtractor()(found)
    out = []
    for i in found.scores.argsort(descending=True, stable=True).tolist():
        x, y, w, h = (int(v) for v in boxes_xywh[i])
        labels = results[i].labels.numpy().astype(np.uint8)[:h, :w]
        uv = results[i].uv.numpy().astype(np.float32)[:, :h, :w]
        out.append(Found((x, y, w, h), labels, uv, float(found.scores[i])))
    return out


# --------------------------------------------------------------------------- random weights


def _affine_to(module: torch.nn.Module, out: torch.Tensor, std: float, mean: float | None) -> torch.Tensor:
    """Rescale ``module``'s weight and bias so that its output ``out`` gets spread ``std``
    (and mean ``mean`` when given); return the output as the rescaled module would give it."""
    if out.numel() < 2:
        return out
    a = std / max(float(out.std()), 1e-12)
    b = 0.0 if mean is None else mean - a * float(out.mean())
    with torch.no_grad():
        module.weight.mul_(a)
        if module.bias is not None:
            module.bias.mul_(a).add_(b)
    return out * a + b


class Calibration:
    """Forward hooks that set the random model's scales from one image, in one forward pass.

    FrozenBatchNorm2d (pre-hook): running_mean/var := the input's per-channel statistics.
    Other modules (hook): weight, bias scaled so the output has the given spread / mean.
    Each module is calibrated on its first call (the RPN head runs once per FPN level).
    """

    def __init__(self):
        self.handles = []
        self.done = set()

    def frozen_bn(self, bn) -> None:
        def pre_hook(module, args):
            if module in self.done:
                return
            x = args[0]
            module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            module.running_var.copy_(x.var(dim=(0, 2, 3)).clamp_min(1e-6))
            self.done.add(module)

        self.handles.append(bn.register_forward_pre_hook(pre_hook))

    def scale(self, module, std: float = 1.0, mean: float | None = None) -> None:
        def hook(mod, args, out):
            if mod in self.done or out.shape[0] == 0:
                return None
            self.done.add(mod)
            return _affine_to(mod, out, std, mean)

        self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Fresh seeded weights for every parameter; FrozenBN weight/bias drawn too."""
    from detectron2.layers import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if isinstance(mod, FrozenBatchNorm2d):
                n = mod.weight.numel()
                mod.weight.copy_(torch.rand(n, generator=g) * 1.0 + 0.5)  # U(0.5, 1.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
            elif isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) * 1.0 + 0.5)  # U(0.5, 1.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                w = mod.weight  # ConvTranspose2d: (in, out, k, k)
                fan_in = w.shape[0] * w[0, 0].numel() if isinstance(mod, torch.nn.ConvTranspose2d) else w[0].numel()
                w.copy_(torch.randn(w.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)


def _model_inputs(rgb: np.ndarray, cfg) -> list[dict]:
    import detectron2.data.transforms as T

    bgr = rgb[:, :, ::-1]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    img = aug.get_transform(bgr).apply_image(bgr)
    tensor = torch.as_tensor(img.astype("float32").transpose(2, 0, 1))
    return [{"image": tensor, "height": rgb.shape[0], "width": rgb.shape[1]}]


# "Person-like" = large, as in a photo of a person. FPN levels get a constant offset on a few
# channels; the RPN and the box classifier read it, so proposals come mostly from the coarse
# levels (anchors of 128-512 px instead of the 4x more numerous small ones of p2) and boxes
# pooled from p4/p5 (sqrt(area) >= 224 px) score higher. The rest of the scores is random.
LEVEL_CHANNELS = slice(0, 32)
LEVEL_OFFSET = {2: -3.0, 3: -1.0, 4: 1.0, 5: 2.0}
RPN_LEVEL_GAIN = 1.5  # objectness logit per unit of offset
BOX_LEVEL_GAIN = 1.5  # person logit per unit of offset
BOX_RANDOM_SPREAD = 0.7  # std of the person logit's random part
FOREGROUND = 0.6  # share of a box's pixels that the coarse segmentation calls foreground


def _level_prior(model) -> None:
    fpn = model.backbone
    rpn = model.proposal_generator.rpn_head
    rh = model.roi_heads
    n = LEVEL_CHANNELS.stop - LEVEL_CHANNELS.start
    with torch.no_grad():
        for level, offset in LEVEL_OFFSET.items():
            getattr(fpn, f"fpn_output{level}").bias[LEVEL_CHANNELS] += offset
        # RPN conv channel 0 = 5 + the level offset; objectness reads it
        rpn.conv.weight[0].zero_()
        rpn.conv.weight[0, LEVEL_CHANNELS, 1, 1] = 1.0 / n
        rpn.conv.bias[0] = 5.0
        rpn.objectness_logits.weight[:, 0] = RPN_LEVEL_GAIN
        rpn.anchor_deltas.weight[:, 0] = 0.0
        # box head fc1/fc2 unit 0 = 5 + the pooled level offset (input is C x 7 x 7 flattened)
        fc1, fc2 = rh.box_head.fc1, rh.box_head.fc2
        res = 7 * 7  # ROI_BOX_HEAD.POOLER_RESOLUTION ** 2
        fc1.weight[0].zero_()
        fc1.weight[0].view(-1, res)[LEVEL_CHANNELS] = 1.0 / (n * res)
        fc1.bias[0] = 5.0
        fc2.weight[0].zero_()
        fc2.weight[0, 0] = 1.0
        fc2.bias[0] = 0.0
        rh.box_predictor.cls_score.weight[:, 0] = 0.0  # set with the person score below
        rh.box_predictor.bbox_pred.weight[:, 0] = 0.0


def _person_logits(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Person-minus-background logits of the RPN's proposals and the predicted boxes."""
    rh = model.roi_heads
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        feats = [features[f] for f in rh.box_in_features]
        box_features = rh.box_head(rh.box_pooler(feats, [x.proposal_boxes for x in proposals]))
        scores, deltas = rh.box_predictor(box_features)
        boxes = rh.box_predictor.predict_boxes((scores, deltas), proposals)[0]
    return scores[:, 0] - scores[:, 1], boxes


def _detections(diff: torch.Tensor, boxes: torch.Tensor, nms: float) -> int:
    from preprocess.densepose.ops import nms as greedy_nms  # torchvision's definition (tests/test_densepose.py)

    keep = diff > 0
    return len(greedy_nms(boxes[keep], diff[keep], nms)) if keep.any() else 0


def random_detectron2_model(d2: Path, calibration: list[np.ndarray], seed: int, detections: int,
                            which: str = "r50"):
    """detectron2's s1x model ``which`` (a key of ``MODELS``) with seeded random weights
    calibrated on a few images.

    Scales: from ``calibration[0]``. The person score's bias: set so that the median image of
    ``calibration`` gets ``detections`` detections above 0.5 (after NMS).
    """
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model

    cfg = detectron2_cfg(d2, model=which)
    model = build_model(cfg).eval()
    _reinit(model, seed)
    inputs = [_model_inputs(rgb, cfg) for rgb in calibration]
    rh = model.roi_heads
    rpn = model.proposal_generator.rpn_head

    # pass 1: backbone, FPN, RPN, box head
    cal = Calibration()
    for name, mod in model.backbone.named_modules():
        if isinstance(mod, FrozenBatchNorm2d):
            cal.frozen_bn(mod)
        elif name.startswith("fpn_"):
            cal.scale(mod, 1.0)
    cal.scale(rpn.conv, 1.0)
    cal.scale(rpn.objectness_logits, 1.5, 0.0)  # distinct logits, no ties in top-k
    cal.scale(rpn.anchor_deltas, 0.2, 0.0)  # proposals move off the anchors a little
    cal.scale(rh.box_head.fc1, 1.0)
    cal.scale(rh.box_head.fc2, 1.0)
    cal.scale(rh.box_predictor.cls_score, 1.0)
    cal.scale(rh.box_predictor.bbox_pred, 0.5, 0.0)
    with torch.no_grad():
        model.inference(inputs[0], do_postprocess=False)
    cal.remove()
    _level_prior(model)

    # the person score: a random part of spread BOX_RANDOM_SPREAD plus the level prior,
    # shifted so that the median calibration image gets ``detections`` boxes
    nms = cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST
    cls = rh.box_predictor.cls_score
    a = BOX_RANDOM_SPREAD / float(torch.cat([_person_logits(model, x)[0] for x in inputs]).std())
    with torch.no_grad():
        cls.weight.mul_(a)
        cls.bias.mul_(a)
        cls.weight[0, 0] = BOX_LEVEL_GAIN
    found = [_person_logits(model, x) for x in inputs]
    every = torch.cat([d for d, _ in found])
    cuts = torch.linspace(float(every.min()), float(every.max()), 401).tolist()
    counts = [statistics.median(_detections(d - c, b, nms) for d, b in found) for c in cuts]
    cut = min(cuts, key=lambda c: (abs(counts[cuts.index(c)] - detections), c))
    with torch.no_grad():
        cls.bias[0] -= cut

    # pass 2: DensePose decoder, head and predictor on the boxes that now pass
    cal = Calibration()
    for mod in rh.decoder.modules():
        if isinstance(mod, torch.nn.Conv2d):
            cal.scale(mod, 1.0)
    head = rh.densepose_head
    if hasattr(head, "ASPP"):  # DeepLab: GroupNorm after every conv but the projection keeps O(1)
        cal.scale(head.ASPP.project[0], 1.0)
    else:
        for i in range(1, head.n_stacked_convs + 1):
            cal.scale(getattr(head, f"body_conv_fcn{i}"), 1.0)
    pred = rh.densepose_predictor
    cal.scale(pred.ann_index_lowres, 2.0, 0.0)  # coarse segmentation (background, foreground)
    cal.scale(pred.index_uv_lowres, 2.0, 0.0)  # 25 part logits
    cal.scale(pred.u_lowres, 0.2, 0.5)  # U, V mostly in [0, 1]
    cal.scale(pred.v_lowres, 0.2, 0.5)
    coarse = []  # (foreground - background) logits, seen after the rescaling hook
    capture = pred.ann_index_lowres.register_forward_hook(lambda m, a, out: coarse.append(out[:, 1] - out[:, 0]))
    busiest = max(range(len(found)), key=lambda i: _detections(found[i][0] - cut, found[i][1], nms))
    with torch.no_grad():
        if not len(model.inference(inputs[busiest], do_postprocess=False)[0]):
            raise RuntimeError("no detection on the calibration images; raise --detections")
        cal.remove()
        capture.remove()
        # foreground on FOREGROUND of the boxes' pixels, not all of them
        pred.ann_index_lowres.bias[1] -= float(torch.quantile(coarse[0].flatten(), 1.0 - FOREGROUND))
    return model


def save_model_zoo_pkl(model: torch.nn.Module, path: Path) -> None:
    """The published detectron2 model-zoo format: numpy float32 arrays under "model"."""
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        # protocol 2, as the published model-zoo files
        pickle.dump({"model": state, "__author__": "benchmarks/parity_densepose.py (seeded random)"}, f, protocol=2)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- images


def blobs(size: tuple[int, int], seed: int, n: int = 14) -> np.ndarray:
    """A synthetic scene: a vertical gradient with coloured ellipses, rectangles and stripes."""
    W, H = size
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, H)[:, None, None]
    base = ((1 - t) * top + t * bottom) * np.ones((1, W, 1))
    img = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(n):
        w, h = rng.integers(W // 10, W // 2), rng.integers(H // 10, H // 2)
        x, y = rng.integers(-w // 4, W - w // 2), rng.integers(-h // 4, H - h // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            d.ellipse([x, y, x + w, y + h], fill=colour)
        elif kind == 1:
            d.rectangle([x, y, x + w, y + h], fill=colour, outline=(0, 0, 0), width=3)
        else:
            for k in range(0, w, 16):
                d.rectangle([x + k, y, x + k + 7, y + h], fill=colour)
    return np.asarray(img)


def test_images() -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8) at 768x1024, 640x480 and 333x517 (W x H)."""
    astronaut = Image.open(REPO / "examples" / "person" / "astronaut.png").convert("RGB")
    mirrored = Image.open(REPO / "examples" / "pose" / "astronaut_mirrored.png").convert("RGB")
    portrait = np.asarray(astronaut.resize((768, 1024), Image.BICUBIC))
    scene = blobs((640, 480), seed=1)
    # the mirrored astronaut pasted into a synthetic scene, odd size
    odd = Image.fromarray(blobs((333, 517), seed=2))
    odd.paste(mirrored.resize((300, 300), Image.BICUBIC), (20, 150))
    return [("astronaut 768x1024", portrait), ("blobs 640x480", scene), ("mixed 333x517", np.asarray(odd))]


def calibration_images() -> list[np.ndarray]:
    """Synthetic scenes with an example garment or person pasted in (not the test images)."""
    out = []
    for size, seed, pasted, where in (((768, 1024), 0, "garment/checked_dress.png", (192, 256, 384, 512)),
                                      ((600, 800), 3, "garment/logo_tee.png", (60, 200, 300, 400)),
                                      ((900, 600), 4, "pose/astronaut_mirrored.png", (450, 100, 400, 400))):
        img = Image.fromarray(blobs(size, seed=seed))
        x, y, w, h = where
        img.paste(Image.open(REPO / "examples" / pasted).convert("RGB").resize((w, h), Image.BICUBIC), (x, y))
        out.append(np.asarray(img))
    return out


# --------------------------------------------------------------------------- comparison


def ours_model(weights: Path, device: str = "cpu"):
    from preprocess.densepose import DensePoseRCNN

    return DensePoseRCNN.from_checkpoint(weights, device=device, score_threshold=SCORE_THRESHOLD)


def as_instances(found: list[Found]):
    from preprocess.densepose import DensePoseInstance

    return [DensePoseInstance(f.box, f.labels, f.uv, f.score) for f in found]


def pair_by_box(ref: list, ours: list, tol: int = MAX_BOX_DIFF_PX) -> list[tuple[int, int]]:
    """(i, j) pairs: each ``ref[i]``, best first, with the best-scoring unpaired ``ours[j]`` whose
    integer box is within ``tol`` px. Pairing by rank instead would call two detections whose
    scores differ by less than the two implementations' rounding "different boxes"."""
    free = list(range(len(ours)))
    pairs = []
    for i, r in enumerate(ref):
        j = next((j for j in free if max(abs(a - b) for a, b in zip(r.box, ours[j].box)) <= tol), None)
        if j is not None:
            free.remove(j)
            pairs.append((i, j))
    return pairs


def compare(ref: list, ours: list, size: tuple[int, int]) -> dict:
    """Figures for one image; ``ref`` and ``ours`` are best-first instance lists."""
    from preprocess.densepose import iuv_image, render_iuv, render_labels, render_segmentation

    pairs = pair_by_box(ref, ours)
    paired_ref, paired_ours = {i for i, _ in pairs}, {j for _, j in pairs}
    row = {"n_ref": len(ref), "n_ours": len(ours), "unpaired_ref": [ref[i] for i in range(len(ref)) if i not in paired_ref],
           "unpaired_ours": [ours[j] for j in range(len(ours)) if j not in paired_ours],
           "box_diff": None, "labels_eq": None, "uv_diff": None, "score_diff": None}
    if pairs:
        row["box_diff"] = max(abs(a - b) for i, j in pairs for a, b in zip(ref[i].box, ours[j].box))
        row["score_diff"] = max(abs(ref[i].score - ours[j].score) for i, j in pairs)
    if ref and ours:
        r, o = ref[0], ours[0]
        h, w = min(r.labels.shape[0], o.labels.shape[0]), min(r.labels.shape[1], o.labels.shape[1])
        # labels over the union of both boxes' pixels: a pixel missing on one side counts as unequal
        union = max(r.labels.size, o.labels.size)
        row["labels_eq"] = 100.0 * float((r.labels[:h, :w] == o.labels[:h, :w]).sum()) / union
        row["uv_diff"] = float(np.abs(r.uv[:, :h, :w] - o.uv[:, :h, :w]).mean())
    for name, render in (("seg", render_segmentation), ("lab", render_labels), ("iuv", render_iuv)):
        a, b = np.asarray(render(ref, size)), np.asarray(render(ours, size))
        row[name] = 100.0 * float((a == b).all(axis=2).mean())
    a, b = iuv_image(ref, size[1], size[0]), iuv_image(ours, size[1], size[0])
    row["mcld"] = 100.0 * float((a == b).all(axis=2).mean()) if a is not None and b is not None else (
        100.0 if a is None and b is None else 0.0)
    return row


def passes(row: dict) -> bool:
    if row["n_ref"] != row["n_ours"] or row["unpaired_ref"] or row["unpaired_ours"]:
        return False
    if row["n_ref"] == 0:
        return True
    return (row["box_diff"] <= MAX_BOX_DIFF_PX and row["labels_eq"] >= MIN_LABELS_EQUAL
            and row["uv_diff"] <= MAX_UV_DIFF)


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def print_table(rows: list[tuple[str, dict]]) -> None:
    print("| image | instances d2 / ours | unpaired d2 / ours | max box diff (px) | max score diff | "
          "top labels equal | top U/V mean abs diff | segmentation equal | labels equal | IUV equal | "
          "MCLD IUV equal | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['n_ref']} / {r['n_ours']} | {len(r['unpaired_ref'])} / {len(r['unpaired_ours'])} | "
              f"{fmt(r['box_diff'], 'd')} | {fmt(r['score_diff'], '.1e')} | {fmt(r['labels_eq'], '.3f')} % | "
              f"{fmt(r['uv_diff'], '.2e')} | {r['seg']:.3f} % | {r['lab']:.3f} % | {r['iuv']:.3f} % | "
              f"{r['mcld']:.3f} % | {'yes' if passes(r) else '**NO**'} |")
    for name, r in rows:
        for who, found in (("detectron2 only", r["unpaired_ref"]), ("ours only", r["unpaired_ours"])):
            for f in found:
                print(f"  {name}: {who}: box {f.box}, score {f.score:.4f}")


# --------------------------------------------------------------------------- speed


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (MiB): VmRSS now, VmHWM peak.

    VmHWM, not ``getrusage(...).ru_maxrss``: Linux carries ru_maxrss over fork and exec, so a
    subprocess started by a big parent reports the parent's peak; VmHWM starts anew at exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(which: str, d2: Path, weights: Path, repeat: int, device: str, model: str = "r50") -> dict:
    """Import time, load time, seconds per 768x1024 photo and peak RSS (and peak GPU memory),
    in this (fresh) process."""
    photo = test_images()[0][1]
    assert photo.shape[:2] == (BENCH_SIZE[1], BENCH_SIZE[0])
    t = time.perf_counter()
    if which == "detectron2":
        check_detectron2_importable(d2)
        from densepose import add_densepose_config  # noqa: F401
        from densepose.vis.extractor import DensePoseResultExtractor  # noqa: F401
        from detectron2.engine import DefaultPredictor  # noqa: F401

        def load():
            return detectron2_predictor(d2, weights, device, model)

        def call(model):
            return run_detectron2(model, photo)
    else:
        import preprocess.densepose.weights  # noqa: F401  (imported by from_checkpoint)
        from preprocess.densepose import DensePoseRCNN  # noqa: F401

        def load():
            return ours_model(weights, device)

        def call(model):
            return model(photo)
    import_s = time.perf_counter() - t
    rss_imported = _status_mib("VmRSS")
    t = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t
    rss_loaded = _status_mib("VmRSS")
    cuda = device.startswith("cuda")
    with torch.no_grad():
        n = len(call(model))  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            call(model)  # both return CPU arrays, so the GPU work has finished
            times.append(time.perf_counter() - t)
    return {"which": which, "import_s": import_s, "load_s": load_s, "per_photo_s": statistics.median(times),
            "instances": n, "peak_rss_mib": _status_mib("VmHWM"), "rss_after_imports_mib": rss_imported,
            "rss_after_load_mib": rss_loaded, "threads": torch.get_num_threads(),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")}


def bench(args) -> list[dict]:
    results = []
    for which in ("detectron2", "ours"):
        cmd = [sys.executable, "-m", "benchmarks.parity_densepose", "--detectron2", str(args.detectron2),
               "--weights", str(args.weights), "--model", args.model,
               "--threads", str(args.threads), "--repeat", str(args.repeat), "--device", args.device,
               "--measure", which]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            sys.exit(f"--measure {which} failed:\n{out.stderr[-4000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    d2, ours = results
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\nSpeed on {where}, {BENCH_SIZE[0]}x{BENCH_SIZE[1]} photo, {args.threads} thread(s), "
          f"median of {args.repeat} after a warm-up, each in its own process:\n")
    cols = [("import_s", "imports (s)", ".2f"), ("load_s", "load from .pkl (s)", ".2f"),
            ("per_photo_s", "s / photo", ".2f"), ("peak_rss_mib", "peak RSS (MiB)", ".0f"),
            ("rss_after_imports_mib", "RSS after imports (MiB)", ".0f"),
            ("rss_after_load_mib", "RSS after load (MiB)", ".0f"), ("peak_gpu_mib", "peak GPU (MiB)", ".0f")]
    print("| | " + " | ".join(title for _, title, _ in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in results:
        print(f"| {r['which']} | " + " | ".join(format(r[k], spec) for k, _, spec in cols) + " |")
    print("| ours / detectron2 | " + " | ".join(f"{ours[k] / d2[k]:.2f}" for k, _, _ in cols) + " |")
    print("\n(torch and numpy are imported before the clock starts, on both sides; the instances "
          f"found: detectron2 {d2['instances']}, ours {ours['instances']})")
    return results


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detectron2", type=Path, required=True, help="detectron2 source checkout")
    p.add_argument("--model", choices=sorted(MODELS), default="r50",
                   help="r50: densepose_rcnn_R_50_FPN_s1x (Leffa); r101-dl: densepose_rcnn_R_101_FPN_DL_s1x (MCLD)")
    p.add_argument("--weights", type=Path, default=None,
                   help="where the random-weight .pkl is written (and read by --measure); default "
                        "$TMPDIR/densepose_<model>_random.pkl")
    p.add_argument("--reuse-weights", action="store_true", help="use --weights as it is if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--detections", type=int, default=8,
                   help="detections above 0.5 wanted on the median calibration image")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where both models run (default cpu)")
    p.add_argument("--bench", action="store_true", help="also time both and measure peak memory")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per implementation (--bench)")
    p.add_argument("--only-detectron2", action="store_true",
                   help="build the weights and run detectron2 alone (instance counts, scores)")
    p.add_argument("--measure", choices=["ours", "detectron2"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.weights is None:
        args.weights = Path(tempfile.gettempdir()) / f"densepose_{args.model.replace('-', '_')}_random.pkl"
    args.detectron2 = args.detectron2.resolve()
    args.weights = args.weights.resolve()
    torch.set_num_threads(args.threads)
    # ours runs in full float32 on CUDA (no TF32, see preprocess.densepose.model.full_float32);
    # so does the reference here, else its TF32 convolutions alone change the detections
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.measure:
        print(json.dumps(measure(args.measure, args.detectron2, args.weights, args.repeat, args.device, args.model)))
        return 0
    check_detectron2_importable(args.detectron2)
    import logging

    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("fvcore").setLevel(logging.WARNING)

    if args.reuse_weights and args.weights.is_file():
        print(f"random weights: reusing {args.weights}")
    else:
        t = time.perf_counter()
        model = random_detectron2_model(args.detectron2, calibration_images(), args.seed, args.detections,
                                        args.model)
        save_model_zoo_pkl(model, args.weights)
        del model
        print(f"random weights (seed {args.seed}) -> {args.weights} ({time.perf_counter() - t:.1f} s)")

    predictor = detectron2_predictor(args.detectron2, args.weights, args.device, args.model)
    ours = None if args.only_detectron2 else ours_model(args.weights, args.device)
    if ours is not None:
        print(f"ours: DensePose {ours.cfg.name} read off {args.weights.name}")
    rows = []
    for name, rgb in test_images():
        ref = run_detectron2(predictor, rgb)
        scores = ", ".join(f"{f.score:.3f}" for f in ref)
        top = ref[0] if ref else None
        detail = "" if top is None else (
            f"; top box {top.box}, {len(np.unique(top.labels))} labels, "
            f"{100 * float((top.labels > 0).mean()):.0f} % foreground, "
            f"U/V in [{top.uv.min():.2f}, {top.uv.max():.2f}]")
        if ref:
            gaps = [a.score - b.score for a, b in itertools.pairwise(ref)]
            detail += (f"; score margin over {SCORE_THRESHOLD}: {ref[-1].score - SCORE_THRESHOLD:.1e}"
                       + (f", smallest gap between scores: {min(gaps):.1e}" if gaps else ""))
        print(f"{name}: detectron2 {len(ref)} instance(s), scores [{scores}]{detail}")
        if ours is not None:
            size = (rgb.shape[1], rgb.shape[0])
            rows.append((name, compare(as_instances(ref), ours(rgb), size)))
    ok = True
    if rows:
        print()
        print_table(rows)
        ok = all(passes(r) for _, r in rows)
    if args.bench:
        del predictor, ours
        bench(args)
    if not ok:
        print("\nFAILED: a parity threshold was missed "
              f"(boxes <= {MAX_BOX_DIFF_PX} px, labels >= {MIN_LABELS_EQUAL} %, U/V <= {MAX_UV_DIFF})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
