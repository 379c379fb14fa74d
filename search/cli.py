"""The `qsearch` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qformer.config import DEFAULT_MODEL


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


SAMPLE_PHOTOS = ["chelsea", "astronaut", "coffee", "rocket", "hubble_deep_field", "retina", "camera", "moon", "brick", "grass"]


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job, offline: index scikit-image's sample photos, then answer a text query."""
    from PIL import Image
    from skimage import data as samples

    from indexer import IndexConfig, build_index
    from qformer.factory import create_model
    from search.engine import Searcher

    work = Path(args.dir)
    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_PHOTOS:
        if not (photos / f"{name}.png").exists():
            Image.fromarray(getattr(samples, name)()).convert("RGB").save(photos / f"{name}.png")
    model = create_model(args.model, _device(args.device))
    stats = build_index(model, [photos], work / "index", IndexConfig(num_workers=0), progress=False)
    _print_rows([("photos", str(photos)), *index_summary(stats)])
    hits = Searcher(work / "index", model=model).search(args.query, k=args.k)
    print(f"\nquery: {args.query!r}   model: {model.name}   (score = ITM match logit + ITC cosine)")
    for h in hits:
        print(f"{h.rank:>3}  {h.score:8.4f}  itc {h.itc:.4f}  itm {h.itm:.4f}  {h.path}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption image files: the Q-Former's ITG decoder, or the frozen LLM of a stage-2 model."""
    from qformer.captioner import load_captioner
    from qformer.decode import BadImage, load_image

    images, names, failed = [], [], []
    for path in args.images:
        try:
            images.append(load_image(path))
            names.append(path)
        except BadImage as e:
            failed.append(path)
            print(f"qsearch: skipping {path}: cannot read image ({e})", file=sys.stderr)
    captions = []
    if images:
        captioner = load_captioner(args.model, _device(args.device), num_beams=args.beams,
                                   max_length=args.max_length, min_length=args.min_length, prompt=args.prompt,
                                   no_repeat_ngram_size=args.no_repeat_ngram)
        captions = captioner.caption_images(images, batch_size=args.batch_size)
    if args.json:
        _print_json([{"path": n, "caption": c} for n, c in zip(names, captions, strict=True)])
    else:
        for n, c in zip(names, captions, strict=True):
            print(f"{n}\t{c}")
    return 1 if failed else 0


def _print_json(obj) -> None:
    from search.jsonout import dumps

    print(dumps(obj, indent=2))


def _print_rows(rows: list[tuple[str, str]]) -> None:
    """A short aligned summary: one "label  value" line per row."""
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def index_summary(stats) -> list[tuple[str, str]]:  # stats: indexer.IndexStats
    """What an indexing run did, as summary rows."""
    changes = [f"{n} {what}" for what, n in (("embedded", stats.embedded), ("reused", stats.reused),
                                              ("unchanged", stats.unchanged), ("updated", stats.updated),
                                              ("removed", stats.removed), ("skipped", stats.skipped))]
    rate = f", {stats.images_per_s:.1f} images/s" if stats.embedded else ""
    return [("index", f"{stats.index_dir} (generation {stats.generation})"),
            ("images", f"{stats.images} in the index"),
            ("this run", f"{stats.scanned} scanned: " + ", ".join(changes)),
            ("time", f"{stats.seconds:.1f} s{rate}, {stats.commits} commit{'s' if stats.commits != 1 else ''}")]


def cmd_index(args: argparse.Namespace) -> int:
    """Index (or bring up to date) image collections."""
    from indexer import IndexConfig, build_index
    from qformer.factory import create_model

    cfg = IndexConfig(batch_size=args.batch_size, num_workers=args.workers, feature_dtype=args.feature_dtype,
                      faiss_factory=args.faiss, faiss_params=args.faiss_params, prune=not args.keep_deleted,
                      image_precision=args.image_precision, itm_kv=args.itm_kv)
    if args.engine == "ray":
        from indexer.distributed import build_index_ray

        if args.captions or args.caption_model:
            raise SystemExit("qsearch index: --engine ray does not caption yet; add captions afterwards with "
                             "the local engine (qsearch index --captions INDEX SOURCES)")
        gpus = 1.0 if _device(args.device) == "cuda" else 0.0
        stats = build_index_ray(args.model, args.sources, args.index, cfg, address=args.address,
                                actors=args.ray_actors, gpus_per_actor=gpus, part_rows=args.part_rows,
                                progress=not args.json)
    else:
        model = create_model(args.model, _device(args.device))
        captioner = None
        if args.caption_model:  # another captioner, e.g. the LLM one of a stage-2 model (blip2-tiny-llm)
            from qformer.captioner import load_captioner

            captioner = load_captioner(args.caption_model, _device(args.device)).caption_images
        elif args.captions:  # the index model's own ITG decoder
            from qformer.itg_decoder import caption_images

            def captioner(images):
                return caption_images(model, images)
        stats = build_index(model, args.sources, args.index, cfg, captioner=captioner, progress=not args.json)
    if args.json:
        _print_json(stats.to_dict())
    else:
        _print_rows(index_summary(stats))
        if stats.skipped:
            print(f"(qsearch info {args.index} lists the skipped files and why)")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Search an index by text, image, or both."""
    from search.engine import Searcher

    searcher = Searcher(args.index, device=_device(args.device), rescore=args.rescore,
                        itm_precision=args.itm_precision)
    if args.captions_of:
        captions = searcher.search_captions(args.captions_of, k=args.k)
        if args.json:
            _print_json([h.to_dict() for h in captions])
        else:
            for c in captions:
                print(f"{c.rank:>3}  {c.score:.4f}  {c.caption}  ({c.path})")
        return 0
    hits = searcher.search(text=args.text, image=args.image, k=args.k, rerank=args.rerank, where=args.where,
                           params=args.param, expand=args.expand, offset=args.offset, hybrid=args.hybrid,
                           min_score=args.min_score)
    if args.json:
        _print_json([h.to_dict() for h in hits])
        return 0
    if not hits:
        print("no results")
    for h in hits:
        parts = [f"{h.rank:>3}  {h.score:8.4f}"]
        if h.itc is not None:
            parts.append(f"itc {h.itc:.4f}")
        if h.itm is not None:
            parts.append(f"itm {h.itm:.4f}")
        if h.image_sim is not None:
            parts.append(f"img {h.image_sim:.4f}")
        print("  ".join(parts + [h.path] + ([f"'{h.caption}'"] if h.caption else [])))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """What an index holds: model, counts, skipped files with reasons, build time."""
    from indexer import Index

    info = Index.open(args.index).info()
    if args.json:
        _print_json(info)
        return 0
    print(f"index      {info['index_dir']} (generation {info['generation']}, "
          f"{'complete' if info['complete'] else 'INCOMPLETE: re-run qsearch index to finish'})")
    print(f"model      {info['model']['name']} ({info['model'].get('source')}), fingerprint "
          f"{info['model']['fingerprint'][:12]}")
    print(f"images     {info['counts']['images']}   vectors/image {info['num_queries']} x {info['embed_dim']}   "
          f"features {info['token_shape']} {info['feature_dtype']}   faiss {info['faiss'].get('factory')}   "
          f"images embedded in {info['image_precision']}" + ("   ITM keys/values stored" if info["cross_kv"] else ""))
    print(f"built      {info['created']}   updated {info['updated']}   build time {info['build_seconds']:.1f} s")
    print(f"skipped    {len(info['skipped'])} files")
    for s in info["skipped"]:
        print(f"  {s['path']}: {s['reason']}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    """Remove files (or everything under directories / tar shards) from an index."""
    from indexer import remove_from_index

    n = remove_from_index(args.index, args.paths)
    if args.json:
        _print_json({"removed": n})
    else:
        print(f"removed {n} images from {args.index}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the Streamlit search UI on an index; prints its address, then becomes the Streamlit server
    (exec: signals such as Ctrl-C or SIGTERM reach the server itself, so nothing is left running)."""
    import importlib.util

    from indexer import Index

    Index.open(args.index)  # a missing or broken index fails here, with a clear message
    app = Path(importlib.util.find_spec("ui.app").origin)  # the Streamlit script; ui sits above search
    url = f"http://{args.host}:{args.port}"
    print(f"qsearch UI for {args.index}: {url}", flush=True)
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
           "--server.address", args.host, "--server.port", str(args.port), "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false", "--server.maxUploadSize", "50", "--client.toolbarMode", "minimal",
           "--", "--index", str(Path(args.index).resolve())]
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve an index over HTTP (FastAPI on uvicorn) until SIGINT/SIGTERM, which drain requests in flight."""
    from indexer import Index
    from search.service import ServiceConfig, check_bind, read_api_key, serve

    key = read_api_key(args.api_key_file) if args.api_key_file else None
    check_bind(args.host, key)
    Index.open(args.index)  # a missing or broken index fails here, with a clear message
    cfg = ServiceConfig(index=str(Path(args.index).resolve()), device=_device(args.device), api_key=key,
                        itm_precision=args.itm_precision, rescore=args.rescore, cors_origins=tuple(args.cors_origin),
                        max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels)
    auth = "API key required" if key else "no API key"
    print(f"qsearch serve {args.index}: http://{args.host}:{args.port}  ({auth}; docs at /docs)", flush=True)
    serve(cfg, args.host, args.port, workers=args.workers, log_level=args.log_level, api_key_file=args.api_key_file)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Training of either stage: the same run as `python -m qformer.train`."""
    from qformer.train import config_from_args, run

    return run(config_from_args(args))


