"""The FAISS index over query embeddings: every image contributes its Q vectors, all carrying its image id.

The index is always `IndexIDMap2` around what `faiss_factory` names (inner product on unit vectors, i.e.
cosine): "Flat" (exact, the default), or an ANN such as "IVF1024,Flat" or "HNSW32". An index that needs
training stays exact ("Flat") until enough vectors exist to train it, then is rebuilt from the stored
embeddings; the manifest records which factory is in effect. Index types that cannot remove vectors
(HNSW) are rebuilt from the stored embeddings instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

EXACT = "Flat"
TRAIN_SAMPLE = 200_000  # vectors used to train an ANN index, at most


def make_index(dim: int, factory: str) -> Any:
    """An empty `IndexIDMap2` over `factory` with the inner-product metric."""
    import faiss

    return faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)


def train_threshold(dim: int, factory: str) -> int:
    """Vectors needed before an index of `factory` is trained (0: it needs no training)."""
    import faiss

    index = make_index(dim, factory)
    if index.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(index)
    return 39 * ivf.nlist if ivf is not None else 10_000


def add(index: Any, image_ids: np.ndarray, embeds: np.ndarray) -> None:
    """Add embeddings [n,Q,D] of images `image_ids` [n]: the Q vectors of image i all carry id i."""
    if len(image_ids) == 0:
        return
    n, q, d = embeds.shape
    index.add_with_ids(np.ascontiguousarray(embeds.reshape(n * q, d), dtype=np.float32),
                       np.repeat(np.asarray(image_ids, dtype=np.int64), q))


def try_remove(index: Any, image_ids: Iterable[int]) -> bool:
    """Remove every vector of these images; False when this index type cannot remove (rebuild it)."""
    import faiss

    ids = np.fromiter(image_ids, dtype=np.int64)
    if len(ids) == 0:
        return True
    try:
        index.remove_ids(faiss.IDSelectorBatch(ids))
    except RuntimeError:
        return False
    return True


def build(dim: int, factory: str, image_ids: np.ndarray, embeds: Iterable[np.ndarray]) -> tuple[Any, str]:
    """A fresh index over all embeddings ([n,Q,D] chunks, in `image_ids` order) -> (index, factory used).

    Falls back to exact search while there are too few vectors to train `factory`."""
    chunks = [np.asarray(e, dtype=np.float32) for e in embeds]
    total = sum(c.shape[0] * c.shape[1] for c in chunks)
    need = train_threshold(dim, factory)
    used = factory if total >= need else EXACT
    index = make_index(dim, used)
    if not index.is_trained:
        flat = np.concatenate([c.reshape(-1, dim) for c in chunks])
        if len(flat) > TRAIN_SAMPLE:
            flat = flat[np.random.default_rng(0).choice(len(flat), TRAIN_SAMPLE, replace=False)]
        index.train(flat)
    start = 0
    for c in chunks:
        add(index, image_ids[start : start + len(c)], c)
        start += len(c)
    return index, used


def ondisk_factory(factory: str) -> str:
    """The factory an on-disk (merged, memory-mapped) index uses for `factory`: exact "Flat" becomes
    "IVF1,Flat" (one inverted list, so every search is exhaustive and exact); IVF factories stay."""
    if factory.strip() == EXACT:
        return "IVF1,Flat"
    if "IVF" not in factory:
        raise ValueError(f"an on-disk index needs an IVF factory (e.g. IVF4096,PQ32) or Flat, not {factory!r}")
    return factory


def merge_ondisk(trained: Any, part_files: list[str], ivfdata: Path) -> Any:
    """Merge populated IVF parts (files) into `trained` (empty), with inverted lists in `ivfdata` on disk.
    The parts are memory-mapped while merging, so the vectors never all sit in RAM."""
    from faiss.contrib.ondisk import merge_ondisk as _merge

    with c_stdout_to_stderr():  # faiss printf()s progress on stdout
        _merge(trained, part_files, str(ivfdata))
    return trained


def fill_part(trained: np.ndarray, embeddings: str, ids: np.ndarray, out: str) -> int:
    """A copy of the trained, empty index + one part's embeddings [n,Q,D] under their image ids -> file."""
    import faiss

    index = faiss.deserialize_index(trained)
    e = np.load(embeddings, mmap_mode="r")
    add(index, ids, np.asarray(e))
    from indexer.store import atomic_write

    atomic_write(Path(out), lambda tmp: faiss.write_index(index, tmp))
    return int(index.ntotal)


def train_sample(files: list[Path], rows: list[np.ndarray], limit: int, seed: int = 0) -> np.ndarray:
    """Up to `limit` query vectors [m,D] drawn evenly from the parts' stored embeddings (memory-mapped)."""
    total = sum(len(r) for r in rows)
    if total == 0:
        return np.zeros((0, 0), np.float32)
    rng = np.random.default_rng(seed)
    out = []
    for f, r in zip(files, rows, strict=True):
        e = np.load(f, mmap_mode="r")  # [n,Q,D]
        take = max(1, int(round(limit / e.shape[1] * len(r) / total)))
        sel = np.sort(rng.choice(len(r), min(take, len(r)), replace=False))
        out.append(np.asarray(e[sel]).reshape(-1, e.shape[2]))
    flat = np.concatenate(out)
    return flat[rng.choice(len(flat), limit, replace=False)] if len(flat) > limit else flat


def read_index(path: str | Path, ondisk: bool = False) -> Any:
    """Read a FAISS index file. `ondisk`: its inverted lists are the `.ivfdata` file beside it, memory-mapped
    (found in the index file's directory, wherever the index has moved)."""
    import faiss

    if not ondisk:
        return faiss.read_index(str(path))
    with c_stdout_to_stderr():  # faiss printf()s a note about the file name on stdout
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


@contextlib.contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints on stdout to stderr meanwhile (keeps `--json` output clean)."""
    import ctypes

    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def set_search_params(index: Any, params: str) -> None:
    """Apply search-time parameters such as "nprobe=16" or "efSearch=128" (comma-separated). Those that do
    not apply to this index (e.g. nprobe while an IVF index is still exact) are ignored."""
    import faiss

    if not params:
        return
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    for kv in params.split(","):
        key, _, value = kv.partition("=")
        key = key.strip()
        ivf = faiss.try_extract_index_ivf(inner)
        if key == "nprobe" and ivf is not None:
            ivf.nprobe = int(value)
        elif key == "efSearch" and hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = int(value)
        elif ivf is None and not hasattr(inner, "hnsw") and key in ("nprobe", "efSearch"):
            continue
        else:
            faiss.ParameterSpace().set_index_parameter(inner, key, float(value))


def to_gpu_if_available(index: Any, use_gpu: bool | None = None) -> Any:
    """GPU hook: a GPU copy of the index when faiss-gpu sees a GPU (and `use_gpu` is not False), else the
    index itself. Searching the copy gives the same ids; the on-disk index stays the CPU one."""
    import faiss

    if use_gpu is False:
        return index
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n == 0:
        if use_gpu:
            raise RuntimeError("use_gpu=True but FAISS sees no GPU (install faiss-gpu: pip install qsearch[gpu])")
        return index
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, 0, index)
    gpu.qsearch_gpu_resources = res  # keep the resources alive as long as the index
    return gpu
