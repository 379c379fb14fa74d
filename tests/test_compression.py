"""A compressed first stage (IVF-PQ over the query vectors) re-scored exactly finds what the exact index finds;
bytes-per-image accounting of the ANN stage and the re-scoring store."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest
from PIL import Image

from indexer import Index, IndexConfig, build_index
from indexer.vectors import make_index
from qformer.factory import create_model
from search.engine import Searcher
from search.first_stage import FirstStage, faiss_scores_exact
from search.footprint import ann_bytes_per_image, ann_bytes_per_vector, store_bytes_per_image

PQ = "IVF4,PQ8x4"  # small model: 8 queries x 32 dims; 8 sub-quantizers of 4 bits -> 4-byte codes
QUERIES = ["a red square", "something blue and green", "stripes on a dark background", "a bright yellow photo"]


@pytest.fixture(scope="module")
def indexes(small_model_dir, tmp_path_factory):
    """The same 40 generated photos indexed twice: exact (Flat) and IVF-PQ probing every list."""
    root = tmp_path_factory.mktemp("compression")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        base = rng.integers(0, 256, 3)
        a = np.empty((48, 64, 3), np.uint8)
        a[:] = base
        y, x = rng.integers(0, 40), rng.integers(0, 56)
        a[y : y + 8, x : x + 8] = 255 - base
        a[:, :: int(rng.integers(3, 9))] //= 2  # stripes
        Image.fromarray(a).save(photos / f"p{i:02d}.png")
    model = create_model(small_model_dir)
    flat, pq = root / "flat", root / "pq"
    build_index(model, [photos], flat, IndexConfig(num_workers=0), progress=False)
    shutil.copytree(flat, pq)  # same embeddings; only the FAISS stage is rebuilt
    build_index(model, [photos], pq, IndexConfig(num_workers=0, faiss_factory=PQ, faiss_params="nprobe=4"),
                progress=False)
    return model, flat, pq


def brute_force(searcher: Searcher, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids = searcher.index.image_ids()
    t = searcher.model.embed_texts([text])[0].numpy()
    sims = np.einsum("iqd,d->iq", searcher.index.embeddings(ids), t).max(1)
    order = np.argsort(-sims, kind="stable")
    return ids[order], sims[order]


def test_rescored_pq_index_gives_the_exact_results(indexes):
    model, flat_dir, pq_dir = indexes
    flat, pq = Searcher(flat_dir, model), Searcher(pq_dir, model)
    assert pq.index.manifest["faiss"]["effective"] == PQ and pq.approximate and not flat.approximate
    for text in QUERIES:
        for rerank in (0, 8):
            a, b = flat.search(text, k=10, rerank=rerank), pq.search(text, k=10, rerank=rerank)
            assert [h.image_id for h in b] == [h.image_id for h in a]
            assert [h.itc for h in b] == pytest.approx([h.itc for h in a], abs=1e-6)
            assert [h.score for h in b] == pytest.approx([h.score for h in a], abs=1e-5)


def test_itc_candidates_are_rescored_exactly_and_not_without(indexes):
    model, _, pq_dir = indexes
    rescored, raw = Searcher(pq_dir, model, rescore=40), Searcher(pq_dir, model, rescore=0)
    worst = 0.0
    for text in QUERIES:
        ids, sims = brute_force(rescored, text)
        t = model.embed_texts([text])[0].float()
        [(got_ids, got)] = rescored.first_stage.top(t, 10)
        assert got_ids.tolist() == ids[:10].tolist()
        assert got == pytest.approx(sims[:10], abs=1e-6)
        [(raw_ids, raw_sims)] = raw.first_stage.top(t, 10)  # FAISS's PQ scores, for the same images
        exact_of = dict(zip(ids.tolist(), sims.tolist(), strict=True))
        worst = max(worst, float(np.abs(raw_sims - [exact_of[i] for i in raw_ids.tolist()]).max()))
    assert worst > 1e-3  # PQ scores really are approximate: the checks above can fail


def test_fp16_scan_gives_the_fp32_scans_top_n(indexes):
    model, flat_dir, _ = indexes
    half, full = FirstStage(Index.open(flat_dir)), FirstStage(Index.open(flat_dir), scan_dtype="fp32")
    assert half.method == full.method == "scan"
    t = model.embed_texts(QUERIES)
    for n in (1, 5, 10, 39, 40):
        for (a, sa), (b, sb) in zip(half.top(t, n), full.top(t, n), strict=True):
            assert a.tolist() == b.tolist() and sa.tolist() == sb.tolist()


def test_exact_indexes_are_never_rescored(indexes):
    model, flat_dir, _ = indexes
    s = Searcher(flat_dir, model, rescore=40)
    s.index.embeddings = None  # FAISS and the fp32 scan must not read the stored embeddings of an exact index
    t = model.embed_texts(["a red square"])[0].float()
    for first in (FirstStage(s.index, rescore=40, method="faiss"), FirstStage(s.index, rescore=40, scan_dtype="fp32")):
        assert len(first.top(t, 5)[0][0]) == 5
    with pytest.raises(ValueError):
        Searcher(flat_dir, model, rescore=-1)


@pytest.mark.parametrize(("factory", "exact"), [("Flat", True), ("IVF4,Flat", True), ("HNSW8", True),
                                                 (PQ, False), ("OPQ8,IVF4,PQ8x4", False), ("IVF4,SQ8", False)])
def test_faiss_scores_exact(factory, exact):
    assert faiss_scores_exact(make_index(32, factory)) is exact  # as the local indexer wraps it (IDMap2)
    bare = faiss.index_factory(32, factory, faiss.METRIC_INNER_PRODUCT)  # as the Ray indexer stores IVF
    assert faiss_scores_exact(bare) is exact


def test_bytes_per_image():
    # the design's count: 32 vectors x (m code bytes + an 8-byte id), as IVF lists store them
    assert ann_bytes_per_image(faiss.index_factory(256, "IVF256,PQ32", faiss.METRIC_INNER_PRODUCT), 32) == 32 * 40
    assert ann_bytes_per_image(faiss.index_factory(256, "OPQ32,IVF256,PQ32", faiss.METRIC_INNER_PRODUCT), 32) == 1280
    assert ann_bytes_per_image(faiss.index_factory(256, "IVF256,PQ16", faiss.METRIC_INNER_PRODUCT), 32) == 768
    # qsearch wraps every index in IndexIDMap2: one more id per vector on disk, a reverse map in memory
    assert ann_bytes_per_image(make_index(256, "IVF256,PQ32"), 32) == 32 * 48
    assert ann_bytes_per_image(make_index(256, "IVF256,PQ32"), 32, in_memory=True) > 32 * 48 + 32 * 32
    assert ann_bytes_per_image(make_index(256, "Flat"), 32) == 32 * (1024 + 8)
    assert ann_bytes_per_image(faiss.IndexIDMap(faiss.IndexFlatIP(256)), 1, in_memory=True) == 1024 + 8
    assert store_bytes_per_image(32, 256, "fp32") == 32768
    assert store_bytes_per_image(32, 256, "fp16") == 16384
    assert store_bytes_per_image(32, 256, "int8") == 8192 + 32 * 4
    with pytest.raises(ValueError):
        store_bytes_per_image(32, 256, "bf16")


def test_bytes_per_vector_is_what_faiss_writes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12_000, 32)).astype(np.float32)
    index = faiss.index_factory(32, "IVF4,PQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    empty = len(faiss.serialize_index(index))
    index.add_with_ids(x, np.arange(len(x), dtype=np.int64) // 8)
    per_vector = (len(faiss.serialize_index(index)) - empty) / len(x)
    assert ann_bytes_per_vector(index) == 16
    assert per_vector == pytest.approx(16, abs=0.05)
