"""Recall of the engine itself: search every caption of a retrieval set through an index, as a user would."""

from __future__ import annotations

from tqdm.auto import tqdm

from qformer.datasets import RetrievalSet
from search.engine import Searcher


def engine_text_to_image_recall(
    searcher: Searcher, data: RetrievalSet, rerank: int = 128, ks: tuple[int, ...] = (1, 5, 10), progress: bool = True
) -> dict[str, float]:
    """img_r@K (text → image) of `Searcher.search` over every caption of `data`, whose images must be indexed
    (under any name of the same file: matched by real path)."""
    want = searcher.index.ids_of(data.image_paths).tolist()
    hits_at = dict.fromkeys(ks, 0)
    for t, text in enumerate(tqdm(data.texts, desc="queries", unit="q", disable=not progress)):
        found = [h.image_id for h in searcher.search(text, k=max(ks), rerank=rerank)]
        target = want[data.txt2img[t]]
        for k in ks:
            hits_at[k] += target in found[:k]
    n = len(data.texts)
    out = {f"img_r{k}": 100.0 * hits_at[k] / n for k in ks}
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    return out
