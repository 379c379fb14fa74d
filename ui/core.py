"""What the search UI does, without Streamlit: filters from metadata, safe image access, thumbnails, paging.

`ui/app.py` draws widgets and calls these; tests call them directly too. Search itself is the engine's
(`search.engine.Searcher`): nothing here ranks anything.

Security rule: the UI reads image files only through an image id of the open index (`search.images`),
never through a path that came from a request, so a crafted path cannot reach a file outside the index.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from search.images import (  # noqa: F401  (the UI's image access is the service's: one implementation)
    THUMBNAIL_SIZE,
    NotIndexed,
    indexed_path,
    read_indexed_image,
    read_upload,
    thumbnail_bytes,
)

# Columns the engine keeps for itself: not offered as filters.
INTERNAL_COLUMNS = {"image_id", "shard", "row", "sha256", "path", "source", "caption", "indexed_at"}
MAX_CHOICES = 50  # a text column with more distinct values than this gets no choice list
PAGE_SIZES = (12, 24, 48)
_ONE_DAY = timedelta(days=1)


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
def placeholder_thumbnail(size: int = THUMBNAIL_SIZE) -> bytes:
    """A grey square, shown when an indexed file has gone or become unreadable since indexing."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 200, 200)).save(buf, "JPEG")
    return buf.getvalue()


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
