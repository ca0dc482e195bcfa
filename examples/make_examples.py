"""Regenerate the example garments and poses (run from the repo root):

    python examples/make_examples.py

Garments are drawn here (no third-party artwork). The pose example is the public-domain
astronaut photo (``person/astronaut.png``) mirrored.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

HERE = Path(__file__).parent
W, H = 768, 1024


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


def main() -> None:
    for name, make in (("striped_tee", striped_tee), ("logo_tee", logo_tee), ("checked_dress", checked_dress)):
        make().save(HERE / "garment" / f"{name}.png")
    astronaut = Image.open(HERE / "person" / "astronaut.png")
    ImageOps.mirror(astronaut).save(HERE / "pose" / "astronaut_mirrored.png")


if __name__ == "__main__":
    main()
