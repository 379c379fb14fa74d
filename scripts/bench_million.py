"""A million images on one machine: the compressed first stage (IVF-PQ over the 32 query vectors, exact
max-over-queries re-scoring from an on-disk store) and ITM@128, with Flickr8k dev mixed in for recall.

    python scripts/bench_million.py                # build (once) + query; JSON in out/million/result.json

1,000,000 images = the 1,000 real Flickr8k dev images (blip2-tiny embeddings, placed at random ids) plus
999,000 synthetic ones. A synthetic image's 32 query vectors are drawn, query slot by query slot, from a
Gaussian with the mean and covariance of the real images' vectors in that slot, then normalised like the
model's. ITM needs frozen-encoder features, which synthetic images do not have: an ITM candidate that is
synthetic borrows the features of a real dev image (the compute per pair is the same; the text is scored
against a different picture, so ITM recall inside the million is a lower bound on realism, not a claim).

Phases run in child processes, so each reports its own peak RSS:
  build: synthetic vectors -> fp16 store on disk (memory-mapped), IVF-PQ trained on a sample, filled in
         parts and merged with `merge_ondisk` (the same path as `qsearch index --engine ray`);
  query: ANN stage latency (FAISS + grouping by image + exact re-scoring), ITM@128 latency, recall.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class MemoryPeak:
    """Peak anonymous memory (heap: what the process really needs) and peak RSS (also counting pages of
    memory-mapped files, which the kernel can drop), sampled from /proc/self/status in a thread."""

    def __init__(self, every: float = 0.1):
        self.anon = self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(every)

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            st = {k: v for k, _, v in (line.partition(":") for line in f)}
        self.anon = max(self.anon, int(st["RssAnon"].split()[0]))
        self.rss = max(self.rss, int(st["VmRSS"].split()[0]))

    def report(self) -> dict:
        self.sample()
        self._stop.set()
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_anon_gib": round(self.anon / 2**20, 2), "peak_rss_gib": round(max(self.rss, hwm) / 2**20, 2)}


def _dir_gb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.exists()) / 2**30


# ---- prepare: real dev embeddings, captions, features ----------------------------------------------------------
def prepare(args: argparse.Namespace) -> dict:
    """Dev index (built if missing) -> dev.npz: image embeddings [1000,Q,D], text embeddings [5000,D], txt2img."""
    import torch

    from indexer import Index, IndexConfig, build_index
    from qformer.datasets import load_retrieval_set
    from qformer.factory import create_model

    data = load_retrieval_set("flickr8k", Path(args.root), "dev")
    model = create_model(args.model)
    if not (Path(args.dev_index) / "CURRENT").exists():
        build_index(model, list(data.image_paths), args.dev_index, IndexConfig())
    index = Index.open(args.dev_index)
    dev_ids = index.ids_of(data.image_paths)
    with torch.inference_mode():
        texts = torch.cat([model.embed_texts(data.texts[i : i + 256]).float()
                           for i in range(0, len(data.texts), 256)]).numpy()
    out = Path(args.work) / "dev.npz"
    np.savez(out, embeds=index.embeddings(dev_ids), texts=texts, txt2img=np.asarray(data.txt2img, np.int64),
             dev_ids=dev_ids, captions=np.array(data.texts, dtype=object))
    return {"dev_images": len(dev_ids), "captions": len(texts)}


# ---- build ---------------------------------------------------------------------------------------------------
def build(args: argparse.Namespace) -> dict:
    import faiss

    mem = MemoryPeak()
    from indexer import vectors

    work = Path(args.work)
    dev = np.load(work / "dev.npz", allow_pickle=True)
    real = dev["embeds"].astype(np.float32)  # [R,Q,D]
    n, (r, q, d) = args.n, real.shape
    rng = np.random.default_rng(0)
    real_ids = np.sort(rng.choice(n, r, replace=False))  # where the real images sit among the million
    t = {}

    # 1. synthetic vectors, slot by slot Gaussian with the real slot's mean/covariance (shrunk), normalised
    import torch

    t0 = time.perf_counter()
    mean = torch.from_numpy(real.mean(0))[:, None, :]  # [Q,1,D]
    chol = torch.empty(q, d, d)
    for s in range(q):
        cov = np.cov(real[:, s].T)
        cov = 0.9 * cov + 0.1 * np.eye(d) * np.trace(cov) / d
        chol[s] = torch.from_numpy(np.linalg.cholesky(cov)).float()
    fstore = open(work / "store.npy", "wb")
    np.lib.format.write_array_header_1_0(fstore, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                  "fortran_order": False, "shape": (n, q, d)})
    is_real = np.zeros(n, bool)
    is_real[real_ids] = True
    gen = torch.Generator().manual_seed(0)
    chunk = 20_000
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        x = torch.baddbmm(mean, torch.randn(q, b - a, d, generator=gen), chol.transpose(1, 2))  # [Q,n,D]
        x = torch.nn.functional.normalize(x, dim=-1).transpose(0, 1).numpy()  # [n,Q,D]
        sel = np.nonzero(is_real[a:b])[0]
        x[sel] = real[np.searchsorted(real_ids, a + sel)]
        fstore.write(x.astype(np.float16).tobytes())
    fstore.close()
    np.save(work / "real_ids.npy", real_ids)
    t["generate_and_store"] = time.perf_counter() - t0

    # 2. IVF-PQ: train on a sample, fill parts, merge the inverted lists on disk
    t0 = time.perf_counter()
    store = np.load(work / "store.npy", mmap_mode="r")
    factory = f"IVF{args.nlist}_HNSW32,PQ{args.pq}"
    trained = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    sample_imgs = np.sort(rng.choice(n, min(n, args.train_vectors // q), replace=False))
    trained.train(np.asarray(store[sample_imgs], np.float32).reshape(-1, d))
    blob = faiss.serialize_index(trained)
    t["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    part_files = []
    per_part = args.part_images
    for p, a in enumerate(range(0, n, per_part)):
        b = min(a + per_part, n)
        index = faiss.deserialize_index(blob)
        for c in range(a, b, 20_000):
            e = min(c + 20_000, b)
            vectors.add(index, np.arange(c, e), np.asarray(store[c:e], np.float32))
        f = work / f"part-{p:04d}.ivf"
        faiss.write_index(index, str(f))
        part_files.append(str(f))
        del index
        print(f"  part {p}: images {a}..{b} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    t["fill_parts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = faiss.deserialize_index(blob)
    vectors.merge_ondisk(merged, part_files, work / "ann.ivfdata")
    faiss.write_index(merged, str(work / "ann.faiss"))
    for f in part_files:
        os.unlink(f)
    t["merge"] = time.perf_counter() - t0
    assert merged.ntotal == n * q, (merged.ntotal, n * q)
    return {"images": n, "real_images": r, "vectors": int(merged.ntotal), "factory": factory,
            "seconds": {k: round(v, 1) for k, v in t.items()}, "build_seconds": round(sum(t.values()), 1),
            **mem.report(),
            "disk_gib": {"ann (faiss + ivfdata)": round(_dir_gb([work / "ann.faiss", work / "ann.ivfdata"]), 3),
                         "rescoring store (fp16)": round(_dir_gb([work / "store.npy"]), 3)},
            "ann_bytes_per_image": round((work / "ann.ivfdata").stat().st_size / n, 1)}


# ---- query ---------------------------------------------------------------------------------------------------
def ann_stage(index, store, t: np.ndarray, want: int, rescore: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Top `want` images for a text embedding [D]: FAISS over-fetch, group by image, exact re-scoring of
    the best `rescore` from the store -> (image ids, exact ITC cosines)."""
    from search.first_stage import faiss_top_images

    [(ids, _)] = faiss_top_images(index, t[None], max(want, rescore), index.ntotal // q, q)
    order = np.argsort(ids)  # sequential-ish reads from the memory-mapped store
    exact = np.einsum("iqd,d->iq", np.asarray(store[ids[order]], np.float32), t).max(1)
    ids, exact = ids[order], exact
    top = np.argsort(-exact, kind="stable")[:want]
    return ids[top], exact[top]


def _borrow(m: int, target: int, r: int) -> int:
    """The dev image whose features synthetic image m borrows for ITM: never the caption's own image."""
    k = m % r
    return (k + 1) % r if k == target else k


def query(args: argparse.Namespace) -> dict:
    import torch

    mem = MemoryPeak()
    from indexer import Index, vectors
    from qformer.factory import create_model

    work = Path(args.work)
    dev = np.load(work / "dev.npz", allow_pickle=True)
    texts, txt2img, captions = dev["texts"], dev["txt2img"], dev["captions"]
    real_ids = np.load(work / "real_ids.npy")
    index = vectors.read_index(work / "ann.faiss", ondisk=True)
    faiss_params = f"nprobe={args.nprobe}"
    vectors.set_search_params(index, faiss_params)
    store = np.load(work / "store.npy", mmap_mode="r")
    n, q, _ = store.shape
    r = len(real_ids)
    gt = real_ids[txt2img]  # the million-id of each caption's image
    out: dict = {"nprobe": args.nprobe, "rescore": args.rescore}
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time, as a server thread would run it
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    # recall of the ANN stage (ITC, exact re-scored) for every dev caption, and its latency
    lat, ranks = [], []
    for i in range(len(texts)):
        t0 = time.perf_counter()
        ids, _ = ann_stage(index, store, texts[i], 10, args.rescore, q)
        lat.append(time.perf_counter() - t0)
        hit = np.nonzero(ids == gt[i])[0]
        ranks.append(int(hit[0]) if len(hit) else 10**9)
    ranks = np.array(ranks)
    lat_ms = np.array(lat) * 1000
    out["ann_latency_ms"] = {"p50": round(float(np.percentile(lat_ms, 50)), 2),
                             "p95": round(float(np.percentile(lat_ms, 95)), 2), "queries": len(lat)}
    out["itc_recall_in_million"] = {f"R@{k}": round(100 * float((ranks < k).mean()), 2) for k in (1, 5, 10)}

    # what the ANN stage loses: exact brute-force ITC (max over queries, every image) on a caption subset
    t0 = time.perf_counter()
    sub = np.sort(np.random.default_rng(2).choice(len(texts), min(args.exact_queries, len(texts)), replace=False))
    tq = torch.from_numpy(texts[sub])  # [m,D]
    gt_score = torch.einsum("mqd,md->mq", torch.from_numpy(np.asarray(store[gt[sub]], np.float32)), tq).amax(1)
    above = torch.zeros(len(sub), dtype=torch.long)
    for a in range(0, n, 20_000):
        x = torch.from_numpy(np.asarray(store[a : a + 20_000], np.float32))  # [c,Q,D]
        sc = (x.reshape(-1, x.shape[-1]) @ tq.T).reshape(x.shape[0], q, -1).amax(1)  # [c,m]
        above += (sc > gt_score).sum(0)
    exact_rank = above.numpy()
    out["itc_recall_subset"] = {
        "captions": len(sub), "exact_seconds": round(time.perf_counter() - t0, 1),
        "exact_in_million": {f"R@{k}": round(100 * float((exact_rank < k).mean()), 2) for k in (1, 5, 10)},
        "ann_in_million": {f"R@{k}": round(100 * float((ranks[sub] < k).mean()), 2) for k in (1, 5, 10)}}

    # exact ITC recall of the same captions over the 1,000 dev images alone (the reference)
    real = dev["embeds"].astype(np.float32)
    sims = np.einsum("iqd,td->tiq", real, texts).max(2)  # [T,R]
    rank_dev = (sims > sims[np.arange(len(texts)), txt2img][:, None]).sum(1)
    out["itc_recall_dev_only_exact"] = {f"R@{k}": round(100 * float((rank_dev < k).mean()), 2) for k in (1, 5, 10)}

    # ITM@128 on a subset of captions: latency of the whole query, and recall inside the million
    model = create_model(args.model)
    dev_index = Index.open(args.dev_index)
    dev_ids = dev["dev_ids"]
    pos_of = {int(m): j for j, m in enumerate(real_ids)}
    qf = model.qformer
    lat, r1, r1_dev = [], 0, 0
    sub = np.random.default_rng(1).choice(len(texts), min(args.itm_queries, len(texts)), replace=False)
    for i in sub:
        t0 = time.perf_counter()
        ids, itc = ann_stage(index, store, texts[i], 128, args.rescore, q)
        src = np.array([dev_ids[pos_of[int(m)]] if int(m) in pos_of else dev_ids[_borrow(int(m), txt2img[i], r)]
                        for m in ids])  # synthetic candidates borrow another real image's features
        tok, mask = model.tokenize([str(captions[i])])
        with torch.inference_mode():
            kv = qf.image_kv(dev_index.features(src))
            itm = qf.itm_match_logit(kv, tok.expand(len(ids), -1), mask.expand(len(ids), -1)).float().numpy()
        best = ids[np.argmax(itm + itc)]
        lat.append(time.perf_counter() - t0)
        r1 += int(best == gt[i])
        # the same caption over the 1,000 dev images alone (exact ITC top 128, then ITM)
        top = np.argsort(-sims[i], kind="stable")[:128]
        with torch.inference_mode():
            kv = qf.image_kv(dev_index.features(dev_ids[top]))
            itm_d = qf.itm_match_logit(kv, tok.expand(len(top), -1), mask.expand(len(top), -1)).float().numpy()
        r1_dev += int(top[np.argmax(itm_d + sims[i][top])] == txt2img[i])
    lat_ms = np.array(lat) * 1000
    out["itm128_latency_ms"] = {"p50": round(float(np.percentile(lat_ms, 50)), 1),
                                "p95": round(float(np.percentile(lat_ms, 95)), 1), "queries": len(lat)}
    out["itc_itm_r1_subset"] = {"in_million": round(100 * r1 / len(sub), 2),
                                "dev_only": round(100 * r1_dev / len(sub), 2), "captions": len(sub)}
    out.update(mem.report())
    return out


# ---- driver --------------------------------------------------------------------------------------------------
def _child(phase: str, argv: list[str]) -> dict:
    """Run a phase in a child process (its own peak RSS) and return its JSON."""
    res = subprocess.run([sys.executable, __file__, "--phase", phase, *argv], stdout=subprocess.PIPE, check=True)
    return json.loads(res.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    from qformer.config import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="images in the collection (real + synthetic)")
    ap.add_argument("--work", default="out/million", help="where the store, the index and the results go")
    ap.add_argument("--root", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--dev-index", default="out/f8k_dev_index", help="blip2-tiny index of Flickr8k dev (built if missing)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--nlist", type=int, default=2048)
    ap.add_argument("--pq", type=int, default=32, help="PQ bytes per query vector")
    ap.add_argument("--train-vectors", type=int, default=163_840)
    ap.add_argument("--part-images", type=int, default=125_000)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--rescore", type=int, default=512, help="images re-scored exactly from the store")
    ap.add_argument("--itm-queries", type=int, default=100, help="captions run with ITM@128")
    ap.add_argument("--exact-queries", type=int, default=500, help="captions also ranked by brute force")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--phase", choices=["prepare", "build", "query"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.phase:
        fn = {"prepare": prepare, "build": build, "query": query}[args.phase]
        print(json.dumps(fn(args)))
        return
    argv = [a for a in sys.argv[1:] if a != "--rebuild"]
    work = Path(args.work)
    result: dict = {"machine": f"{os.cpu_count()}-core CPU, no GPU", "n": args.n}
    if args.rebuild or not (work / "dev.npz").exists():
        result["prepare"] = _child("prepare", argv)
    if args.rebuild or not (work / "build.json").exists():
        (work / "build.json").write_text(json.dumps(_child("build", argv), indent=2) + "\n")
    result["build"] = json.loads((work / "build.json").read_text())
    result["query"] = _child("query", argv)
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
