"""Loading user images safely and fitting them to the model's canvas (spec §5 "Resize")."""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import OptionError, UserError

MODEL_SIZE = (768, 1024)  # (width, height) every published model was fed
MAX_PIXELS = 50_000_000  # refuse larger images (decompression bombs, absurd uploads)
# The most memory loading one image may take at its peak (see _decode_bytes): 8 bytes a pixel of
# MAX_PIXELS, so every PNG, GIF, BMP and JPEG within MAX_PIXELS fits (a progressive JPEG with full
# colour resolution is decoded at a reduced scale); a WebP fits up to 25 MP.
MAX_DECODE_BYTES = 400_000_000
# The formats read: those whose decoding cost _decode_bytes knows from the header (JPEG includes
# MPO). Not ICO, for one: Pillow decodes an icon's embedded PNG, of any size, while opening it.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"
_JPEG_FORMATS = ("JPEG", "MPO")
_JPEG_SCALES = (2, 4, 8)  # the reductions libjpeg decodes directly (Image.draft)
_COPY_BYTES = 4  # a pixel of one RGB or RGBA image: Pillow stores both in 4 bytes
_COEFFICIENT_BYTES = 2  # a progressive JPEG keeps every DCT coefficient (int16) until its last scan
_WEBP_FRAME_BYTES = 4  # the decoded WebP frame, as bytes, while it is copied into the image
_WEBP_HELD_BYTES = 8  # libwebp's two canvases, alive as long as the image
_TIFF_BITS, _TIFF_SAMPLES, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 258, 277, 322, 323
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_MODE_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
_KEPT_ALPHA_MODES = ("RGBA", "LA", "PA", "P")  # returned as RGBA with ``keep_alpha``
_STRIP_PIXELS = 1 << 20  # high-bit images are converted about a million pixels at a time


class ImageLoadError(UserError, ValueError):
    """An input image cannot be used; the message says why and what to do."""


def _strips(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, pixels as an array) for strips of about ``_STRIP_PIXELS`` pixels, top to bottom."""
    rows = max(1, _STRIP_PIXELS // img.width)
    for y in range(0, img.height, rows):
        yield y, np.asarray(img.crop((0, y, img.width, min(y + rows, img.height))))


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16- and 32-bit grey (I;16, I, F) -> L, scaled as a whole: floats up to 1.0 and integers up
    to 255 keep their scale, otherwise 65535 is white. A strip at a time: one byte a pixel."""
    high = np.max([strip.max() for _, strip in _strips(img)])
    top = 1.0 if img.mode == "F" and high <= 1.0 else (255.0 if high <= 255 else 65535.0)
    out = np.empty((img.height, img.width), np.uint8)
    for y, strip in _strips(img):
        out[y:y + len(strip)] = np.clip(strip.astype(np.float64) / top * 255.0, 0, 255).round()
    return Image.fromarray(out)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any 8-bit PIL mode -> RGB (RGB itself is returned as is); transparency is composited onto white."""
    if img.mode == "La":  # premultiplied: Pillow converts it only to LA
        img = img.convert("LA")
    if img.mode in ("PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        canvas = Image.new("RGB", img.size, WHITE)
        canvas.paste(img, mask=img)
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def _label(source, name: str) -> str:
    """How messages call the image: its role and at most its file's base name, never a folder."""
    path = source if isinstance(source, (str, os.PathLike)) else (
        getattr(source, "filename", None) or getattr(source, "name", None))
    base = os.path.basename(str(path)) if isinstance(path, (str, os.PathLike)) else ""
    return f"{name} ({base})" if base and base not in name else name


def _reason(error: Exception, source) -> str:
    """A decoder's words for a message, without any folder."""
    if isinstance(error, OSError) and error.filename is not None:  # names the file: keep the reason
        return error.strerror or type(error).__name__
    text = str(error)
    if isinstance(source, (str, os.PathLike)):
        for path in (os.path.abspath(source), str(source)):
            text = text.replace(path, os.path.basename(path))
    return f"{type(error).__name__}: {text}"


