"""Robust image decoding: any format Pillow opens -> an 8-bit RGB image, or a `BadImage` with the reason.

- EXIF orientation is applied (`ImageOps.exif_transpose`); the reported width/height are the upright ones.
- CMYK, palette, 1-bit, 16-bit and float images become RGB; transparency is composited on white.
- Animated formats (GIF, WebP, APNG) give their first frame (where `Image.open` leaves them).
- The pixel count is checked against `max_pixels` *before* decoding (decompression bombs); Pillow's own
  global limit is lifted for the duration so that the configured one is the only one that applies.
- Large JPEGs are decoded at a reduced scale when `draft_size` allows it (DCT scaling, much faster).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class BadImage(ValueError):
    """An input that cannot be used as an image; the message says why."""


@dataclass
class Decoded:
    image: Image.Image  # RGB, upright, possibly reduced by JPEG draft mode
    width: int  # full-resolution upright width
    height: int  # full-resolution upright height
    format: str | None


def _open(data: bytes | Path | str, max_pixels: int) -> Image.Image:
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) == 0:
            raise BadImage("empty file (0 bytes)")
        src: io.BytesIO | str = io.BytesIO(data)
    else:
        if Path(data).stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        src = str(data)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our explicit check below is the one that applies
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src)
    except UnidentifiedImageError as e:
        raise BadImage("not an image Pillow can identify") from e
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"unreadable image header: {e}") from e
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadImage(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        im.close()
        raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # a corrupt EXIF block must not cost us the image
        return 1


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha is composited on white, 16-bit/float scaled to 8 bits."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode.startswith("I;16"):
            a8 = (a.astype(np.uint32) >> 8).astype(np.uint8)
        elif mode == "I":
            a8 = (a >> 8 if a.max(initial=0) > 255 else a).clip(0, 255).astype(np.uint8)
        else:  # float: [0,1] or [0,255]
            a = np.nan_to_num(a.astype(np.float32))
            a8 = (a * 255 if a.max(initial=0) <= 1.0 else a).clip(0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes | Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Decoded:
    """Decode bytes or a file into an upright RGB image plus its full-resolution upright size.

    `draft_size`: JPEGs may be decoded at 1/2, 1/4 or 1/8 scale as long as both sides stay >= it.
    Raises `BadImage` (with the reason) for empty, truncated, unidentifiable or oversized inputs.
    """
    try:
        opened = im = _open(data, max_pixels)
    except FileNotFoundError as e:
        raise BadImage(f"file not found: {e.filename}") from e
    except OSError as e:
        raise BadImage(f"cannot read file: {e}") from e
    rgb: Image.Image | None = None
    try:
        fmt = im.format
        w, h = im.size
        orientation = _orientation(im)
        if orientation in _SWAPS_SIDES:
            w, h = h, w
        if draft_size and fmt == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
            im.draft(im.mode, (draft_size, draft_size))
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadImage(f"corrupt or truncated image data ({fmt}): {e}") from e
        if orientation != 1:
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # keep the image as stored rather than lose it
                pass
        rgb = to_rgb(im)
        rgb.load()
        return Decoded(rgb, w, h, fmt)
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise BadImage(f"cannot decode image: {type(e).__name__}: {e}") from e
    finally:
        if opened is not rgb:
            opened.close()  # the file handle; never the image we return


def load_image(path_or_bytes: bytes | Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A file or bytes -> upright 8-bit RGB `PIL.Image` at full resolution. Raises `BadImage` with the reason."""
    return decode_image(path_or_bytes, max_pixels).image
