"""Search an index: text → image, image → image, image → text, and text + image, with ITM re-ranking.

Text → image follows the paper's retrieval score:
1. ITC (`search.first_stage.FirstStage`): the text embedding against every image's Q query embeddings, max
   over queries: an exact scan of the stored embeddings, FAISS, or FAISS with exact re-scoring.
2. ITM (`qformer.itm.ItmReranker`) re-ranks the top `rerank` images (the paper's k_test = 128; 0 turns
   re-ranking off), the same arithmetic as the retrieval benchmark's.
3. Final score = ITM match logit + ITC cosine.

Filters (`where`) are SQL predicates over the metadata, run by DuckDB on the metadata table alone with
external access disabled, values bound as parameters. With a filter, scoring is exact over the matching
images (stored embeddings), so k results come back whenever k images match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from indexer import Index, load_image
from qformer.factory import Blip2Retriever, create_model
from qformer.itm import ImageInput, ItmReranker
from qformer.precision import use_bf16
from search.first_stage import DEFAULT_RESCORE, FirstStage

FUSION_DEPTH = 128  # hybrid search fuses the dense and BM25 rankings down to this depth
MAX_QUERY_CHARS = 2000  # longer text is refused: the tokenizer would keep only ~35 tokens anyway


class QueryError(ValueError):
    """A query that cannot be run (empty, unreadable image, bad filter)."""


@dataclass
class Hit:
    rank: int
    image_id: int
    path: str
    score: float  # what the ranking used: itm + itc (+ image similarity) when re-ranked
    itc: float | None  # text-image ITC cosine (max over queries)
    itm: float | None  # ITM match logit (None without re-ranking)
    image_sim: float | None  # query-image similarity (image queries)
    caption: str | None
    metadata: dict[str, Any] = field(default_factory=dict)  # the user's columns, width, height, ...

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("rank", "image_id", "path", "score", "itc", "itm", "image_sim",
                                              "caption", "metadata")}


@dataclass
class CaptionHit:
    rank: int
    image_id: int
    path: str
    caption: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("rank", "image_id", "path", "caption", "score")}


class Searcher:
    """An open index plus the model it was built with."""

    def __init__(self, index_dir: str | Path, model: Blip2Retriever | None = None, device: str = "cpu",
                 rescore: int = DEFAULT_RESCORE, itm_precision: str = "auto"):
        """rescore: when FAISS scores are approximate (PQ codes), the ITC candidates are the best
        max(n, rescore) images by approximate score, re-scored exactly from the stored embeddings (0: keep
        FAISS's scores). Indexes holding full vectors (Flat, IVF-Flat, HNSW-Flat) are never re-scored that way.
        itm_precision: the ITM re-ranker's arithmetic, "auto" (bf16 where the device has native bf16, else
        fp32), "fp32" or "bf16" (qformer.precision)."""
        if rescore < 0:
            raise ValueError("rescore must be >= 0")
        use_bf16(device, itm_precision)  # rejects an unknown precision before anything loads
        self.itm_precision = itm_precision
        self.index = Index.open(index_dir)
        self.first_stage = FirstStage(self.index, device, rescore)
        src = self.index.manifest["model"].get("source") or self.index.manifest["model"]["name"]
        self.model = model if model is not None else create_model(src, device)
        self.index.check_model(self.model)
        self.reranker = ItmReranker(self.model, itm_precision)
        self._caption_embeds: tuple[np.ndarray, torch.Tensor] | None = None
        self._fts: Any = None  # DuckDB connection with a BM25 index over the stored captions, built lazily

    @property
    def approximate(self) -> bool:
        """Whether the FAISS index scores approximately (compressed codes)."""
        return self.first_stage.approximate

    # ---- embeddings -------------------------------------------------------------------------------------
    def embed_text(self, text: str) -> torch.Tensor:
        """A query text's ITC embedding [D] float32 (QueryError when empty or too long)."""
        return self.embed_texts([text])[0]

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Query texts' ITC embeddings [B,D] float32, in one pass (QueryError when one is empty or too long)."""
        return self.model.embed_texts([_checked_text(t) for t in texts]).float().cpu()

    def embed_image(self, image: str | Path | bytes | Image.Image) -> tuple[torch.Tensor, torch.Tensor, Image.Image]:
        """Query image -> (query embeddings [Q,D], frozen tokens [1,N,C], decoded image); QueryError when
        it cannot be read."""
        if not isinstance(image, Image.Image):
            try:
                image = load_image(image)
            except (OSError, ValueError) as e:
                raise QueryError(f"cannot read the query image: {e}") from e
        pixels = self.model.preprocess()(image)[None]
        embeds, tokens = self.model.embed_images(pixels, self.index.image_precision)
        return embeds[0].float().cpu(), tokens, image

    # ---- candidate scoring ---------------------------------------------------------------------------------
    def _filter_ids(self, where: str | None, params: Sequence[Any] | None) -> np.ndarray | None:
        if not where:
            return None
        return filter_ids(self.index.metadata, where, params)

    def _itc_top(self, t: torch.Tensor, n: int, allowed: np.ndarray | None) -> np.ndarray:
        return self.first_stage.top(t, n, allowed)[0][0]

    def itm_logits(self, text: str, image_ids: np.ndarray) -> np.ndarray:
        """ITM match logits [k] float32 of the text against these images, in passes of the re-ranker's batch:
        the stored keys/values where the index has them (bf16 re-ranker), else from the stored tokens."""
        ids, mask = self.model.tokenize([" ".join(text.split())])
        stored_kv = self.index.has_cross_kv and self.reranker.dtype == torch.bfloat16  # what they were made by
        heads = self.reranker.encoder.config.num_heads

        def images(part: slice) -> ImageInput:
            if stored_kv:
                return self.index.cross_kv(image_ids[part], heads)
            return self.index.features(image_ids[part], self.reranker.dtype)

        return self.reranker.text_vs_images(ids[0], mask[0], images, len(image_ids)).cpu().numpy()

    def _image_sim(self, query_embeds: torch.Tensor, image_ids: np.ndarray) -> np.ndarray:
        """Image-image similarity: mean over the query image's Q embeddings of the best match among each
        candidate's Q embeddings (MaxSim)."""
        e = self.index.embeddings(image_ids)  # [k,Q,D]
        return np.einsum("kpd,qd->kqp", e, query_embeds.numpy()).max(2).mean(1)

    # ---- public API ------------------------------------------------------------------------------------------
    def search(
        self,
        text: str | None = None,
        image: str | Path | bytes | Image.Image | None = None,
        k: int = 10,
        rerank: int = 128,
        where: str | None = None,
        params: Sequence[Any] | None = None,
        expand: bool = False,
        offset: int = 0,
        hybrid: bool = False,
        min_score: float | None = None,
    ) -> list[Hit]:
        """Images ranked for a text, an example image, or both.

        rerank: ITM re-ranks this many ITC candidates (0: ITC only). expand: an image query's generated
        caption joins the query as text. hybrid: text candidates fuse dense ITC with BM25 over the stored
        captions (reciprocal-rank fusion) before re-ranking. offset: skip this many results (paging).
        min_score: keep only the hits whose score is at least this (a relevance threshold).
        """
        [result] = self.search_many([{"text": text, "image": image, "k": k, "rerank": rerank, "where": where,
                                      "params": params, "expand": expand, "offset": offset, "hybrid": hybrid,
                                      "min_score": min_score}])
        if isinstance(result, Exception):
            raise result
        return result

    def search_many(self, searches: Sequence[dict[str, Any]]) -> list[list[Hit] | Exception]:
        """Several searches at once, each a dict of `search`'s keyword arguments; each result (or the error
        that search alone raised) in order. Their texts are embedded in one pass, their unfiltered ITC scans
        share one matrix product; ITM re-ranks each on its own."""
        plans: list[_Plan | Exception] = []
        for kw in searches:
            try:
                plans.append(self._plan(**kw))
            except Exception as e:  # that search's own error (QueryError for bad input)
                plans.append(e)
        texts = [p for p in plans if isinstance(p, _Plan) and p.text is not None]
        if texts:
            embeds = self.embed_texts([p.text for p in texts])  # [B,D]
            for p, t in zip(texts, embeds, strict=True):
                p.t = t
        scan = [p for p in texts if p.allowed is None]  # one first-stage pass for the unfiltered ones
        if scan:
            depth = max(p.depth for p in scan)
            for p, (ids, _) in zip(scan, self.first_stage.top(torch.stack([p.t for p in scan]), depth), strict=True):
                p.dense = ids[: p.depth]
        for i, p in enumerate(plans):
            if isinstance(p, _Plan):
                try:
                    self._candidates(p)
                except Exception as e:
                    plans[i] = e
        for p in plans:  # ITM query by query: larger passes mixing queries' pairs were not faster (benchmarks.md)
            if isinstance(p, _Plan) and p.t is not None and p.rerank > 0 and len(p.ids):
                p.itm = self.itm_logits(p.text, p.ids[: p.rerank])
        return [p if isinstance(p, Exception) else self._hits(p) for p in plans]

    def _plan(self, text: str | None = None, image: str | Path | bytes | Image.Image | None = None, k: int = 10,
              rerank: int = 128, where: str | None = None, params: Sequence[Any] | None = None,
              expand: bool = False, offset: int = 0, hybrid: bool = False,
              min_score: float | None = None) -> _Plan:
        """A search's checked input, its filter, and its query image's embeddings (and caption, with expand)."""
        if k <= 0:
            raise QueryError("k must be positive")
        if text is not None and not text.strip():
            text = None
        if text is None and image is None:
            raise QueryError("empty query: give some words or an image")
        allowed = self._filter_ids(where, params)
        want = max(rerank, k + offset)
        q_img = None
        if image is not None:
            q_img, _, decoded = self.embed_image(image)
            if expand:
                from qformer.itg_decoder import caption_images

                caption = caption_images(self.model, [decoded])[0]
                text = f"{text} {caption}" if text else caption
        if text is not None:
            text = _checked_text(text)
        depth = max(want, FUSION_DEPTH) if hybrid else want  # hybrid fuses both rankings at depth >= 128
        return _Plan(text, q_img, allowed, k, rerank, offset, hybrid, min_score, want, depth)

    def _candidates(self, p: _Plan) -> None:
        """p.ids and their ITC / image-similarity scores: ITC for text, MaxSim for images (the pooled query
        embedding for the first stage), best `want` kept."""
        cand: dict[int, None] = {}
        if p.t is not None:
            dense = p.dense if p.dense is not None else self._itc_top(p.t, p.depth, p.allowed)
            if p.hybrid:
                dense = self._fuse_with_bm25(dense, p.text, p.depth, p.allowed)
            cand.update(dict.fromkeys(dense[: p.want].tolist()))
        if p.q_img is not None:
            pooled = torch.nn.functional.normalize(p.q_img.mean(0), dim=0)
            cand.update(dict.fromkeys(self._itc_top(pooled, p.want, p.allowed).tolist()))
        ids = np.fromiter(cand, np.int64, len(cand))
        itc = self.first_stage.exact_scores(p.t, ids)[0] if p.t is not None else None
        sim = self._image_sim(p.q_img, ids) if p.q_img is not None and len(ids) else None
        base = (itc if itc is not None else 0.0) + (sim if sim is not None else 0.0)
        if p.fused:  # keep the fused candidate order (it decides the re-ranking pool and the tail's order)
            p.ids, p.itc, p.sim, p.base = ids, itc, None, base
        else:
            p.ids, p.itc, p.sim, p.base = _top(ids, base, p.want, itc, sim) if len(ids) else (ids, itc, sim, base)

    def _hits(self, p: _Plan) -> list[Hit]:
        """The page of hits: re-ranked ones first by itm + itc (+ image similarity), the rest in ITC order."""
        if len(p.ids) == 0:
            return []
        ids, itc, sim, base = p.ids, p.itc, p.sim, np.asarray(p.base, np.float32)
        itm = None
        if p.itm is not None:
            n = len(p.itm)
            itm = np.full(len(ids), np.nan, np.float32)
            itm[:n] = p.itm
            score = base.copy()
            score[:n] = itm[:n] + base[:n]
            order = np.concatenate([np.argsort(-score[:n], kind="stable"), np.arange(n, len(ids))])
        else:
            score = base
            order = np.arange(len(ids)) if p.fused else np.argsort(-score, kind="stable")
        order = order[p.offset : p.offset + p.k]
        rows = self.index.rows(ids[order]).to_pylist()
        hits = []
        for r, (i, row) in enumerate(zip(order, rows, strict=True)):
            hits.append(Hit(
                rank=p.offset + r + 1, image_id=int(ids[i]), path=row["path"], score=float(score[i]),
                itc=None if itc is None else float(itc[i]),
                itm=None if itm is None or np.isnan(itm[i]) else float(itm[i]),
                image_sim=None if sim is None else float(sim[i]), caption=row.get("caption"),
                metadata={c: v for c, v in row.items() if c not in ("image_id", "path", "caption", "shard", "row")},
            ))
        return hits if p.min_score is None else [h for h in hits if h.score >= p.min_score]

    def _fuse_with_bm25(self, dense: np.ndarray, text: str, n: int, allowed: np.ndarray | None) -> np.ndarray:
        """Reciprocal-rank fusion (k=60) of dense ITC ranks with BM25 ranks over the stored captions."""
        bm25 = self._bm25_top(text, n * 4 if allowed is not None else n)
        if allowed is not None:
            bm25 = bm25[np.isin(bm25, allowed)][:n]
        fused: dict[int, float] = {}
        for ranking in (dense, bm25):
            for r, i in enumerate(ranking.tolist()):
                fused[i] = fused.get(i, 0.0) + 1.0 / (60 + r + 1)
        return np.array(sorted(fused, key=lambda i: -fused[i])[:n], np.int64)

    def _bm25_top(self, text: str, n: int) -> np.ndarray:
        if self._fts is None:
            self._fts = caption_fts(self.index.metadata)
        if self._fts is False:
            return np.empty(0, np.int64)
        rows = self._fts.execute(
            "SELECT image_id FROM (SELECT image_id, fts_main_caps.match_bm25(image_id, ?) AS s FROM caps) "
            "WHERE s IS NOT NULL ORDER BY s DESC, image_id LIMIT ?", [text, n]).fetchall()
        return np.array([r[0] for r in rows], np.int64)

    def search_captions(self, image: str | Path | bytes | Image.Image, k: int = 10) -> list[CaptionHit]:
        """Image → text: the stored captions ranked by ITC against the query image."""
        q_img, _, _ = self.embed_image(image)
        ids, embeds = self._stored_caption_embeddings()
        if len(ids) == 0:
            return []
        sims = (embeds @ q_img.T).amax(1).numpy()  # [captions]: max over the query image's Q embeddings
        order = np.argsort(-sims, kind="stable")[:k]
        rows = self.index.rows(ids[order]).to_pylist()
        return [CaptionHit(rank=r + 1, image_id=int(ids[i]), path=row["path"], caption=row["caption"],
                           score=float(sims[i])) for r, (i, row) in enumerate(zip(order, rows, strict=True))]

    def _stored_caption_embeddings(self) -> tuple[np.ndarray, torch.Tensor]:
        if self._caption_embeds is None:
            meta = self.index.metadata.select(["image_id", "caption"]).to_pylist()
            pairs = [(r["image_id"], r["caption"]) for r in meta if r["caption"]]
            ids = np.array([p[0] for p in pairs], np.int64)
            texts = [p[1] for p in pairs]
            embeds = torch.cat([self.model.embed_texts(texts[i : i + 256]).float().cpu()
                                for i in range(0, len(texts), 256)]) if texts else torch.empty(0)
            self._caption_embeds = (ids, embeds)
        return self._caption_embeds


