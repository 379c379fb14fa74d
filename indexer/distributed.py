"""Build an index on a Ray cluster: `build_index_ray` (the `qsearch index --engine ray` path).

    driver: list the sources                 (directories, manifests, webdataset shards: `qformer.sources`)
      -> Ray Data map_batches (CPU tasks):   read, hash, decode, preprocess          -> pixels [b,3,S,S]
      -> Ray Data map_batches (actor pool):  frozen encoder + Q-Former, on GPU or CPU workers; each call
                                             writes one part: features [n,N,C] (fp16 / int8 + scales),
                                             query embeddings [n,Q,D]                -> small result rows
    driver: image ids, metadata Parquet; trains the IVF quantizer on a sample of the stored embeddings
      -> Ray tasks: each part's embeddings go into a copy of the trained, empty IVF  -> part .ivf files
    driver: `merge_ondisk` joins the parts' inverted lists into one `.ivfdata` file without loading the
            vectors, then publishes the generation. Readers memory-map that file.

The result is an ordinary qsearch index (same files, same manifest), except that its FAISS index is an IVF
with on-disk inverted lists: exact "Flat" is built as "IVF1,Flat" (one list, exhaustive search). Workers
write into the index directory, so on a multi-node cluster it must be on storage every node mounts.
The Ray engine builds new indexes; `qsearch index` (local engine) updates them afterwards, rebuilding the
FAISS part in RAM. A killed run publishes nothing: the next run starts over.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from indexer import metadata as md
from indexer import store, vectors
from indexer.build import IndexConfig, IndexStats, decode_item, itm_keys_values, metadata_row
from indexer.errors import IndexNotFound, IndexStoreError, ModelMismatch
from indexer.fingerprint import model_fingerprint, model_identity
from qformer.factory import create_model
from qformer.precision import autocast, resolve
from qformer.sources import TAR_SEP, Item, collect

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".ray-parts-"
RESULT_COLUMNS = ("i", "error", "sha256", "size", "width", "height", "format", "part", "row")


class IndexExists(IndexStoreError):
    """The Ray engine only builds new indexes."""


# ---- stage 1: decode (CPU tasks) ---------------------------------------------------------------------------
def _decode_batch(batch: dict[str, np.ndarray], transform: Callable[[Image.Image], Tensor], config: IndexConfig,
                  draft: int | None, size: int) -> dict[str, np.ndarray]:
    """Rows of items -> the same rows plus sha256/size/width/height/format/error and pixels [b,3,S,S]."""
    n = len(batch["i"])
    out: dict[str, Any] = {k: [] for k in ("i", "error", "sha256", "size", "width", "height", "format")}
    pixels = np.zeros((n, 3, size, size), np.float32)
    for k in range(n):
        item = Item(str(batch["path"][k]), "", int(batch["size"][k]), 0.0, int(batch["tar_offset"][k]))
        r = decode_item(item, int(batch["i"][k]), None, transform, config, draft)
        if r["pixels"] is not None:
            pixels[k] = r["pixels"].numpy()
        for c in out:
            out[c].append(r.get(c))
    cols = {c: np.array(v, dtype=object) for c, v in out.items()}
    cols["i"] = np.asarray(batch["i"], np.int64)
    cols["pixels"] = pixels
    return cols


# ---- stage 2: embed and write a part (actors) ---------------------------------------------------------------
class EmbedParts:
    """A model replica on a Ray worker: each call embeds a batch of decoded images and writes it as one part."""

    def __init__(self, model_source: str, fingerprint: str, staging: str, feature_dtype: str, device: str,
                 batch_size: int, threads: int, image_precision: str = "fp32", itm_kv: bool = False):
        torch.set_num_threads(max(1, threads))
        self.model = create_model(model_source, device)
        got = model_fingerprint(self.model)
        if got != fingerprint:  # e.g. a hub id that resolved to other weights on this node
            raise ModelMismatch(f"worker loaded {model_source!r} with fingerprint {got[:12]}, the driver "
                                f"{fingerprint[:12]}: every node must see the same model")
        self.staging, self.feature_dtype, self.batch_size = Path(staging), feature_dtype, batch_size
        self.image_precision, self.itm_kv = image_precision, itm_kv

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([e is None for e in batch["error"]], bool)
        pixels = batch["pixels"][ok]
        out = {c: batch[c] for c in RESULT_COLUMNS if c in batch}
        out["part"] = np.array([""] * len(ok), dtype=object)
        out["row"] = np.full(len(ok), -1, np.int64)
        if len(pixels) == 0:
            return out
        tokens, embeds = [], []
        for s in range(0, len(pixels), self.batch_size):
            px = torch.from_numpy(np.ascontiguousarray(pixels[s : s + self.batch_size])).to(self.model.device)
            t = self.model.image_tokens(px, self.image_precision)  # [b,N,C]
            with autocast(self.model.device, self.image_precision):
                embeds.append(self.model.qformer.encode_image(t).float().cpu().numpy())  # [b,Q,D]
            tokens.append(t.float().cpu().numpy())
        part = uuid.uuid4().hex
        stored, scale = store.quantize(np.concatenate(tokens), self.feature_dtype)
        store.write_npy(self.staging / f"{part}.features.npy", stored)
        if scale is not None:
            store.write_npy(self.staging / f"{part}.scale.npy", scale)
        store.write_npy(self.staging / f"{part}.embeddings.npy", np.concatenate(embeds))
        if self.itm_kv:
            store.write_npy(self.staging / f"{part}.kv.npy",
                            itm_keys_values(self.model, np.concatenate(tokens), self.feature_dtype))
        out["part"][ok] = part
        out["row"][ok] = np.arange(ok.sum())
        return out


# ---- public API ----------------------------------------------------------------------------------------------
def build_index_ray(
    model_source: str,
    sources: list[str | Path],
    index_dir: str | Path,
    config: IndexConfig | None = None,
    address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    part_rows: int = 256,
    progress: bool = True,
) -> IndexStats:
    """Build a new index of `sources` in `index_dir` on Ray (a cluster at `address`, or a local one).

    `actors` model replicas run the encoder and the Q-Former (each on `gpus_per_actor` GPUs, else on
    `cpus_per_actor` CPU threads); decoding runs in Ray tasks. Each part holds up to `part_rows` images.
    `config.faiss_factory` must be Flat (exact) or an IVF factory; the merged index lives on disk.
    Raises `IndexExists` if `index_dir` already holds an index.
    """
    import ray

    config = config or IndexConfig()
    if config.feature_dtype not in store.FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {store.FEATURE_DTYPES}, not {config.feature_dtype!r}")
    factory = vectors.ondisk_factory(config.faiss_factory)
    t0 = time.perf_counter()
    index_dir = Path(index_dir).resolve()
    items, problems, roots = collect(sources, config.path_column, config.include_hidden)
    t_list = time.perf_counter() - t0
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    config = dataclasses.replace(config, image_precision=resolve(device, config.image_precision))  # one for all actors
    model = create_model(model_source, "cpu")
    fingerprint = model_fingerprint(model)
    size = int(model.encoder.image_size)
    timings = {"list": t_list}
    with store.writer_lock(index_dir):
        try:
            store.read_current(index_dir)
            raise IndexExists(f"{index_dir} already holds an index: the Ray engine builds new indexes "
                              "(update this one with the local engine, or build into a new directory)")
        except IndexNotFound:
            pass
        for old in index_dir.glob(STAGING_PREFIX + "*"):  # left by a killed run
            shutil.rmtree(old, ignore_errors=True)
        staging = index_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     include_dashboard=False)
        try:
            t = time.perf_counter()
            results = _embed(items, model, fingerprint, model_source, staging, config, size, device, actors,
                             gpus_per_actor, cpus_per_actor, part_rows, progress)
            timings["embed"] = time.perf_counter() - t
            m = _publish(index_dir, staging, items, problems, results, model, fingerprint, config, factory,
                         timings, t0)
        finally:
            if started_ray:
                ray.shutdown()
            shutil.rmtree(staging, ignore_errors=True)
    embedded = int(m["counts"]["images"])
    seconds = round(time.perf_counter() - t0, 3)
    return IndexStats(str(index_dir), m["generation"], scanned=len(items), embedded=embedded,
                      skipped=m["counts"]["skipped"], images=embedded, commits=1, seconds=seconds,
                      images_per_s=round(embedded / seconds, 2) if seconds else 0.0,
                      timings={k: round(v, 3) for k, v in timings.items()})


def _embed(items: list[Item], model: Any, fingerprint: str, model_source: str, staging: Path, config: IndexConfig,
           size: int, device: str, actors: int, gpus_per_actor: float, cpus_per_actor: float, part_rows: int,
           progress: bool) -> dict[str, np.ndarray]:
    """Run the decode and embed stages over all items -> result columns (RESULT_COLUMNS), sorted by item."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = progress
    rows = [{"i": k, "path": it.path, "size": it.size, "tar_offset": it.tar_offset} for k, it in enumerate(items)]
    if not rows:
        return {c: np.zeros(0, np.int64 if c in ("i", "row") else object) for c in RESULT_COLUMNS}
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 64, 200)))
    ds = ds.map_batches(_decode_batch, batch_size=64, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"transform": model.preprocess(), "config": config,
                                   "draft": size if config.jpeg_draft else None, "size": size})
    ds = ds.map_batches(EmbedParts, batch_size=part_rows, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=max(1, actors)),
                        num_gpus=gpus_per_actor or None, num_cpus=cpus_per_actor,
                        fn_constructor_kwargs={"model_source": model_source, "fingerprint": fingerprint,
                                               "staging": str(staging), "feature_dtype": config.feature_dtype,
                                               "device": device, "batch_size": config.batch_size,
                                               "threads": int(cpus_per_actor),
                                               "image_precision": config.image_precision,
                                               "itm_kv": config.itm_kv})
    got: dict[str, list[np.ndarray]] = {c: [] for c in RESULT_COLUMNS}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for c in RESULT_COLUMNS:
            got[c].append(b[c])
    cols = {c: np.concatenate(v) for c, v in got.items()}
    order = np.argsort(cols["i"], kind="stable")
    return {c: v[order] for c, v in cols.items()}


