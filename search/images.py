"""The index's images as the UI and the service show them: files by image id, thumbnails, query uploads.

Security rule: an image file is read only through an image id of the open index (`indexed_path`), never
through a path that came from a request, so a crafted path cannot reach a file outside the index.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from qformer.decode import DEFAULT_MAX_PIXELS, decode_image
from qformer.sources import Item, read_item_bytes

THUMBNAIL_SIZE = 320  # longest side, pixels


class NotIndexed(LookupError):
    """A requested image is not part of the open index."""


def indexed_path(index: Any, image_id: Any) -> str:
    """The stored path of an image of the open index; `NotIndexed` for anything else (ids only, no paths)."""
    try:
        i = int(str(image_id).strip())
    except ValueError:
        raise NotIndexed(f"not an image of this index: {str(image_id)[:80]!r}") from None
    try:
        return index.paths([i])[0]
    except KeyError:
        raise NotIndexed(f"not an image of this index: {i}") from None


def indexed_bytes(index: Any, image_id: Any) -> bytes:
    """The encoded bytes of an indexed image (file or tar member). OSError when the file has gone."""
    return read_item_bytes(Item(path=indexed_path(index, image_id), source="", size=-1, mtime=0.0))


def read_indexed_image(index: Any, image_id: Any, draft_size: int | None = None) -> Image.Image:
    """Decode an indexed image (file or tar member), EXIF-oriented RGB. draft_size: a large JPEG may be
    decoded at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size (much faster, for thumbnails)."""
    return decode_image(indexed_bytes(index, image_id), draft_size=draft_size).image


def thumbnail_bytes(index: Any, image_id: Any, size: int = THUMBNAIL_SIZE) -> bytes:
    """A JPEG thumbnail (longest side `size`) of an indexed image."""
    return thumbnail(indexed_bytes(index, image_id), size)


def thumbnail(data: bytes, size: int = THUMBNAIL_SIZE) -> bytes:
    """A JPEG thumbnail (longest side `size`) of encoded image bytes. ValueError (`BadImage`) when they are
    not an image."""
    im = decode_image(data, draft_size=size).image
    im.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def read_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An uploaded query image; ValueError with a readable message when it is not one (or has more than
    max_pixels pixels: the decompression-bomb guard, checked before decoding)."""
    if not data:
        raise ValueError("the uploaded file is empty")
    try:
        return decode_image(data, max_pixels).image
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"the uploaded file is not an image Pillow can read ({e})") from e
