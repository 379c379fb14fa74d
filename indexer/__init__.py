"""Build and read image indexes: FAISS over Q-Former query embeddings, memory-mapped frozen-encoder
features for ITM, and Parquet metadata, committed in crash-safe generations (see `indexer.store`)."""

from indexer.build import IndexConfig, IndexStats, build_index, remove_from_index
from indexer.decode import BadImage, decode_image, load_image
from indexer.errors import IndexCorrupt, IndexLocked, IndexNotFound, IndexStoreError, ModelMismatch
from indexer.fingerprint import model_fingerprint
from indexer.index import Index
from indexer.store import dequantize, quantize

__all__ = [
    "BadImage", "Index", "IndexConfig", "IndexCorrupt", "IndexLocked", "IndexNotFound", "IndexStats",
    "IndexStoreError", "ModelMismatch", "build_index", "decode_image", "dequantize", "load_image",
    "model_fingerprint", "quantize", "remove_from_index",
]
