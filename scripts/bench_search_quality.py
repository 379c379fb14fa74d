"""Does each search option earn its place? Measured on a retrieval split (Flickr8k dev) through `Searcher`:

1. hybrid text search (BM25 over the stored generated captions, fused with dense ITC) vs dense ITC, for
   every caption as a query: R@1/5/10 with ITC only, and ITC+ITM@rerank on a random sample of captions;
2. caption expansion of image queries vs the image alone. Flickr8k has no image -> image ground truth, so
   each query is an augmented copy of a split image (random crop of 35-70% of the area, a flip, colour
   jitter; seeded), and the hit is the original;
3. the ITM feature store's precision (with --int8-index): ITM logits and ITC+ITM R@1 with int8 features
   against fp16 ones, on the same candidate pools.

ITC+ITM rankings are computed as the engine computes them (final score = ITM logit + ITC over the first
`rerank` candidates, stable order) from cached ITM logits, so pools shared by two settings cost one ITM
pass; the script checks that this equals `Searcher.search(..., rerank=R)` on a few queries.

    qsearch bench captions --dataset flickr8k --root ../shared/data/flickr8k --split dev \
        --out out/captions_itg_dev.json                          # generated captions, BLEU-4 / CIDEr
    python scripts/bench_search_quality.py --root ../shared/data/flickr8k --captions out/captions_itg_dev.json \
        --out out/search_quality.json                            # builds the fp16 and int8 indexes it needs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm

from indexer import IndexConfig, build_index
from qformer.config import DEFAULT_MODEL
from qformer.datasets import load_retrieval_set
from qformer.decode import load_image
from qformer.factory import create_model
from search.engine import Searcher

KS = (1, 5, 10)


def recall(ranks: list[int]) -> dict[str, float]:
    """R@K (%) from the 0-based rank of each query's target (a large number when absent)."""
    r = np.asarray(ranks)
    return {f"R@{k}": round(100.0 * float(np.mean(r < k)), 2) for k in KS}


class ItmCache:
    """ITM match logits of (query text, image id) pairs through one Searcher, computed once."""

    def __init__(self, searcher: Searcher):
        self.searcher, self.logits, self.seconds = searcher, {}, 0.0

    def __call__(self, text: str, ids: np.ndarray) -> np.ndarray:
        todo = [int(i) for i in ids if (text, int(i)) not in self.logits]
        if todo:
            t = time.perf_counter()
            self.logits.update(zip([(text, i) for i in todo], self.searcher.itm_logits(text, np.array(todo)).tolist(),
                                   strict=True))
            self.seconds += time.perf_counter() - t
        return np.array([self.logits[(text, int(i))] for i in ids], np.float32)


def reranked(itm: np.ndarray, itc: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The engine's order of a re-ranked pool: ITM + ITC, stable."""
    return ids[np.argsort(-(itm + itc), kind="stable")]


def pool(searcher: Searcher, text: str, rerank: int, hybrid: bool) -> tuple[np.ndarray, np.ndarray]:
    """The first `rerank` candidates of a text query in the engine's order, and their ITC cosines."""
    hits = searcher.search(text, k=rerank, rerank=0, hybrid=hybrid)
    return np.array([h.image_id for h in hits], np.int64), np.array([h.itc for h in hits], np.float32)


def augmented(path: Path, seed: int, size: int = 384) -> Image.Image:
    """A seeded augmented copy of an image: crop of 35-70% of the area, flip, colour jitter."""
    torch.manual_seed(seed)
    aug = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.35, 0.7)),
                              transforms.RandomHorizontalFlip(), transforms.ColorJitter(0.3, 0.3, 0.3)])
    return aug(load_image(path))