def _stored_bytes(img: Image.Image) -> int:
    """Bytes a pixel in Pillow's memory (a palette image with transparency becomes RGBA)."""
    if img.mode == "P" and "transparency" in img.info:
        return _COPY_BYTES
    if img.mode in ("1", "L", "P"):
        return 1
    return 2 if img.mode.startswith("I;16") else 4


def _tiff_bits(img: Image.Image) -> tuple[int, ...]:
    bits = img.tag_v2.get(_TIFF_BITS, (1,))
    return bits if isinstance(bits, tuple) else (bits,)


def _jpeg_coefficient_bytes(img: Image.Image) -> float:
    """Bytes a pixel of a progressive JPEG's coefficient buffer: 2 per sample of each component."""
    layers = getattr(img, "layer", None) or [(None, 1, 1, 0)] * len(img.getbands())
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    return _COEFFICIENT_BYTES * sum(h * v for _, h, v, _ in layers) / (h_max * v_max)


def _decoder_bytes(img: Image.Image) -> float:
    """What the decoder of ``img`` holds besides the image while it decodes (bytes)."""
    pixels = img.width * img.height
    if img.format == "WEBP":
        return pixels * _WEBP_FRAME_BYTES
    if img.format in _JPEG_FORMATS and img.info.get("progressive"):
        return pixels * _jpeg_coefficient_bytes(img)  # at full size, whatever the draft scale
    if img.format == "TIFF":  # one strip or tile of raw samples (or of RGBA)
        tile = img.tag_v2.get(_TIFF_TILE_WIDTH, 0) * img.tag_v2.get(_TIFF_TILE_LENGTH, 0)
        raw = img.tag_v2.get(_TIFF_SAMPLES, len(_tiff_bits(img))) * max(_tiff_bits(img)) / 8
        return max(pixels, tile) * max(raw, _COPY_BYTES)
    return 0


def _decode_bytes(img: Image.Image, pixels: int | None = None) -> int:
    """The peak memory of loading ``img`` (not decoded yet) into ``pixels`` pixels (default: all):
    the decoded image with what its decoder holds meanwhile, or the image with one RGB(A) copy
    (the conversion, the alpha composite or the EXIF rotation), whichever is more."""
    pixels = img.width * img.height if pixels is None else pixels
    stored = _stored_bytes(img)
    held = _WEBP_HELD_BYTES if img.format == "WEBP" else 0
    decoding = pixels * stored + _decoder_bytes(img)
    converting = pixels * (stored + _COPY_BYTES)
    return math.ceil(max(decoding, converting) + pixels * held)


def _bits_per_channel(img: Image.Image) -> int:
    if img.format == "TIFF":
        return max(_tiff_bits(img))
    args = img.tile[0][3] if getattr(img, "tile", None) else None
    rawmode = args[0] if isinstance(args, tuple) and args else args
    if isinstance(rawmode, str) and ";16" in rawmode:  # 16-bit PNG colour, stored in 8 bits
        return 16
    return _MODE_BITS.get(img.mode, 8)


def _fitting(width: int, height: int, scale: float) -> str:
    return f"{max(1, math.floor(width * scale))}x{max(1, math.floor(height * scale))}"


def _check_pixels(img: Image.Image, label: str, max_pixels: int) -> None:
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageLoadError(f"{label} is empty (0 pixels)")
    if w * h > max_pixels:
        raise ImageLoadError(f"{label} is too large ({w}x{h} = {w * h / 1e6:.1f} MP; the limit is "
                             f"{max_pixels / 1e6:g} MP): resize it to at most "
                             f"{_fitting(w, h, math.sqrt(max_pixels / (w * h)))} and try again")


