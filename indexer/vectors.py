"""The FAISS index over query embeddings: every image contributes its Q vectors, all carrying its image id.

The index is always `IndexIDMap2` around what `faiss_factory` names (inner product on unit vectors, i.e.
cosine): "Flat" (exact, the default), or an ANN such as "IVF1024,Flat" or "HNSW32". An index that needs
training stays exact ("Flat") until enough vectors exist to train it, then is rebuilt from the stored
embeddings; the manifest records which factory is in effect. Index types that cannot remove vectors
(HNSW) are rebuilt from the stored embeddings instead.
"""

from __future__ import annotations

from collections.abc import Iterable
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
