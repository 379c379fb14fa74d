"""One writer of an index (under the writer lock): load the current generation, write shards,
and commit new generations. Used by `build_index` and `remove_from_index`.

Commit = write the FAISS file, metadata and skipped Parquet of generation g+1 (shards are already on
disk), then the manifest `gen-<g+1>.json`, then atomically replace `CURRENT`; then garbage-collect files
that neither generation g+1 nor the previous `keep_generations - 1` ones reference.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexer import metadata as md
from indexer import store, vectors
from indexer.errors import IndexCorrupt, IndexNotFound


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class IndexWriter:
    """The current generation, loaded for modification. Call only while holding `store.writer_lock`."""

    def __init__(self, index_dir: Path, keep_generations: int = 2):
        self.dir = Path(index_dir)
        self.keep_generations = max(1, keep_generations)
        self.force_rebuild = False
        try:
            self.manifest: dict[str, Any] | None = store.read_manifest(self.dir)
        except IndexNotFound:
            self.manifest = None
        except FileNotFoundError as e:
            raise IndexCorrupt(f"{self.dir}: {store.CURRENT} names a missing manifest ({e.filename})") from e
        self.index: Any = None
        self.shards: dict[int, dict[str, Any]] = {}
        self.skipped: dict[str, dict[str, Any]] = {}
        self.table = md.empty_table()
        if self.manifest is None:
            return
        m = self.manifest
        try:
            self.table = pq.read_table(self.dir / m["metadata"])
            self.skipped = {r["path"]: r for r in pq.read_table(self.dir / m["skipped"]).to_pylist()}
            ondisk = bool(m["faiss"].get("ivfdata"))
            self.index = vectors.read_index(self.dir / m["faiss"]["file"], ondisk)
        except (OSError, RuntimeError, pa.ArrowException) as e:
            raise IndexCorrupt(f"{self.dir}: generation {m['generation']} is unreadable ({e})") from e
        self.shards = {s["id"]: s for s in m["shards"]}
        # an on-disk index (Ray engine) is memory-mapped read-only: changes rebuild it in RAM
        self.force_rebuild = ondisk

    # ---- properties of the index being written -----------------------------------------------------------
    @property
    def exists(self) -> bool:
        return self.manifest is not None

    def setup(self, header: dict[str, Any]) -> None:
        """Header fields of a new index (model, num_queries, embed_dim, token_shape, feature_dtype, faiss)."""
        self.manifest = {"format": store.FORMAT, "version": store.FORMAT_VERSION, "generation": 0,
                         "created": now_iso(), "build_seconds": 0.0, "next_image_id": 0, "next_shard": 0,
                         "shards": [], "complete": False, **header}

    @property
    def int8(self) -> bool:
        assert self.manifest is not None
        return self.manifest["feature_dtype"] == "int8"

    def new_image_id(self) -> int:
        assert self.manifest is not None
        i = self.manifest["next_image_id"]
        self.manifest["next_image_id"] = i + 1
        return i

    # ---- shards ------------------------------------------------------------------------------------------
    def write_shard(self, tokens: np.ndarray, embeds: np.ndarray, kv: np.ndarray | None = None) -> int:
        """Write a new immutable shard: tokens [n,N,C] float32, embeddings [n,Q,D] float32, and for an index
        with `cross_kv` the keys/values [n,L,2,N,H] (`store.kv_to_array`) -> shard id."""
        assert self.manifest is not None
        if (kv is None) == bool(self.manifest.get("cross_kv")):
            raise ValueError("an index with cross_kv needs keys/values with every shard, and only such an index")
        s = self.manifest["next_shard"]
        self.manifest["next_shard"] = s + 1
        files = store.shard_files(s, self.int8, kv is not None)
        stored, scale = store.quantize(tokens, self.manifest["feature_dtype"])
        store.write_npy(self.dir / files["features"], stored)
        if scale is not None:
            store.write_npy(self.dir / files["scale"], scale)
        if kv is not None:
            store.write_npy(self.dir / files["kv"], kv)
        store.write_npy(self.dir / files["embeddings"], np.asarray(embeds, dtype=np.float32))
        self.shards[s] = {"id": s, "rows": int(len(tokens)), "files": files}
        return s

    def _load(self, shard: int, key: str) -> np.ndarray:
        return np.load(self.dir / self.shards[shard]["files"][key], mmap_mode="r")

    def embeddings(self, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Stored query embeddings [k,Q,D] at (shard, row) pairs."""
        assert self.manifest is not None
        out = np.empty((len(shard), self.manifest["num_queries"], self.manifest["embed_dim"]), np.float32)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = self._load(int(s), "embeddings")[row[sel]]
        return out

    def compact(self, table: pa.Table, below: float) -> pa.Table:
        """Rewrite the live rows of shards whose live fraction is under `below` into one new shard."""
        if below <= 0 or table.num_rows == 0:
            return table
        shard = table["shard"].to_numpy()
        row = table["row"].to_numpy()
        pairs = np.unique(np.stack([shard, row], 1), axis=0)  # live (shard,row), duplicates share one
        live = {int(s): int(n) for s, n in zip(*np.unique(pairs[:, 0], return_counts=True), strict=True)}
        sparse = [s for s, n in live.items() if n < below * self.shards[s]["rows"]]
        if not sparse:
            return table
        moving = pairs[np.isin(pairs[:, 0], sparse)]
        tokens = np.concatenate([self._tokens(int(s), moving[moving[:, 0] == s, 1]) for s in sparse])
        kv = np.concatenate([self._load(int(s), "kv")[moving[moving[:, 0] == s, 1]] for s in sparse]) \
            if self.manifest.get("cross_kv") else None  # stored bits, copied as they are
        embeds = self.embeddings(moving[:, 0], moving[:, 1])
        order = np.concatenate([np.nonzero(moving[:, 0] == s)[0] for s in sparse])
        new = self.write_shard(tokens, embeds[order], kv)
        new_row = {(int(s), int(r)): i for i, (s, r) in enumerate(moving[order])}
        moved = np.isin(shard, sparse)
        shard2, row2 = shard.copy(), row.copy()
        for i in np.nonzero(moved)[0]:
            shard2[i], row2[i] = new, new_row[(int(shard[i]), int(row[i]))]
        table = table.set_column(table.column_names.index("shard"), "shard", pa.array(shard2, pa.int32()))
        return table.set_column(table.column_names.index("row"), "row", pa.array(row2, pa.int32()))

    def _tokens(self, shard: int, rows: np.ndarray) -> np.ndarray:
        stored = self._load(shard, "features")[rows]
        scale = self._load(shard, "scale")[rows] if self.int8 else None
        return store.dequantize(stored, scale)

    # ---- commit ------------------------------------------------------------------------------------------
    def _rebuild_index(self, table: pa.Table) -> tuple[Any, str]:
        assert self.manifest is not None
        ids = table["image_id"].to_numpy()
        shard, row = table["shard"].to_numpy(), table["row"].to_numpy()
        chunks = (self.embeddings(shard[i : i + 4096], row[i : i + 4096]) for i in range(0, len(ids), 4096))
        return vectors.build(self.manifest["embed_dim"], self.manifest["faiss"]["factory"], ids, chunks)

    def _update_index(self, table: pa.Table, removed: set[int], added: np.ndarray) -> None:
        assert self.manifest is not None
        fa = self.manifest["faiss"]
        q, d = self.manifest["num_queries"], self.manifest["embed_dim"]
        wanted, effective = fa["factory"], fa.get("effective", vectors.EXACT)
        rebuild = self.force_rebuild or self.index is None and table.num_rows > 0
        if not rebuild and effective != wanted:
            need = vectors.train_threshold(d, wanted)
            rebuild = table.num_rows * q >= need
        if not rebuild and self.index is not None:
            if not vectors.try_remove(self.index, removed):
                rebuild = True
            elif len(added):
                sel = table.filter(pc.is_in(table["image_id"], pa.array(added, pa.int64())))
                vectors.add(self.index, sel["image_id"].to_numpy(),
                            self.embeddings(sel["shard"].to_numpy(), sel["row"].to_numpy()))
        if rebuild:
            self.index, fa["effective"] = self._rebuild_index(table)
            fa.pop("ivfdata", None)
            self.force_rebuild = False
        elif self.index is None:
            fa["effective"] = wanted if vectors.train_threshold(d, wanted) == 0 else vectors.EXACT
            self.index = vectors.make_index(d, fa["effective"])
        if self.index.ntotal != table.num_rows * q:
            raise IndexCorrupt(f"{self.dir}: FAISS holds {self.index.ntotal} vectors, expected "
                               f"{table.num_rows} images x {q}; nothing was committed")

    def commit(
        self,
        table: pa.Table,
        removed: set[int],
        added: np.ndarray,
        complete: bool,
        seconds: float = 0.0,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Publish generation g+1 with this metadata table; `removed` / `added` image ids update FAISS."""
        assert self.manifest is not None
        t0 = time.perf_counter()
        table = table.sort_by("image_id")
        self._update_index(table, removed, added)
        prev = self.manifest if self.manifest.get("generation", 0) > 0 else None
        m = dict(self.manifest)
        g = m["generation"] = m["generation"] + 1
        m["metadata"], m["skipped"] = store.metadata_file(g), store.skipped_file(g)
        m["faiss"] = {**m["faiss"], "file": store.faiss_file(g), "ntotal": int(self.index.ntotal)}
        # mid-run, shards nothing references yet stay listed: a later item of the run may reuse their rows
        live = set(np.unique(table["shard"].to_numpy()).tolist()) if table.num_rows else set()
        m["shards"] = [self.shards[s] for s in sorted(live if complete else self.shards)]
        m["counts"] = {"images": table.num_rows, "skipped": len(self.skipped), "vectors": int(self.index.ntotal),
                       "shards": len(m["shards"]), "feature_rows": sum(s["rows"] for s in m["shards"])}
        m["complete"] = complete
        m.update(extra or {})
        store.write_faiss(self.dir / m["faiss"]["file"], self.index)
        store.write_parquet(self.dir / m["metadata"], table)
        store.write_parquet(self.dir / m["skipped"], md.skipped_table(self.skipped))
        m["updated"] = now_iso()
        m["build_seconds"] = round(m.get("build_seconds", 0.0) + seconds + time.perf_counter() - t0, 3)
        store.publish(self.dir, m)  # <- the commit point
        self.manifest, self.table = m, table
        keep = [m] + ([prev] if prev and self.keep_generations > 1 else [])
        for older in range(g - 2, max(0, g - self.keep_generations), -1):
            try:
                keep.append(store.read_manifest(self.dir, store.gen_file(older)))
            except (FileNotFoundError, IndexCorrupt):
                pass
        store.collect_garbage(self.dir, keep)
        return m
