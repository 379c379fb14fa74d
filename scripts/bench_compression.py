"""Multi-vector at scale: a compressed first stage (<= 2 KB per image) against the exact index, on Flickr8k dev.

    python scripts/bench_compression.py                      # builds out/f8k_dev_index once (~80 s)
    python scripts/bench_compression.py --index out/bench_ui/index   # any index holding the dev images

Each image is 32 Q-Former query vectors x 256 dims (fp32: 32 KB); text -> image ITC is the max over the 32
query cosines. The ANN stage is a FAISS IVF-PQ index over all 32 query vectors of each image (id = image),
searched like the engine does (`search.first_stage.faiss_top_images`: over-fetch vectors, keep each image's best
hit), then the best R images are re-scored EXACTLY from the stored embeddings (`FirstStage`);
R = 0 keeps FAISS's approximate scores. The alternative "pooled" is one unit mean vector per image (Flat).

Measured for every caption of the split, searching the split's images (or, --gallery index, every image
of --index, e.g. out/bench_ui/index's 10,000), against the exact index over the same collection:
- ITC-only text -> image R@1/5/10 of the exact index and of each configuration, and its loss;
- the ITM pool: the top k_test (128) by ITC. Candidates are re-scored exactly, and the engine computes
  ITC from the stored embeddings for every ITM candidate, so a pair's fused score (ITM logit + ITC) is the
  same in both systems: only the pool can differ. The ITC+ITM R@1 loss is computed EXACTLY, with ITM only
  where it can matter: a caption can lose its hit only if its image is in the exact pool and either leaves
  the compressed pool or is beaten by an image that entered it (and gain the other way round); only for
  those captions does ITM go over the exact (compressed) pool, to see whether the image wins it.
- the exact system's ITC+ITM R@1 itself needs, per caption, ITM until an image beats the caption's own
  (all 128 when none does): too slow on a CPU for every caption, so it is reported on a random sample of
  captions (--itm-sample);
- the re-scoring store in fp16 / int8 instead of fp32 changes ITC a little, so the identical-score
  argument no longer holds: ITC-only numbers over all captions, ITC+ITM R@1 on the same sample;
- bytes per image: ANN stage (code + 8-byte id per vector; as FAISS stores IVF lists), the same in the
  IndexIDMap2 wrapper qsearch builds today (+8 B/vector on disk, + a reverse hash map in memory), and
  the re-scoring store;
- ANN-stage time per query (single thread): FAISS + grouping + exact re-scoring from the index's
  memory-mapped embeddings, for --timing-queries captions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KS = (1, 5, 10)


# ---- data ------------------------------------------------------------------------------------------------------
def open_or_build_index(index_dir: Path, paths: list[Path], model: Any) -> Any:
    """The index at `index_dir`, built there from `paths` first when there is none."""
    from indexer import Index, IndexConfig, build_index

    if not (index_dir / "CURRENT").exists():
        print(f"building a {len(paths)}-image index in {index_dir} ...", file=sys.stderr)
        build_index(model, [str(p) for p in paths], index_dir, IndexConfig(num_workers=1), progress=True)
    return Index.open(index_dir)


def image_ids_of(index: Any, paths: list[Path]) -> np.ndarray:
    """The image ids of these files in `index` (matched by real path)."""
    try:
        return index.ids_of(paths)
    except KeyError as e:
        raise SystemExit(f"{e.args[0]}; leave --index out to build an index of them") from None


def embed_texts(model: Any, texts: list[str], batch: int = 256) -> np.ndarray:
    import torch

    return torch.cat([model.embed_texts(texts[i : i + batch]).float().cpu()
                      for i in range(0, len(texts), batch)]).numpy()


def max_over_queries(embeds: np.ndarray, texts: np.ndarray, chunk: int = 500) -> np.ndarray:
    """ITC [T,n]: each text embedding against each image's Q embeddings [n,Q,D], max over queries."""
    n, q, d = embeds.shape
    flat = np.ascontiguousarray(embeds, np.float32).reshape(n * q, d)
    return np.concatenate([(flat @ texts[i : i + chunk].T).reshape(n, q, -1).max(1).T
                           for i in range(0, len(texts), chunk)])


