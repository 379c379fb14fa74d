"""ITM re-ranking latency alone: `Searcher.itm_logits` on the ITC top `--rerank` of real Flickr8k dev captions.

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
import resource
import time
from pathlib import Path

import numpy as np
import torch

from qformer.datasets import load_retrieval_set
from qformer.malloc import keep_freed_memory
from search.engine import Searcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--root", default="../shared/data/flickr8k", help="Flickr8k (dev captions are the queries)")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--rerank", type=int, default=128)
    ap.add_argument("--itm-precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--label", default="", help="copied into the output line")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc malloc as it is (A/B of qformer.malloc.keep_freed_memory)")
    args = ap.parse_args()
    if not args.default_malloc:
        keep_freed_memory()  # as the qsearch CLI and the UI do
    texts = load_retrieval_set("flickr8k", Path(args.root), "dev").texts[::5][: args.queries]
    s = Searcher(args.index, itm_precision=args.itm_precision)
    candidates = [ids for ids, _ in s.first_stage.top(torch.stack([s.embed_text(t) for t in texts]), args.rerank)]
    s.itm_logits(texts[0], candidates[0])  # warm-up
    ms, r0 = [], resource.getrusage(resource.RUSAGE_SELF)
    for text, ids in zip(texts, candidates, strict=True):
        t0 = time.perf_counter()
        s.itm_logits(text, ids)
        ms.append(1e3 * (time.perf_counter() - t0))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"label": args.label, "queries": len(ms), "rerank": args.rerank,
                      "itm_precision": args.itm_precision, "p50_ms": round(float(np.median(ms)), 1),
                      "p95_ms": round(float(np.percentile(ms, 95)), 1), "min_ms": round(min(ms), 1),
                      "malloc": "default" if args.default_malloc else "keep_freed_memory",
                      # per query, over all threads: CPU seconds in the kernel (page faults) and in user code
                      "page_faults": round((r1.ru_minflt - r0.ru_minflt) / len(ms)),
                      "sys_cpu_ms": round(1e3 * (r1.ru_stime - r0.ru_stime) / len(ms), 1),
                      "user_cpu_ms": round(1e3 * (r1.ru_utime - r0.ru_utime) / len(ms), 1)}))


if __name__ == "__main__":
    main()