def cmd_bench_retrieval(args: argparse.Namespace) -> int:
    """Recall@K on a retrieval dataset with the paper's protocol."""
    from qformer.datasets import load_retrieval_set
    from qformer.factory import create_model
    from qformer.recall import format_table
    from qformer.retrieval_bench import evaluate_retrieval

    data = load_retrieval_set(args.dataset, Path(args.root), args.split)
    if args.max_images:
        data = data.head(args.max_images)
    model = create_model(args.model, _device(args.device))
    if model.device.type == "cuda":  # frozen tower in half precision; the Q-Former stays fp32 (as transformers)
        model.encoder.half()
    res = evaluate_retrieval(model, data, k_test=args.k_test, batch_size=args.batch_size,
                             itm_batch_size=args.itm_batch_size, num_workers=args.workers,
                             progress=not args.quiet, itm_precision=args.itm_precision,
                             image_precision=args.image_precision)
    rows = {k: v for k, v in res.items() if k in ("itc", "itc+itm")}
    out = {"model": model.name, "dataset": args.dataset, "split": args.split, "root": str(args.root),
           "device": str(model.device), **res}
    took = ", ".join(f"{stage} {sec:.1f} s" for stage, sec in res["seconds"].items())
    print(f"{args.dataset} {args.split}: {res['n_images']} images, {res['n_texts']} texts, "
          f"model {model.name}, k_test {args.k_test} ({took})")
    print(format_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_bench_captions(args: argparse.Namespace) -> int:
    """BLEU-4, CIDEr and degenerate captions of a captioner on a captioned image set."""
    from qformer.captioner import evaluate_captioner, load_captioner
    from qformer.datasets import load_retrieval_set

    data = load_retrieval_set(args.dataset, Path(args.root), args.split)
    if args.max_images:
        data = data.head(args.max_images)
    captioner = load_captioner(args.model, _device(args.device), num_beams=args.beams, max_length=args.max_length,
                               min_length=args.min_length, prompt=args.prompt, no_repeat_ngram_size=args.no_repeat_ngram)
    res = evaluate_captioner(captioner, data, batch_size=args.batch_size, num_workers=args.workers,
                             progress=not args.quiet)
    names = {"num_beams": "beam", "max_length": "max", "min_length": "min", "no_repeat_ngram_size": "no-repeat"}
    settings = ", ".join(f"{names.get(k, k)} {v}" for k, v in captioner.settings.items())
    print(f"{args.dataset} {args.split}: {res['n_images']} images, {captioner.kind} captioner of {captioner.name} "
          f"({settings}): BLEU-4 {res['bleu4']:.2f}  CIDEr {res['cider']:.2f}  degenerate "
          f"{res['degenerate']}/{res['n_images']}  distinct {res['distinct']}  ({res['seconds']} s)")
    if args.out:
        out = {"dataset": args.dataset, "split": args.split, "root": str(args.root), **res}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _itm_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--itm-precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="ITM re-ranking arithmetic; auto: bf16 where the CPU/GPU has native bf16 (about 1.7x "
                        "faster on CPU), else fp32")


