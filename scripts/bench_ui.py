"""UI benchmark: time from a submitted query to a rendered page of results, on a 10,000-image index.

    python scripts/bench_ui.py --images ../shared/data/flickr8k/images --n 10000 --out out/bench_ui.json

The collection is the photos in --images, topped up with mirrored copies (written under --work) until there
are --n; the index is built once under --work and reused by later runs. Each query runs the real app
(`ui/app.py`) under Streamlit's AppTest: a full script run with the engine search (ITC, then ITM
re-ranking of --depth candidates), thumbnails for the first page (12) and the page layout. Browser
rendering is not included. Every query is new text, so no result page comes from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from PIL import Image, ImageOps

from qformer.malloc import keep_freed_memory

QUERIES = ["a dog runs through the grass", "two children playing on the beach", "a man riding a bike",
           "a woman in a red dress", "people standing in front of a building", "a black dog with a ball",
           "a boy jumps into the water", "a group of people on a snowy mountain", "a girl on a swing",
           "a football player in a white uniform", "a surfer riding a wave", "a brown dog in the snow",
           "a crowd watching a concert", "a man climbing a rock wall", "a cat on a windowsill",
           "two men sitting on a bench", "a child in a yellow shirt", "a bird flying over water",
           "a skateboarder doing a trick", "a baby eating food"]
APP = Path(__file__).resolve().parents[1] / "ui" / "app.py"


def collection(images: Path, n: int, work: Path) -> list[Path]:
    """n image paths: the folder's photos, then mirrored copies of them."""
    photos = sorted(p for p in images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    out = photos[:n]
    mirror_dir = work / "mirrored"
    mirror_dir.mkdir(parents=True, exist_ok=True)
    for p in photos[: max(0, n - len(out))]:
        q = mirror_dir / f"{p.stem}_mirror.jpg"
        if not q.exists():
            with Image.open(p) as im:
                ImageOps.mirror(im.convert("RGB")).save(q, quality=90)
        out.append(q)
    if len(out) < n:
        raise SystemExit(f"only {len(out)} images available for --n {n}")
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    keep_freed_memory()  # as the qsearch CLI and the UI do
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="../shared/data/flickr8k/images")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--work", default="out/bench_ui")
    ap.add_argument("--model", default=None, help="model for a new index (default: qsearch's default)")
    ap.add_argument("--depth", type=int, nargs="+", default=[128, 32], help="ITM re-rank depths to time")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--out", default="out/bench_ui.json")
    args = ap.parse_args()

    import torch
    from streamlit.testing.v1 import AppTest

    from indexer import Index, IndexConfig, build_index
    from qformer.factory import DEFAULT_MODEL, create_model
    from qformer.precision import resolve

    work = Path(args.work)
    index_dir = work / "index"
    paths = collection(Path(args.images), args.n, work)
    manifest = work / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{p.resolve()}\n" for p in paths))
    t = time.perf_counter()
    if not (index_dir / "CURRENT").exists() or len(Index.open(index_dir)) < args.n:
        model = create_model(args.model or DEFAULT_MODEL)
        build_index(model, [manifest], index_dir, IndexConfig(num_workers=2), progress=True)
    build_s = time.perf_counter() - t
    n_indexed = len(Index.open(index_dir))

    os.environ["QSEARCH_INDEX"] = str(index_dir)
    at = AppTest.from_file(str(APP), default_timeout=600)
    t = time.perf_counter()
    at.run()
    startup_s = time.perf_counter() - t  # opening the index, loading the model
    results: dict[str, dict[str, float]] = {}
    queries = iter(QUERIES * 10)
    at.text_input(key="q").input("warm-up query").run()  # first search: lazy imports, FAISS first touch
    for depth in args.depth:
        at.select_slider(key="depth").set_value(depth)
        times = []
        for _ in range(args.queries):
            at.text_input(key="q").input(next(queries))
            t = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - t)
            assert not at.exception and len(at.image) == 12, (at.exception, len(at.image))
        results[f"itm@{depth}"] = {"p50_s": round(pct(times, 50), 3), "p95_s": round(pct(times, 95), 3),
                                   "max_s": round(max(times), 3)}
        print(f"search + thumbnails, ITM re-rank depth {depth}: {results[f'itm@{depth}']}", flush=True)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads",
              "images_indexed": n_indexed, "index_build_s": round(build_s, 1), "app_startup_s": round(startup_s, 2),
              "queries_per_depth": args.queries, "itm_precision": resolve("cpu"),
              "latency": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
