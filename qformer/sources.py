"""Where images come from: directories (recursive), CSV/Parquet manifests, webdataset tar shards.

Every source expands into `Item`s, one per image, each with a stable key (`path`): the absolute file
path, or `<absolute tar path>::<member name>` for an image inside a tar shard. Manifest columns other
than the path column, and a shard's `.txt` / `.json` members, become the item's metadata.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from qformer.features import TAR_SEP, read_tar_member

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PATH_COLUMNS = ("path", "filepath", "file_path", "image_path", "image", "filename", "file")


class SourceError(ValueError):
    """A source that cannot be listed (missing, unknown kind, manifest without a path column)."""


@dataclass
class Item:
    """One image to index."""

    path: str  # the key: absolute file path, or "<tar>::<member>"
    source: str  # the source it was found through (absolute dir / manifest / tar path)
    size: int  # bytes
    mtime: float  # seconds since the epoch
    tar_offset: int = -1  # member data offset in an uncompressed tar, else -1
    meta: dict[str, Any] = field(default_factory=dict)  # user metadata (manifest columns, .txt/.json)

    @property
    def in_tar(self) -> bool:
        return TAR_SEP in self.path


def image_extensions() -> set[str]:
    """File extensions of every format Pillow can open (lowercase, with the dot)."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def read_item_bytes(item: Item) -> bytes:
    """The encoded image bytes of an item (file, or tar member)."""
    if not item.in_tar:
        with open(item.path, "rb") as f:
            return f.read()
    tar_path, member = item.path.split(TAR_SEP, 1)
    return read_tar_member(tar_path, member, item.tar_offset, item.size)  # shared with qformer's image reader


def expand_source(source: str | Path) -> list[Path]:
    """Globs (`*`, `?`, `[..]`) and webdataset brace ranges (`shard-{000..009}.tar`) -> paths."""
    s = str(source)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", s)
    if m:
        a, b = m.group(1), m.group(2)
        width = len(a)
        return [p for i in range(int(a), int(b) + 1)
                for p in expand_source(s[: m.start()] + str(i).zfill(width) + s[m.end():])]
    if any(c in s for c in "*?["):
        hits = sorted(glob.glob(os.path.expanduser(s), recursive=True))
        if not hits:
            raise SourceError(f"{s}: the pattern matches nothing")
        return [Path(h) for h in hits]
    return [Path(s).expanduser()]


def _abs(p: str | Path) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(p))))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def scan_directory(root: Path, extensions: set[str], include_hidden: bool = False) -> Iterable[Item]:
    """Image files under `root`, recursively, in sorted order (symlinked directories are not followed)."""
    src = _abs(root)
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if include_hidden or not _is_hidden(d))
        for name in sorted(filenames):
            if (not include_hidden and _is_hidden(name)) or os.path.splitext(name)[1].lower() not in extensions:
                continue
            p = os.path.join(dirpath, name)
            try:
                st = os.stat(p)
            except OSError:
                continue  # vanished or a dangling link
            yield Item(p, src, st.st_size, st.st_mtime)


def _read_manifest_table(path: Path):  # -> pyarrow.Table
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    kind = MANIFEST_SUFFIXES[path.suffix.lower()]
    try:
        if kind == "parquet":
            return pq.read_table(path)
        opts = pacsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        return pacsv.read_csv(path, parse_options=opts)
    except Exception as e:
        raise SourceError(f"{path}: cannot read manifest ({type(e).__name__}: {e})") from e