def build(model, data, captions: dict[str, str], index: Path, dtype: str) -> None:
    """Index the split's images with their generated captions (a CSV manifest), if not already done."""
    if (index / "CURRENT").exists():
        return
    index.mkdir(parents=True, exist_ok=True)
    manifest = index.parent / f"{index.name}.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for p in data.image_paths:
            w.writerow([str(Path(p).resolve()), captions[str(Path(p).resolve())]])
    build_index(model, [manifest], index, IndexConfig(feature_dtype=dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="flickr8k")
    ap.add_argument("--root", required=True)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--captions", required=True, help="`qsearch bench captions --out` JSON: the generated captions")
    ap.add_argument("--index", default="out/quality_fp16_index", help="fp16 index (built here if missing)")
    ap.add_argument("--int8-index", default="out/quality_int8_index", help="int8 index (built here if missing; '': skip)")
    ap.add_argument("--rerank", type=int, default=128)
    ap.add_argument("--itm-sample", type=int, default=200, help="captions whose ITC+ITM ranking is measured")
    ap.add_argument("--image-sample", type=int, default=500, help="images queried by an augmented copy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    t_start = time.perf_counter()
    data = load_retrieval_set(args.dataset, Path(args.root), args.split)
    caps = json.loads(Path(args.captions).read_text())
    captions = {str(Path(c["path"]).resolve()): c["caption"] for c in caps["captions"]}
    model = create_model(args.model)
    build(model, data, captions, Path(args.index), "fp16")
    s = Searcher(args.index, model=model)
    meta = s.index.rows(np.arange(len(s.index))).to_pylist()
    image_of = {r["image_id"]: str(Path(r["path"]).resolve()) for r in meta}
    want = [str(Path(p).resolve()) for p in data.image_paths]
    assert sorted(image_of.values()) == sorted(want), "the index must hold exactly the split's images"
    rng = random.Random(args.seed)
    itm = ItmCache(s)
    res: dict = {"dataset": args.dataset, "split": args.split, "model": model.name, "images": len(want),
                 "captions": len(data.texts), "generated_captions": {k: caps.get(k) for k in ("model", "settings",
                                                                                              "bleu4", "cider")}}

    def rank_of(ids, target: str) -> int:
        paths = [image_of[int(i)] for i in ids]
        return paths.index(target) if target in paths else 10**9

    # 1. hybrid vs dense, ITC only over every caption
    text_rows = {}
    for hybrid in (False, True):
        ranks, t0 = [], time.perf_counter()
        for t, text in enumerate(tqdm(data.texts, desc=f"text hybrid={hybrid}", unit="q")):
            ranks.append(rank_of([h.image_id for h in s.search(text, k=max(KS), rerank=0, hybrid=hybrid)],
                                 want[data.txt2img[t]]))
        text_rows["hybrid" if hybrid else "dense"] = {"itc": recall(ranks),
                                                      "ms_per_query": round(1e3 * (time.perf_counter() - t0) / len(ranks), 1)}
    # ... and ITC+ITM@rerank on a caption sample (pools from the engine, ITM logits shared between settings)
    sample = sorted(rng.sample(range(len(data.texts)), min(args.itm_sample, len(data.texts))))
    pools = {h: [pool(s, data.texts[t], args.rerank, h) for t in sample] for h in (False, True)}
    for hybrid in (False, True):
        ranks = []
        for t, (ids, itc) in tqdm(list(zip(sample, pools[hybrid], strict=True)), desc=f"ITM hybrid={hybrid}"):
            ranks.append(rank_of(reranked(itm(data.texts[t], ids), itc, ids), want[data.txt2img[t]]))
        row = text_rows["hybrid" if hybrid else "dense"]
        row[f"itc_itm@{args.rerank}_on_sample"] = recall(ranks)
        row["itc_on_sample"] = recall([rank_of(ids, want[data.txt2img[t]])
                                       for t, (ids, _) in zip(sample, pools[hybrid], strict=True)])
    for t in sample[:3]:  # the shortcut above is the engine's own ranking
        for hybrid in (False, True):
            ids, itc = pools[hybrid][sample.index(t)]
            mine = reranked(itm(data.texts[t], ids), itc, ids)[:10].tolist()
            engine = [h.image_id for h in s.search(data.texts[t], k=10, rerank=args.rerank, hybrid=hybrid)]
            assert mine == engine, (t, hybrid, mine, engine)
    res["text_to_image"] = {**text_rows, "itm_sample": len(sample), "rerank": args.rerank}

    # 2. image queries: augmented copies, with and without caption expansion (ITC + image similarity)
    img_sample = sorted(rng.sample(range(len(want)), min(args.image_sample, len(want))))
    rows = {}
    for expand in (False, True):
        ranks, t0 = [], time.perf_counter()
        for i in tqdm(img_sample, desc=f"image expand={expand}", unit="q"):
            q = augmented(Path(want[i]), seed=args.seed * 100_003 + i)
            ranks.append(rank_of([h.image_id for h in s.search(image=q, k=max(KS), rerank=0, expand=expand)], want[i]))
        rows["expanded" if expand else "image_only"] = {
            **recall(ranks), "ms_per_query": round(1e3 * (time.perf_counter() - t0) / len(ranks), 1)}
    res["image_to_image_augmented_copy"] = {**rows, "queries": len(img_sample), "rerank": 0}

    # 3. ITM feature precision: the same pools (ITC does not depend on the feature store) through int8 features
    if args.int8_index:
        build(model, data, captions, Path(args.int8_index), "int8")
        s8 = Searcher(args.int8_index, model=model)
        itm8 = ItmCache(s8)
        diffs, ranks16, ranks8, same_top1 = [], [], [], 0
        for t, (ids, itc) in tqdm(list(zip(sample, pools[False], strict=True)), desc="ITM int8"):
            a, b = itm(data.texts[t], ids), itm8(data.texts[t], ids)
            diffs.append(np.abs(a - b))
            r16, r8 = reranked(a, itc, ids), reranked(b, itc, ids)
            ranks16.append(rank_of(r16, want[data.txt2img[t]]))
            ranks8.append(rank_of(r8, want[data.txt2img[t]]))
            same_top1 += int(r16[0] == r8[0])
        d = np.concatenate(diffs)
        logits = np.array(list(itm.logits.values()))
        res["itm_features"] = {
            "pairs": int(d.size), "logit_std_fp16": round(float(logits.std()), 4),
            "abs_logit_diff": {"mean": round(float(d.mean()), 5), "p99": round(float(np.quantile(d, 0.99)), 5),
                               "max": round(float(d.max()), 5)},
            "top1_identical_pct": round(100.0 * same_top1 / len(sample), 2),
            f"itc_itm@{args.rerank}": {"fp16": recall(ranks16), "int8": recall(ranks8)},
            "feature_bytes_per_image": {"fp16": _feature_bytes(Path(args.index)) // len(want),
                                        "int8": _feature_bytes(Path(args.int8_index)) // len(want)},
        }
    res["itm_seconds"] = round(itm.seconds, 1)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    res["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


def _feature_bytes(index: Path) -> int:
    return sum(p.stat().st_size for p in (index / "features").glob("*.npy"))


if __name__ == "__main__":
    main()
