"""Does the engine agree with the benchmark? Index a retrieval set, search each caption through
`Searcher.search`, and compare text → image R@1/5/10 with `qsearch bench retrieval` on the same model.

    python scripts/engine_vs_bench.py --root ../shared/data/flickr8k --split dev --model blip2-tiny-init --k-test 128
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from indexer import IndexConfig, build_index
from qformer.config import DEFAULT_MODEL
from qformer.datasets import load_retrieval_set
from qformer.factory import create_model
from qformer.malloc import keep_freed_memory
from qformer.retrieval_bench import evaluate_retrieval
from search.engine import Searcher
from search.engine_recall import engine_text_to_image_recall


def main() -> None:
    keep_freed_memory()  # as the qsearch CLI and the UI do
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="flickr8k")
    ap.add_argument("--root", required=True)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--k-test", type=int, default=128)
    ap.add_argument("--index", default="out/engine_vs_bench_index")
    ap.add_argument("--feature-dtype", default="fp16", choices=["fp16", "int8"])
    ap.add_argument("--out")
    args = ap.parse_args()
    data = load_retrieval_set(args.dataset, Path(args.root), args.split)
    model = create_model(args.model)
    t0 = time.perf_counter()
    bench = evaluate_retrieval(model, data, k_test=args.k_test)
    t1 = time.perf_counter()
    build_index(model, list(data.image_paths), args.index, IndexConfig(feature_dtype=args.feature_dtype))
    engine = engine_text_to_image_recall(Searcher(args.index, model=model), data, rerank=args.k_test)
    t2 = time.perf_counter()
    row = "itc+itm" if args.k_test > 0 else "itc"
    res = {"model": model.name, "k_test": args.k_test, "feature_dtype": args.feature_dtype,
           "bench": {k: bench[row][k] for k in engine}, "engine": engine,
           "equal": all(abs(bench[row][k] - engine[k]) < 1e-9 for k in engine),
           "seconds": {"bench": round(t1 - t0, 1), "engine": round(t2 - t1, 1)}}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
