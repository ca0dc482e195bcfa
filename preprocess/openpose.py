"""OpenPose body keypoints (CMU, 18 COCO-order points) in plain PyTorch (spec §5 "Keypoints").

``BodyPoseNet`` is the six-stage CMU network; ``load_body_pose_weights`` reads
``openpose/body_pose_model.pth`` (flat CMU/ControlNet key names such as ``conv1_1.weight``
and ``Mconv7_stage6_L2.bias``). ``decode_people`` turns heatmaps and part-affinity fields
into people: heatmap peaks, limb candidates scored along the PAF, greedy assembly.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from errors import UserError

NUM_POINTS = 18
# limbs as (point a, point b), 0-based COCO order, and the PAF channels (x, y) of each
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
         (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17)]
PAF_CHANNELS = [(12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5),
                (6, 7), (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19),
                (26, 27)]


class NoPersonError(UserError, ValueError):
    """No person was found in the image."""


# -- network ------------------------------------------------------------------------------
def _block(spec: list[tuple], last_linear: bool) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    for i, (name, *cfg) in enumerate(spec):
        if name.startswith("pool"):
            layers.append((name, nn.MaxPool2d(kernel_size=2, stride=2)))
            continue
        cin, cout, k = cfg
        layers.append((name, nn.Conv2d(cin, cout, k, padding=k // 2)))
        if not (last_linear and i == len(spec) - 1):
            layers.append((f"relu_{name}", nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class BodyPoseNet(nn.Module):
    """CMU OpenPose body network: VGG features, then 6 stages of (PAF L1, heatmap L2) branches."""

    def __init__(self):
        super().__init__()
        self.model0 = _block([
            ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("pool1_stage1",),
            ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), ("pool2_stage1",),
            ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3),
            ("conv3_4", 256, 256, 3), ("pool3_stage1",),
            ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3),
            ("conv4_4_CPM", 256, 128, 3)], last_linear=False)
        for branch, out in (("L1", 38), ("L2", 19)):
            setattr(self, f"model1_{branch[1]}", _block(
                [(f"conv5_{i}_CPM_{branch}", 128, 128, 3) for i in (1, 2, 3)]
                + [(f"conv5_4_CPM_{branch}", 128, 512, 1), (f"conv5_5_CPM_{branch}", 512, out, 1)],
                last_linear=True))
            for s in range(2, 7):
                setattr(self, f"model{s}_{branch[1]}", _block(
                    [(f"Mconv1_stage{s}_{branch}", 185, 128, 7)]
                    + [(f"Mconv{i}_stage{s}_{branch}", 128, 128, 7) for i in (2, 3, 4, 5)]
                    + [(f"Mconv6_stage{s}_{branch}", 128, 128, 1), (f"Mconv7_stage{s}_{branch}", 128, out, 1)],
                    last_linear=True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-0.5, 0.5) -> PAFs (B, 38, H/8, W/8), heatmaps (B, 19, H/8, W/8)."""
        features = self.model0(x)
        paf, heat = self.model1_1(features), self.model1_2(features)
        for s in range(2, 7):
            both = torch.cat([paf, heat, features], dim=1)
            paf, heat = getattr(self, f"model{s}_1")(both), getattr(self, f"model{s}_2")(both)
        return paf, heat