def fts_extension_path() -> Path:
    """The DuckDB full-text-search extension shipped in the `duckdb-extension-fts` wheel (no download)."""
    import importlib.util

    import duckdb

    spec = importlib.util.find_spec("duckdb_extension_fts")
    if spec is None or not spec.submodule_search_locations:
        raise QueryError("hybrid search needs the `duckdb-extension-fts` package")
    path = Path(list(spec.submodule_search_locations)[0]) / "extensions" / f"v{duckdb.__version__}" / "fts.duckdb_extension"
    if not path.exists():
        raise QueryError(f"no DuckDB FTS extension for duckdb {duckdb.__version__} at {path}")
    return path


def caption_fts(metadata: Any) -> Any:
    """An in-memory DuckDB with a BM25 index over the non-empty captions (False if there are none)."""
    import duckdb

    caps = metadata.select(["image_id", "caption"]).filter(metadata["caption"].is_valid())
    if caps.num_rows == 0:
        return False
    con = duckdb.connect(":memory:")
    con.execute(f"LOAD '{fts_extension_path()}'")
    con.register("m", caps)
    con.execute("CREATE TABLE caps AS SELECT image_id, caption FROM m WHERE length(trim(caption)) > 0")
    con.execute("PRAGMA create_fts_index('caps', 'image_id', 'caption')")
    return con


