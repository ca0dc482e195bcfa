"""What framing and blending add to a try-on on a real photo (preprocess/framing.py), at 12 MP and
48 MP: choosing the box, the model's 768x1024 picture of it, and pasting the answer back at full
resolution, against the photo's decoding (which every path pays), in the same run.

    python -m benchmarks.bench_framing [--sizes 4000x3000,8000x6000] [--repeat 3]

Prints a Markdown table: seconds per step (best of ``--repeat``) and the process's peak resident
memory. The generated picture is a stand-in (a flat colour) with a garment-sized mask: the model is
not what is measured.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image, ImageDraw

from preprocess.framing import Box, crop_to_model, frame_box, paste_back
from preprocess.images import MODEL_SIZE, load_image


def _photo(size: tuple[int, int]) -> bytes:
    """A JPEG of ``size`` with a person-like figure right of centre on a textured background."""
    w, h = size
    rng = np.random.default_rng(0)
    texture = rng.integers(90, 200, (h // 8, w // 8, 3), dtype=np.uint8)
    img = Image.fromarray(texture).resize(size, Image.Resampling.BILINEAR)
    ImageDraw.Draw(img).rectangle((int(w * 0.55), int(h * 0.15), int(w * 0.7), int(h * 0.95)), fill=(40, 60, 90))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def measure(size: tuple[int, int], repeat: int) -> dict[str, float]:
    data = _photo(size)
    t_load, photo = _best(lambda: load_image(data, name="photo"), repeat)
    w, h = photo.size
    person = Box(int(w * 0.55), int(h * 0.15), int(w * 0.7), int(h * 0.95))  # as Preprocessor.people finds it
    t_box, box = _best(lambda: frame_box(person, photo.size), repeat)
    t_crop, _ = _best(lambda: crop_to_model(photo, box), repeat)
    mask = Image.new("L", MODEL_SIZE)
    mask.paste(255, (200, 250, 570, 700))  # an upper-body garment's share of the picture
    generated = Image.new("RGB", MODEL_SIZE, (200, 30, 30))
    t_paste, out = _best(lambda: paste_back(photo, generated, box, mask), repeat)
    assert out.size == photo.size
    return {"mp": w * h / 1e6, "load": t_load, "box": t_box, "crop": t_crop, "paste": t_paste,
            "added": t_box + t_crop + t_paste, "rss": _peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4000x3000,8000x6000", help="photo sizes WxH, comma-separated")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    print("| photo | decode s | box s | 768x1024 crop s | paste-back s | framing + blending s | ratio to decode "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for text in args.sizes.split(","):
        size = tuple(int(v) for v in text.lower().split("x"))
        r = measure(size, args.repeat)
        print(f"| {size[0]}x{size[1]} ({r['mp']:.0f} MP) | {r['load']:.3f} | {r['box']:.5f} | {r['crop']:.3f} | "
              f"{r['paste']:.3f} | {r['added']:.3f} | {r['added'] / r['load']:.2f} | {r['rss']:.0f} |")


if __name__ == "__main__":
    main()
