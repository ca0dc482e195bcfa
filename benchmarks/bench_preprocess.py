"""Preprocessing time per photo on this machine, and the cache-hit time.

    python -m benchmarks.bench_preprocess

Uses the full-size OpenPose body network (random weights: same cost as the real ones), the
real mask code, and the stand-in parser/DensePose (the SCHP network needs its weights; the
DensePose network is timed against detectron2's by ``benchmarks/parity_densepose.py``). The cached re-run is what a user pays when
changing only steps/seed/guidance.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from PIL import Image

from preprocess.inputs import PARSE_SIZE, Preprocessor
from preprocess.masks import agnostic_mask
from preprocess.openpose import BodyPoseNet, OpenPoseDetector
from preprocess.standins import StandInDensePose, StandInParser


def timed(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    photo = np.full((1024, 768, 3), 255, np.uint8)
    photo[100:950, 250:520] = rng.integers(0, 120, (850, 270, 3))
    person = Image.fromarray(photo)
    small = np.asarray(person.resize(PARSE_SIZE, Image.Resampling.BICUBIC))
    detector = OpenPoseDetector(BodyPoseNet().eval())
    parse = StandInParser()(Image.fromarray(small)).labels
    from preprocess.standins import StandInPose

    kp = StandInPose()(small)

    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; median of 5")
    print(f"OpenPose network + map resizing 384x512:{timed(lambda: detector.maps(small)) * 1000:8.1f} ms")
    for variant in ("viton_hd", "dress_code"):
        t = timed(lambda: agnostic_mask(parse, kp, "upper_body", variant), 20)
        print(f"agnostic mask ({variant}):               {t * 1000:8.1f} ms")

    def pose(rgb):  # the real network's cost; random weights find no one, so stand-in points
        detector.maps(rgb)
        return StandInPose()(rgb)

    pre = Preprocessor(StandInParser, lambda: pose, StandInDensePose)
    garment = Image.fromarray(rng.integers(0, 255, (1024, 768, 3), dtype=np.uint8))
    first = timed(lambda: pre.tryon(person, garment, "viton_hd", "upper_body"), 1)
    cached = timed(lambda: pre.tryon(person, garment, "viton_hd", "upper_body"), 10)
    print(f"Preprocessor.tryon, first time:          {first * 1000:8.1f} ms")
    print(f"Preprocessor.tryon, cached (same person): {cached * 1000:8.1f} ms  (target < 50 ms)")


if __name__ == "__main__":
    main()
