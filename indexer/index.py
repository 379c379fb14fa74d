"""`Index`: a read-only view of an index's current generation."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from indexer import store, vectors
from indexer.errors import IndexCorrupt, ModelMismatch
from indexer.fingerprint import model_fingerprint
from qformer.factory import Blip2Retriever
from qformer.sources import TAR_SEP

_OPEN_ATTEMPTS = 5


class Index:
    """The current generation of an index: manifest, metadata, FAISS index, memory-mapped features.

    Opening reads `CURRENT` once; the view stays consistent even while a writer commits newer
    generations (data files are immutable, and the previous generation outlives each commit).
    """

    def __init__(self, index_dir: Path, manifest: dict[str, Any], metadata: pa.Table, skipped: pa.Table,
                 faiss_index: Any, shards: dict[int, dict[str, np.ndarray]]):
        self.dir = index_dir
        self.manifest = manifest
        self.metadata = metadata  # one row per image, sorted by image_id
        self.skipped = skipped  # path, source, reason, size, mtime, sha256
        self.faiss_index = faiss_index  # IndexIDMap2: Q vectors per image, id = image_id
        self._shards = shards  # shard id -> {"features": [n,N,C], "scale": [n,N]?, "embeddings": [n,Q,D]} mmaps
        self._ids = metadata["image_id"].to_numpy()
        self._shard = metadata["shard"].to_numpy()
        self._row = metadata["row"].to_numpy()
        self._plan: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] | None = None  # embedding_blocks

    @classmethod
    def open(cls, index_dir: str | Path) -> Index:
        """Open the current generation. Raises `IndexNotFound` (no index there) or `IndexCorrupt`."""
        d = Path(index_dir)
        last: Exception | None = None
        for attempt in range(_OPEN_ATTEMPTS):
            name = store.read_current(d)
            try:
                return cls._open_generation(d, name)
            except FileNotFoundError as e:  # a writer collected this generation meanwhile: follow CURRENT
                last = e
                if store.read_current(d) == name and attempt > 0:
                    break
                time.sleep(0.05 * (attempt + 1))
        raise IndexCorrupt(f"{d}: files of the current generation are missing ({last})")

    @classmethod
    def _open_generation(cls, d: Path, name: str) -> Index:
        m = store.read_manifest(d, name)
        try:
            shards = {}
            for s in m["shards"]:
                shards[s["id"]] = {k: np.load(d / f, mmap_mode="r") for k, f in s["files"].items()}
            metadata = pq.read_table(d / m["metadata"])
            skipped = pq.read_table(d / m["skipped"])
            index = _read_faiss(d / m["faiss"]["file"], bool(m["faiss"].get("ivfdata")))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, RuntimeError, pa.ArrowException) as e:
            raise IndexCorrupt(f"{d}: generation {m['generation']} is unreadable ({e})") from e
        vectors.set_search_params(index, m["faiss"].get("params", ""))
        if metadata.num_rows != m["counts"]["images"] or index.ntotal != metadata.num_rows * m["num_queries"]:
            raise IndexCorrupt(f"{d}: generation {m['generation']} is inconsistent: {metadata.num_rows} "
                               f"metadata rows, {index.ntotal} vectors, manifest says {m['counts']}")
        return cls(d, m, metadata, skipped, index, shards)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"Index({str(self.dir)!r}, generation={self.manifest['generation']}, images={len(self)})"

    def image_ids(self) -> np.ndarray:
        """All image ids [n] int64, ascending."""
        return self._ids.copy()

    def _positions(self, image_ids: np.ndarray | list[int]) -> np.ndarray:
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._ids, ids)
        ok = (pos < len(self._ids)) & (self._ids[np.minimum(pos, len(self._ids) - 1)] == ids) if len(self._ids) \
            else np.zeros(len(ids), bool)
        if not ok.all():
            raise KeyError(f"image ids not in the index: {ids[~ok][:10].tolist()}")
        return pos

    def rows(self, image_ids: np.ndarray | list[int]) -> pa.Table:
        """Metadata rows of these images, in the order given."""
        return self.metadata.take(pa.array(self._positions(image_ids)))

    def paths(self, image_ids: np.ndarray | list[int]) -> list[str]:
        return self.rows(image_ids)["path"].to_pylist()

    def ids_of(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Image ids [n] int64 of these files, matched by real path: the index keeps the absolute path it was
        given, so a file indexed through a symlink (or a symlinked parent) is found by either name. Raises
        KeyError naming the first files that are not in the index."""
        by_path = {_real_path(p): i for p, i in zip(self.metadata["path"].to_pylist(),
                                                     self.metadata["image_id"].to_pylist(), strict=True)}
        keys = [_real_path(p) for p in paths]
        missing = [k for k in keys if k not in by_path]
        if missing:
            raise KeyError(f"{len(missing)} of {len(keys)} files are not in the index {self.dir}: {missing[:3]}")
        return np.array([by_path[k] for k in keys], np.int64)

    def features(self, image_ids: np.ndarray | list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Frozen-encoder tokens [k,N,C] of these images, dequantised to `dtype` (the ITM model's), for ITM."""
        pos = self._positions(image_ids)
        if self.manifest["token_shape"] is None:  # nothing embedded yet
            return torch.empty(0, 0, 0, dtype=dtype)
        n, c = self.manifest["token_shape"]
        shard, row = self._shard[pos], self._row[pos]
        out = torch.empty((len(pos), n, c), dtype=dtype)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            f = self._shards[int(s)]
            scale = f["scale"][row[sel]] if "scale" in f else None
            out[torch.from_numpy(sel)] = store.dequantize_torch(f["features"][row[sel]], scale, dtype)
        return out

    @property
    def has_cross_kv(self) -> bool:
        """Whether the index stores the bf16 ITM re-ranker's cross-attention keys/values (`itm_kv`)."""
        return bool(self.manifest.get("cross_kv"))

    def cross_kv(self, image_ids: np.ndarray | list[int], num_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Stored cross-attention (keys, values) of these images, per cross layer [k,heads,N,d] bf16: what
        `image_kv` of the bf16 ITM re-ranker gives for their stored tokens, bit for bit."""
        if not self.has_cross_kv:
            raise ValueError(f"{self.dir} stores no ITM keys/values (build it with itm_kv)")
        return store.array_to_kv(self._stored(image_ids, "kv", self.manifest["cross_kv"]["shape"], np.uint16),
                                 num_heads)

    def embeddings(self, image_ids: np.ndarray | list[int]) -> np.ndarray:
        """Stored query embeddings [k,Q,D] float32 of these images."""
        return self._stored(image_ids, "embeddings", [self.manifest["num_queries"], self.manifest["embed_dim"]],
                            np.float32)

    def _stored(self, image_ids: np.ndarray | list[int], key: str, shape: list[int], dtype: type) -> np.ndarray:
        """Rows [k,*shape] of the shard file `key` ("embeddings", "kv") for these images, gathered per shard."""
        pos = self._positions(image_ids)
        shard, row = self._shard[pos], self._row[pos]
        out = np.empty((len(pos), *shape), dtype)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = self._shards[int(s)][key][row[sel]]
        return out

    def embedding_blocks(self) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """The stored embeddings for a full scan, per shard: (positions in `image_ids()` order, the shard rows
        there or None when they are all its rows in order, its embeddings [n_s,Q,D] float32 as a tensor over
        the memory map). Built on first use."""
        if self._plan is None:
            plan = []
            with warnings.catch_warnings():  # read-only memory maps: the tensors are only ever read
                warnings.simplefilter("ignore", UserWarning)
                for s in np.unique(self._shard):
                    sel = np.nonzero(self._shard == s)[0]
                    rows, emb = self._row[sel], self._shards[int(s)]["embeddings"]
                    whole = len(rows) == len(emb) and bool((rows == np.arange(len(emb))).all())
                    plan.append((torch.from_numpy(sel), None if whole else torch.from_numpy(rows.astype(np.int64)),
                                 torch.from_numpy(emb)))
            self._plan = plan
        return self._plan

    def search_index(self, use_gpu: bool | None = None) -> Any:
        """The FAISS index to search: moved to the GPU when faiss-gpu sees one (hook; CPU otherwise)."""
        return vectors.to_gpu_if_available(self.faiss_index, use_gpu)

    def check_model(self, model: Blip2Retriever) -> None:
        """Raise `ModelMismatch` unless `model` is the one this index was built with."""
        want = self.manifest["model"]
        got = model_fingerprint(model)
        if got != want["fingerprint"]:
            raise ModelMismatch(
                f"{self.dir}: index built with model {want['name']!r} (fingerprint {want['fingerprint'][:12]}), "
                f"but the query model is {model.name!r} (fingerprint {got[:12]}); use the same model, or "
                "rebuild the index with this one")

    @property
    def image_precision(self) -> str:
        """The arithmetic this index's images were embedded in ("bf16" | "fp32"; fp32 when the manifest does
        not record it)."""
        return self.manifest.get("image_precision", "fp32")

    def info(self) -> dict[str, Any]:
        """Summary for `qsearch info`: model, shapes, counts, timings, and every skipped file with its reason."""
        m = self.manifest
        return {
            "index_dir": str(self.dir),
            "generation": m["generation"],
            "complete": m["complete"],
            "model": m["model"],
            "num_queries": m["num_queries"],
            "embed_dim": m["embed_dim"],
            "token_shape": m["token_shape"],
            "feature_dtype": m["feature_dtype"],
            "cross_kv": m.get("cross_kv"),
            "image_precision": self.image_precision,
            "faiss": dict(m["faiss"]),
            "counts": m["counts"],
            "created": m["created"],
            "updated": m["updated"],
            "build_seconds": m["build_seconds"],
            "last_run": m.get("last_run"),
            "skipped": [{"path": p, "reason": r} for p, r in
                        zip(self.skipped["path"].to_pylist(), self.skipped["reason"].to_pylist(), strict=True)],
        }


def _real_path(p: str | Path) -> str:
    """The canonical name of a file, or of a tar member ("<real tar path>::<member>")."""
    tar, sep, member = str(p).partition(TAR_SEP)
    return os.path.realpath(os.path.expanduser(tar)) + sep + member


def _read_faiss(path: Path, ondisk: bool) -> Any:
    try:
        return vectors.read_index(path, ondisk)
    except RuntimeError:
        if not path.exists():  # collected by a writer meanwhile: let `open` follow CURRENT
            raise FileNotFoundError(str(path)) from None
        raise
