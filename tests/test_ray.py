"""`qsearch index --engine ray` on a real local Ray cluster: the same index, and the same search results,
as the single-process indexer on the same images (directory + manifest + webdataset shard)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from indexer import Index
from search.cli import main
from search.engine import Searcher

ray = pytest.importorskip("ray")

QUERIES = ["an astronaut in a space suit", "a cat looking at the camera", "a cup of coffee", "a rocket",
           "a man with a camera", "a horse"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Real photos (scikit-image samples, mirrored copies) in a directory, a manifest and a tar shard."""
    from skimage import data as samples

    root = tmp_path_factory.mktemp("collection")
    photos = root / "photos"
    photos.mkdir()
    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "horse"]
    for n in names:
        im = Image.fromarray(getattr(samples, n)()).convert("RGB")
        im.save(photos / f"{n}.jpg", quality=90)
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    extra = root / "extra"
    extra.mkdir()
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "kind"])
        w.writeheader()
        for n in names[:3]:
            p = extra / f"{n}-mirrored.jpg"
            Image.open(photos / f"{n}.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(p, quality=90)
            w.writerow({"path": str(p), "kind": "mirrored"})
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for k, n in enumerate(names[3:]):
            buf = io.BytesIO()
            Image.open(photos / f"{n}.jpg").crop((0, 0, 256, 256)).save(buf, "JPEG", quality=90)
            for suffix, data in ((".jpg", buf.getvalue()), (".txt", f"a crop of the {n} photo".encode())):
                info = tarfile.TarInfo(f"{k:04d}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return [str(photos), str(root / "manifest.csv"), str(root / "shard-000000.tar")]


@pytest.fixture(scope="module")
def indexes(sources, small_model_dir, ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("indexes")
    common = ["--model", str(small_model_dir), "--device", "cpu", "--json"]
    assert main(["index", str(d / "local"), *sources, *common, "--workers", "0"]) == 0
    assert main(["index", str(d / "ray"), *sources, *common, "--engine", "ray", "--part-rows", "4", "--itm-kv"]) == 0
    return d / "local", d / "ray"


def test_ray_index_holds_what_the_local_one_holds(indexes):
    local, distributed = Index.open(indexes[0]), Index.open(indexes[1])
    assert len(distributed) == len(local) == 12
    cols = ["image_id", "path", "sha256", "width", "height", "caption", "kind"]
    assert distributed.metadata.select(cols).to_pylist() == local.metadata.select(cols).to_pylist()
    assert distributed.info()["skipped"] == local.info()["skipped"]
    assert [s["reason"] for s in distributed.info()["skipped"]][0]  # the broken PNG, with its reason
    ids = local.image_ids()
    np.testing.assert_allclose(distributed.embeddings(ids), local.embeddings(ids), atol=1e-5)
    np.testing.assert_allclose(distributed.features(ids), local.features(ids), atol=1e-2)  # fp16 store
    m = distributed.manifest
    assert m["last_run"]["engine"] == "ray" and m["counts"]["shards"] >= 3  # 13 items, parts of <= 4
    assert sum(s["rows"] for s in m["shards"]) == 12 and max(s["rows"] for s in m["shards"]) <= 4
    assert m["faiss"]["effective"] == "IVF1,Flat" and m["faiss"]["ivfdata"].endswith(".ivfdata")


def test_ray_search_results_equal_local(indexes, capfd):
    a, b = Searcher(indexes[0]), Searcher(indexes[1])
    for q in QUERIES:
        for rerank in (0, 8):
            ha, hb = a.search(q, k=12, rerank=rerank), b.search(q, k=12, rerank=rerank)
            assert [h.path for h in hb] == [h.path for h in ha], q
            assert [h.score for h in hb] == pytest.approx([h.score for h in ha], abs=1e-4)
    photo = Index.open(indexes[0]).paths([0])[0]
    assert [h.path for h in b.search(image=photo, k=5)] == [h.path for h in a.search(image=photo, k=5)]
    capfd.readouterr()
    assert main(["search", str(indexes[1]), "a rocket", "-k", "3", "--json"]) == 0
    assert len(json.loads(capfd.readouterr().out)) == 3  # stdout stays pure JSON (faiss notes go to stderr)


def test_merged_faiss_index_is_on_disk_and_memory_mapped(indexes, tmp_path):
    import faiss

    moved = tmp_path / "moved"
    shutil.copytree(indexes[1], moved)  # served from wherever it lies: the .ivfdata is found beside it
    m = Index.open(moved).manifest
    index = faiss.read_index(str(moved / m["faiss"]["file"]), faiss.IO_FLAG_ONDISK_SAME_DIR)
    ivf = faiss.extract_index_ivf(index)
    assert isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
    assert index.ntotal == 12 * m["num_queries"]
    assert (moved / m["faiss"]["ivfdata"]).stat().st_size > 0
    assert Searcher(moved).search("a horse", k=3, rerank=0)


def test_local_engine_updates_a_ray_built_index(indexes, sources, small_model_dir, tmp_path):
    d = tmp_path / "index"
    shutil.copytree(indexes[1], d)
    new = tmp_path / "new.jpg"
    Image.open(sources[0] + "/coffee.jpg").rotate(90).save(new)
    assert main(["index", str(d), *sources, str(new), "--model", str(small_model_dir), "--device", "cpu",
                 "--workers", "0", "--json"]) == 0
    idx = Index.open(d)
    assert len(idx) == 13 and "ivfdata" not in idx.manifest["faiss"]  # FAISS rebuilt in RAM
    assert main(["remove", str(d), str(new), "--json"]) == 0
    hits = Searcher(d).search("a cup of coffee", k=12, rerank=0)
    ref = Searcher(indexes[0]).search("a cup of coffee", k=12, rerank=0)
    assert [h.path for h in hits] == [h.path for h in ref]


def test_ray_engine_refuses_an_existing_index(indexes, sources, small_model_dir, capfd):
    rc = main(["index", str(indexes[1]), sources[0], "--model", str(small_model_dir), "--engine", "ray",
               "--json"])
    assert rc == 2
    assert "already holds an index" in capfd.readouterr().err
    assert len(Index.open(indexes[1])) == 12  # untouched



def test_ray_parts_store_the_itm_keys_values_search_would_compute(indexes):
    """--itm-kv under Ray: every part carries the bf16 re-ranker's keys/values of its stored tokens."""
    import torch

    from qformer.factory import create_model

    index = Index.open(indexes[1])
    assert index.has_cross_kv and not Index.open(indexes[0]).has_cross_kv
    model = create_model(index.manifest["model"]["source"])
    itm = model.itm_encoder("bf16")
    ids = index.image_ids()
    with torch.inference_mode():
        computed = itm.image_kv(index.features(ids, torch.bfloat16))
    stored = index.cross_kv(ids, itm.config.num_heads)
    assert all(torch.equal(a, c) and torch.equal(b, e) for (a, b), (c, e) in zip(stored, computed, strict=True))