def scan_manifest(path: Path, path_column: str | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items of a CSV/Parquet manifest (relative paths are relative to the manifest's folder), and the
    (path, reason) of rows that name no usable file."""
    table = _read_manifest_table(path)
    names = table.column_names
    col = path_column or next((c for c in PATH_COLUMNS if c in names), None)
    if col is None or col not in names:
        raise SourceError(f"{path}: no path column (looked for {path_column or list(PATH_COLUMNS)}; "
                          f"columns are {names})")
    src, base = _abs(path), os.path.dirname(_abs(path))
    rows = table.to_pylist()
    items, missing = [], []
    for row in rows:
        raw = row.pop(col)
        if raw is None or str(raw).strip() == "":
            missing.append((f"{src}[row {len(items) + len(missing)}]", f"empty {col!r} in manifest"))
            continue
        p = _abs(os.path.join(base, str(raw)))
        try:
            st = os.stat(p)
        except OSError as e:
            missing.append((p, f"listed in manifest {src} but cannot stat: {e.strerror or e}"))
            continue
        items.append(Item(p, src, st.st_size, st.st_mtime, meta=row))
    return items, missing


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = member path up to the first dot of its basename; the rest is the ext."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem), ext.lower()


def scan_tar(path: Path, extensions: set[str]) -> tuple[list[Item], list[tuple[str, str]]]:
    """Images of a webdataset shard: one item per key with an image member; `<key>.txt` becomes column
    `txt` and the top-level fields of `<key>.json` become columns."""
    src = _abs(path)
    compressed = not src.lower().endswith(".tar")
    try:
        tf = tarfile.open(src)
    except (OSError, tarfile.TarError) as e:
        raise SourceError(f"{src}: not a readable tar shard ({e})") from e
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    problems: list[tuple[str, str]] = []
    with tf:
        members = tf.getmembers()
        for m in members:
            if m.isfile():
                key, ext = _split_key(m.name)
                groups.setdefault(key, {})[ext] = m
        items = []
        for key in sorted(groups):
            g = groups[key]
            img_ext = next((e for e in g if "." + e.rsplit(".", 1)[-1] in extensions), None)
            if img_ext is None:
                continue
            m = g[img_ext]
            meta: dict[str, Any] = {}
            for ext, mm in g.items():
                if ext not in ("txt", "json"):
                    continue
                try:
                    raw = tf.extractfile(mm).read()  # type: ignore[union-attr]
                    if ext == "txt":
                        meta["txt"] = raw.decode("utf-8", "replace").strip()
                    else:
                        obj = json.loads(raw)
                        if isinstance(obj, dict):
                            meta.update(obj)
                except (OSError, ValueError, tarfile.TarError) as e:
                    problems.append((f"{src}{TAR_SEP}{mm.name}", f"metadata member unreadable: {e}"))
            items.append(Item(f"{src}{TAR_SEP}{m.name}", src, m.size, float(m.mtime),
                              -1 if compressed else m.offset_data, meta))
    return items, problems


def collect(
    sources: list[str | Path],
    path_column: str | None = None,
    include_hidden: bool = False,
) -> tuple[list[Item], list[tuple[str, str]], set[str]]:
    """All items of all sources (deduplicated by path; later metadata fills earlier gaps), the
    (path, reason) of listed-but-unusable entries, and the absolute source roots that were scanned."""
    exts = image_extensions()
    by_path: dict[str, Item] = {}
    problems: list[tuple[str, str]] = []
    roots: set[str] = set()
    for s in sources:
        for p in expand_source(s):
            if p.is_dir():
                found: Iterable[Item] = scan_directory(p, exts, include_hidden)
            elif not p.exists():
                raise SourceError(f"{p}: no such file or directory")
            elif p.suffix.lower() in MANIFEST_SUFFIXES:
                found, bad = scan_manifest(p, path_column)
                problems += bad
            elif str(p).lower().endswith(TAR_SUFFIXES):
                found, bad = scan_tar(p, exts)
                problems += bad
            else:  # a single image file
                st = p.stat()
                a = _abs(p)
                found = [Item(a, a, st.st_size, st.st_mtime)]
            roots.add(_abs(p))
            for it in found:
                old = by_path.get(it.path)
                if old is None:
                    by_path[it.path] = it
                else:
                    old.meta.update({k: v for k, v in it.meta.items() if v is not None})
    return [by_path[k] for k in sorted(by_path)], problems, roots
