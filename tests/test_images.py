"""Image loading: every odd input either loads as a correct RGB image or raises ImageLoadError."""

from __future__ import annotations

import importlib.util
import io
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess.images import (MAX_DECODE_BYTES, ImageLoadError, fit_to_canvas, load_garment, load_image,
                               load_label_image, preprocess_garment, save_image_atomic)

REPO = Path(__file__).resolve().parents[1]


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I;16B", "I", "F",
                                  "PA", "RGBa", "La"])
def test_every_mode_becomes_rgb(mode):
    base = Image.new("RGB", (20, 10), (200, 100, 50))
    if mode.startswith("I") or mode == "F":
        img = Image.new(mode, (20, 10), 40000 if mode != "F" else 0.5)
    else:
        img = base.convert("RGBA").convert(mode) if mode in ("RGBa", "La") else base.convert(mode)
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


@pytest.mark.parametrize("pillow_warning", ["ignore", "error"])
@pytest.mark.parametrize("side", [8000, 10000, 30000])  # ours only, Pillow's warning, Pillow's error
def test_the_pixel_limit_quoted_is_ours(side, pillow_warning):
    """Pillow refuses (or warns about) huge images with its own limit; the message quotes ours."""
    with warnings.catch_warnings():
        warnings.simplefilter(pillow_warning, Image.DecompressionBombWarning)
        with pytest.raises(ImageLoadError, match="too large") as caught:
            load_image(_png_claiming(side, side), name="person image")
    message = str(caught.value)
    assert "the limit" in message and "50 MP" in message
    assert str(Image.MAX_IMAGE_PIXELS) not in message and str(2 * Image.MAX_IMAGE_PIXELS) not in message


def _png_of_zeros(path: Path, width: int, height: int, bit_depth: int, colour_type: int) -> Path:
    """A PNG of zero samples written row by row: 7000x7000 16-bit grey is a 95 KB file."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes(width * channels * bit_depth // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


PEAK_MEMORY_OF_LOADING = """
import resource, sys
from preprocess.images import load_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
load_image(data, name="person image")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)  # Linux: KiB
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
@pytest.mark.parametrize("bit_depth,colour_type", [(16, 0), (8, 6)])  # 16-bit grey; RGBA onto white
def test_decoding_stays_within_its_memory_bound(tmp_path, bit_depth, colour_type):
    """A tiny 7000x7000 PNG (49 MP, under the pixel limit) once took 1.2 GB (16-bit grey, via
    float64 arrays) or 0.94 GB (RGBA) to load; the peak, in a fresh process, is now bounded."""
    path = _png_of_zeros(tmp_path / "big.png", 7000, 7000, bit_depth, colour_type)
    run = subprocess.run([sys.executable, "-c", PEAK_MEMORY_OF_LOADING, str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < MAX_DECODE_BYTES


def _grey_16_bit_png(size: int) -> bytes:
    return _bytes(Image.fromarray(np.full((size, size), 1000, np.uint16)))


def test_over_the_memory_bound_is_refused_with_what_fits():
    with pytest.raises(ImageLoadError) as caught:
        load_image(_grey_16_bit_png(1000), name="person image", max_bytes=1_000_000)
    assert str(caught.value) == (
        "person image is 1000x1000 at 16 bits per channel: too large to decode "
        "(6 MB needed, the limit is 1 MB); resize it to at most 408x408 and try again")
    assert load_image(_grey_16_bit_png(400), max_bytes=1_000_000).size == (400, 400)


def test_decoder_buffers_count():
    """A progressive JPEG holds every coefficient while it decodes, WebP two canvases: a JPEG over
    the bound is decoded at a reduced scale (libjpeg's draft), a WebP is refused."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (400, 400, 3), dtype=np.uint8))
    budget = 1_300_000  # 400x400 RGB with its RGB copy: 1.28 MB; progressive 4:4:4: 1.6 MB; WebP: 2.56 MB
    assert load_image(_bytes(img), max_bytes=budget).size == (400, 400)
    assert load_image(_bytes(img, "JPEG"), max_bytes=budget).size == (400, 400)
    progressive = _bytes(img, "JPEG", progressive=True, subsampling=0)
    assert load_image(progressive, max_bytes=budget).size == (200, 200)
    with pytest.raises(ImageLoadError, match="too large to decode"):
        load_image(_bytes(img, "WEBP"), max_bytes=budget)


def test_icons_are_not_read():
    """Pillow decodes an icon's embedded PNG while opening it, whatever size the icon claims."""
    png = _bytes(Image.new("RGB", (300, 300), "red"))
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
    with pytest.raises(ImageLoadError, match="not a readable image"):
        load_image(ico, max_pixels=1000)


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


@pytest.mark.parametrize("content", [None, "folder", b"", b"hello", "truncated", "bomb"])
def test_messages_show_the_role_and_file_name_never_a_folder(tmp_path, content):
    """In the app the file is in Gradio's cache (/tmp/gradio/<sha>/...): only its name is shown."""
    folder = tmp_path / "gradio" / "0123456789abcdef"
    folder.mkdir(parents=True)
    path = folder / "photo.png"
    if content == "folder":
        path.mkdir()
    elif content == "truncated":
        path.write_bytes(_bytes(Image.new("RGB", (64, 64), "red"))[:60])
    elif content == "bomb":
        path.write_bytes(_png_claiming(30000, 30000))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path, name="person image")
    message = str(caught.value)
    assert message.startswith("person image (photo.png)")
    assert "gradio" not in message and str(tmp_path) not in message


def test_garment_and_label_messages_name_their_role(tmp_path):
    (tmp_path / "mask.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match=r"^garment image \(shirt.jpg\): file not found$"):
        load_garment(tmp_path / "shirt.jpg")
    with pytest.raises(ImageLoadError, match=r"^uploaded mask \(mask.png\) is not a readable image"):
        load_label_image(tmp_path / "mask.png", "uploaded mask")


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


EXAMPLES = REPO / "examples"


def test_every_example_loads_and_is_documented():
    readme = (EXAMPLES / "README.md").read_text()
    files = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".png", ".py"))
    for path in files:
        assert f"`{path.relative_to(EXAMPLES).as_posix()}`" in readme, path
    for path in EXAMPLES.rglob("*.png"):
        assert load_image(path, name=path.name).mode == "RGB"
    poses = {p.name for p in (EXAMPLES / "pose").glob("*.png")}
    assert {"astronaut_mirrored.png", "cameraman.png"} <= poses  # two different people
    camera = Image.open(EXAMPLES / "pose" / "cameraman.png")
    assert (camera.mode, camera.size) == ("RGB", (768, 1024))
    assert (EXAMPLES / "pose" / "cameraman.png").stat().st_size < 600_000


def test_make_examples_regenerates_the_garments_without_scikit_image():
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert "skimage" not in sys.modules
    for name in ("striped_tee", "logo_tee", "checked_dress"):
        shipped = np.asarray(Image.open(EXAMPLES / "garment" / f"{name}.png"))
        assert np.array_equal(np.asarray(getattr(script, name)()), shipped), name
    camera = np.asarray(Image.open(EXAMPLES / "pose" / "cameraman.png"))
    assert camera[0].min() == 255 and camera[-1].min() == 255  # fitted onto white, above and below
    with pytest.raises(SystemExit, match="not scikit-image's CC0 camera.png"):
        script.cameraman(EXAMPLES / "garment" / "logo_tee.png")
