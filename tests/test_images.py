"""Image loading: every odd input either loads as a correct RGB image or raises ImageLoadError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from preprocess.images import (ImageLoadError, fit_to_canvas, load_image, preprocess_garment,
                               save_image_atomic)


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    base = Image.new("RGB", (20, 10), (200, 100, 50))
    img = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.new(mode, (20, 10), 40000 if mode != "F" else 0.5)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_16_bit_grey_keeps_its_level():
    out = load_image(Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16)))
    assert abs(int(np.asarray(out)[0, 0, 0]) - 127) <= 1


def test_transparency_goes_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(load_image(img))[0, 0].tolist() == [255, 255, 255]
    assert load_image(img, keep_alpha=True).mode == "RGBA"


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = load_image(_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 30)


def test_animated_image_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 0, 0]


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (never decoded)."""
    data = bytearray(_bytes(Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_decompression_bomb_is_refused():
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(_png_claiming(30000, 30000), name="person image")
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=5000)


@pytest.mark.parametrize("content,message", [
    (b"", "not a readable image"),
    (b"hello, this is text", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "not a readable image|truncated"),
])
def test_non_images(content, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(content)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files(fmt):
    rng = np.random.default_rng(0)
    data = _bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(ImageLoadError, match="truncated or corrupt|not a readable image"):
        load_image(data[: len(data) // 2])


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.png", name="garment image")


def test_random_corruption_fuzz():
    """Flip random bytes of valid files: the result is an RGB image or our error, nothing else."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (32, 24, 3), dtype=np.uint8))
    originals = [_bytes(img, f) for f in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        data = bytearray(originals[rng.integers(len(originals))])
        for _ in range(rng.integers(1, 8)):
            data[rng.integers(len(data))] = rng.integers(256)
        if rng.random() < 0.3:
            data = data[: rng.integers(1, len(data))]
        try:
            out = load_image(bytes(data))
        except ImageLoadError:
            outcomes["error"] += 1
            continue
        assert out.mode == "RGB" and out.width > 0 and out.height > 0
        outcomes["ok"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


def test_fit_to_canvas():
    wide = Image.new("RGB", (200, 100), "red")
    out = fit_to_canvas(wide, (768, 1024))
    assert out.size == (768, 1024)
    a = np.asarray(out)
    assert a[0, 0].tolist() == [255, 255, 255] and a[512, 384].tolist() == [255, 0, 0]
    mask = fit_to_canvas(Image.new("L", (200, 100), 255), (768, 1024), fill=(0, 0, 0),
                         resample=Image.Resampling.NEAREST)
    assert set(np.unique(np.asarray(mask))) == {0, 255}


def test_garment_png_preprocessing():
    img = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (40, 10, 60, 90))  # a 20×80 garment
    out = np.asarray(preprocess_garment(img))
    assert out.shape == (1024, 768, 3)
    assert out[512, 384].tolist() == [0, 0, 255] and out[512, 10].tolist() == [255, 255, 255]
    # cropped to its alpha box (20×80), centred on an 80×80 square, fitted: y 128..896
    assert out[130, 384].tolist() == [0, 0, 255] and out[120, 384].tolist() == [255, 255, 255]
    with pytest.raises(ImageLoadError, match="transparent background"):
        preprocess_garment(Image.new("RGB", (10, 10)))
    with pytest.raises(ImageLoadError, match="fully transparent"):
        preprocess_garment(Image.new("RGBA", (10, 10), (0, 0, 0, 0)))


def test_atomic_save(tmp_path):
    path = save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "sub" / "x.png")
    assert Image.open(path).size == (4, 4) and not list(path.parent.glob(".*tmp"))
    with pytest.raises(ImageLoadError, match="image format"):
        save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "x.unknown")
