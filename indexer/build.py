"""Build or update an index: `build_index` (incremental, crash-safe) and `remove_from_index`.

A run lists its sources, then streams every item through DataLoader workers, which read the bytes,
hash them (sha256) and — unless the content is already indexed under that path — decode and preprocess
them. The main process runs the model on what is new, and commits a new generation every
`max(commit_every, commit_fraction * images in the index)` new images, so a kill loses at most that much
work. A re-run skips what the current generation holds (same path, same sha256), re-embeds changed files,
reuses the stored embeddings of content already indexed under another path (renames, copies), and drops
images whose files are gone.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from indexer import metadata as md
from indexer import store
from indexer.errors import ModelMismatch
from indexer.fingerprint import model_fingerprint, model_identity
from indexer.writer import IndexWriter
from qformer.decode import DEFAULT_MAX_PIXELS, BadImage, decode_image
from qformer.factory import Blip2Retriever
from qformer.itm import ItmReranker
from qformer.precision import autocast, resolve
from qformer.sources import TAR_SEP, Item, collect, read_item_bytes
from qformer.workers import DECODE_NICE, lower_priority

logger = logging.getLogger(__name__)

Captioner = Callable[[list[Image.Image]], list[str]]


@dataclass
class IndexConfig:
    """How to build an index. Fixed at creation: `feature_dtype`, `image_precision`, `itm_kv`. Changeable on any
    run: the rest."""

    batch_size: int = 32  # images per model call
    num_workers: int = 2  # decoding processes (0: decode in the main process)
    commit_every: int = 256  # new images between commits (a kill loses at most this much work) ...
    commit_fraction: float = 0.05  # ... or this fraction of the index, if larger (bounds rewrite cost)
    feature_dtype: str = "fp16"  # "fp16" or "int8" (symmetric, per-token scale)
    image_precision: str = "auto"  # encoder + query pass arithmetic: fp32 | bf16 | auto (bf16 where native)
    itm_kv: bool = False  # also store the bf16 ITM re-ranker's cross-attention keys/values (+226 KB an image for blip2-tiny)
    faiss_factory: str = "Flat"  # exact; or an ANN such as "IVF1024,Flat", "HNSW32"
    faiss_params: str = ""  # search-time parameters stored with the index, e.g. "nprobe=16"
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped (decompression bombs)
    max_file_bytes: int = 512 << 20  # larger files are skipped
    jpeg_draft: bool = True  # decode big JPEGs at reduced scale (never below the model's input size)
    path_column: str | None = None  # manifest path column (default: path, filepath, image, filename, ...)
    include_hidden: bool = False  # index dot-files and dot-directories too
    prune: bool = True  # drop images whose file is gone, or that a rescanned source no longer lists
    compact_below: float = 0.5  # rewrite feature shards whose live fraction falls below this (0: never)
    keep_generations: int = 2  # generations kept on disk for readers that opened an older one
    caption_image_side: int = 512  # longest side of the images handed to a captioner
    prefetch_factor: int = 2  # batches each worker decodes ahead
    worker_nice: int = DECODE_NICE  # niceness added to the decoding processes (qformer.workers)


@torch.inference_mode()
def itm_keys_values(model: Blip2Retriever, tokens: np.ndarray, feature_dtype: str) -> np.ndarray:
    """The bf16 ITM re-ranker's cross-attention keys/values [n,L,2,N,H] (bf16 bits, `store.kv_to_array`) of
    tokens [n,N,C], from the tokens as stored (quantised, then read back in bf16): what search computes
    (`ItmReranker.keys_values`, each image's alone)."""
    stored, scale = store.quantize(tokens, feature_dtype)
    x = store.dequantize_torch(stored, scale, torch.bfloat16)
    rr = ItmReranker(model, "bf16")
    return np.concatenate([store.kv_to_array(rr.keys_values(x[i : i + 128])) for i in range(0, len(x), 128)])


@dataclass
class IndexStats:
    """What one `build_index` run did, and how long each part took."""

    index_dir: str
    generation: int
    scanned: int = 0  # items listed by the sources
    embedded: int = 0  # run through the model
    reused: int = 0  # new path, content already indexed: stored embeddings reused
    unchanged: int = 0  # same path and sha256 as indexed
    updated: int = 0  # metadata (mtime, manifest columns, caption) refreshed
    removed: int = 0  # left the index (deleted, changed or now unreadable)
    skipped: int = 0  # not indexable, with a reason (see Index.info()["skipped"])
    images: int = 0  # in the index after the run
    commits: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0  # embedded images per second of the whole run
    timings: dict[str, float] = field(default_factory=dict)  # seconds: list, decode (worker CPU), wait, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- decoding in workers -------------------------------------------------------------------------------------
class _Decoded(Dataset):
    """Item -> dict(i, sha256, error | unchanged | pixels [3,S,S] (+ image for a captioner), width, ...)."""

    def __init__(self, items: list[Item], expected: list[str | None], transform: Callable[[Image.Image], Tensor],
                 config: IndexConfig, draft: int | None, want_image: bool):
        self.items, self.expected, self.transform = items, expected, transform
        self.config, self.draft, self.want_image = config, draft, want_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return decode_item(self.items[i], i, self.expected[i], self.transform, self.config, self.draft,
                           self.want_image)


def decode_item(item: Item, i: int, expected: str | None, transform: Callable[[Image.Image], Tensor],
                config: IndexConfig, draft: int | None, want_image: bool = False) -> dict[str, Any]:
    """Read, hash and decode one item -> dict(i, sha256, size, error | unchanged | pixels [3,S,S], width,
    height, format, cpu seconds, + image for a captioner). Never raises: a bad input becomes `error`."""
    t0 = time.process_time()
    out: dict[str, Any] = {"i": i, "sha256": None, "error": None, "unchanged": False, "pixels": None}
    try:
        _fill(item, expected, out, transform, config, draft, want_image)
    except Exception as e:  # nothing an input does may stop the run
        out["error"] = f"unexpected {type(e).__name__}: {e}"
        out["pixels"] = None
    out["cpu"] = time.process_time() - t0
    return out


def _fill(item: Item, expected: str | None, out: dict[str, Any], transform: Callable[[Image.Image], Tensor],
          config: IndexConfig, draft: int | None, want_image: bool) -> None:
    if item.size > config.max_file_bytes:
        out["error"] = f"file too large ({item.size} bytes > max_file_bytes={config.max_file_bytes})"
        return
    try:
        data = read_item_bytes(item)
    except OSError as e:
        out["error"] = f"cannot read: {e}"
        return
    out["sha256"], out["size"] = hashlib.sha256(data).hexdigest(), len(data)
    if out["sha256"] == expected:
        out["unchanged"] = True
        return
    try:
        dec = decode_image(data, config.max_pixels, draft)
        out["pixels"] = transform(dec.image)
    except BadImage as e:
        out["error"] = str(e)
        return
    out["width"], out["height"], out["format"] = dec.width, dec.height, dec.format
    if want_image:
        im = dec.image
        im.thumbnail((config.caption_image_side,) * 2)
        out["image"] = im


def metadata_row(image_id: int, item: Item, r: dict[str, Any]) -> dict[str, Any]:
    """The metadata row of a newly embedded item (`r`: what `decode_item` found), without shard/row."""
    caption = item.meta.get("caption")
    return {"image_id": image_id, "path": item.path, "source": item.source, "sha256": r["sha256"],
            "size": r["size"], "mtime": item.mtime, "width": r["width"], "height": r["height"],
            "format": r["format"], "caption": None if caption is None else str(caption),
            "indexed_at": time.time(), **md.user_columns(item.meta)}


def _collate(batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Tensor | None]:
    """Stack the pixels of the decoded items (in the worker); row k belongs to the k-th result with pixels."""
    pix = [r.pop("pixels") for r in batch]
    good = [p for p in pix if p is not None]
    for r, p in zip(batch, pix, strict=True):
        r["has_pixels"] = p is not None
    return batch, (torch.stack(good) if good else None)


# ---- one run -------------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, model: Blip2Retriever, writer: IndexWriter, config: IndexConfig,
                 captioner: Captioner | None, items: list[Item], roots: set[str], started: float):
        self.model, self.w, self.config, self.captioner = model, writer, config, captioner
        self.items, self.roots, self.started = items, roots, started
        base = writer.table
        self.base = base
        self.base_paths: list[str] = base["path"].to_pylist()
        self.base_ids = base["image_id"].to_numpy()
        self.base_sha: list[str] = base["sha256"].to_pylist()
        self.base_source: list[str] = base["source"].to_pylist()
        self.base_mtime_us = pc.cast(base["mtime"], pa.int64()).to_numpy(zero_copy_only=False)
        self.base_no_caption = pc.is_null(base["caption"]).to_numpy(zero_copy_only=False)
        self.pos = {p: i for i, p in enumerate(self.base_paths)}
        shard, row = base["shard"].to_numpy(), base["row"].to_numpy()
        self.sha_loc: dict[str, tuple[int, int]] = {s: (int(a), int(b)) for s, a, b in zip(self.base_sha, shard, row,
                                                                                           strict=True)}
        # pending until the next commit
        self.deleted: set[int] = set()
        self.updates: dict[int, dict[str, Any]] = {}
        self.new_rows: list[dict[str, Any]] = []
        self.tokens: list[np.ndarray] = []  # [N,C] per embedded image, in pending-shard row order
        self.embeds: list[np.ndarray] = []  # [Q,D]
        self.pending_sha: dict[str, int] = {}  # sha -> row in the pending shard
        self.stats = IndexStats(str(writer.dir), 0, scanned=len(items))
        self.t = {"decode_cpu": 0.0, "wait": 0.0, "encoder": 0.0, "qformer": 0.0, "itm_kv": 0.0, "caption": 0.0,
                  "write": 0.0}
        self.last_commit = started
        self.skipped_committed = dict(writer.skipped)

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def delete(self, pos: int) -> None:
        i = int(self.base_ids[pos])
        if i not in self.deleted:
            self.deleted.add(i)
            self.updates.pop(i, None)
            self.stats.removed += 1

    def base_row(self, pos: int) -> dict[str, Any]:
        i = int(self.base_ids[pos])
        return self.updates.get(i) or self.base.slice(pos, 1).to_pylist()[0]

    def prune(self, problems: list[tuple[str, str]]) -> None:
        """Drop what the sources no longer list, or whose file is gone; re-judge skipped entries."""
        seen = {it.path for it in self.items}
        if self.config.prune:
            for pos, p in enumerate(self.base_paths):
                if p not in seen and (self.base_source[pos] in self.roots or not _exists(p)):
                    self.delete(pos)
        problem_paths = {p for p, _ in problems}
        for p, entry in list(self.w.skipped.items()):
            if p not in seen and p not in problem_paths and (entry["source"] in self.roots or not _exists(p)):
                del self.w.skipped[p]
        for p, reason in problems:
            self.w.skipped[p] = {"path": p, "source": p.split(TAR_SEP)[0], "reason": reason}
        self.stats.skipped += len(problems)

    def new_row(self, item: Item, r: dict[str, Any]) -> dict[str, Any]:
        return metadata_row(self.w.new_image_id(), item, r)

    def refresh(self, pos: int, item: Item) -> None:
        """Same content as indexed: refresh mtime / source / user columns if they changed."""
        changes: dict[str, Any] = {}
        if md.to_us(item.mtime) != int(self.base_mtime_us[pos]):
            changes["mtime"] = item.mtime
        if item.source != self.base_source[pos]:
            changes["source"] = item.source
        if item.meta:
            row = self.base_row(pos)
            user = md.user_columns(item.meta)
            changes.update({k: v for k, v in user.items() if row.get(k) != v})
            cap = item.meta.get("caption")
            if cap is not None and row.get("caption") != str(cap):
                changes["caption"] = str(cap)
        if changes:
            i = int(self.base_ids[pos])
            if i not in self.updates:
                self.stats.updated += 1
            self.updates[i] = {**self.base_row(pos), **changes}

    # -- main loop --------------------------------------------------------------------------------------------
    def expected_sha(self) -> list[str | None]:
        """Per item, the sha256 that means "nothing to do" (None: decode whatever the content)."""
        out: list[str | None] = []
        for it in self.items:
            pos = self.pos.get(it.path)
            if pos is None or (self.captioner is not None and self.base_no_caption[pos]
                               and it.meta.get("caption") is None):
                out.append(None)
            else:
                out.append(self.base_sha[pos])
        return out

    def run(self, progress: bool) -> IndexStats:
        model, cfg = self.model, self.config
        size = int(model.encoder.image_size)
        ds = _Decoded(self.items, self.expected_sha(), model.preprocess(), cfg,
                      size if cfg.jpeg_draft else None, self.captioner is not None)
        loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=_collate,
                            prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
                            worker_init_fn=functools.partial(lower_priority, nice=cfg.worker_nice),
                            pin_memory=model.device.type == "cuda")
        bar = tqdm(total=len(self.items), desc="indexing", unit="img", disable=not progress, smoothing=0.1)
        t = time.perf_counter()
        for results, pixels in loader:
            self.t["wait"] += time.perf_counter() - t
            self.handle(results, pixels)
            bar.update(len(results))
            bar.set_postfix(new=self.stats.embedded + self.stats.reused, skipped=self.stats.skipped, refresh=False)
            if len(self.new_rows) + len(self.deleted) + len(self.updates) >= self.commit_interval():
                self.commit(complete=False)
            t = time.perf_counter()
        bar.close()
        self.commit(complete=True)
        self.stats.generation = self.w.manifest["generation"]  # type: ignore[index]
        self.stats.images = self.w.table.num_rows
        return self.stats

    def commit_interval(self) -> int:
        return max(1, self.config.commit_every, int(self.config.commit_fraction * self.w.table.num_rows))

    def handle(self, results: list[dict[str, Any]], pixels: Tensor | None) -> None:
        k = 0
        embed_rows: list[tuple[int, dict[str, Any]]] = []  # (row in `pixels`, new metadata row)
        caption_jobs: list[tuple[dict[str, Any], Image.Image]] = []
        for r in results:
            item = self.items[r["i"]]
            px = k if r["has_pixels"] else -1
            k += r["has_pixels"]
            self.t["decode_cpu"] += r["cpu"]
            pos = self.pos.get(item.path)
            if r["error"] is not None:
                self.stats.skipped += 1
                self.w.skipped[item.path] = {"path": item.path, "source": item.source, "reason": r["error"],
                                             "size": item.size, "mtime": md.timestamp(item.mtime),
                                             "sha256": r["sha256"]}
                if pos is not None:
                    self.delete(pos)
                continue
            self.w.skipped.pop(item.path, None)
            if pos is not None and r["sha256"] == self.base_sha[pos]:
                self.stats.unchanged += 1
                self.refresh(pos, item)
                if not r["unchanged"] and "image" in r:  # decoded only to caption it
                    i = int(self.base_ids[pos])
                    if i not in self.updates:
                        self.updates[i] = self.base_row(pos)
                        self.stats.updated += 1
                    caption_jobs.append((self.updates[i], r["image"]))
                continue
            if pos is not None:
                self.delete(pos)  # content changed: the old vectors go, the new ones get a new id
            row = self.new_row(item, r)
            self.new_rows.append(row)
            if self.captioner is not None and row["caption"] is None:
                caption_jobs.append((row, r["image"]))
            sha = r["sha256"]
            if sha in self.pending_sha:
                row["shard"], row["row"] = -1, self.pending_sha[sha]
                self.stats.reused += 1
            elif sha in self.sha_loc:
                row["shard"], row["row"] = self.sha_loc[sha]
                self.stats.reused += 1
            else:
                self.pending_sha[sha] = len(self.tokens) + len(embed_rows)
                row["shard"], row["row"] = -1, self.pending_sha[sha]
                embed_rows.append((px, row))
        if embed_rows:
            self.embed(pixels[[px for px, _ in embed_rows]])  # type: ignore[index]
        if caption_jobs:
            self.caption(caption_jobs)

    @torch.inference_mode()
    def embed(self, pixels: Tensor) -> None:
        t0 = time.perf_counter()
        precision = self.w.manifest["image_precision"]  # type: ignore[index]
        tokens = self.model.image_tokens(pixels, precision)  # [B,N,C]
        tok = tokens.float().cpu().numpy()
        t1 = time.perf_counter()
        with autocast(self.model.device, precision):
            emb = self.model.qformer.encode_image(tokens).float().cpu().numpy()  # [B,Q,D]
        t2 = time.perf_counter()
        self.t["encoder"] += t1 - t0
        self.t["qformer"] += t2 - t1
        self.tokens.extend(tok)
        self.embeds.extend(emb)
        self.stats.embedded += len(tok)

    def cross_kv(self, tokens: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = itm_keys_values(self.model, tokens, self.w.manifest["feature_dtype"])  # type: ignore[index]
        self.t["itm_kv"] += time.perf_counter() - t0
        return out

    def caption(self, jobs: list[tuple[dict[str, Any], Image.Image]]) -> None:
        t0 = time.perf_counter()
        try:
            caps = list(self.captioner([im for _, im in jobs]))  # type: ignore[misc]
            if len(caps) != len(jobs):
                raise ValueError(f"captioner returned {len(caps)} captions for {len(jobs)} images")
        except Exception as e:  # a failing captioner costs captions, not the index
            logger.warning("captioner failed on %d images: %s", len(jobs), e)
            caps = [None] * len(jobs)
        for (row, _), c in zip(jobs, caps, strict=True):
            row["caption"] = None if c is None else str(c)
        self.t["caption"] += time.perf_counter() - t0

    # -- commit -----------------------------------------------------------------------------------------------
    def commit(self, complete: bool) -> None:
        w = self.w
        assert w.manifest is not None
        dirty = bool(self.new_rows or self.deleted or self.updates) or w.force_rebuild \
            or not w.manifest["complete"] or w.manifest["generation"] == 0 or self.skipped_committed != w.skipped
        if not dirty:
            return
        t0 = time.perf_counter()
        if self.tokens:
            tokens = np.stack(self.tokens)  # [n,N,C]
            kv = self.cross_kv(tokens) if w.manifest.get("cross_kv") else None
            shard = w.write_shard(tokens, np.stack(self.embeds), kv)  # embeddings [n,Q,D]
            if kv is not None and w.manifest["cross_kv"].get("shape") is None:
                w.manifest["cross_kv"]["shape"] = list(kv.shape[1:])
            if w.manifest["token_shape"] is None:
                w.manifest["token_shape"] = list(self.tokens[0].shape)
            for row in self.new_rows:
                if row["shard"] == -1:
                    row["shard"] = shard
            for sha, r in self.pending_sha.items():
                self.sha_loc[sha] = (shard, r)
        drop = self.deleted | set(self.updates)
        table = w.table
        if drop:
            table = table.filter(pc.invert(pc.is_in(table["image_id"], pa.array(sorted(drop), pa.int64()))))
        if self.updates or self.new_rows:
            table = md.concat([table, md.rows_to_table(list(self.updates.values()) + self.new_rows)])
        if complete:
            table = w.compact(table, self.config.compact_below)
        added = np.array([r["image_id"] for r in self.new_rows], np.int64)
        self.stats.images = table.num_rows
        m = w.commit(table, set(self.deleted), added, complete, seconds=t0 - self.last_commit,
                     extra={"last_run": self._summary(complete)})
        self.last_commit = time.perf_counter()
        self.t["write"] += self.last_commit - t0
        self.stats.commits += 1
        self.stats.generation = m["generation"]
        self.deleted, self.updates, self.new_rows = set(), {}, []
        self.tokens, self.embeds, self.pending_sha = [], [], {}
        self.skipped_committed = dict(w.skipped)

    def _summary(self, complete: bool) -> dict[str, Any]:
        s = self.stats
        return {"complete": complete, "scanned": s.scanned, "embedded": s.embedded, "reused": s.reused,
                "unchanged": s.unchanged, "updated": s.updated, "removed": s.removed, "skipped": s.skipped,
                "sources": sorted(self.roots), "timings": {k: round(v, 3) for k, v in self.t.items()}}


def _exists(path: str) -> bool:
    return os.path.exists(path.split(TAR_SEP)[0])


# ---- public API ----------------------------------------------------------------------------------------------
def build_index(
    model: Blip2Retriever,
    sources: list[str | Path],
    index_dir: str | Path,
    config: IndexConfig | None = None,
    captioner: Captioner | None = None,
    progress: bool = True,
) -> IndexStats:
    """Index (or bring up to date) the images of `sources` in `index_dir` with `model`.

    Sources: directories (recursive, every format Pillow opens), CSV/TSV/Parquet manifests (a path column
    plus metadata columns), webdataset tar shards, single image files, globs and `{000..009}` ranges.
    `captioner(images) -> captions` fills the `caption` column of images that have none.
    Raises `ModelMismatch` if the index was built with another model, `IndexLocked` if another writer
    is active. Unreadable inputs never stop the run: they are skipped, each with its reason.
    """
    config = config or IndexConfig()
    if config.feature_dtype not in store.FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {store.FEATURE_DTYPES}, not {config.feature_dtype!r}")
    t0 = time.perf_counter()
    index_dir = Path(index_dir)
    items, problems, roots = collect(sources, config.path_column, config.include_hidden)
    t_list = time.perf_counter() - t0
    fingerprint = model_fingerprint(model)
    # the images of one index are all embedded alike: fixed at creation, bf16 where the device has it natively
    image_precision = resolve(model.device, config.image_precision)
    with store.writer_lock(index_dir):
        store.remove_temp_files(index_dir)
        w = IndexWriter(index_dir, config.keep_generations)
        if w.exists:
            _check_same_model(w, model, fingerprint, index_dir)
            if config.itm_kv and not w.manifest.get("cross_kv"):  # type: ignore[union-attr]
                logger.warning("%s was built without ITM keys/values; ignoring itm_kv", index_dir)
            if config.feature_dtype != w.manifest["feature_dtype"]:  # type: ignore[index]
                logger.warning("%s stores %s features; ignoring feature_dtype=%s", index_dir,
                               w.manifest["feature_dtype"], config.feature_dtype)  # type: ignore[index]
            w.manifest.setdefault("image_precision", "fp32")  # type: ignore[union-attr]  # indexes from before bf16
            if config.image_precision not in ("auto", w.manifest["image_precision"]):  # type: ignore[index]
                logger.warning("%s embeds images in %s; ignoring image_precision=%s", index_dir,
                               w.manifest["image_precision"], config.image_precision)  # type: ignore[index]
        else:
            q = model.qformer.config
            w.setup({"model": {**model_identity(model), "fingerprint": fingerprint},
                     "num_queries": q.num_query_tokens, "embed_dim": q.embed_dim, "token_shape": None,
                     "feature_dtype": config.feature_dtype, "int8_scale": "per-token symmetric, max|x|/127",
                     "image_precision": image_precision,
                     "cross_kv": {"dtype": "bf16", "shape": None} if config.itm_kv else None,
                     "faiss": {"factory": config.faiss_factory, "metric": "inner_product",
                               "params": config.faiss_params}})
        fa = w.manifest["faiss"]  # type: ignore[index]
        if fa["factory"] != config.faiss_factory:
            fa["factory"], w.force_rebuild = config.faiss_factory, True
        fa["params"] = config.faiss_params
        run = _Run(model, w, config, captioner, items, roots, started=t0)
        run.t["list"] = t_list
        run.prune(problems)
        stats = run.run(progress)
    stats.seconds = round(time.perf_counter() - t0, 3)
    stats.images_per_s = round(stats.embedded / stats.seconds, 2) if stats.seconds else 0.0
    stats.timings = {k: round(v, 3) for k, v in run.t.items()}
    return stats


def _check_same_model(w: IndexWriter, model: Blip2Retriever, fingerprint: str, index_dir: Path) -> None:
    want = w.manifest["model"]  # type: ignore[index]
    if want["fingerprint"] != fingerprint:
        raise ModelMismatch(
            f"{index_dir}: index built with model {want['name']!r} (fingerprint {want['fingerprint'][:12]}), "
            f"not {model.name!r} (fingerprint {fingerprint[:12]}); build into a new directory instead")


def remove_from_index(index_dir: str | Path, paths: list[str | Path]) -> int:
    """Remove images from the index by path (a directory or tar shard removes everything under it).
    Returns how many images left the index. Commits a new generation when anything changed."""
    index_dir = Path(index_dir)
    store.read_current(index_dir)  # IndexNotFound early, before taking the lock
    keys = [_key(p) for p in paths]
    with store.writer_lock(index_dir):
        w = IndexWriter(index_dir)
        table = w.table
        all_paths = table["path"].to_pylist()
        hit = np.array([any(_under(p, k) for k in keys) for p in all_paths], bool)
        dropped_skips = [p for p in w.skipped if any(_under(p, k) for k in keys)]
        for p in dropped_skips:
            del w.skipped[p]
        if not hit.any() and not dropped_skips:
            return 0
        removed = set(table["image_id"].to_numpy()[hit].tolist())
        t0 = time.perf_counter()
        table = w.compact(table.filter(pa.array(~hit)), IndexConfig.compact_below)
        w.commit(table, removed, np.zeros(0, np.int64), bool(w.manifest["complete"]),  # type: ignore[index]
                 seconds=0.0, extra={"last_run": {"removed": len(removed), "seconds": time.perf_counter() - t0}})
        return len(removed)


def _key(p: str | Path) -> str:
    s = str(p)
    if TAR_SEP in s:
        tar, member = s.split(TAR_SEP, 1)
        return os.path.normpath(os.path.abspath(tar)) + TAR_SEP + member
    return os.path.normpath(os.path.abspath(os.path.expanduser(s)))


def _under(path: str, key: str) -> bool:
    return path == key or path.startswith(key + os.sep) or path.startswith(key + TAR_SEP)