def load_body_pose_weights(net: BodyPoseNet, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load flat CMU key names (``conv1_1.weight``) into the nested network, strictly."""
    from weightfiles.checkpoint import check_state_dict

    flat = {k.split(".", 1)[1]: k for k in net.state_dict()}  # "conv1_1.weight" -> "model0.conv1_1.weight"
    renamed = {flat.get(k, k): v for k, v in state.items()}
    check_state_dict(net.state_dict(), renamed, source)
    net.load_state_dict(renamed, strict=True)


# -- decoding -------------------------------------------------------------------------------
def find_peaks(heatmap: np.ndarray, threshold: float = 0.1) -> list[tuple[float, float, float]]:
    """Local maxima (x, y, score) of a Gaussian-smoothed (σ = 3) heatmap above ``threshold``."""
    smooth = gaussian_filter(heatmap, sigma=3)
    pad = np.pad(smooth, 1)
    centre = pad[1:-1, 1:-1]
    is_peak = ((centre >= pad[:-2, 1:-1]) & (centre >= pad[2:, 1:-1]) & (centre >= pad[1:-1, :-2])
               & (centre >= pad[1:-1, 2:]) & (centre > threshold))
    ys, xs = np.nonzero(is_peak)
    return [(float(x), float(y), float(heatmap[y, x])) for x, y in zip(xs, ys)]


def _limb_score(paf_x, paf_y, a, b, image_height, samples=10, threshold=0.05):
    """Mean PAF projection along a→b with a length prior, or None if the limb is implausible."""
    vec = np.array([b[0] - a[0], b[1] - a[1]])
    norm = max(float(np.hypot(*vec)), 1e-3)
    vec /= norm
    xs = np.rint(np.linspace(a[0], b[0], samples)).astype(int)
    ys = np.rint(np.linspace(a[1], b[1], samples)).astype(int)
    along = paf_x[ys, xs] * vec[0] + paf_y[ys, xs] * vec[1]
    score = along.mean() + min(0.5 * image_height / norm - 1, 0)
    if np.count_nonzero(along > threshold) > 0.8 * samples and score > 0:
        return float(score)
    return None


Peak = tuple[float, float, float]  # x, y, score
Connection = tuple[int, int, float]  # candidate id of point a, of point b, limb score


def heatmap_candidates(heatmaps: np.ndarray, threshold: float = 0.1) -> tuple[list[list[int]], list[Peak]]:
    """Step 1: the peaks of each part's heatmap as candidates. Returns, per part, the ids of its
    candidates, and all candidates (x, y, score) indexed by id (part by part, in peak order)."""
    ids_by_part: list[list[int]] = []
    candidates: list[Peak] = []
    for part in range(NUM_POINTS):
        peaks = find_peaks(heatmaps[:, :, part], threshold)
        ids_by_part.append(list(range(len(candidates), len(candidates) + len(peaks))))
        candidates += peaks
    return ids_by_part, candidates


def match_limb(ids_a: list[int], ids_b: list[int], candidates: list[Peak], paf_x: np.ndarray,
               paf_y: np.ndarray, image_height: int) -> list[Connection]:
    """Step 2, one limb: score every (a, b) pair of candidates along the limb's PAF, then take
    the best-scoring pairs greedily, each candidate at most once."""
    scored = []
    for i, a in enumerate(ids_a):
        for j, b in enumerate(ids_b):
            s = _limb_score(paf_x, paf_y, candidates[a], candidates[b], image_height)
            if s is not None:
                scored.append((s, i, j))
    scored.sort(key=lambda t: -t[0])
    used_a, used_b, chosen = set(), set(), []
    for s, i, j in scored:
        if i in used_a or j in used_b:
            continue
        chosen.append((ids_a[i], ids_b[j], s))
        used_a.add(i), used_b.add(j)
        if len(chosen) >= min(len(ids_a), len(ids_b)):
            break
    return chosen


@dataclass(eq=False)
class _Person:
    """A person being assembled: a candidate id per part (-1 = none), total score, part count."""

    ids: list[int]
    score: float
    count: int


def _add_connection(people: list[_Person], limb: int, connection: Connection, candidates: list[Peak]) -> None:
    """Step 3, one connection: extend the person owning either end, merge two disjoint owners,
    or start a new person (not from the last two limbs, ear to shoulder)."""
    (pa, pb), (id_a, id_b, s) = LIMBS[limb], connection
    owners = [p for p in people if p.ids[pa] == id_a or p.ids[pb] == id_b]
    if len(owners) == 1 and owners[0].ids[pb] != id_b:
        owner = owners[0]
        owner.ids[pb] = id_b
        owner.count += 1
        owner.score += candidates[id_b][2] + s
    elif len(owners) == 2:
        p1, p2 = owners
        if not any(u >= 0 and v >= 0 for u, v in zip(p1.ids, p2.ids)):  # disjoint: merge
            p1.ids = [u if u >= 0 else v for u, v in zip(p1.ids, p2.ids)]
            p1.score += p2.score + s
            p1.count += p2.count
            people.remove(p2)
        else:
            p1.ids[pb] = id_b
            p1.count += 1
            p1.score += candidates[id_b][2] + s
    elif not owners and limb < 17:
        ids = [-1] * NUM_POINTS
        ids[pa], ids[pb] = id_a, id_b
        people.append(_Person(ids, candidates[id_a][2] + candidates[id_b][2] + s, 2))


def assemble_people(connections: list[list[Connection]], candidates: list[Peak]) -> list[_Person]:
    """Step 3: join the limbs, in ``LIMBS`` order, into people; keep those with at least 4
    parts and a mean score of at least 0.4."""
    people: list[_Person] = []
    for limb, chosen in enumerate(connections):
        for connection in chosen:
            _add_connection(people, limb, connection, candidates)
    return [p for p in people if p.count >= 4 and p.score / p.count >= 0.4]


def _points(person: _Person, candidates: list[Peak]) -> np.ndarray:
    """Step 4: a person as an (18, 3) array of (x, y, score), missing points (0, 0, 0)."""
    pts = np.zeros((NUM_POINTS, 3), np.float32)
    for part, cid in enumerate(person.ids):
        if cid >= 0:
            pts[part] = candidates[cid]
    return pts


def decode_people(heatmaps: np.ndarray, pafs: np.ndarray, threshold: float = 0.1) -> list[np.ndarray]:
    """People from (H, W, 19) heatmaps and (H, W, 38) PAFs at image resolution.

    Returns a list of (18, 3) arrays (x, y, score; missing points (0, 0, 0)).
    """
    ids_by_part, candidates = heatmap_candidates(heatmaps, threshold)
    connections = [match_limb(ids_by_part[a], ids_by_part[b], candidates, pafs[:, :, cx], pafs[:, :, cy],
                              heatmaps.shape[0])
                   for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS)]
    return [_points(p, candidates) for p in assemble_people(connections, candidates)]


def person_size(points: np.ndarray) -> float:
    """Area of the bounding box of a person's detected points."""
    present = points[points[:, 2] > 0, :2]
    if len(present) < 2:
        return 0.0
    return float(np.prod(present.max(0) - present.min(0)))


@dataclass
class OpenPoseDetector:
    """Body keypoints of the largest person in an RGB image."""

    net: BodyPoseNet
    scales: tuple[float, ...] = (0.5,)  # multiples of box_size / image height
    box_size: int = 368
    device: torch.device | str = "cpu"

    @classmethod
    def from_file(cls, path: str | Path, device: torch.device | str = "cpu") -> OpenPoseDetector:
        from weightfiles.checkpoint import load_state_dict_file

        net = BodyPoseNet()
        load_body_pose_weights(net, load_state_dict_file(path), str(path))
        return cls(net.eval().to(device), device=device)

    @torch.no_grad()
    def maps(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps (H, W, 19) and PAFs (H, W, 38), averaged over scales, at image size."""
        h, w = rgb.shape[:2]
        heat_avg = np.zeros((h, w, 19), np.float32)
        paf_avg = np.zeros((h, w, 38), np.float32)
        for scale in self.scales:
            f = scale * self.box_size / h
            img = cv2.resize(rgb, (0, 0), fx=f, fy=f, interpolation=cv2.INTER_CUBIC)
            ph, pw = -img.shape[0] % 8, -img.shape[1] % 8  # pad right/bottom to a multiple of 8
            img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(128, 128, 128))
            x = torch.from_numpy(img.astype(np.float32) / 256 - 0.5).permute(2, 0, 1)[None]
            paf, heat = self.net(x.to(self.device))
            for out, avg in ((heat, heat_avg), (paf, paf_avg)):
                m = out[0].permute(1, 2, 0).float().cpu().numpy()
                m = cv2.resize(m, (0, 0), fx=8, fy=8, interpolation=cv2.INTER_CUBIC)
                m = m[: img.shape[0] - ph, : img.shape[1] - pw]
                avg += cv2.resize(m, (w, h), interpolation=cv2.INTER_CUBIC) / len(self.scales)
        return heat_avg, paf_avg

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """(18, 2) keypoints in pixels of ``rgb``, missing points (0, 0)."""
        people = decode_people(*self.maps(rgb))
        if not people:
            raise NoPersonError("no person detected in the photo: use a photo of one person, "
                                "standing, with the upper body visible")
        best = max(people, key=person_size)  # first (largest) person
        return best[:, :2].copy()


def draw_keypoints(image, keypoints: np.ndarray):
    """The skeleton drawn on a copy of ``image`` (PIL)."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    r = max(2, out.height // 128)
    present = lambda p: not (p[0] <= 1 and p[1] <= 1)
    for n, (a, b) in enumerate(LIMBS[:17]):
        pa, pb = keypoints[a], keypoints[b]
        if present(pa) and present(pb):
            hue = int(255 * n / 17)
            colour = tuple(int(c) for c in cv2.cvtColor(np.uint8([[[hue, 255, 255]]]), cv2.COLOR_HSV2RGB_FULL)[0, 0])
            draw.line([tuple(pa), tuple(pb)], fill=colour, width=r)
    for p in keypoints:
        if present(p):
            draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=(255, 0, 0))
    return out
