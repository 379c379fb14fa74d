"""What the search UI does, without Streamlit: filters from metadata, safe image access, thumbnails, paging.

`ui/app.py` draws widgets and calls these; tests call them directly too. Search itself is the engine's
(`search.engine.Searcher`): nothing here ranks anything.

Security rule: the UI reads image files only through an image id of the open index (`indexed_path`),
never through a path that came from a request, so a crafted path cannot reach a file outside the index.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from indexer.decode import decode_image, load_image
from indexer.sources import TAR_SEP

# Columns the engine keeps for itself: not offered as filters.
INTERNAL_COLUMNS = {"image_id", "shard", "row", "sha256", "path", "source", "caption", "indexed_at"}
MAX_CHOICES = 50  # a text column with more distinct values than this gets no choice list
THUMBNAIL_SIZE = 320  # longest side, pixels
PAGE_SIZES = (12, 24, 48)
_ONE_DAY = timedelta(days=1)


class NotIndexed(LookupError):
    """A requested image is not part of the open index."""


# ---- filters -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnFilter:
    """A filter widget built from one metadata column."""

    column: str
    kind: str  # "choice" (text: pick values) | "range" (numbers) | "date" (timestamps and dates)
    options: list[Any] = field(default_factory=list)  # choice: the distinct values, sorted
    low: Any = None  # range/date: the column's minimum
    high: Any = None  # range/date: the column's maximum


def column_filters(metadata: pa.Table) -> list[ColumnFilter]:
    """One filter per useful metadata column: choices for text, ranges for numbers, date ranges for times."""
    out: list[ColumnFilter] = []
    for name in metadata.column_names:
        if name in INTERNAL_COLUMNS:
            continue
        col = metadata[name]
        t = col.type
        if col.null_count == len(col):
            continue
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t):
            values = pc.unique(col.drop_null()).to_pylist()
            if 1 < len(values) <= MAX_CHOICES:
                out.append(ColumnFilter(name, "choice", options=sorted(values)))
        elif pa.types.is_integer(t) or pa.types.is_floating(t):
            mm = pc.min_max(col)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if lo is not None and hi is not None and lo < hi and math.isfinite(lo) and math.isfinite(hi):
                out.append(ColumnFilter(name, "range", low=lo, high=hi))
        elif pa.types.is_timestamp(t) or pa.types.is_date(t):
            mm = pc.min_max(col)
            lo, hi = _as_date(mm["min"].as_py()), _as_date(mm["max"].as_py())
            if lo is not None and hi is not None and lo < hi:
                out.append(ColumnFilter(name, "date", low=lo, high=hi))
    return out


def _as_date(v: Any) -> date | None:
    return v.date() if isinstance(v, datetime) else v


def quote_identifier(name: str) -> str:
    """A SQL identifier in double quotes (embedded quotes doubled), so any column name is safe."""
    return '"' + name.replace('"', '""') + '"'


def where_clause(filters: list[ColumnFilter], chosen: dict[str, Any], free_sql: str = "") -> tuple[str, list[Any]]:
    """(SQL predicate with ? placeholders, parameters) for the chosen filter values plus a free WHERE text.

    chosen: column -> list of values (choice) or (low, high) (range, date). A choice with nothing picked, or
    a range left at the column's full extent, adds nothing. Values always travel as parameters.
    """
    parts: list[str] = []
    params: list[Any] = []
    by_name = {f.column: f for f in filters}
    for name, value in chosen.items():
        f = by_name.get(name)
        if f is None or value is None:
            continue
        col = quote_identifier(name)
        if f.kind == "choice":
            values = list(value)
            if values:
                parts.append(f"{col} IN ({', '.join('?' for _ in values)})")
                params.extend(values)
        elif f.kind == "range":
            lo, hi = value
            if (lo, hi) != (f.low, f.high):
                parts.append(f"{col} BETWEEN ? AND ?")
                params.extend([lo, hi])
        elif f.kind == "date":
            lo, hi = value
            if (lo, hi) != (f.low, f.high):  # whole days, in UTC: [lo 00:00, hi+1 00:00)
                parts.append(f"{col} >= ? AND {col} < ?")
                params.extend([datetime.combine(lo, time(), UTC),
                               datetime.combine(hi, time(), UTC) + _ONE_DAY])
    free_sql = (free_sql or "").strip()
    if free_sql:
        parts.append(f"({free_sql})")
    return " AND ".join(parts), params


# ---- images: only the index's own files ------------------------------------------------------------------
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


def read_indexed_image(index: Any, image_id: Any, draft_size: int | None = None) -> Image.Image:
    """Decode an indexed image (file or tar member), EXIF-oriented RGB. draft_size: a large JPEG may be
    decoded at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size (much faster, for thumbnails)."""
    path = indexed_path(index, image_id)
    if TAR_SEP in path:
        tar_path, member = path.split(TAR_SEP, 1)
        import tarfile

        with tarfile.open(tar_path) as tf:
            fobj = tf.extractfile(member)
            if fobj is None:
                raise OSError(f"{tar_path}: member {member} is not a regular file")
            return decode_image(fobj.read(), draft_size=draft_size).image
    return decode_image(Path(path), draft_size=draft_size).image


def thumbnail_bytes(index: Any, image_id: Any, size: int = THUMBNAIL_SIZE) -> bytes:
    """A JPEG thumbnail (longest side `size`) of an indexed image."""
    im = read_indexed_image(index, image_id, draft_size=size)
    im.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def placeholder_thumbnail(size: int = THUMBNAIL_SIZE) -> bytes:
    """A grey square, shown when an indexed file has gone or become unreadable since indexing."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 200, 200)).save(buf, "JPEG")
    return buf.getvalue()


def read_upload(data: bytes) -> Image.Image:
    """An uploaded query image; ValueError with a readable message when it is not one."""
    if not data:
        raise ValueError("the uploaded file is empty")
    try:
        return load_image(data)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"the uploaded file is not an image Pillow can read ({e})") from e


# ---- paging and display ----------------------------------------------------------------------------------------
def page_offset(page: int, per_page: int) -> int:
    """Results to skip for a 1-based page."""
    return max(0, page - 1) * per_page


def score_line(hit: dict[str, Any]) -> str:
    """'fused 1.234 · ITC 0.321 · ITM 0.913' for a hit dict (scores the query did not compute are left out)."""
    parts = [f"fused {hit['score']:.3f}"]
    for key, label in (("itc", "ITC"), ("itm", "ITM"), ("image_sim", "image")):
        if hit.get(key) is not None:
            parts.append(f"{label} {hit[key]:.3f}")
    return " · ".join(parts)


def index_summary(index: Any) -> dict[str, Any]:
    """What the index page shows: image count, model, build dates and time, skipped files with reasons."""
    info = index.info()
    return {
        "images": info["counts"]["images"],
        "model": info["model"]["name"],
        "model_source": info["model"].get("source"),
        "created": info["created"],
        "updated": info["updated"],
        "build_seconds": info["build_seconds"],
        "complete": info["complete"],
        "vectors": f"{info['num_queries']} × {info['embed_dim']} per image",
        "skipped": info["skipped"],
        "index_dir": info["index_dir"],
    }