def _image_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="arithmetic of the image encoder and the Q-Former's query pass; auto: bf16 where the "
                        "CPU/GPU has native bf16, else fp32 (an index keeps the one it was created with)")


def _dataset_arguments(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--dataset", required=True, help="flickr8k | coco | flickr30k | karpathy-<name> | lavis")
    p.add_argument("--root", required=True, help="dataset directory (see qformer/datasets.py for layouts)")
    p.add_argument("--split", default="test")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")


def _run_arguments(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    p.add_argument("--max-images", type=int, default=0, help="only the first N images (quick runs)")
    p.add_argument("--out", help=out_help)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _caption_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beams", type=int, default=None, help="beam width (default: ITG 3, LLM 5)")
    p.add_argument("--max-length", type=int, default=None, help="most tokens (default 30)")
    p.add_argument("--min-length", type=int, default=None, help="fewest tokens (default: ITG 10, LLM 8)")
    p.add_argument("--prompt", default=None, help='LLM captioner only: the text prompt (default "a photo of")')
    p.add_argument("--no-repeat-ngram", type=int, default=None, metavar="N",
                   help="repetition guard: no token N-gram twice in a caption; 0: off (default: the captioner's, "
                        "see qformer/captioner.py)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsearch", description="Image-text search on the BLIP-2 Q-Former.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="index sample photos and search them (offline)")
    d.add_argument("query", nargs="?", default="a cat looking at the camera")
    d.add_argument("--dir", default="out/demo", help="where the photos and the index go")
    d.add_argument("--model", default=DEFAULT_MODEL, help="model name, checkpoint directory/file or hub id")
    d.add_argument("--device", default="auto")
    d.add_argument("-k", type=int, default=5)
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("index", help="index image collections (incremental, crash-safe)")
    i.add_argument("index", help="index directory (created if missing)")
    i.add_argument("sources", nargs="+", help="directories, CSV/Parquet manifests, webdataset .tar shards, files")
    i.add_argument("--model", default=DEFAULT_MODEL)
    i.add_argument("--device", default="auto")
    i.add_argument("--captions", action="store_true", help="caption every image (ITG decoder) into the metadata")
    i.add_argument("--caption-model", metavar="MODEL",
                   help="caption with this model instead (implies --captions): a stage-1 model's ITG decoder, or "
                        "the LLM captioner of a stage-2 model such as blip2-tiny-llm")
    i.add_argument("--feature-dtype", default="fp16", choices=["fp16", "int8"], help="ITM feature store precision")
    i.add_argument("--itm-kv", action="store_true",
                   help="also store the bf16 ITM re-ranker's cross-attention keys/values (new index only): re-ranking "
                        "skips computing them (about -17%% of ITM@128 on a CPU), for about 226 KB more per image")
    _image_precision_argument(i)
    i.add_argument("--faiss", default="Flat", help="FAISS factory string: Flat (exact) or e.g. IVF1024,Flat / HNSW32")
    i.add_argument("--faiss-params", default="", help="search-time FAISS parameters stored with the index, e.g. nprobe=32")
    i.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process (incremental, crash-safe); ray: a new index built on a Ray cluster")
    i.add_argument("--address", default=None, help="Ray cluster address (--engine ray; default: start a local one)")
    i.add_argument("--ray-actors", type=int, default=1, help="model replicas on the Ray cluster (--engine ray)")
    i.add_argument("--part-rows", type=int, default=256, help="images per part written by a Ray worker")
    i.add_argument("--batch-size", type=int, default=32)
    i.add_argument("--workers", type=int, default=2, help="image decoding processes")
    i.add_argument("--keep-deleted", action="store_true", help="keep images whose files are gone")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="search an index by text, image, or both")
    s.add_argument("index")
    s.add_argument("text", nargs="?", help="text query")
    s.add_argument("--image", help="query image (query by example); with text: combined query")
    s.add_argument("-k", type=int, default=10, help="results to return")
    s.add_argument("--offset", type=int, default=0, help="skip this many results (paging)")
    s.add_argument("--rerank", type=int, default=128, help="ITM re-ranks this many ITC candidates (0: off)")
    _itm_precision_argument(s)
    s.add_argument("--rescore", type=int, default=512,
                   help="compressed (PQ) indexes: candidate images re-scored exactly from the stored embeddings")
    s.add_argument("--where", help="SQL predicate over the metadata, e.g. \"width > ?\"")
    s.add_argument("--param", action="append", default=[], help="a value for a ? in --where (repeatable)")
    s.add_argument("--expand", action="store_true", help="image queries: add the image's generated caption")
    s.add_argument("--hybrid", action="store_true",
                   help="text queries: fuse BM25 over the stored captions with dense ITC before re-ranking")
    s.add_argument("--min-score", type=float, default=None, help="keep only hits scoring at least this")
    s.add_argument("--captions-of", metavar="IMAGE", help="image → text: rank the stored captions for IMAGE")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_search)

    n = sub.add_parser("info", help="what an index holds, and the files it skipped")
    n.add_argument("index")
    n.add_argument("--json", action="store_true")
    n.set_defaults(func=cmd_info)

    rm = sub.add_parser("remove", help="remove files from an index")
    rm.add_argument("index")
    rm.add_argument("paths", nargs="+")
    rm.add_argument("--json", action="store_true")
    rm.set_defaults(func=cmd_remove)

    c = sub.add_parser("caption", help="caption images: ITG decoder (stage-1 model) or frozen LLM (stage-2 model)")
    c.add_argument("images", nargs="+", help="image files")
    c.add_argument("--model", default=DEFAULT_MODEL,
                   help="a stage-1 model (ITG captioner) or a stage-2 checkpoint / blip2-tiny-llm (LLM captioner)")
    c.add_argument("--device", default="auto")
    _caption_settings(c)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_caption)

    u = sub.add_parser("ui", help="start the search UI (Streamlit) on an index")
    u.add_argument("index")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    u.add_argument("--port", type=int, default=8501)
    u.set_defaults(func=cmd_ui)

    sv = sub.add_parser("serve", help="serve an index over HTTP (JSON API, OpenAPI docs at /docs)")
    sv.add_argument("index")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on; any non-loopback address needs --api-key-file")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key-file", metavar="FILE",
                    help="file holding the API key (at least 16 characters), sent as 'Authorization: Bearer KEY'")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--workers", type=int, default=1, help="server processes, each with its own model and index")
    _itm_precision_argument(sv)
    sv.add_argument("--rescore", type=int, default=512,
                    help="compressed (PQ) indexes: candidate images re-scored exactly from the stored embeddings")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="allow browser pages from this origin (repeatable; CORS is off without it)")
    sv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (query image), MiB")
    sv.add_argument("--max-pixels", type=int, default=40_000_000, help="largest upload, in pixels")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=cmd_serve)

    from qformer.train import add_arguments

    t = add_arguments(sub.add_parser("train", help="training: stage 1 (ITC + ITM + ITG) or --stage 2 (frozen LLM)"))
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    r = bsub.add_parser("retrieval", help="recall@K with ITC and ITC+ITM re-ranking (the paper's protocol)")
    _dataset_arguments(r, model_help="model name, checkpoint directory/file or hub id")
    r.add_argument("--k-test", type=int, default=128, help="ITM re-ranks the top k by ITC (0: ITC only)")
    r.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    r.add_argument("--itm-batch-size", type=int, default=128, help="pairs per ITM batch")
    _itm_precision_argument(r)
    _image_precision_argument(r)
    _run_arguments(r, out_help="write the results as JSON here")
    r.set_defaults(func=cmd_bench_retrieval)
    bc = bsub.add_parser("captions", help="BLEU-4 and CIDEr of a captioner (ITG or LLM) on a captioned split")
    _dataset_arguments(bc, model_help="stage-1 model (ITG) or stage-2 model (LLM)")
    _caption_settings(bc)
    bc.add_argument("--batch-size", type=int, default=16, help="images per captioning batch")
    _run_arguments(bc, out_help="write the scores and every caption as JSON here")
    bc.set_defaults(func=cmd_bench_captions)
    return p


def main(argv: list[str] | None = None) -> int:
    from indexer.errors import IndexStoreError
    from qformer.malloc import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # reuse freed activations instead of faulting fresh pages in on every batch
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:  # the reader went away (`qsearch search ... --json | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere
        return 141  # as a process killed by SIGPIPE
    except (FileNotFoundError, ValueError, IndexStoreError) as e:  # clear message, no traceback
        print(f"qsearch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
