"""Bytes per image of a multi-vector index: the FAISS (ANN) stage and the store the candidates are re-scored from.

Only what grows with the collection is counted: per stored vector, its code plus the ids FAISS keeps with
it; the fixed parts (IVF centroids, PQ codebooks, an OPQ rotation) are not. Counted as FAISS writes the
index to disk. In memory, `IndexIDMap2` also keeps a reverse hash map (id -> position), about
`IDMAP2_REV_MAP_BYTES` more per vector (libstdc++ `unordered_map<int64, int64>`).
"""

from __future__ import annotations

from typing import Any

ID_BYTES = 8  # FAISS ids are int64
IDMAP2_REV_MAP_BYTES = 44  # measured: IndexIDMap2 RSS growth per vector minus IndexIDMap's (faiss 1.15, x86-64)
STORE_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def ann_bytes_per_vector(index: Any) -> int:
    """Bytes one stored vector costs in `index` on disk: its code plus every id kept for it (an IVF list
    stores an id per code; `IndexIDMap(2)` adds its own id map). Transforms (OPQ, PCA, RR) add nothing."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return ID_BYTES + ann_bytes_per_vector(index.index)
    if isinstance(index, faiss.IndexPreTransform):
        return ann_bytes_per_vector(index.index)
    if isinstance(index, faiss.IndexIVF):
        return int(index.code_size) + ID_BYTES
    if isinstance(index, faiss.IndexHNSW):
        return ann_bytes_per_vector(index.storage) + 4 * index.hnsw.nb_neighbors(0)  # level-0 links (int32)
    if isinstance(index, faiss.IndexFlatCodes):
        return int(index.code_size)
    raise ValueError(f"no byte accounting for {type(index).__name__}")


def ann_bytes_per_image(index: Any, vectors_per_image: int, in_memory: bool = False) -> int:
    """Bytes per image of the ANN stage: `vectors_per_image` vectors (32 query vectors, or 1 pooled vector)
    at `ann_bytes_per_vector` each; `in_memory` adds IndexIDMap2's reverse map."""
    import faiss

    extra = IDMAP2_REV_MAP_BYTES if in_memory and isinstance(faiss.downcast_index(index), faiss.IndexIDMap2) else 0
    return vectors_per_image * (ann_bytes_per_vector(index) + extra)


def store_bytes_per_image(num_queries: int, dim: int, dtype: str) -> int:
    """Bytes per image of the re-scoring store: [Q,D] embeddings in `dtype` ("fp32", "fp16", "int8"; int8
    adds one fp32 scale per query vector, as `indexer.quantize` stores it)."""
    if dtype not in STORE_DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(STORE_DTYPE_BYTES)}, not {dtype!r}")
    return num_queries * dim * STORE_DTYPE_BYTES[dtype] + (4 * num_queries if dtype == "int8" else 0)
