"""Image-text retrieval scoring and recall@K, following the protocol behind BLIP-2's published numbers.

The protocol is LAVIS ``blip2_models/blip2.py::compute_sim_matrix`` + ``tasks/retrieval.py::_report_metrics``:

1. ITC similarity: cosine between each image's query embeddings and each text embedding, max over the
   queries, no temperature (:func:`itc_similarity`).
2. Re-ranking: for each image (i2t) and each text (t2i) keep the top-``k`` candidates by ITC and score
   them ``itm_logit + itc``; every other entry is ``-100`` (:func:`rerank_with_itm`).
3. Recall@K on the resulting score matrices (:func:`recall_at_k`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "FILL_SCORE",
    "TABLE_COLUMNS",
    "format_table",
    "itc_similarity",
    "recall_at_k",
    "rerank_with_itm",
]

FILL_SCORE: float = -100.0
"""Score given to pairs outside the ITM top-k (as LAVIS ``torch.full(..., -100.0)``)."""

TABLE_COLUMNS: tuple[str, ...] = (
    "txt_r1",
    "txt_r5",
    "txt_r10",
    "img_r1",
    "img_r5",
    "img_r10",
    "txt_r_mean",
    "img_r_mean",
    "r_mean",
)

# Largest [chunk, Q, Nt] (itc) or [chunk, M] (recall) block materialised at once, in elements.
_CHUNK_ELEMENTS = 1 << 24


def itc_similarity(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """ITC similarity: cosine of every (image, text) pair, max over the image's queries, no temperature.

    ``image_embeds`` [Ni, Q, D] and ``text_embeds`` [Nt, D] must already be L2-normalised (they are not
    re-normalised here). Computed in float32 in image chunks so that e.g. 5000 x 1000 x 32 never builds
    the full [Ni, Q, Nt] tensor. Returns [Ni, Nt] float32 on the inputs' device.
    """
    if image_embeds.dim() != 3:
        raise ValueError(f"image_embeds must be [Ni, Q, D], got shape {tuple(image_embeds.shape)}")
    if text_embeds.dim() != 2:
        raise ValueError(f"text_embeds must be [Nt, D], got shape {tuple(text_embeds.shape)}")
    n_img, n_q, dim = image_embeds.shape
    n_txt = text_embeds.shape[0]
    if text_embeds.shape[1] != dim:
        raise ValueError(f"embedding dims differ: image {dim} vs text {text_embeds.shape[1]}")

    text_t = text_embeds.to(device=image_embeds.device, dtype=torch.float32).t()  # [D, Nt]
    out = torch.empty(n_img, n_txt, dtype=torch.float32, device=image_embeds.device)  # [Ni, Nt]
    if n_img == 0 or n_txt == 0:
        return out
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_q * n_txt))
    for start in range(0, n_img, chunk):
        img = image_embeds[start : start + chunk].to(torch.float32)  # [c, Q, D]
        sim = torch.matmul(img, text_t)  # [c, Q, Nt]
        out[start : start + chunk] = sim.amax(dim=1) if n_q > 0 else float("-inf")  # [c, Nt]
    return out


def _pair_batches(n_rows: int, k: int, batch_size: int, pack: bool = True) -> Iterator[tuple[int, int, int, int]]:
    """Yield (row_start, row_end, col_start, col_end) blocks of the [n_rows, k] top-k grid, one per call.

    Whole rows are packed ``batch_size // k`` per call (one per call unless ``pack``); when
    ``k > batch_size`` each row is split into consecutive column slices of at most ``batch_size`` pairs.
    """
    if k <= batch_size:
        rows_per_call = batch_size // k if pack else 1
        for r0 in range(0, n_rows, rows_per_call):
            yield r0, min(r0 + rows_per_call, n_rows), 0, k
    else:
        for r in range(n_rows):
            for c0 in range(0, k, batch_size):
                yield r, r + 1, c0, min(c0 + batch_size, k)


def _rerank_rows(
    sims: Tensor,
    itm_rows: Callable[[Tensor, Tensor], Tensor],
    k: int,
    batch_size: int,
    progress: bool,
    desc: str,
    pack: bool = True,
) -> Tensor:
    """Top-k re-ranking of every row of ``sims`` [N, M]; ``itm_rows(row_idx[P], col_idx[P]) -> [P]``.

    Returns [N, M] float32 with ``itm + sims`` on each row's top-k columns and ``FILL_SCORE`` elsewhere.
    """
    n_rows, n_cols = sims.shape
    scores = torch.full((n_rows, n_cols), FILL_SCORE, dtype=torch.float32, device=sims.device)  # [N, M]
    k = min(k, n_cols)
    if n_rows == 0 or k == 0:
        return scores
    sims = sims.to(torch.float32)
    topk_sim, topk_idx = sims.topk(k, dim=1)  # [N, k], [N, k]

    blocks = list(_pair_batches(n_rows, k, batch_size, pack))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blocks), desc=desc, unit="batch")
    for r0, r1, c0, c1 in blocks:
        cols = topk_idx[r0:r1, c0:c1]  # [r, c]
        rows = torch.arange(r0, r1, device=sims.device).unsqueeze(1).expand_as(cols)  # [r, c]
        logits = itm_rows(rows.reshape(-1).cpu(), cols.reshape(-1).cpu())  # [r * c]
        logits = torch.as_tensor(logits).to(device=sims.device, dtype=torch.float32).reshape(-1)
        if logits.numel() != cols.numel():
            raise ValueError(f"itm_fn returned {logits.numel()} logits for {cols.numel()} pairs")
        scores[rows, cols] = logits.view_as(cols) + topk_sim[r0:r1, c0:c1]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return scores


def rerank_with_itm(
    itc: Tensor,
    itm_fn: Callable[[Tensor, Tensor], Tensor],
    k: int = 128,
    batch_size: int = 128,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Re-rank ITC's top-k candidates with ITM, as LAVIS ``compute_sim_matrix`` (k_test = 128).

    ``itc`` [Ni, Nt]; ``itm_fn(image_idx LongTensor[P], text_idx LongTensor[P]) -> [P]`` returns the
    match logits of those (image, text) pairs (indices on CPU).

    - i2t: for each image take its top-k texts by ITC; score = itm + itc; all other entries -100.
    - t2i: for each text take its top-k images by ITC (a column of ``itc``); same.

    ``k`` is clamped to the number of candidates. ``itm_fn`` is called with at most ``batch_size``
    pairs; for i2t the k texts of one image share a call whenever ``k <= batch_size`` (calls hold
    ``batch_size // k`` whole images, pairs image-major). For t2i each call holds one text's candidates
    (its top k, or a slice of ``batch_size`` of them), in ITC order: a search engine's query.
    Returns (scores_i2t [Ni, Nt], scores_t2i [Nt, Ni]), float32 on ``itc``'s device.
    """
    if itc.dim() != 2:
        raise ValueError(f"itc must be [Ni, Nt], got shape {tuple(itc.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def i2t_fn(rows: Tensor, cols: Tensor) -> Tensor:
        return itm_fn(rows, cols)  # rows are images, cols are texts

    def t2i_fn(rows: Tensor, cols: Tensor) -> Tensor:
        return itm_fn(cols, rows)  # rows are texts, cols are images

    scores_i2t = _rerank_rows(itc, i2t_fn, k, batch_size, progress, "itm i2t")  # [Ni, Nt]
    scores_t2i = _rerank_rows(itc.t(), t2i_fn, k, batch_size, progress, "itm t2i", pack=False)  # [Nt, Ni]
    return scores_i2t, scores_t2i


def _ranks(scores: Tensor, positive: Tensor) -> Tensor:
    """Pessimistic rank of the best positive in each row: #negatives scoring >= it.

    ``scores`` [N, M] float, ``positive`` [N, M] bool. Returns [N] int64; a row without positives gets
    rank M (never a hit).
    """
    n_rows, n_cols = scores.shape
    ranks = torch.empty(n_rows, dtype=torch.long, device=scores.device)  # [N]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, chunk):
        s = scores[start : start + chunk]  # [c, M]
        pos = positive[start : start + chunk]  # [c, M]
        best = s.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)  # [c, 1]
        rank = ((s >= best) & ~pos).sum(dim=1)  # [c]
        ranks[start : start + chunk] = torch.where(pos.any(dim=1), rank, torch.full_like(rank, n_cols))
    return ranks


