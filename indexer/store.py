"""On-disk layout of an index, and the primitives of its commit protocol.

    index_dir/
      CURRENT                          one line: the current generation's manifest, e.g. "gen-000007.json"
      gen-000007.json                  manifest of generation 7 (model, shapes, counts, file list, skipped...)
      metadata-000007.parquet          one row per image: image_id, path, sha256, ..., user columns
      skipped-000007.parquet           path, reason, ... of every input that was not indexed
      queries-000007.faiss             IndexIDMap2 over the Q query embeddings of every image (id = image_id)
      queries-000007.ivfdata           indexes built by the Ray engine: an IVF index (ids = image ids) whose
                                       inverted lists live in this file, memory-mapped (see indexer.distributed)
      features/shard-000003.npy        frozen-encoder tokens [n,N,C], fp16 or int8; written once, never changed
      features/shard-000003.scale.npy  int8 only: symmetric per-token scales [n,N] float32
      features/shard-000003.kv.npy     indexes built with `itm_kv`: the ITM re-ranker's cross-attention keys
                                       and values [n,L,2,N,H] (L cross layers; keys, values), bf16 bits as
                                       uint16, computed from the stored tokens exactly as search would
      embeddings/shard-000003.npy      query embeddings [n,Q,D] float32 (rebuilds FAISS without the model)
      .lock                            held (flock) by the one writer

Every data file is written to a temporary name, fsynced and renamed into place, and is never modified
afterwards. A generation becomes current when `CURRENT` is atomically replaced (temp + fsync + rename +
directory fsync), so a reader sees either the old generation or the new one, complete. Files that
neither the current nor the previous generation reference are garbage-collected after the switch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.errors import IndexCorrupt, IndexLocked, IndexNotFound

FORMAT = "qsearch-index"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
LOCK = ".lock"
FEATURES_DIR = "features"
EMBEDDINGS_DIR = "embeddings"
FEATURE_DTYPES = ("fp16", "int8")
_TMP = ".tmp-"


def gen_file(g: int) -> str:
    return f"gen-{g:06d}.json"


def metadata_file(g: int) -> str:
    return f"metadata-{g:06d}.parquet"


def skipped_file(g: int) -> str:
    return f"skipped-{g:06d}.parquet"


def faiss_file(g: int) -> str:
    return f"queries-{g:06d}.faiss"


def ivfdata_file(g: int) -> str:
    return f"queries-{g:06d}.ivfdata"


def shard_files(s: int, int8: bool, kv: bool = False) -> dict[str, str]:
    """Relative paths of shard `s`: features (+ scale for int8, + cross-attention keys/values) and embeddings."""
    files = {"features": f"{FEATURES_DIR}/shard-{s:06d}.npy", "embeddings": f"{EMBEDDINGS_DIR}/shard-{s:06d}.npy"}
    if int8:
        files["scale"] = f"{FEATURES_DIR}/shard-{s:06d}.scale.npy"
    if kv:
        files["kv"] = f"{FEATURES_DIR}/shard-{s:06d}.kv.npy"
    return files


def kv_to_array(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """Cross-attention keys/values (per cross layer, each [b,heads,N,d] bf16) -> bf16 bits [b,L,2,N,H] uint16."""
    a = torch.stack([torch.stack([k.transpose(1, 2).flatten(2), v.transpose(1, 2).flatten(2)], 1) for k, v in kv], 1)
    return a.to(torch.bfloat16).contiguous().cpu().view(torch.int16).numpy().view(np.uint16)


def array_to_kv(a: np.ndarray, num_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of `kv_to_array`: bf16 bits [b,L,2,N,H] -> per cross layer (keys, values) [b,heads,N,d] bf16."""
    t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    heads = [t[:, i, j].unflatten(-1, (num_heads, -1)).transpose(1, 2) for i in range(t.shape[1]) for j in (0, 1)]
    return list(zip(heads[0::2], heads[1::2], strict=True))


