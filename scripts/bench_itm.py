"""ITM re-ranking latency alone: `Searcher._itm` on the ITC top `--rerank` of real Flickr8k dev captions.

    python scripts/bench_itm.py --index out/bench_ui/index --queries 30
    # A/B against another commit, alternating processes (the machine's speed drifts):
    git worktree add /tmp/old <commit>
    for r in 1 2 3 4 5; do for root in /tmp/old .; do
      PYTHONPATH=$root python $root/scripts/bench_itm.py --index out/bench_ui/index --label $root; done; done

The candidates are found first (not timed), so only the re-ranker is measured: reading the stored
features, the image keys/values and the Q-Former passes. One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from qformer.datasets import load_retrieval_set
from search.engine import Searcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--root", default="../shared/data/flickr8k", help="Flickr8k (dev captions are the queries)")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--rerank", type=int, default=128)
    ap.add_argument("--itm-precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--label", default="", help="copied into the output line")
    args = ap.parse_args()
    texts = load_retrieval_set("flickr8k", Path(args.root), "dev").texts[::5][: args.queries]
    s = Searcher(args.index, itm_precision=args.itm_precision)
    candidates = [s._itc_top(s._text(t), args.rerank, None)[0] for t in texts]
    s._itm(candidates[0], texts[0])  # warm-up
    ms = []
    for text, ids in zip(texts, candidates, strict=True):
        t0 = time.perf_counter()
        s._itm(ids, text)
        ms.append(1e3 * (time.perf_counter() - t0))
    print(json.dumps({"label": args.label, "queries": len(ms), "rerank": args.rerank,
                      "itm_precision": args.itm_precision, "p50_ms": round(float(np.median(ms)), 1),
                      "p95_ms": round(float(np.percentile(ms, 95)), 1), "min_ms": round(min(ms), 1)}))


if __name__ == "__main__":
    main()
