"""Engine benchmark: indexing throughput (split into decode / encoder / Q-Former / write), an open_clip
ViT-B-32 image-tower anchor on the same images and batch size, query latency p50/p95, index bytes per image.

    python scripts/bench_engine.py --images ../shared/data/flickr8k/images --n 512 --out out/bench_engine.json
    python scripts/bench_engine.py ... --image-precision fp32 bf16   (indexing in both arithmetics, same images)

Query latency is measured two ways:
- end to end through `Searcher.search` on the index just built (n images);
- by component at `--latency-images` (default 10,000) images: text embedding, exact FAISS search over
  10,000 × Q vectors with grouping by image, feature fetch and ITM on 128 candidates. The FAISS part uses
  random unit vectors (its cost depends only on the sizes); the ITM part uses real features.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from indexer import IndexConfig, build_index
from qformer.config import DEFAULT_MODEL
from qformer.factory import create_model
from qformer.malloc import keep_freed_memory
from qformer.precision import resolve
from qformer.retrieval_bench import ImageFiles
from search.engine import Searcher
from search.first_stage import faiss_top_images

QUERIES = ["a dog runs through the grass", "two children playing on the beach", "a man riding a bike",
           "a woman in a red dress", "people standing in front of a building", "a black dog with a ball",
           "a boy jumps into the water", "a group of people on a snowy mountain"]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(1e3 * pct(xs, 50), 2), "p95_ms": round(1e3 * pct(xs, 95), 2)}


def anchor_vit_b32(paths: list[Path], batch_size: int, workers: int) -> float:
    """images/s of the open_clip ViT-B-32 image tower alone (random weights: same cost), decode included."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    visual = model.visual.eval()
    loader = torch.utils.data.DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size, num_workers=workers)
    t = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            visual(x)
    return len(paths) / (time.perf_counter() - t)


def main() -> None:
    keep_freed_memory()  # as the qsearch CLI and the UI do
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="a folder of images")
    ap.add_argument("--n", type=int, default=512, help="images to index")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--index", default="out/bench_engine_index")
    ap.add_argument("--latency-images", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--rerank", type=int, default=128)
    ap.add_argument("--image-precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"],
                    help="index once per value (the last index serves the latency part)")
    ap.add_argument("--itm-precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--out")
    args = ap.parse_args()
    paths = sorted(Path(args.images).glob("*.jpg"))[: args.n]
    model = create_model(args.model)
    res: dict[str, object] = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                              "model": model.name, "images": len(paths), "batch_size": args.batch_size}

    res["indexing"] = {}
    for precision in args.image_precision:
        shutil.rmtree(args.index, ignore_errors=True)
        stats = build_index(model, list(paths), args.index, IndexConfig(
            batch_size=args.batch_size, num_workers=args.workers, image_precision=precision))
        key = resolve(model.device, precision)
        res["indexing"][f"image_precision={key}"] = {"images_per_s": round(stats.images_per_s, 2),
                                                     "seconds": stats.seconds, "timings_s": stats.timings}
    size = sum(f.stat().st_size for f in Path(args.index).rglob("*") if f.is_file())
    res["index_bytes_per_image"] = round(size / len(paths))
    res["anchor_vit_b32_images_per_s"] = round(anchor_vit_b32(paths, args.batch_size, args.workers), 2)

    searcher = Searcher(args.index, model=model, itm_precision=args.itm_precision)
    res["itm_precision"] = resolve(model.device, args.itm_precision)
    queries = [QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}") for i in range(args.queries)]
    for name, rerank in (("itc_only", 0), (f"itc_itm{args.rerank}", args.rerank)):
        searcher.search(queries[0], rerank=rerank)  # warm-up
        lat = []
        for q in queries:
            t = time.perf_counter()
            searcher.search(q, k=10, rerank=rerank)
            lat.append(time.perf_counter() - t)
        res[f"search_{name}_{len(paths)}_images"] = ms(lat)

    # components at latency-images (e.g. 10k) images
    import faiss

    q_, d = model.qformer.config.num_query_tokens, model.qformer.config.embed_dim
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((args.latency_images * q_, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    big = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    big.add_with_ids(vecs, np.repeat(np.arange(args.latency_images), q_))
    rr = searcher.reranker  # what Searcher.itm_logits runs
    feats = searcher.index.features(searcher.index.image_ids()[: min(args.rerank, len(paths))], rr.dtype)
    feats = feats[torch.arange(args.rerank) % len(feats)]
    t_text, t_faiss, t_itm = [], [], []
    for qtext in queries:
        t0 = time.perf_counter()
        t = model.embed_texts([qtext])[0].numpy()
        t1 = time.perf_counter()
        faiss_top_images(big, t[None], args.rerank, args.latency_images, q_)
        t2 = time.perf_counter()
        ids, mask = model.tokenize([qtext])
        rr.text_vs_images(ids, mask, feats)
        t3 = time.perf_counter()
        t_text.append(t1 - t0)
        t_faiss.append(t2 - t1)
        t_itm.append(t3 - t2)
    total_itc = [a + b for a, b in zip(t_text, t_faiss, strict=True)]
    total = [a + b for a, b in zip(total_itc, t_itm, strict=True)]
    res[f"components_{args.latency_images}_images"] = {
        "text_embed": ms(t_text), "faiss_search_group": ms(t_faiss), f"itm_{args.rerank}": ms(t_itm),
        "itc_only_total": ms(total_itc), "itc_itm_total": ms(total)}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
