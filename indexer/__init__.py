"""Build and read image indexes: FAISS over Q-Former query embeddings, memory-mapped frozen-encoder
features for ITM, and Parquet metadata, committed in crash-safe generations (see `indexer.store`).

Names are imported on first use, so light modules (`indexer.store`, `indexer.vectors`) load without torch
(Ray workers that only touch FAISS start faster)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IndexConfig": "indexer.build", "IndexStats": "indexer.build", "build_index": "indexer.build",
    "remove_from_index": "indexer.build", "BadImage": "qformer.decode", "decode_image": "qformer.decode",
    "load_image": "qformer.decode", "IndexCorrupt": "indexer.errors", "IndexLocked": "indexer.errors",
    "IndexNotFound": "indexer.errors", "IndexStoreError": "indexer.errors", "ModelMismatch": "indexer.errors",
    "model_fingerprint": "indexer.fingerprint", "Index": "indexer.index", "dequantize": "indexer.store",
    "quantize": "indexer.store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'indexer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