@dataclass
class _Plan:
    """One search of `Searcher.search_many` on its way: its input, then its candidates and their scores."""

    text: str | None
    q_img: torch.Tensor | None  # the query image's embeddings [Q,D]
    allowed: np.ndarray | None  # image ids the filter lets through (None: no filter)
    k: int
    rerank: int
    offset: int
    hybrid: bool
    min_score: float | None
    want: int  # candidates kept: max(rerank, k + offset)
    depth: int  # dense candidates asked of the first stage
    t: torch.Tensor | None = None  # the text's ITC embedding [D]
    dense: np.ndarray | None = None  # its first-stage candidates, when found in a shared pass
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # candidates, best first
    itc: np.ndarray | None = None
    sim: np.ndarray | None = None
    base: Any = 0.0  # itc (+ image similarity) per candidate
    itm: np.ndarray | None = None  # ITM logits of the first min(rerank, len(ids)) candidates

    @property
    def fused(self) -> bool:
        """A hybrid text-only search: the fused candidate order is kept."""
        return self.hybrid and self.q_img is None


def _checked_text(text: str | None) -> str:
    """Whitespace collapsed; QueryError when empty or too long."""
    text = " ".join((text or "").split())
    if not text:
        raise QueryError("empty query: give some words or an image")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"query too long ({len(text)} characters, at most {MAX_QUERY_CHARS})")
    return text