def _check_memory(img: Image.Image, label: str, max_bytes: int, may_reduce: bool) -> None:
    """Refuse an image whose decoding would need more than ``max_bytes``, after asking libjpeg
    for the largest reduced scale that fits (``may_reduce``: the image is ours to change)."""
    need = _decode_bytes(img)
    if need <= max_bytes:
        return
    if may_reduce and img.format in _JPEG_FORMATS:
        for scale in _JPEG_SCALES:
            pixels = math.ceil(img.width / scale) * math.ceil(img.height / scale)
            if _decode_bytes(img, pixels) <= max_bytes:
                img.draft(None, (max(1, img.width // scale), max(1, img.height // scale)))
                return
    w, h = img.size
    raise ImageLoadError(f"{label} is {w}x{h} at {_bits_per_channel(img)} bits per channel: too large to "
                         f"decode ({need / 1e6:.0f} MB needed, the limit is {max_bytes / 1e6:.0f} MB); "
                         f"resize it to at most {_fitting(w, h, math.sqrt(max_bytes / need))} and try again")


def _open(source, files: contextlib.ExitStack) -> tuple[Image.Image, bool]:
    """The image, not decoded yet, and whether this call opened it (and so may change it)."""
    if isinstance(source, Image.Image):
        return source, False
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        source = files.enter_context(open(source, "rb"))
    return Image.open(source, formats=FORMATS), True


def _decode(source, files: contextlib.ExitStack, label: str, max_pixels: int, max_bytes: int) -> Image.Image:
    """Open, check the header, decode the first frame and apply the EXIF orientation."""
    img, owned = _open(source, files)
    if img.tell() != 0:
        img.seek(0)
    _check_pixels(img, label, max_pixels)
    _check_memory(img, label, max_bytes, may_reduce=owned)
    if not owned:
        return ImageOps.exif_transpose(img)  # a copy: the caller's image stays as it was
    ImageOps.exif_transpose(img, in_place=True)
    return img


def load_image(source: str | Path | bytes | BinaryIO | Image.Image, *, name: str = "image",
               max_pixels: int = MAX_PIXELS, keep_alpha: bool = False,
               max_bytes: int = MAX_DECODE_BYTES) -> Image.Image:
    """Open an image as RGB (or RGBA with ``keep_alpha``): EXIF orientation applied, first
    frame of an animation, any mode converted. Raises ``ImageLoadError`` for anything unusable;
    its message calls the image ``name`` and at most its file's base name.

    The header is checked before anything is decoded: at most ``max_pixels`` pixels
    (``MAX_PIXELS``, 50 MP), and at most ``max_bytes`` (``MAX_DECODE_BYTES``, 400 MB) of memory
    for decoding and converting it, counted from its mode and format (16-bit and 32-bit images,
    WebP's and libjpeg's buffers, TIFF strips). A JPEG over ``max_bytes`` comes back decoded at
    1/2, 1/4 or 1/8 of its size when that fits (libjpeg's draft mode); anything else over it is
    refused. Formats: ``FORMATS``.
    """
    label = _label(source, name)
    try:
        with contextlib.ExitStack() as files:
            img = _decode(source, files, label, max_pixels, max_bytes)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: file not found") from None
    except (IsADirectoryError, PermissionError) as e:
        raise ImageLoadError(f"{label} cannot be read ({e.strerror})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's limit (above ours)
        raise ImageLoadError(f"{label} is too large (more than {max_pixels / 1e6:g} MP, the limit): "
                             "resize it and try again") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label} is not a readable image; use a {_FORMAT_NAMES} file") from None
    except MemoryError:
        raise ImageLoadError(f"{label} is too large to decode: resize it and try again") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, TypeError, KeyError...
        raise ImageLoadError(f"{label} is truncated or corrupt ({_reason(e, source)}); "
                             "export it again") from None
    if keep_alpha and img.mode in _KEPT_ALPHA_MODES:
        return img if img.mode == "RGBA" else img.convert("RGBA")
    if img.mode in _HIGH_BIT_MODES:
        img = _high_bit_to_l(img)  # the decoded image is freed before the RGB copy is made
    return _to_rgb(img)


def canvas_placement(image_size: tuple[int, int], size: tuple[int, int] = MODEL_SIZE
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where ``fit_to_canvas`` puts an image of ``image_size`` on a canvas of ``size``: its new size
    and its top-left corner, both (x, y)."""
    (iw, ih), (w, h) = image_size, size
    scale = min(w / iw, h / ih)
    new = (max(1, round(iw * scale)), max(1, round(ih * scale)))
    return new, ((w - new[0]) // 2, (h - new[1]) // 2)


def fit_to_canvas(img: Image.Image, size: tuple[int, int] = MODEL_SIZE, *,
                  fill: tuple[int, int, int] = WHITE,
                  resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Fit ``img`` into ``size`` (width, height) keeping its aspect ratio, centred on ``fill``.

    Masks and DensePose images use ``fill=BLACK`` and ``NEAREST`` so labels stay labels.
    """
    new, corner = canvas_placement(img.size, size)
    resized = img.resize(new, resample) if new != img.size else img
    canvas = Image.new(img.mode, size, fill if img.mode == "RGB" else fill[0])
    canvas.paste(resized, corner)
    return canvas


def binarize(mask: Image.Image) -> Image.Image:
    """A single-channel 0/255 mask, thresholded at 128 (as the pipeline reads PIL masks)."""
    return mask.convert("L").point(lambda v: 255 if v >= 128 else 0)


def fit_label_image(img: Image.Image, size: tuple[int, int] = MODEL_SIZE) -> Image.Image:
    """A mask or DensePose image on the canvas: nearest resampling, black padding."""
    return fit_to_canvas(img, size, fill=BLACK, resample=Image.Resampling.NEAREST)


def load_label_image(source, name: str, size: tuple[int, int] = MODEL_SIZE, *, binary: bool = False) -> Image.Image:
    """Load a mask (``binary``: single channel, thresholded at 128) or a DensePose image onto the canvas."""
    img = fit_label_image(load_image(source, name=name), size)
    return binarize(img) if binary else img


def check_output_path(path: str | Path) -> Path:
    """Refuse, before any work, an output path that cannot take an image: an unknown extension,
    an existing folder, a parent that is a file, or a folder this process may not write to."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"{path} is a folder: give a file name such as {path / 'result.png'}")
    if Image.registered_extensions().get(path.suffix.lower()) is None:
        raise OptionError(f"{path}: cannot tell the image format from {path.suffix or 'no extension'!r}; "
                          "use .png, .jpg or .webp")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders save_image_atomic would make
        folder = folder.parent
    if not folder.is_dir():
        raise OptionError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"cannot write {path}: no permission to write in {folder}")
    try:  # the real test: create (and remove) a file where save_image_atomic will write its temporary one
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise OptionError(f"cannot write {path}: {e.strerror or e} (in {folder})") from None
    return path


def save_image_atomic(img: Image.Image, path: str | Path) -> Path:
    """Write ``img`` to ``path`` via a temporary file, so a failure never leaves half a file; its
    colour profile (a photo's, kept through the paste-back) goes with it."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageLoadError(f"cannot tell the image format of {path}: use .png, .jpg or .webp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        img.save(tmp, format=fmt, icc_profile=img.info.get("icc_profile"))
        tmp.replace(path)
    except OSError as e:  # disk full, folder gone or made read-only since the check: say so, keep nothing
        raise OptionError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def preprocess_garment(img: Image.Image, size: tuple[int, int] = MODEL_SIZE) -> Image.Image:
    """A garment cut-out (PNG with transparency) -> RGB on white: cropped to its alpha box,
    centred on a square, then fitted into ``size``."""
    if img.mode not in ("RGBA", "LA", "PA", "P") and "transparency" not in img.info:
        raise ImageLoadError("garment preprocessing needs a PNG with a transparent background; "
                             "turn the option off for ordinary photos")
    rgba = img.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box is None:
        raise ImageLoadError("the garment image is fully transparent")
    crop = rgba.crop(box)
    side = max(crop.size)
    square = Image.new("RGBA", (side, side), WHITE + (255,))
    square.alpha_composite(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return fit_to_canvas(square.convert("RGB"), size)


def load_garment(source, size: tuple[int, int] = MODEL_SIZE, cut_out: bool = False) -> Image.Image:
    """The garment image on the canvas: a PNG cut-out cropped to its transparency
    (``cut_out``), else an ordinary photo fitted onto white."""
    if cut_out:
        return preprocess_garment(load_image(source, name="garment image", keep_alpha=True), size)
    return fit_to_canvas(load_image(source, name="garment image"), size)
