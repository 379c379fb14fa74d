"""The metadata table (one row per indexed image) and the skipped-files table, as pyarrow tables.

Core columns come first with fixed types; user columns (manifest columns, webdataset `.txt`/`.json`
fields) follow with inferred types. A user column whose name clashes with a core column is renamed
`user_<name>`, except `caption`, which fills the caption column.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CORE = pa.schema([
    ("image_id", pa.int64()),
    ("path", pa.string()),  # absolute file path, or "<tar>::<member>"
    ("source", pa.string()),  # the directory / manifest / tar / file it was found through
    ("sha256", pa.string()),
    ("size", pa.int64()),  # bytes
    ("mtime", TS),
    ("width", pa.int32()),  # full-resolution, after EXIF orientation
    ("height", pa.int32()),
    ("format", pa.string()),  # Pillow format name
    ("caption", pa.string()),  # nullable; filled by a captioner or a manifest `caption` column
    ("indexed_at", TS),
    ("shard", pa.int32()),  # feature / embedding shard holding this image
    ("row", pa.int32()),  # row within that shard
])
CORE_NAMES = set(CORE.names)
SKIPPED = pa.schema([("path", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                     ("size", pa.int64()), ("mtime", TS), ("sha256", pa.string())])


def timestamp(v: float | datetime | None) -> datetime | None:
    if v is None or isinstance(v, datetime):
        return v
    return datetime.fromtimestamp(float(v), UTC)


def to_us(v: float | datetime) -> int:
    """Microseconds since the epoch, rounded exactly as the stored timestamp column is."""
    return (timestamp(v) - _EPOCH) // timedelta(microseconds=1)  # type: ignore[operator]


def user_columns(meta: dict[str, Any]) -> dict[str, Any]:
    """User metadata -> column values, renaming clashes with core columns."""
    out = {}
    for k, v in meta.items():
        k = str(k)
        if k == "caption":
            continue
        out[f"user_{k}" if k in CORE_NAMES else k] = v
    return out


def _column(values: list[Any]) -> pa.Array:
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        arr = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, default=str)
                        for v in values], pa.string())
    return arr  # an all-null column stays null-typed, so that it takes the type of the column it joins


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Row dicts (core fields + user columns) -> a table with the core schema first."""
    core = {f.name: pa.array([r.get(f.name) if f.type != TS else timestamp(r.get(f.name)) for r in rows], f.type)
            for f in CORE}
    extra_names: list[str] = []
    for r in rows:
        extra_names += [k for k in r if k not in CORE_NAMES and k not in extra_names]
    extra = {k: _column([r.get(k) for r in rows]) for k in extra_names}
    return pa.table({**core, **extra})


def empty_table() -> pa.Table:
    return CORE.empty_table()


def concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate tables whose user columns may differ (missing -> null; clashing types -> string)."""
    tables = [t for t in tables if t.num_columns]
    if not tables:
        return empty_table()
    try:
        out = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        out = _concat_as_strings(tables)
    for i, f in enumerate(out.schema):  # columns that are null everywhere: string, for readers' sake
        if pa.types.is_null(f.type):
            out = out.set_column(i, f.name, out.column(i).cast(pa.string()))
    return out


def _concat_as_strings(tables: list[pa.Table]) -> pa.Table:
    """Concatenate, turning user columns whose types cannot be unified into strings."""
    clash = set()
    for n in {n for t in tables for n in t.column_names if n not in CORE_NAMES}:
        fields = [pa.schema([t.schema.field(n)]) for t in tables if n in t.column_names]
        try:
            pa.unify_schemas(fields, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            clash.add(n)
    fixed = []
    for t in tables:
        for n in clash & set(t.column_names):
            values = [None if v is None else v if isinstance(v, str) else json.dumps(v, default=str)
                      for v in t.column(n).to_pylist()]
            t = t.set_column(t.column_names.index(n), n, pa.array(values, pa.string()))
        fixed.append(t)
    return pa.concat_tables(fixed, promote_options="permissive")


def skipped_table(entries: dict[str, dict[str, Any]]) -> pa.Table:
    rows = [entries[k] for k in sorted(entries)]
    return pa.table({f.name: pa.array([r.get(f.name) if f.type != TS else timestamp(r.get(f.name)) for r in rows],
                                      f.type) for f in SKIPPED})
