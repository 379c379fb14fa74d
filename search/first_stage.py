"""The first stage of a text → image search: the images whose best query embedding scores highest (ITC, max
over an image's Q query embeddings) for each of a batch of text embeddings.

Three ways, chosen from the index (`FirstStage.method`):
- "scan": an exhaustive scan of the stored embeddings with torch (an exact, Flat, index on a CPU). By default
  it reads an fp16 copy held in memory, half the bytes of fp32, then re-scores in fp32 every image whose fp16
  score is within twice the rounding bound of the n-th best: the top n is the fp32 scan's, image for image.
  A batch of `BATCH_SCAN_MIN` or more queries is scanned by one matrix product over a bf16 copy where the
  CPU has native bf16 (the scan is memory-bound for one query, compute-bound for a batch), re-scored the
  same way with bf16's rounding bound.
- "faiss": FAISS, whose index holds the Q vectors of each image under its image id; it over-fetches vectors
  and keeps each image's first (best) hit, exactly that image's max-over-queries score (Flat on a GPU,
  IVF-Flat, HNSW-Flat).
- "faiss+rescore": compressed codes (IVF-PQ, OPQ, SQ) score approximately; FAISS proposes the best
  `rescore` images, re-scored exactly from the stored embeddings before the top n are kept.

Every method returns ITC cosines computed from the stored fp32 embeddings by `exact_scores`, except FAISS's
approximate scores when `rescore` is 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from indexer import Index
from qformer.precision import cpu_bf16_native

DEFAULT_RESCORE = 512  # approximate FAISS stage: candidate images re-scored exactly (scripts/bench_compression.py)
SCAN_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
BATCH_SCAN_MIN = 3  # queries from which one bf16 matrix product beats fp16 matrix-vector products (benchmarks.md)

Candidates = tuple[np.ndarray, np.ndarray]  # image ids [m] int64 and their ITC cosines [m] float32, best first


class FirstStage:
    """ITC candidates from an open index. method: "auto" (scan for a Flat index on a CPU, else FAISS, re-scored
    when its scores are approximate), "scan" or "faiss". scan_dtype: "fp16" (half the bytes, same top n) or
    "fp32". batch_dtype: the scan copy for batches of `BATCH_SCAN_MIN` or more queries, "auto" (bf16 where
    the CPU has native bf16, else scan_dtype), "bf16", "fp16" or "fp32". rescore: candidates an approximate
    FAISS index proposes for exact re-scoring (0: keep its scores)."""

    def __init__(self, index: Index, device: str | torch.device = "cpu", rescore: int = DEFAULT_RESCORE,
                 method: str = "auto", scan_dtype: str = "fp16", batch_dtype: str = "auto"):
        if rescore < 0:
            raise ValueError("rescore must be >= 0")
        if method not in ("auto", "scan", "faiss"):
            raise ValueError(f"method must be auto, scan or faiss, not {method!r}")
        if scan_dtype not in SCAN_DTYPES:
            raise ValueError(f"scan_dtype must be one of {', '.join(SCAN_DTYPES)}, not {scan_dtype!r}")
        if batch_dtype not in ("auto", "bf16", *SCAN_DTYPES):
            raise ValueError(f"batch_dtype must be auto, bf16 or one of {', '.join(SCAN_DTYPES)}, not {batch_dtype!r}")
        self.index, self.rescore, self.scan_dtype = index, rescore, SCAN_DTYPES[scan_dtype]
        if batch_dtype == "auto":
            self.batch_dtype = torch.bfloat16 if cpu_bf16_native() and self.scan_dtype != torch.float32 else self.scan_dtype
        else:
            self.batch_dtype = torch.bfloat16 if batch_dtype == "bf16" else SCAN_DTYPES[batch_dtype]
        self.approximate = not faiss_scores_exact(index.faiss_index)
        if method == "auto":  # torch scans faster than FAISS's Flat on a CPU; FAISS serves ANN indexes and GPUs
            method = "scan" if is_flat(index.faiss_index) and torch.device(device).type == "cpu" else "faiss"
        if method == "faiss" and self.approximate and rescore > 0:
            method = "faiss+rescore"
        self.method = method
        self._copies: dict[torch.dtype, tuple[torch.Tensor, float]] = {}  # dtype -> embeddings [n,Q,D], max norm

    def top(self, queries: np.ndarray | torch.Tensor, n: int, allowed: np.ndarray | None = None) -> list[Candidates]:
        """The best n images for each query vector: queries [B,D] (or one [D]) -> B (image ids, cosines), best
        first, ties in image-id order; fewer than n where fewer are reachable (an IVF index probing some
        lists). allowed: only these image ids, scored exactly from the stored embeddings."""
        t = _queries(queries)
        if allowed is not None:
            allowed = np.asarray(allowed, np.int64)
            return [top_images(allowed, s, n) for s in self.exact_scores(t, allowed)]
        if self.method == "scan":
            return self._scan_top(t, n)
        size = (len(self.index), self.index.manifest["num_queries"])
        fetch = max(n, self.rescore) if self.method == "faiss+rescore" else n
        found = faiss_top_images(self.index.search_index(), t.numpy(), fetch, *size)
        if self.method == "faiss":
            return found
        return [top_images(ids, self.exact_scores(q[None], ids)[0], n) for q, (ids, _) in zip(t, found, strict=True)]

    def exact_scores(self, queries: np.ndarray | torch.Tensor, image_ids: np.ndarray) -> np.ndarray:
        """ITC cosines [B,k] float32 of queries [B,D] against these images, from their stored fp32 embeddings."""
        t = _queries(queries)
        if len(image_ids) == 0:
            return np.empty((len(t), 0), np.float32)
        return _max_query_sims(torch.from_numpy(self.index.embeddings(image_ids)), t).numpy()

    def scan_scores(self, queries: np.ndarray | torch.Tensor) -> np.ndarray:
        """ITC cosines [B,n] float32 of queries [B,D] against every image, in `Index.image_ids()` order: the
        exact fp32 scan of the stored embeddings."""
        t = _queries(queries)
        out = torch.empty(len(t), len(self.index), dtype=torch.float32)
        for sel, rows, emb in self.index.embedding_blocks():
            sims = _max_query_sims(emb, t)  # [B,n_s]
            out[:, sel] = sims if rows is None else sims[:, rows]
        return out.numpy()

    def _scan_top(self, t: torch.Tensor, n: int) -> list[Candidates]:
        ids = self.index.image_ids()
        dtype = self.batch_dtype if len(t) >= BATCH_SCAN_MIN else self.scan_dtype
        if dtype == torch.float32 or n >= len(ids):
            return [top_images(ids, s, n) for s in self.scan_scores(t)]
        copy, norm = self.scan_copy(dtype)
        flat = copy.view(-1, copy.shape[-1])  # [n*Q,D]
        if dtype == torch.bfloat16:  # one matrix product for the batch: [n*Q,D] x [D,B]
            approx = (flat @ t.to(dtype).T).view(len(ids), -1, len(t)).amax(1).T.float()  # [B,n]
        else:  # one matrix-vector product per query (the fp16 matrix-matrix kernel is slower on CPUs)
            approx = torch.stack([(flat @ q.to(dtype)).view(len(ids), -1).amax(1).float() for q in t])
        bound = self.rounding_bound(norm, copy.shape[-1], dtype)
        out = []
        for q, a in zip(t, approx, strict=True):
            nth = float(torch.topk(a, n).values[-1]) if n > 0 else float("inf")
            cand = torch.nonzero(a >= nth - 2 * bound * float(q.norm())).flatten().numpy()  # ascending ids
            out.append(top_images(ids[cand], self.exact_scores(q[None], ids[cand])[0], n))
        return out

    def scan_copy(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, float]:
        """The low-precision copy (default: scan_dtype's) of every image's embeddings [n,Q,D] (image_ids()
        order) and the largest stored vector norm; built on first use."""
        dtype = dtype or self.scan_dtype
        if dtype not in self._copies:
            n, q, d = len(self.index), self.index.manifest["num_queries"], self.index.manifest["embed_dim"]
            copy, norm = torch.empty((n, q, d), dtype=dtype), 0.0
            for sel, rows, emb in self.index.embedding_blocks():
                part = emb if rows is None else emb[rows]
                copy[sel] = part.to(dtype)
                norm = max(norm, float(part.norm(dim=-1).max())) if len(part) else norm
            self._copies[dtype] = (copy, norm)
        return self._copies[dtype]

    def rounding_bound(self, norm: float, dim: int, dtype: torch.dtype | None = None) -> float:
        """A bound on |low-precision scan score - fp32 scan score| per unit text norm: the rounding (unit
        roundoff u: fp16 2^-11, bf16 2^-8; default dtype: scan_dtype's) of the stored vector, of the text and
        of the product (3u), and fp32 accumulation over `dim` terms in both scans, for vectors of norm <=
        `norm` (Cauchy-Schwarz)."""
        u = _UNIT_ROUNDOFF[dtype or self.scan_dtype]
        return (3 * u + 2 * dim * 2.0**-24) * max(norm, 1.0) + 1e-7


def _queries(queries: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(queries).detach().to("cpu", torch.float32)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"queries must be [B,D] or [D], got shape {tuple(t.shape)}")
    return t.contiguous()


def _max_query_sims(embeds: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Embeddings [k,Q,D] against queries [B,D] -> max over Q [B,k]; one matrix-vector product per query, so
    a row's score is the same bits whichever rows share the product."""
    return torch.stack([(embeds @ q).amax(1) for q in t]) if len(t) else torch.empty(0, len(embeds))


def top_images(ids: np.ndarray, sims: np.ndarray, n: int) -> Candidates:
    """The n best (image ids, scores) of ids [m] scored sims [m], best first (ties: in ids order)."""
    if n <= 0:
        return ids[:0], sims[:0]
    if n < len(sims):
        part = np.sort(np.argpartition(-sims, n - 1)[:n])  # the n best, back in ids order for stable ties
        order = part[np.argsort(-sims[part], kind="stable")]
    else:
        order = np.argsort(-sims, kind="stable")
    return ids[order], sims[order]


def _inner_index(index: Any) -> Any:
    """The index under any IDMap wrappers, downcast to its own class."""
    import faiss

    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(inner.index)
    return inner


def faiss_scores_exact(index: Any) -> bool:
    """Whether FAISS scores the vectors it returns exactly, i.e. holds them in full: Flat, IVF-Flat (any
    nprobe: what it misses, re-scoring cannot find) or HNSW-Flat. PQ/SQ codes and transforms are lossy."""
    import faiss

    inner = _inner_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    return isinstance(inner, faiss.IndexFlat | faiss.IndexIVFFlat)


def is_flat(index: Any) -> bool:
    """Whether the index is exhaustive and exact (FAISS Flat)."""
    import faiss

    return isinstance(_inner_index(index), faiss.IndexFlat)


def faiss_top_images(index: Any, queries: np.ndarray, n: int, num_images: int, q: int) -> list[Candidates]:
    """Top n images for each query vector [B,D] over an index holding q vectors per image (id = image id):
    over-fetch vectors until n distinct images are found; each image's first hit is its max score.
    With an approximate index the scores are FAISS's; fewer than n come back when fewer are reachable
    (an IVF index probing some lists)."""
    import faiss

    queries = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, index.d))
    n = min(n, num_images)
    # the top n*q vectors hold at least n images, so one pass suffices; a trained model's q vectors of one image
    # lie close together, and a 4n start took 3 passes on a 10k index. HNSW's cost grows with k: it starts at 4n
    fetch = min(max(4 * n, 64) if isinstance(_inner_index(index), faiss.IndexHNSW) else n * q, index.ntotal)
    out: list[Candidates | None] = [None] * len(queries)
    todo = np.arange(len(queries))
    while len(todo):
        scores, labels = index.search(queries[todo], max(fetch, 1))
        again = []
        for j, lab, sc in zip(todo, labels, scores, strict=True):
            keep = lab >= 0
            lab, sc = lab[keep], sc[keep]
            _, first = np.unique(lab, return_index=True)
            if len(first) >= n or fetch >= index.ntotal or not keep.all():  # -1 labels: all reachable returned
                first = np.sort(first)[:n]  # in score order
                out[j] = (lab[first].astype(np.int64), sc[first])
            else:
                again.append(j)
        todo, fetch = np.array(again, np.int64), min(fetch * 4, index.ntotal)
    return out  # type: ignore[return-value]
