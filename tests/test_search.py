"""The engine as users call it: `qsearch index | search | info | remove` and `Searcher.search`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from indexer import Index, IndexNotFound, ModelMismatch
from search.cli import main
from search.engine import QueryError, Searcher
from search.first_stage import FirstStage

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "black": (5, 5, 5), "white": (250, 250, 250), "purple": (130, 30, 160), "orange": (250, 140, 0)}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rows = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        im = Image.new("RGB", (64, 48), rgb)
        for x in range(0, 64, 8):  # a pattern so images differ in more than colour
            im.paste((255 - rgb[0], 255 - rgb[1], 255 - rgb[2]), (x, (i * 5) % 40, x + 3, (i * 5) % 40 + 6))
        im.save(root / f"{name}.png")
        rows.append({"path": str(root / f"{name}.png"), "colour": name, "year": 2000 + i})
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "colour", "year"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def index_dir(collection, small_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("idx") / "index"
    rc = main(["index", str(d), str(collection / "manifest.csv"), str(collection / "broken.jpg"),
               "--model", str(small_model_dir), "--device", "cpu", "--workers", "0", "--json"])
    assert rc == 0
    return d


@pytest.fixture(scope="module")
def searcher(index_dir):
    return Searcher(index_dir)


def test_text_search_ranks_by_itm_plus_itc(searcher):
    hits = searcher.search("a red square", k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    for h in hits:
        assert h.score == pytest.approx(h.itm + h.itc, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert {h.metadata["colour"] for h in hits} <= set(COLOURS)


def test_itc_only_equals_brute_force_max_over_queries(searcher):
    hits = searcher.search("a photo of something blue", k=8, rerank=0)
    ids = searcher.index.image_ids()
    t = searcher.model.embed_texts(["a photo of something blue"])[0].numpy()
    brute = np.einsum("iqd,d->iq", searcher.index.embeddings(ids), t).max(1)
    expected = ids[np.argsort(-brute, kind="stable")]
    assert [h.image_id for h in hits] == expected.tolist()
    assert [h.itc for h in hits] == pytest.approx(np.sort(brute)[::-1].tolist(), abs=1e-5)
    assert all(h.itm is None for h in hits)


def test_rerank_equals_direct_itm(index_dir):
    searcher = Searcher(index_dir, itm_precision="fp32")
    hits = searcher.search("a green thing", k=8, rerank=8)
    model = searcher.model
    for h in hits[:3]:
        feats = searcher.index.features([h.image_id])
        direct = float(model.itm_match_logit(feats, ["a green thing"])[0])
        assert h.itm == pytest.approx(direct, abs=1e-4)  # fp16 feature store vs the same features


def test_bf16_rerank_stays_close_to_fp32(index_dir, capsys):
    fp32 = Searcher(index_dir, itm_precision="fp32").search("a green thing", k=8, rerank=8)
    bf16 = Searcher(index_dir, itm_precision="bf16").search("a green thing", k=8, rerank=8)
    by_id = {h.image_id: h for h in fp32}
    spread = np.ptp([h.itm for h in fp32])
    for h in bf16:
        ref = by_id[h.image_id]
        assert h.itc == ref.itc  # ITC is untouched by the re-ranker's precision
        assert h.itm != ref.itm or spread == 0  # bf16 really ran (the logits differ in low bits) ...
        assert abs(h.itm - ref.itm) < 0.02 * max(spread, 1e-3) + 2e-3  # ... and stays within rounding of fp32
    with pytest.raises(ValueError, match="precision"):
        Searcher(index_dir, itm_precision="fp8")
    assert main(["search", str(index_dir), "a green thing", "-k", "3", "--itm-precision", "fp32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [h["itm"] for h in out] == pytest.approx([h.itm for h in fp32[:3]], abs=1e-6)


def test_image_query_finds_itself_first(searcher, collection):
    hits = searcher.search(image=collection / "purple.png", k=3)
    assert hits[0].path.endswith("purple.png")
    assert hits[0].image_sim == pytest.approx(1.0, abs=1e-3)
    combined = searcher.search("purple", image=collection / "purple.png", k=3)
    assert combined[0].itm is not None and combined[0].image_sim is not None


def test_search_many_answers_each_search_as_search_does(searcher, collection, monkeypatch):
    searches = [
        {"text": "a red square", "k": 5},
        {"text": "   "},  # an error for this search alone
        {"text": "a colourful picture", "k": 3, "offset": 2, "rerank": 0},
        {"text": "anything", "k": 3, "where": "year >= ?", "params": [2003]},
        {"image": collection / "purple.png", "k": 3},
        {"text": "blue", "image": collection / "blue.png", "k": 4, "rerank": 4},
        {"text": "a blue thing", "k": 2, "rerank": 3, "min_score": -1e9},
    ]
    singles = [None if i == 1 else searcher.search(**kw) for i, kw in enumerate(searches)]
    batches = []
    top = searcher.first_stage.top
    monkeypatch.setattr(searcher.first_stage, "top", lambda t, n, allowed=None: batches.append(len(t)) or top(t, n, allowed))
    got = searcher.search_many(searches)
    assert isinstance(got[1], QueryError) and "empty" in str(got[1])
    for i, (one, hits) in enumerate(zip(singles, got, strict=True)):
        if one is not None:
            assert [h.image_id for h in hits] == [h.image_id for h in one], searches[i]
            assert [h.score for h in hits] == pytest.approx([h.score for h in one], abs=1e-5)
            assert [h.rank for h in hits] == [h.rank for h in one]
    assert batches[0] == 4  # the four unfiltered text searches share one first-stage pass


def test_paging(searcher):
    full = searcher.search("a colourful picture", k=8)
    page2 = searcher.search("a colourful picture", k=3, offset=3)
    assert [h.image_id for h in page2] == [h.image_id for h in full[3:6]]
    assert [h.rank for h in page2] == [4, 5, 6]


def test_filters_with_parameters_return_k(searcher):
    hits = searcher.search("anything", k=3, where="year >= ?", params=[2003])
    assert len(hits) == 3 and all(h.metadata["year"] >= 2003 for h in hits)
    hits = searcher.search("anything", k=10, where="colour IN (?, ?)", params=["red", "blue"])
    assert sorted(h.metadata["colour"] for h in hits) == ["blue", "red"]
    assert searcher.search("anything", where="colour = ?", params=["magenta"]) == []


@pytest.mark.parametrize("where, params", [
    ("1=1; DROP TABLE meta", None),
    ("1=1) UNION SELECT 42 --", None),
    ("1=1 /* comment */", None),
    ("EXISTS (SELECT * FROM read_csv('/etc/passwd'))", None),
    ("image_id IN (SELECT 1 FROM read_parquet('/etc/hostname'))", None),
])
def test_sql_injection_is_refused(searcher, where, params):
    with pytest.raises(QueryError):
        searcher.search("anything", where=where, params=params)


def test_injection_through_parameters_is_just_a_value(searcher):
    assert searcher.search("anything", where="colour = ?", params=["red' OR '1'='1"]) == []
    n = len(searcher.search("anything", k=50, rerank=0))
    assert n == len(COLOURS)  # the table is intact


def test_bad_queries_get_clear_errors(searcher, tmp_path):
    with pytest.raises(QueryError, match="empty"):
        searcher.search("   ")
    with pytest.raises(QueryError, match="too long"):
        searcher.search("word " * 1000)
    (tmp_path / "x.jpg").write_bytes(b"nope")
    with pytest.raises(QueryError, match="query image"):
        searcher.search(image=tmp_path / "x.jpg")


def test_cli_errors_and_exit_codes(index_dir, tmp_path, capsys):
    assert main(["search", str(tmp_path / "missing"), "cat"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["search", str(index_dir), "   "]) == 2
    assert "empty" in capsys.readouterr().err
    (tmp_path / "x.jpg").write_bytes(b"nope")
    assert main(["search", str(index_dir), "--image", str(tmp_path / "x.jpg")]) == 2
    assert "query image" in capsys.readouterr().err
    with pytest.raises(IndexNotFound):
        Index.open(tmp_path / "missing")


def test_model_mismatch_is_refused(index_dir):
    from qformer.factory import create_model

    other = create_model("blip2-tiny-init")
    with pytest.raises(ModelMismatch):
        Searcher(index_dir, model=other)


def test_info_and_json_outputs(index_dir, capsys):
    assert main(["info", str(index_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["images"] == len(COLOURS)
    assert any(s["path"].endswith("broken.jpg") for s in info["skipped"])
    assert main(["info", str(index_dir)]) == 0
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "skipped" in out
    assert main(["search", str(index_dir), "red", "-k", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 2 and {"path", "score", "itc", "itm", "metadata"} <= set(res[0])


def test_remove_and_reindex(collection, small_model_dir, tmp_path, capsys):
    d = tmp_path / "index"
    args = ["--model", str(small_model_dir), "--device", "cpu", "--workers", "0", "--json"]
    assert main(["index", str(d), str(collection / "manifest.csv"), *args]) == 0
    capsys.readouterr()
    assert main(["remove", str(d), str(collection / "red.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": 1}
    s = Searcher(d)
    hits = s.search("red", k=20, rerank=0)
    assert len(hits) == len(COLOURS) - 1 and not any(h.path.endswith("red.png") for h in hits)
    # the exact scan skips the removed image's row, still in its shard, and ranks as FAISS does
    t = s.model.embed_texts(["red"])[0].numpy()
    brute = np.einsum("iqd,d->iq", s.index.embeddings(s.index.image_ids()), t).max(1)
    assert s.first_stage.method == "scan" and s.first_stage.scan_scores(t)[0] == pytest.approx(brute, abs=1e-6)
    s.first_stage = FirstStage(s.index, method="faiss")
    faiss_hits = s.search("red", k=20, rerank=0)
    assert [h.image_id for h in faiss_hits] == [h.image_id for h in hits]
    assert [h.itc for h in faiss_hits] == pytest.approx([h.itc for h in hits], abs=1e-6)


def test_hybrid_bm25_over_stored_captions(collection, small_model_dir, tmp_path):
    captions = {name: f"a plain {name} card" for name in COLOURS}
    captions["green"] = "a zebra grazing on a green field"
    with open(tmp_path / "captioned.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption"])
        w.writeheader()
        w.writerows({"path": str(collection / f"{n}.png"), "caption": c} for n, c in captions.items())
    d = tmp_path / "index"
    assert main(["index", str(d), str(tmp_path / "captioned.csv"), "--model", str(small_model_dir),
                 "--device", "cpu", "--workers", "0", "--json"]) == 0
    s = Searcher(d)
    hits = s.search("zebra", k=1, rerank=0, hybrid=True)  # the only BM25 match outranks every dense-only hit
    assert hits[0].path.endswith("green.png") and hits[0].caption.startswith("a zebra")
    # without a caption match, hybrid keeps the dense candidates
    assert len(s.search("qwertyuiop", k=3, rerank=0, hybrid=True)) == 3
    assert s.search("zebra", k=2, hybrid=True, where="caption LIKE ?", params=["%plain%"])[0].caption.startswith("a plain")
    ranked = s.search_captions(collection / "green.png", k=3)
    assert len(ranked) == 3 and {h.caption for h in ranked} <= set(captions.values())


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_faiss_first_stage_finds_the_best_images_when_each_images_vectors_cluster(factory):
    # a trained model's 32 query vectors of one image lie close together, so the top vectors belong to few images
    import faiss

    from search.first_stage import faiss_top_images

    rng = np.random.default_rng(0)
    num_images, q, d, n = 300, 8, 16, 40
    centres = rng.standard_normal((num_images, 1, d))
    vecs = centres + 0.01 * rng.standard_normal((num_images, q, d))
    vecs = (vecs / np.linalg.norm(vecs, axis=-1, keepdims=True)).astype(np.float32)
    index = faiss.index_factory(d, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    if factory.startswith("HNSW"):
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch = 1024  # exhaustive enough
    index.add_with_ids(vecs.reshape(-1, d), np.repeat(np.arange(num_images), q))
    t = vecs[7, 0][None]
    [(ids, scores)] = faiss_top_images(index, t, n, num_images, q)
    exact = (vecs @ t[0]).max(1)
    assert len(set(ids.tolist())) == n
    np.testing.assert_array_equal(ids, np.argsort(-exact, kind="stable")[:n])
    np.testing.assert_allclose(scores, exact[ids], atol=1e-5)


def test_engine_recall_matches_files_indexed_through_a_symlink(collection, small_model_dir, tmp_path):
    """A collection indexed under a symlinked name is evaluated against its real paths (and back)."""
    from qformer.datasets import RetrievalSet
    from search.engine_recall import engine_text_to_image_recall

    link = tmp_path / "linked"
    link.symlink_to(collection, target_is_directory=True)
    d = tmp_path / "index"
    assert main(["index", str(d), str(link), "--model", str(small_model_dir), "--device", "cpu", "--workers", "0",
                 "--json"]) == 0
    index = Index.open(d)
    assert all(p.startswith(str(link)) for p in index.paths(index.image_ids()))  # the name it was given
    data = RetrievalSet()
    for name in COLOURS:
        data.add_image(collection / f"{name}.png", [f"a {name} square"])
    ids = index.ids_of(data.image_paths)
    assert index.paths(ids) == [str(link / f"{name}.png") for name in COLOURS]
    with pytest.raises(KeyError, match="1 of 2 files are not in the index"):
        index.ids_of([collection / "red.png", collection / "missing.png"])
    recall = engine_text_to_image_recall(Searcher(d), data, rerank=0, progress=False)
    assert recall["img_r10"] == 100.0  # 8 images: every caption's image is in its top 10


def test_stored_itm_keys_values_rerank_bit_for_bit_and_survive_compaction(collection, small_model_dir, index_dir,
                                                                         tmp_path, capsys):
    """`qsearch index --itm-kv` stores the bf16 re-ranker's cross-attention keys/values: search then reads them
    instead of computing them from the tokens, with the same scores to the bit, also after compaction."""
    d = tmp_path / "kv"
    args = ["--model", str(small_model_dir), "--device", "cpu", "--workers", "0", "--json"]
    assert main(["index", str(d), str(collection / "manifest.csv"), "--itm-kv", *args]) == 0
    plain, stored = Searcher(index_dir, itm_precision="bf16"), Searcher(d, itm_precision="bf16")
    assert stored.index.has_cross_kv and not plain.index.has_cross_kv
    assert (d / stored.index.manifest["shards"][0]["files"]["kv"]).exists()

    def scores(s: Searcher) -> dict[str, tuple[float, float]]:
        return {h.path: (h.itm, h.itc) for h in s.search("a red square", k=8)}

    expected = scores(plain)
    read, cross_kv = [], stored.index.cross_kv
    stored.index.cross_kv = lambda ids, heads: read.append(len(ids)) or cross_kv(ids, heads)
    assert len(expected) == len(COLOURS) and scores(stored) == expected
    assert read == [len(COLOURS)]  # the stored keys/values were read, not recomputed
    assert Searcher(d, itm_precision="fp32").search("a red square", k=1)[0].itm is not None  # fp32: from tokens
    # keep 3 of 8 images: the shard falls under half live and is rewritten, keys/values moved with their rows
    keep = ["purple", "orange", "white"]
    capsys.readouterr()
    assert main(["remove", str(d), *(str(collection / f"{n}.png") for n in COLOURS if n not in keep), "--json"]) == 0
    compacted = Searcher(d, itm_precision="bf16")
    assert compacted.index.manifest["counts"]["feature_rows"] == 3  # the old shard is gone
    assert scores(compacted) == {p: expected[p] for p in expected if any(p.endswith(f"/{n}.png") for n in keep)}
    info = json.loads((capsys.readouterr(), main(["info", str(d), "--json"]), capsys.readouterr().out)[2])
    assert info["cross_kv"]["shape"][1] == 2