# ---- atomic writes -------------------------------------------------------------------------------------------
def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` then fsync and rename onto `path`: `path` is either absent/old or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def write_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))

    atomic_write(path, write)


def write_parquet(path: Path, table: Any) -> None:  # table: pyarrow.Table
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_faiss(path: Path, index: Any) -> None:
    import faiss

    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))


def remove_temp_files(index_dir: Path) -> int:
    """Delete temporary files left by killed writers (call only while holding the writer lock)."""
    n = 0
    for d in (index_dir, index_dir / FEATURES_DIR, index_dir / EMBEDDINGS_DIR):
        if d.is_dir():
            for p in d.iterdir():
                if _TMP in p.name:
                    p.unlink(missing_ok=True)
                    n += 1
    return n


# ---- generations ---------------------------------------------------------------------------------------------
def read_current(index_dir: Path) -> str:
    """Name of the current generation's manifest. Raises `IndexNotFound` when there is none."""
    p = Path(index_dir) / CURRENT
    try:
        name = p.read_text().strip()
    except FileNotFoundError:
        if not Path(index_dir).exists():
            raise IndexNotFound(f"{index_dir}: no such directory, so no index there") from None
        raise IndexNotFound(f"{index_dir}: not a qsearch index (no {CURRENT} file); build one first") from None
    if not re.fullmatch(r"gen-\d{6,}\.json", name):
        raise IndexCorrupt(f"{p}: unexpected content {name[:80]!r}")
    return name


def read_manifest(index_dir: Path, name: str | None = None) -> dict[str, Any]:
    """A generation's manifest (default: the current one)."""
    name = name or read_current(index_dir)
    p = Path(index_dir) / name
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise IndexCorrupt(f"{p}: unreadable manifest ({e})") from e
    if m.get("format") != FORMAT:
        raise IndexCorrupt(f"{p}: not a qsearch index manifest")
    if m.get("version", 0) > FORMAT_VERSION:
        raise IndexCorrupt(f"{p}: written by a newer qsearch (index format {m['version']})")
    return m


def publish(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the generation's manifest, then atomically point `CURRENT` at it (the commit point)."""
    name = gen_file(manifest["generation"])
    atomic_write_bytes(index_dir / name, (json.dumps(manifest, indent=1) + "\n").encode())
    atomic_write_bytes(index_dir / CURRENT, (name + "\n").encode())


def referenced_files(manifest: dict[str, Any]) -> set[str]:
    """Relative paths of every file a generation needs."""
    files = {gen_file(manifest["generation"]), manifest["metadata"], manifest["skipped"], manifest["faiss"]["file"]}
    if manifest["faiss"].get("ivfdata"):
        files.add(manifest["faiss"]["ivfdata"])
    for s in manifest["shards"]:
        files.update(s["files"].values())
    return files


def collect_garbage(index_dir: Path, keep: list[dict[str, Any]]) -> int:
    """Delete generation and shard files that none of the `keep` manifests reference."""
    live: set[str] = set()
    for m in keep:
        live |= referenced_files(m)
    n = 0
    pattern = re.compile(r"(gen-\d+\.json|metadata-\d+\.parquet|skipped-\d+\.parquet|queries-\d+\.faiss|queries-\d+\.ivfdata)")
    for p in index_dir.iterdir():
        if pattern.fullmatch(p.name) and p.name not in live:
            p.unlink(missing_ok=True)
            n += 1
    for sub in (FEATURES_DIR, EMBEDDINGS_DIR):
        d = index_dir / sub
        if d.is_dir():
            for p in d.iterdir():
                if re.fullmatch(r"shard-\d+(\.scale|\.kv)?\.npy", p.name) and f"{sub}/{p.name}" not in live:
                    p.unlink(missing_ok=True)
                    n += 1
    return n


@contextlib.contextmanager
def writer_lock(index_dir: Path) -> Iterator[None]:
    """Exclusive writer lock (flock: released by the kernel if the writer dies)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(index_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexLocked(f"{index_dir}: another process is writing to this index") from None
        yield
    finally:
        os.close(fd)


# ---- feature quantisation ------------------------------------------------------------------------------------
def quantize(tokens: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float tokens [n,N,C] -> (stored array, int8 scale [n,N] or None).

    fp16: a plain cast (clipped to the fp16 range). int8: symmetric per token, scale = max|x| / 127.
    """
    x = np.asarray(tokens, dtype=np.float32)
    if dtype == "fp16":
        return np.clip(x, -65504, 65504).astype(np.float16), None
    if dtype == "int8":
        scale = np.abs(x).max(axis=-1) / 127.0  # [n,N]
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
        return q, scale
    raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, not {dtype!r}")


def dequantize_torch(stored: np.ndarray, scale: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor:
    """Stored tokens [k,N,C] (+ int8 scales [k,N]) -> `dtype` [k,N,C], rounded once: fp16 tokens go straight
    to a bf16 re-ranker's dtype, with no float32 copy in between."""
    x = torch.from_numpy(np.ascontiguousarray(stored))
    if scale is None:
        return x.to(dtype)
    s = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32))[..., None]  # [k,N,1]
    return torch.mul(x, s).to(dtype)


def dequantize(stored: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Stored tokens [k,N,C] (+ int8 scales [k,N]) -> float32 [k,N,C]."""
    return dequantize_torch(stored, scale, torch.float32).numpy()