# ---- metrics ---------------------------------------------------------------------------------------------------
def recall(scores: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Text -> image R@K from scores [T,n] (-inf: not a candidate, never a hit)."""
    rows = np.arange(len(gt))
    own = scores[rows, gt]
    rank = (scores > own[:, None]).sum(1)
    hit = np.isfinite(own)
    return {f"R@{k}": round(100.0 * float(np.mean(hit & (rank < k))), 2) for k in KS}


def top_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """[T,n] bool: each row's top k finite scores (a tie at the k-th place is broken arbitrarily)."""
    k = min(k, scores.shape[1])
    order = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.indices(scores.shape)[1]
    rows = np.arange(len(scores))[:, None]
    mask = np.zeros(scores.shape, bool)
    mask[rows, order] = np.isfinite(scores[rows, order])
    return mask


def keep_top(approx: np.ndarray, exact: np.ndarray, r: int) -> np.ndarray:
    """Exact scores of each row's best r images by approximate score; -inf elsewhere (r = 0: `approx`)."""
    if r == 0:
        return approx
    return np.where(top_mask(approx, r), exact, -np.inf).astype(np.float32)


# ---- ANN stage -------------------------------------------------------------------------------------------------
def ann_factory(m: int, opq: bool, nlist: int, dim: int) -> str:
    """IVF-PQ factory with m bytes per vector. PQ needs dim % m == 0, so m=48 on 256 dims first maps into
    288 dims (random orthogonal embedding "RR288", or OPQ's learned one). "np": no polysemous training
    (~2 min, and it changes nothing unless polysemous Hamming filtering is switched on)."""
    width = dim if dim % m == 0 else (dim // m + 1) * m
    if opq:
        pre = f"OPQ{m}," if width == dim else f"OPQ{m}_{width},"
    else:
        pre = "" if width == dim else f"RR{width},"
    return f"{pre}IVF{nlist},PQ{m}np"


def auto_nlist(num_vectors: int) -> int:
    """IVF lists: the power of two nearest sqrt(vectors) (dev's 32,000 -> 128; 32M vectors -> 4096)."""
    return int(2 ** round(np.log2(max(num_vectors, 1)) / 2))


def build_ann(factory: str, vectors: np.ndarray, labels: np.ndarray) -> tuple[Any, float]:
    import faiss

    t = time.perf_counter()
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add_with_ids(vectors, labels)
    return index, time.perf_counter() - t


def set_nprobe(index: Any, nprobe: int) -> None:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)


def approx_image_scores(index: Any, texts: np.ndarray, n: int, fetch: int, chunk: int = 250) -> np.ndarray:
    """[T,n]: each image's best approximate score among the top `fetch` vectors FAISS returns (-inf: none).
    With fetch >= q x R, each row's best R finite entries are exactly the engine's first R distinct images."""
    out = np.full((len(texts), n), -np.inf, np.float32)
    for s in range(0, len(texts), chunk):
        d, i = index.search(texts[s : s + chunk], min(fetch, index.ntotal))
        rows = np.broadcast_to(np.arange(s, s + len(d))[:, None], i.shape)
        ok = i >= 0
        np.maximum.at(out, (rows[ok], i[ok]), d[ok])
    return out


def time_queries(index: Any, store: Any, image_ids: np.ndarray, texts: np.ndarray, r: int, k_test: int,
                 q: int) -> dict[str, float]:
    """ANN stage per query as the engine runs it: FAISS + grouping (+ exact re-scoring of r from the
    index's memory-mapped embeddings); FAISS labels are positions in `image_ids`."""
    from search.first_stage import faiss_top_images, top_images

    n = len(image_ids)
    lat = []
    for t in texts:
        t0 = time.perf_counter()
        if r == 0:
            faiss_top_images(index, t[None], k_test, n, q)
        else:
            [(pos, _)] = faiss_top_images(index, t[None], max(k_test, r), n, q)
            top_images(pos, np.einsum("iqd,d->iq", store.embeddings(image_ids[pos]), t).max(1), k_test)
        lat.append(time.perf_counter() - t0)
    ms = 1e3 * np.array(lat)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


# ---- ITM -------------------------------------------------------------------------------------------------------
class Itm:
    """ITM match logits of (caption, image) pairs, each computed once, by the engine's re-ranker
    (`qformer.itm.ItmReranker` in fp32, on the stored features)."""

    def __init__(self, model: Any, index: Any, image_ids: np.ndarray, texts: list[str]):
        from qformer.itm import ItmReranker

        self.model, self.index, self.image_ids, self.texts = model, index, image_ids, texts
        self.reranker = ItmReranker(model, "fp32")
        self.logits: dict[tuple[int, int], float] = {}
        self.seconds = 0.0

    def __call__(self, c: int, js: np.ndarray) -> np.ndarray:
        """Logits of caption c against collection images js (positions in `image_ids`)."""
        todo = list(dict.fromkeys(int(j) for j in js if (c, int(j)) not in self.logits))
        t = time.perf_counter()
        ids, mask = self.model.tokenize([self.texts[c]])
        images = self.image_ids[todo]
        out = self.reranker.text_vs_images(ids, mask, lambda s: self.index.features(images[s]), len(todo)).numpy()
        self.logits.update(((c, j), float(x)) for j, x in zip(todo, out, strict=True))
        self.seconds += time.perf_counter() - t
        return np.array([self.logits[(c, int(j))] for j in js], np.float32)

    def prefetch(self, pairs: list[tuple[int, int]], batch: int = 64) -> None:
        """Logits of many (caption, image) pairs, batched across captions (texts padded, padding masked)."""
        todo = list(dict.fromkeys(p for p in pairs if p not in self.logits))
        t = time.perf_counter()
        for s in range(0, len(todo), batch):
            part = todo[s : s + batch]
            ids, mask = self.model.tokenize([self.texts[c] for c, _ in part])
            out = self.reranker.pairs(self.index.features(self.image_ids[[j for _, j in part]]), ids, mask).numpy()
            self.logits.update(zip(part, out.tolist(), strict=True))
        self.seconds += time.perf_counter() - t

    def wins(self, c: int, pool: np.ndarray, itc: np.ndarray, g: int) -> bool:
        """Whether image g has the best ITM + ITC of the pool (itc: the caption's ITC row). ITM runs in
        growing batches, highest ITC first, and stops at the first image that beats g."""
        if not pool[g]:
            return False
        f_g = self(c, np.array([g]))[0] + itc[g]
        rest = np.nonzero(pool)[0]
        rest = rest[rest != g]
        rest = rest[np.argsort(-itc[rest], kind="stable")]
        s, batch = 0, 4
        while s < len(rest):
            js = rest[s : s + batch]
            if np.any(self(c, js) + itc[js] > f_g):
                return False
            s, batch = s + batch, batch * 2
        return True


def itm_r1_change(itm: Itm, exact: np.ndarray, pool_e: np.ndarray, pool_c: np.ndarray, gt: np.ndarray) -> dict:
    """Exact ITC+ITM R@1 change when the ITM pool is `pool_c` instead of `pool_e` (same exact ITC scores).

    Loss at caption c (hit with pool_e, miss with pool_c) needs: g in pool_e, and g out of pool_c or beaten
    by an image of pool_c - pool_e; only for those captions does ITM go over the exact pool (to see whether
    g wins it). Gain likewise."""
    pairs0 = len(itm.logits)
    lost = gained = 0
    live = np.nonzero(pool_e[np.arange(len(gt)), gt] | pool_c[np.arange(len(gt)), gt])[0]
    both = [c for c in live if pool_e[c, gt[c]] and pool_c[c, gt[c]]]
    itm.prefetch([(int(c), int(j)) for c in both for j in [gt[c], *np.nonzero(pool_e[c] ^ pool_c[c])[0]]])
    for c in live:
        g, e, p = int(gt[c]), pool_e[c], pool_c[c]
        if e[g] and p[g]:
            f_g = itm(c, np.array([g]))[0] + exact[c, g]
            new, old = np.nonzero(p & ~e)[0], np.nonzero(e & ~p)[0]
            may_lose = len(new) > 0 and bool(np.any(itm(c, new) + exact[c, new] > f_g))
            may_gain = len(old) > 0 and bool(np.any(itm(c, old) + exact[c, old] > f_g))
        else:
            may_lose, may_gain = bool(e[g]), bool(p[g])
        lost += may_lose and itm.wins(c, e, exact[c], g)
        gained += may_gain and itm.wins(c, p, exact[c], g)
    return {"captions_lost": int(lost), "captions_gained": int(gained),
            "r1_loss": round(100.0 * (lost - gained) / len(gt), 2), "itm_pairs_computed": len(itm.logits) - pairs0}


def itm_pairs_needed(pool_e: np.ndarray, pool_c: np.ndarray, gt: np.ndarray) -> int:
    """ITM pairs `itm_r1_change` needs at least: the caption's image and the pools' differences, for every
    caption whose image is in either pool."""
    rows = np.arange(len(gt))
    live = pool_e[rows, gt] | pool_c[rows, gt]
    return int(live.sum() + (pool_e[live] ^ pool_c[live]).sum())


def sample_itm_r1(itm: Itm, sample: np.ndarray, itc: np.ndarray, pool: np.ndarray, gt: np.ndarray) -> float:
    """ITC+ITM R@1 (%) over the sampled captions: does the caption's image win its pool (ITM + `itc`)?"""
    itm.prefetch([(int(c), int(gt[c])) for c in sample if pool[c, gt[c]]])
    return round(100.0 * float(np.mean([itm.wins(c, pool[c], itc[c], int(gt[c])) for c in sample])), 2)


# ---- main ------------------------------------------------------------------------------------------------------
_RSS_GROWTH = """
import os, sys, faiss, numpy as np
n = int(sys.argv[2]); x = np.zeros((n, 1), np.float32); ids = np.arange(n, dtype=np.int64) * 7
index = getattr(faiss, sys.argv[1])(faiss.IndexFlatIP(1))
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
r0 = rss(); index.add_with_ids(x, ids); print((rss() - r0) / n)
"""


def rev_map_bytes(n: int = 2_000_000) -> float:
    """Memory per vector of IndexIDMap2's reverse hash map: its RSS growth minus IndexIDMap's (fresh processes)."""
    import subprocess

    grow = [float(subprocess.run([sys.executable, "-c", _RSS_GROWTH, kind, str(n)], capture_output=True,
                                 text=True, check=True).stdout.split()[-1]) for kind in ("IndexIDMap", "IndexIDMap2")]
    return round(grow[1] - grow[0], 1)


def markdown(rows: list[dict], exact: dict, q: int, dim: int) -> str:
    """The configs as a markdown table (bytes per image; ITC recall and loss; ITC+ITM R@1 loss; ANN time)."""
    cols = ["config", "nprobe", "R", "ANN B/img", "IDMap2 B/img disk / RAM", "ITC R@1", "R@5", "R@10", "ΔR@1",
            "pool overlap /128", "ITC+ITM ΔR@1", "ANN ms p50"]
    flat = q * (4 * dim + 8)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
           f"| exact Flat ({q} x fp32) | | | {q * 4 * dim} | {flat} / {flat + 44 * q} | {exact['R@1']} | "
           f"{exact['R@5']} | {exact['R@10']} | 0 | 128 | 0 | |"]
    for r in rows:
        itm = r.get("itc_itm") or {}
        itm_loss = f"{itm['r1_loss']} (sample of {itm['on_sample']})" if "on_sample" in itm else itm.get("r1_loss", "")
        out.append(f"| {r['config']} | {r['nprobe']} | {r['rescore']} | {r['ann_bytes_per_image']} | "
                   f"{r['qsearch_bytes_per_image']['disk']} / {r['qsearch_bytes_per_image']['ram']} | "
                   f"{r['itc']['R@1']} | {r['itc']['R@5']} | {r['itc']['R@10']} | {r['itc_loss']['R@1']} | "
                   f"{r['pool_overlap']} | {itm_loss} | {r['time']['p50_ms']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default=None, help="index holding the split's images (default: build out/f8k_dev_index)")
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--split", default="dev")
    ap.add_argument("--gallery", choices=["split", "index"], default="split",
                    help="the collection searched: the split's images, or every image of --index")
    ap.add_argument("--model", default="blip2-tiny", help="model for a new index (an existing index: its own)")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0: power of two nearest sqrt(vectors))")
    ap.add_argument("--nprobe", type=int, default=0, help="lists probed in the main grid (0: all, PQ error alone)")
    ap.add_argument("--sweep", default="IVF{nlist},PQ32np", help="main-grid factory also run at --nprobe-sweep")
    ap.add_argument("--nprobe-sweep", type=int, nargs="*", default=[8, 16, 32, 64])
    ap.add_argument("--pq", type=int, nargs="+", default=[16, 32, 48], help="PQ bytes per vector")
    ap.add_argument("--opq", choices=["both", "yes", "no"], default="both", help="with / without an OPQ rotation")
    ap.add_argument("--rescore", type=int, nargs="+", default=[0, 128, 256, 512, 1024])
    ap.add_argument("--k-test", type=int, default=128, help="ITM pool: top k by ITC")
    ap.add_argument("--itm-rescore", type=int, nargs="*", default=[256, 512],
                    help="exact ITC+ITM R@1 loss of every config at these R (none: skip)")
    ap.add_argument("--itm-sample", type=int, default=1000, help="random captions for ITC+ITM R@1 itself (0: none)")
    ap.add_argument("--itm-budget", type=int, default=8000,
                    help="ITM pairs a config's exact loss may need; beyond, its loss is measured on the sample")
    ap.add_argument("--store-config", default="IVF{nlist},PQ32np@512",
                    help="main-grid config (factory@R) whose candidates the fp16 / int8 re-scoring stores use")
    ap.add_argument("--timing-queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch / FAISS threads")
    ap.add_argument("--out", default="out/bench_compression.json")
    args = ap.parse_args()

    import faiss
    import torch

    from indexer import Index, quantize
    from indexer.vectors import make_index
    from qformer.datasets import load_flickr8k
    from qformer.factory import create_model
    from search.footprint import ann_bytes_per_image, store_bytes_per_image

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    t_all = time.perf_counter()
    data = load_flickr8k(Path(args.root), args.split)
    index_dir = Path(args.index or "out/f8k_dev_index")
    if (index_dir / "CURRENT").exists():
        index = Index.open(index_dir)
        model = create_model(index.manifest["model"].get("source") or index.manifest["model"]["name"])
    else:
        model = create_model(args.model)
        index = open_or_build_index(index_dir, data.image_paths, model)
    index.check_model(model)
    split_ids = image_ids_of(index, data.image_paths)
    ids = split_ids if args.gallery == "split" else index.image_ids()
    gt = np.searchsorted(ids, split_ids)[np.asarray(data.txt2img)] if args.gallery == "index" \
        else np.asarray(data.txt2img, np.int64)
    embeds = index.embeddings(ids)  # [n,Q,D]
    n, q, dim = embeds.shape
    nlist = args.nlist or auto_nlist(n * q)
    nprobe = args.nprobe or nlist
    t0 = time.perf_counter()
    texts = embed_texts(model, data.texts)
    t_embed = time.perf_counter() - t0
    exact = max_over_queries(embeds, texts)
    exact_recall = recall(exact, gt)
    pool_e = top_mask(exact, args.k_test)
    print(f"{len(gt)} captions, {n} images, nlist {nlist}; exact ITC {exact_recall}", file=sys.stderr)
    timing = texts[: args.timing_queries]
    fetch = q * max(max(args.rescore), args.k_test)  # enough vectors for the first R distinct images
    itm = Itm(model, index, ids, data.texts)
    store_factory, _, store_r = args.store_config.format(nlist=nlist).partition("@")
    sample = np.sort(np.random.default_rng(0).choice(len(gt), min(args.itm_sample, len(gt)), replace=False))
    sample_exact = sample_itm_r1(itm, sample, exact, pool_e, gt) if len(sample) else None
    store_cand: np.ndarray | None = None

    def measure(name: str, index_ann: Any, probe: int, per_image: int, wrapped: Any, build_s: float) -> list[dict]:
        nonlocal store_cand
        set_nprobe(index_ann, probe)
        t = time.perf_counter()
        approx = approx_image_scores(index_ann, texts, n, fetch)
        eval_s = time.perf_counter() - t
        rows = []
        for r in args.rescore:
            scores = keep_top(approx, exact, r)
            pool = top_mask(scores, args.k_test)
            rec = recall(scores, gt)
            row = {
                "config": name, "nprobe": probe, "rescore": r,
                "ann_bytes_per_image": ann_bytes_per_image(index_ann, per_image),
                "qsearch_bytes_per_image": {"disk": ann_bytes_per_image(wrapped, per_image),
                                            "ram": ann_bytes_per_image(wrapped, per_image, in_memory=True)},
                "serialized_bytes_per_image_incl_fixed": round(len(faiss.serialize_index(index_ann)) / n, 1),
                "itc": rec, "itc_loss": {k: round(exact_recall[k] - rec[k], 2) for k in rec},
                "pool_overlap": round(float((pool & pool_e).sum(1).mean()), 3),
                "pools_identical": int((pool == pool_e).all(1).sum()),
                "gt_in_pool_pct": round(100.0 * float(pool[np.arange(len(gt)), gt].mean()), 2),
                "time": time_queries(index_ann, index, ids, timing, r, args.k_test, per_image),
                "build_s": round(build_s, 2), "eval_s": round(eval_s, 2),
            }
            if r in args.itm_rescore:
                t = time.perf_counter()
                need = itm_pairs_needed(pool_e, pool, gt)
                if need <= args.itm_budget:
                    row["itc_itm"] = itm_r1_change(itm, exact, pool_e, pool, gt)
                elif len(sample):  # pools differ too much for ITM on every difference: the sample only
                    r1 = sample_itm_r1(itm, sample, exact, pool, gt)
                    row["itc_itm"] = {"on_sample": len(sample), "r1": r1, "r1_loss": round(sample_exact - r1, 2)}
                else:
                    row["itc_itm"] = {"not_computed": f"needs >= {need} ITM pairs (--itm-budget)"}
                row["itc_itm"]["seconds"] = round(time.perf_counter() - t, 1)
            if name == store_factory and probe == nprobe and str(r) == store_r:
                store_cand = top_mask(approx, r)
            rows.append(row)
            print(f"  {name} nprobe={probe} R={r}: ITC {rec}, pool overlap {row['pool_overlap']}, "
                  f"ITC+ITM {row.get('itc_itm')}, {row['time']['p50_ms']} ms", file=sys.stderr)
        return rows

    rows: list[dict] = []
    flat_vectors = np.ascontiguousarray(embeds.reshape(n * q, dim))
    labels = np.repeat(np.arange(n, dtype=np.int64), q)
    for m in args.pq:
        for opq in {"both": (False, True), "yes": (True,), "no": (False,)}[args.opq]:
            factory = ann_factory(m, opq, nlist, dim)
            ann, build_s = build_ann(factory, flat_vectors, labels)
            sweep = args.nprobe_sweep if factory == args.sweep.format(nlist=nlist) else []
            for probe in [nprobe, *(p for p in sweep if p < nprobe)]:
                rows += measure(factory, ann, probe, q, make_index(dim, factory), build_s)
            del ann
    del flat_vectors
    pooled = embeds.mean(1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    ann = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    t = time.perf_counter()
    ann.add_with_ids(np.ascontiguousarray(pooled, np.float32), np.arange(n, dtype=np.int64))
    rows += measure("pooled mean, Flat", ann, 1, 1, make_index(dim, "Flat"), time.perf_counter() - t)

    # re-scoring store precision (fp32 / fp16 / int8) on one config's candidates; ITC+ITM on a sample
    stores = {}
    for dtype in ("fp32", "fp16", "int8"):
        stored, scale = quantize(embeds, dtype) if dtype != "fp32" else (embeds, None)
        itc = max_over_queries(stored.astype(np.float32) * (scale[..., None] if scale is not None else 1), texts)
        scores = itc if store_cand is None else np.where(store_cand, itc, -np.inf).astype(np.float32)
        pool = top_mask(scores, args.k_test)
        rec = recall(scores, gt)
        stores[dtype] = {
            "bytes_per_image": store_bytes_per_image(q, dim, dtype), "itc": rec,
            "itc_loss": {k: round(exact_recall[k] - rec[k], 2) for k in rec},
            "max_abs_itc_error": float(np.abs(itc - exact).max()),
            "pool_overlap": round(float((pool & pool_e).sum(1).mean()), 3),
            "pools_identical": int((pool == pool_e).all(1).sum()),
        }
        if len(sample):
            stores[dtype]["itc_itm_r1_on_sample"] = sample_itm_r1(itm, sample, itc, pool, gt)
        print(f"  store {dtype}: {stores[dtype]}", file=sys.stderr)

    result = {
        "what": ("text -> image, every caption of the split, on the collection below; exact = Flat over the "
                 f"{q} x fp32 query vectors; R = candidates re-scored exactly (0: FAISS's approximate scores); "
                 "ITC+ITM R@1 loss computed exactly (see the script's docstring)"),
        "dataset": {"root": args.root, "split": args.split, "captions": len(gt)},
        "collection": {"gallery": args.gallery, "images": n, "vectors": n * q},
        "index": str(index_dir), "model": model.name, "num_queries": q, "embed_dim": dim,
        "nlist": nlist, "nprobe": nprobe, "k_test": args.k_test,
        "exact": {"itc": exact_recall, "itc_itm_r1_on_sample": sample_exact, "sample_captions": len(sample),
                  "bytes_per_image": {"vectors_fp32": store_bytes_per_image(q, dim, "fp32"),
                                      "qsearch_idmap2_flat_disk": ann_bytes_per_image(make_index(dim, "Flat"), q)}},
        "configs": rows,
        "rescoring_store": {"candidates_of": args.store_config.format(nlist=nlist), "by_dtype": stores},
        "idmap2_rev_map_bytes_per_vector_measured": rev_map_bytes(),
        "itm": {"pairs_computed": len(itm.logits), "seconds": round(itm.seconds, 1)},
        "seconds": {"embed_texts": round(t_embed, 1), "total": round(time.perf_counter() - t_all, 1)},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                    "faiss": faiss.__version__, "torch": torch.__version__},
        "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(rows, exact_recall, q, dim))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
