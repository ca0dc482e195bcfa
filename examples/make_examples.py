"""Regenerate the example garments and poses (run from the repo root):

    python examples/make_examples.py [CAMERA_PNG]

Garments are drawn here (no third-party artwork). ``pose/astronaut_mirrored.png`` is the
public-domain astronaut photo (``person/astronaut.png``) mirrored. ``pose/cameraman.png`` is
scikit-image's ``camera.png`` (CC0, photographed by Lav Varshney) fitted onto a white 768x1024
canvas; its source is CAMERA_PNG, else ``$LEFFA_CAMERA_PNG``, else the copy inside an installed
scikit-image (found, not imported). Without one, that file is left as it is. See README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

HERE = Path(__file__).parent
W, H = 768, 1024
CAMERA_ENV = "LEFFA_CAMERA_PNG"
# scikit-image's data/camera.png (skimage/data/_registry.py): the CC0 photo the README describes
CAMERA_SHA256 = "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"


def tee_outline(draw: ImageDraw.ImageDraw, fill, outline=(40, 40, 40)) -> None:
    body = [(234, 180), (330, 150), (384, 190), (438, 150), (534, 180), (660, 330), (585, 390),
            (540, 340), (540, 900), (228, 900), (228, 340), (183, 390), (108, 330)]
    draw.polygon(body, fill=fill, outline=outline)


def striped_tee() -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    mask = Image.new("L", (W, H))
    tee_outline(ImageDraw.Draw(mask), 255, outline=255)
    stripes = Image.new("RGB", (W, H), (230, 230, 240))
    d = ImageDraw.Draw(stripes)
    for i, y in enumerate(range(0, H, 48)):
        d.rectangle([0, y, W, y + 23], fill=(30, 60, 160) if i % 2 else (200, 40, 40))
    img.paste(stripes, mask=mask)
    return img


def logo_tee() -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    tee_outline(d, (250, 200, 40))
    d.ellipse([304, 330, 464, 490], fill=(20, 120, 90), outline=(0, 0, 0), width=6)
    d.polygon([(384, 350), (420, 470), (330, 395), (438, 395), (348, 470)], fill=(250, 250, 250))
    d.text((300, 560), "LEFFA  2025", fill=(0, 0, 0), font_size=44)
    d.text((318, 620), "flow fields", fill=(60, 60, 60), font_size=34)
    return img


def checked_dress() -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    mask = Image.new("L", (W, H))
    ImageDraw.Draw(mask).polygon([(300, 120), (468, 120), (500, 380), (640, 940), (128, 940), (268, 380)],
                                 fill=255)
    checks = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(checks)
    for y in range(0, H, 40):
        for x in range(0, W, 40):
            d.rectangle([x, y, x + 39, y + 39], fill=(120, 20, 80) if (x + y) // 40 % 2 else (245, 220, 230))
    img.paste(checks, mask=mask)
    return img


def fit_on_white(img: Image.Image) -> Image.Image:
    """``img`` as RGB, fitted into W x H keeping its aspect ratio, centred on white."""
    scale = min(W / img.width, H / img.height)
    size = (round(img.width * scale), round(img.height * scale))
    canvas = Image.new("RGB", (W, H), "white")
    resized = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    canvas.paste(resized, ((W - size[0]) // 2, (H - size[1]) // 2))
    return canvas


def camera_source(given: str | None) -> Path | None:
    """The path of scikit-image's camera.png: given, from the environment, or in scikit-image."""
    if given or os.environ.get(CAMERA_ENV):
        return Path(given or os.environ[CAMERA_ENV])
    spec = importlib.util.find_spec("skimage")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "data" / "camera.png"


def cameraman(source: Path) -> Image.Image:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != CAMERA_SHA256:
        raise SystemExit(f"{source} is not scikit-image's CC0 camera.png (sha256 {digest}); "
                         "the licence in examples/README.md covers only that file")
    return fit_on_white(Image.open(source))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("camera", nargs="?", help=f"scikit-image's data/camera.png (default: "
                                                  f"${CAMERA_ENV}, else the installed scikit-image's copy)")
    args = parser.parse_args()
    for name, make in (("striped_tee", striped_tee), ("logo_tee", logo_tee), ("checked_dress", checked_dress)):
        make().save(HERE / "garment" / f"{name}.png")
    astronaut = Image.open(HERE / "person" / "astronaut.png")
    ImageOps.mirror(astronaut).save(HERE / "pose" / "astronaut_mirrored.png")
    source = camera_source(args.camera)
    if source is None:
        print("pose/cameraman.png left as it is: give scikit-image's data/camera.png "
              f"(argument or ${CAMERA_ENV}), or install scikit-image")
        return
    cameraman(source).save(HERE / "pose" / "cameraman.png", optimize=True)


if __name__ == "__main__":
    main()