def recall_at_k(
    scores_i2t: Tensor,
    scores_t2i: Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K in percent for both directions, with LAVIS ``_report_metrics`` key names.

    ``scores_i2t`` [Ni, Nt], ``scores_t2i`` [Nt, Ni]; ``img2txt[i]`` lists image i's caption indices,
    ``txt2img[t]`` is caption t's image.

    Rank definition (ties count against the model): the rank of a query is the number of *negative*
    candidates whose score is >= the score of its best-scoring positive; it is a hit at K when rank < K.
    For i2t the positives are all of the image's captions (a hit if ANY caption ranks < K); for t2i the
    one image of the caption. Without ties this is exactly LAVIS's position in ``argsort`` (descending)
    of the best positive; with ties, a model that gives every candidate the same score gets ~0 instead
    of index-order luck. Positives tied with each other do not count against each other.
    NaN scores raise ValueError.

    Returns ``txt_r{k}`` (i2t), ``img_r{k}`` (t2i) for each k, ``txt_r_mean``, ``img_r_mean`` (mean over
    ks) and ``r_mean`` (mean of the two).
    """
    n_img, n_txt = scores_i2t.shape
    if tuple(scores_t2i.shape) != (n_txt, n_img):
        raise ValueError(
            f"scores_t2i must be [Nt, Ni] = {(n_txt, n_img)}, got shape {tuple(scores_t2i.shape)}"
        )
    if len(img2txt) != n_img:
        raise ValueError(f"img2txt has {len(img2txt)} entries for {n_img} images")
    if len(txt2img) != n_txt:
        raise ValueError(f"txt2img has {len(txt2img)} entries for {n_txt} texts")
    if n_img == 0 or n_txt == 0:
        raise ValueError("recall_at_k needs at least one image and one text")
    if len(ks) == 0 or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    if torch.isnan(scores_i2t).any() or torch.isnan(scores_t2i).any():
        raise ValueError("score matrices contain NaN")

    device = scores_i2t.device
    pos_rows = [i for i, caps in enumerate(img2txt) for _ in caps]
    pos_cols = [t for caps in img2txt for t in caps]
    pos_i2t = torch.zeros(n_img, n_txt, dtype=torch.bool, device=device)  # [Ni, Nt]
    if pos_cols:
        pos_i2t[torch.tensor(pos_rows, device=device), torch.tensor(pos_cols, device=device)] = True
    device_t = scores_t2i.device
    pos_t2i = torch.zeros(n_txt, n_img, dtype=torch.bool, device=device_t)  # [Nt, Ni]
    pos_t2i[torch.arange(n_txt, device=device_t), torch.as_tensor(txt2img, device=device_t)] = True

    ranks_i2t = _ranks(scores_i2t, pos_i2t)  # [Ni]
    ranks_t2i = _ranks(scores_t2i, pos_t2i)  # [Nt]

    result: dict[str, float] = {}
    for k in ks:
        result[f"txt_r{k}"] = 100.0 * (ranks_i2t < k).double().mean().item()
    for k in ks:
        result[f"img_r{k}"] = 100.0 * (ranks_t2i < k).double().mean().item()
    result["txt_r_mean"] = sum(result[f"txt_r{k}"] for k in ks) / len(ks)
    result["img_r_mean"] = sum(result[f"img_r{k}"] for k in ks) / len(ks)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def format_table(results: dict[str, dict[str, float]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Aligned plain-text table: one row per entry of ``results`` (e.g. "itc", "itc+itm"), values to 2 dp.

    Missing values are shown as "-".
    """
    header = ["method", *columns]
    rows = [
        [name] + [f"{metrics[c]:.2f}" if c in metrics else "-" for c in columns]
        for name, metrics in results.items()
    ]
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
