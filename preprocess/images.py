"""Loading user images safely and fitting them to the model's canvas (spec §5 "Resize")."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import OptionError, UserError

MODEL_SIZE = (768, 1024)  # (width, height) every published model was fed
MAX_PIXELS = 50_000_000  # refuse larger images (decompression bombs, absurd uploads)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


class ImageLoadError(UserError, ValueError):
    """An input image cannot be used; the message says why and what to do."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and a.max() <= 1.0 else (255.0 if a.max() <= 255 else 65535.0)
        img = Image.fromarray(np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: str | Path | bytes | BinaryIO | Image.Image, *, name: str = "image",
               max_pixels: int = MAX_PIXELS, keep_alpha: bool = False) -> Image.Image:
    """Open an image as RGB (or RGBA with ``keep_alpha``): EXIF orientation applied, first
    frame of an animation, any mode converted. Raises ``ImageLoadError`` for anything unusable.
    """
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(source)
        w, h = img.size
        if w == 0 or h == 0:
            raise ImageLoadError(f"{name} is empty (0 pixels)")
        if w * h > max_pixels:
            raise ImageLoadError(f"{name} is too large ({w}x{h} = {w * h / 1e6:.0f} MP; "
                                 f"the limit is {max_pixels / 1e6:.0f} MP): resize it first")
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{name}: file not found: {source}") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{name} is too large ({e}): resize it first") from None
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name} is not a readable image ({e}); use a PNG, JPEG or WebP file") from None
    except MemoryError:
        raise ImageLoadError(f"{name} is too large to decode: resize it first") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, TypeError, KeyError...
        raise ImageLoadError(f"{name} is truncated or corrupt ({type(e).__name__}: {e}); export it again") from None
    if keep_alpha and img.mode in ("RGBA", "LA", "PA", "P"):
        return img.convert("RGBA")
    return _to_rgb(img)


def fit_to_canvas(img: Image.Image, size: tuple[int, int] = MODEL_SIZE, *,
                  fill: tuple[int, int, int] = WHITE,
                  resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Fit ``img`` into ``size`` (width, height) keeping its aspect ratio, centred on ``fill``.

    Masks and DensePose images use ``fill=BLACK`` and ``NEAREST`` so labels stay labels.
    """
    w, h = size
    scale = min(w / img.width, h / img.height)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resized = img.resize(new, resample) if new != img.size else img
    canvas = Image.new(img.mode, size, fill if img.mode == "RGB" else fill[0])
    canvas.paste(resized, ((w - new[0]) // 2, (h - new[1]) // 2))
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
    return path


def save_image_atomic(img: Image.Image, path: str | Path) -> Path:
    """Write ``img`` to ``path`` via a temporary file, so a failure never leaves half a file."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageLoadError(f"cannot tell the image format of {path}: use .png, .jpg or .webp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        img.save(tmp, format=fmt)
        tmp.replace(path)
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