def _top(ids: np.ndarray, base: np.ndarray, n: int, *cols: np.ndarray | None):
    order = np.argsort(-base, kind="stable")[:n]
    return (ids[order], *(None if c is None else c[order] for c in cols), base[order])


_FORBIDDEN = re.compile(r";|--|/\*")


def filter_ids(metadata: Any, where: str, params: Sequence[Any] | None = None) -> np.ndarray:
    """Image ids whose metadata satisfies the SQL predicate `where` (values as `?` parameters).

    Runs in an in-memory DuckDB that sees only the metadata table, with external access (files,
    network, extensions) disabled and the configuration locked, so a predicate can read nothing else.
    """
    import duckdb

    if _FORBIDDEN.search(where):
        raise QueryError("a filter is one SQL predicate: ';' and comments are not allowed")
    con = duckdb.connect(":memory:")
    try:
        con.register("meta", metadata)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            rows = con.execute(f"SELECT image_id FROM meta WHERE ({where}) ORDER BY image_id",
                               list(params or [])).fetchnumpy()
        except duckdb.Error as e:
            raise QueryError(f"bad filter {where!r}: {e}") from e
    finally:
        con.close()
    ids = np.asarray(rows["image_id"], np.int64)
    return ids[np.isin(ids, metadata["image_id"].to_numpy())]  # only images that exist, whatever the SQL