def _publish(index_dir: Path, staging: Path, items: list[Item], problems: list[tuple[str, str]],
             res: dict[str, np.ndarray], model: Any, fingerprint: str, config: IndexConfig, factory: str,
             timings: dict[str, float], t0: float) -> dict[str, Any]:
    """Shards, metadata, the merged on-disk FAISS index and the manifest of generation 1."""
    import faiss
    import ray

    t = time.perf_counter()
    q, d = model.qformer.config.num_query_tokens, model.qformer.config.embed_dim
    ok = np.array([p != "" for p in res["part"]], bool)
    # parts become shards, numbered in item order; image ids follow item order, as in the local engine
    parts: list[str] = []
    for p in res["part"][ok]:
        if not parts or parts[-1] != p:
            if p in parts:
                raise RuntimeError("Ray returned a part's rows out of order")
            parts.append(p)
    shard_of = {p: s for s, p in enumerate(parts)}
    int8 = config.feature_dtype == "int8"
    shards = []
    for p, s in shard_of.items():
        files = store.shard_files(s, int8, config.itm_kv)
        for key, f in files.items():
            (index_dir / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / f"{p}.{key}.npy", index_dir / f)
        n = int((res["part"] == p).sum())
        shards.append({"id": s, "rows": n, "files": files})
    if shards:
        store.fsync_dir(index_dir / store.FEATURES_DIR)
    rows, skipped = [], {}
    for k in range(len(items)):
        item, r = items[k], {c: res[c][k] for c in RESULT_COLUMNS}
        if r["part"] == "":
            skipped[item.path] = {"path": item.path, "source": item.source, "reason": r["error"], "size": item.size,
                                  "mtime": md.timestamp(item.mtime), "sha256": r["sha256"]}
            continue
        row = metadata_row(len(rows), item, r)
        row["shard"], row["row"] = shard_of[r["part"]], int(r["row"])
        rows.append(row)
    for p, reason in problems:
        skipped[p] = {"path": p, "source": p.split(TAR_SEP)[0], "reason": reason}
    table = md.rows_to_table(rows) if rows else md.empty_table()
    timings["metadata"] = time.perf_counter() - t

    # FAISS: train on a sample, fill one IVF per shard in Ray tasks, merge the lists on disk
    t = time.perf_counter()
    g = 1
    emb_files = [index_dir / s["files"]["embeddings"] for s in shards]
    ids_per_shard = [table["image_id"].to_numpy()[table["shard"].to_numpy() == s["id"]] for s in shards]
    total = len(table) * q
    used = factory if total >= vectors.train_threshold(d, factory) else vectors.ondisk_factory(vectors.EXACT)
    trained = faiss.index_factory(d, used, faiss.METRIC_INNER_PRODUCT)
    ivfdata = None
    if total:
        trained.train(vectors.train_sample(emb_files, ids_per_shard, vectors.TRAIN_SAMPLE))
        blob = ray.put(faiss.serialize_index(trained))
        fill = ray.remote(num_cpus=1)(vectors.fill_part)
        part_files = [str(staging / f"shard-{s['id']:06d}.ivf") for s in shards]
        ray.get([fill.remote(blob, str(f), ids, out)
                 for f, ids, out in zip(emb_files, ids_per_shard, part_files, strict=True)])
        ivfdata = store.ivfdata_file(g)
        vectors.merge_ondisk(trained, part_files, index_dir / ivfdata)
    if trained.ntotal != total:
        raise RuntimeError(f"merged index holds {trained.ntotal} vectors, expected {total}; nothing was published")
    store.write_faiss(index_dir / store.faiss_file(g), trained)
    timings["faiss"] = time.perf_counter() - t

    store.write_parquet(index_dir / store.metadata_file(g), table)
    store.write_parquet(index_dir / store.skipped_file(g), md.skipped_table(skipped))
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    seconds = round(time.perf_counter() - t0, 3)
    summary = {"complete": True, "engine": "ray", "scanned": len(items), "embedded": len(table), "reused": 0,
               "unchanged": 0, "updated": 0, "removed": 0, "skipped": len(skipped),
               "sources": sorted({it.source for it in items}), "timings": {k: round(v, 3) for k, v in timings.items()}}
    m = {"format": store.FORMAT, "version": store.FORMAT_VERSION, "generation": g, "created": now, "updated": now,
         "build_seconds": seconds, "next_image_id": len(table), "next_shard": len(shards), "shards": shards,
         "complete": True, "model": {**model_identity(model), "fingerprint": fingerprint}, "num_queries": q,
         "embed_dim": d, "token_shape": _token_shape(index_dir, shards), "feature_dtype": config.feature_dtype,
         "image_precision": config.image_precision,
         "cross_kv": {"dtype": "bf16", "shape": _kv_shape(index_dir, shards)} if config.itm_kv else None,
         "int8_scale": "per-token symmetric, max|x|/127",
         "faiss": {"factory": config.faiss_factory, "metric": "inner_product", "params": config.faiss_params,
                   "effective": used, "file": store.faiss_file(g), "ntotal": int(trained.ntotal),
                   **({"ivfdata": ivfdata} if ivfdata else {})},
         "metadata": store.metadata_file(g), "skipped": store.skipped_file(g),
         "counts": {"images": len(table), "skipped": len(skipped), "vectors": int(trained.ntotal),
                    "shards": len(shards), "feature_rows": sum(s["rows"] for s in shards)},
         "last_run": summary}
    store.publish(index_dir, m)  # <- the commit point
    store.collect_garbage(index_dir, [m])  # files an earlier, killed run left behind
    return m


def _kv_shape(index_dir: Path, shards: list[dict[str, Any]]) -> list[int] | None:
    if not shards:
        return None
    return list(np.load(index_dir / shards[0]["files"]["kv"], mmap_mode="r").shape[1:])


def _token_shape(index_dir: Path, shards: list[dict[str, Any]]) -> list[int] | None:
    if not shards:
        return None
    return list(np.load(index_dir / shards[0]["files"]["features"], mmap_mode="r").shape[1:])
