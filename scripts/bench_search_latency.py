"""End-to-end query latency of `Searcher.search` on real indexes, split into its stages.

Every query is a different Flickr8k dev caption (no cache helps), k=10. For each index and each
re-ranking depth: p50/p95 of the whole call, and of its stages measured separately on the same queries
(text embedding; first stage = FAISS + grouping by image (+ exact re-scoring for PQ indexes); ITM).

    # the 10,000-image index of bench_ui, exact, and a copy with an IVF-PQ first stage:
    cp -al out/bench_ui/index out/bench_ui/index_pq
    qsearch index out/bench_ui/index_pq out/bench_ui/manifest.csv --faiss IVF256,PQ32 --faiss-params nprobe=32
    python scripts/bench_search_latency.py --index out/bench_ui/index out/bench_ui/index_pq --rescore 128
    # what the first stage costs in recall: every dev caption through each index, ITC only
    python scripts/bench_search_latency.py --index out/bench_ui/index out/bench_ui/index_pq --queries 0 --recall
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from qformer.config import DEFAULT_MODEL
from qformer.datasets import load_retrieval_set
from qformer.factory import create_model
from qformer.malloc import keep_freed_memory
from qformer.precision import cpu_bf16_native, resolve
from search.engine import Searcher
from search.engine_recall import engine_text_to_image_recall


def ms(xs: list[float]) -> dict[str, float]:
    a = 1e3 * np.asarray(xs)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2)}


def main() -> None:
    keep_freed_memory()  # as the qsearch CLI and the UI do
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", nargs="+", required=True)
    ap.add_argument("--root", default="../shared/data/flickr8k", help="Flickr8k (dev captions are the queries)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--rerank", type=int, nargs="+", default=[0, 128])
    ap.add_argument("--rescore", type=int, default=128, help="exact re-scoring depth for approximate indexes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--recall", action="store_true",
                    help="also text -> image R@1/5/10 of every dev caption through each index (ITC only)")
    ap.add_argument("--itm-precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"],
                    help="ITM re-ranking arithmetic; several: each index is timed with each")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.queries == 0:  # recall only
        args.rerank = [0]
    data = load_retrieval_set("flickr8k", Path(args.root), "dev")
    texts = data.texts[:: 5][: args.queries + 1]
    model = create_model(args.model)
    res: dict = {"queries": args.queries, "k": 10, "threads": torch.get_num_threads(), "rescore": args.rescore,
                 "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
                 "cpu_bf16_native": cpu_bf16_native(), "indexes": {}}
    for path, precision in itertools.product(args.index, args.itm_precision):
        s = Searcher(path, model=model, rescore=args.rescore, itm_precision=precision)
        row: dict = {"images": len(s.index), "faiss": s.index.manifest["faiss"]["factory"],
                     "faiss_params": s.index.manifest["faiss"].get("params", ""), "approximate": s.approximate, "first_stage": s.first_stage.method,
                     "itm_precision": resolve(model.device, precision)}
        s.search(texts[-1], k=10, rerank=max(args.rerank))  # warm-up: memory maps, FAISS, model
        stages: dict[str, list[float]] = {"text_embed": [], "first_stage": [], f"itm_{max(args.rerank)}": []}
        for text in texts[: args.queries]:
            t0 = time.perf_counter()
            t = s.embed_text(text)
            t1 = time.perf_counter()
            [(ids, _)] = s.first_stage.top(t, max(max(args.rerank), 10))
            t2 = time.perf_counter()
            if max(args.rerank):
                s.itm_logits(text, ids[: max(args.rerank)])
            t3 = time.perf_counter()
            for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                stages[name].append(dt)
        row["stages"] = {k: ms(v) for k, v in stages.items() if any(v)}
        for rerank in args.rerank if args.queries else ():
            lat = []
            for text in texts[: args.queries]:
                t0 = time.perf_counter()
                s.search(text, k=10, rerank=rerank)
                lat.append(time.perf_counter() - t0)
            row[f"search_rerank_{rerank}"] = ms(lat)
        if args.recall:
            t0 = time.perf_counter()
            row["dev_recall_itc"] = engine_text_to_image_recall(s, data, rerank=0, progress=False)
            row["dev_recall_seconds"] = round(time.perf_counter() - t0, 1)
        key = path if len(args.itm_precision) == 1 else f"{path} itm={row['itm_precision']}"
        res["indexes"][key] = row
        print(json.dumps({key: row}, indent=2), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
