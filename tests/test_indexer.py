"""The indexer: robust decoding, sources, incremental and crash-safe builds, the on-disk layout.

All images are generated small in tmp_path. The model is the small random checkpoint of conftest with
the encoder's input size lowered to 64 px (EfficientNet-Lite0 then gives 2x2 = 4 tokens), so that whole
builds stay fast on a 2-core CPU.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from indexer import (
    BadImage,
    Index,
    IndexConfig,
    IndexLocked,
    IndexNotFound,
    ModelMismatch,
    build_index,
    decode_image,
    dequantize,
    load_image,
    model_fingerprint,
    quantize,
    remove_from_index,
    store,
)
from qformer.decode import to_rgb

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # encoder input size for these tests


@pytest.fixture(scope="module")
def model(small_model_dir):
    from qformer.factory import create_model

    m = create_model(small_model_dir)
    m.encoder.image_size = SIZE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core CPU, 2 intra-op threads can be 10x slower than 1
    yield m
    torch.set_num_threads(threads)


def cfg(**kw) -> IndexConfig:
    base = {"batch_size": 8, "num_workers": 0, "commit_every": 8}
    return IndexConfig(**{**base, **kw})


def noise(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def png_bomb_header(w: int, h: int) -> bytes:
    """A valid PNG whose header claims w x h pixels (with a tiny IDAT): cheap to write, huge to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_odd_inputs(d: Path) -> dict[str, str]:
    """Every odd and bad input; returns {file name: expected skip-reason fragment} for the bad ones."""
    d.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(noise(1))
    (d / "good.jpg").write_bytes(good)
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "bomb.png").write_bytes(png_bomb_header(100_000, 100_000))
    noise(2).convert("CMYK").save(d / "cmyk.jpg")
    noise(3).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    rgba = noise(4).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(d / "gray16.png")
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    noise(5).save(d / "image.webp")
    noise(6).save(d / "image.bmp")
    (d / "sub").mkdir()
    noise(7).save(d / "sub" / "image.tif")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    noise(8, (64, 32)).save(d / "rotated.jpg", exif=exif)
    (d / "notes.txt").write_text("not an image extension: ignored, not skipped")
    (d / ".hidden.jpg").write_bytes(good)
    return {"truncated.jpg": "truncated", "empty.jpg": "empty", "text.jpg": "identify", "bomb.png": "bomb"}


@pytest.fixture(scope="module")
def odd_index(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    bad = write_odd_inputs(root / "imgs")
    stats = build_index(model, [root / "imgs"], root / "index", cfg(num_workers=2), progress=False)
    return root, bad, stats


# ---- decoding ------------------------------------------------------------------------------------------------
def test_decode_conversions(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0))[0] in (126, 127)
    g16 = Image.fromarray(np.full((4, 4), 100 * 256, np.uint16))
    assert g16.mode.startswith("I;16") and to_rgb(g16).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (4, 4))
    p.putpalette([0, 255, 0] * 256)
    assert to_rgb(p).getpixel((0, 0)) == (0, 255, 0)
    assert to_rgb(Image.new("F", (4, 4), 0.5)).getpixel((0, 0)) == (127, 127, 127)

    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "a.gif").getpixel((0, 0)) == (255, 0, 0)  # first frame

    big = jpeg_bytes(noise(0, (1024, 768)))
    dec = decode_image(big, draft_size=224)  # JPEG draft: decoded at 1/2 scale, reports full size
    assert (dec.width, dec.height) == (1024, 768) and dec.image.size == (512, 384)

    with pytest.raises(BadImage, match="max_pixels"):
        load_image(big, max_pixels=1000)
    with pytest.raises(BadImage, match="bomb"):
        load_image(png_bomb_header(100_000, 100_000))
    with pytest.raises(BadImage, match="empty"):
        load_image(b"")
    with pytest.raises(BadImage, match="truncated"):
        load_image(big[:2000])
    with pytest.raises(BadImage, match="not found"):
        load_image(tmp_path / "missing.png")


def test_odd_inputs_skipped_with_reasons_and_good_ones_indexed(odd_index):
    root, bad, stats = odd_index
    ix = Index.open(root / "index")
    meta = {Path(p).name: r for p, r in zip(ix.metadata["path"].to_pylist(), ix.metadata.to_pylist(), strict=True)}
    good = {"good.jpg", "cmyk.jpg", "palette.png", "rgba.png", "gray16.png", "anim.gif", "image.webp",
            "image.bmp", "image.tif", "rotated.jpg"}
    assert set(meta) == good  # .txt ignored, hidden files ignored
    assert (meta["rotated.jpg"]["width"], meta["rotated.jpg"]["height"]) == (32, 64)  # EXIF orientation
    assert meta["anim.gif"]["format"] == "GIF" and meta["image.tif"]["format"] == "TIFF"
    skipped = {Path(s["path"]).name: s["reason"] for s in ix.info()["skipped"]}
    assert set(skipped) == set(bad)
    for name, fragment in bad.items():
        assert fragment in skipped[name], (name, skipped[name])
    assert stats.skipped == len(bad) and stats.embedded == len(good) and stats.images == len(good)
    info = ix.info()
    assert info["complete"] and info["counts"]["images"] == len(good) and info["build_seconds"] > 0
    assert info["model"]["name"] == "small-random" and len(info["model"]["fingerprint"]) == 64
    assert ix.faiss_index.ntotal == info["num_queries"] * len(good)
    assert ix.features(ix.image_ids()[:3]).shape == (3, *info["token_shape"])


def test_files_open_with_stock_tools(odd_index):
    import duckdb
    import faiss

    root, _, _ = odd_index
    d = root / "index"
    m = json.loads((d / (d / "CURRENT").read_text().strip()).read_text())
    index = faiss.read_index(str(d / m["faiss"]["file"]))
    table = pq.read_table(d / m["metadata"])
    assert index.ntotal == table.num_rows * m["num_queries"]
    assert duckdb.sql(f"SELECT count(*) FROM '{d / m['metadata']}'").fetchone()[0] == table.num_rows
    assert duckdb.sql(f"SELECT count(*) FROM '{d / m['skipped']}'").fetchone()[0] == m["counts"]["skipped"]
    shard = np.load(d / m["shards"][0]["files"]["features"], mmap_mode="r")
    assert isinstance(shard, np.memmap) and shard.dtype == np.float16 and shard.shape[1:] == tuple(m["token_shape"])
    emb = np.load(d / m["shards"][0]["files"]["embeddings"], mmap_mode="r")
    assert emb.shape[1:] == (m["num_queries"], m["embed_dim"])
    # every image's vectors are unit-norm and carry its id
    ids = faiss.vector_to_array(faiss.downcast_index(index).id_map)
    assert set(ids.tolist()) == set(table["image_id"].to_pylist())
    assert np.bincount(ids).max() == m["num_queries"]


# ---- sources -------------------------------------------------------------------------------------------------
def test_manifests_and_webdataset(model, tmp_path):
    import duckdb

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        noise(10 + i).save(imgs / f"{i}.jpg")
    (tmp_path / "list.csv").write_text("path,label,score\nimgs/0.jpg,cat,0.5\nimgs/1.jpg,dog,1.5\n"
                                       "imgs/missing.jpg,cow,2.0\n")
    pq.write_table(pa.table({"image_path": [str(imgs / "2.jpg"), "imgs/3.jpg"], "split": ["train", "test"],
                             "caption": ["a given caption", None]}), tmp_path / "list.parquet")
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
        add("000.jpg", jpeg_bytes(noise(20)))
        add("000.txt", b"a noisy square\n")
        add("000.json", json.dumps({"label": "noise", "n": 3}).encode())
        buf = io.BytesIO()
        noise(21).save(buf, "PNG")
        add("001.png", buf.getvalue())
        add("001.json", json.dumps({"label": "more", "n": 4, "size": 9}).encode())
        add("002.txt", b"no image for this key")
    sources = [tmp_path / "list.csv", tmp_path / "list.parquet", tmp_path / "shard-{000..000}.tar"]
    stats = build_index(model, sources, tmp_path / "index", cfg(num_workers=1), progress=False)
    assert stats.embedded == 6 and stats.skipped == 1
    ix = Index.open(tmp_path / "index")
    rows = {r["path"]: r for r in ix.metadata.to_pylist()}
    assert rows[str(imgs / "0.jpg")]["label"] == "cat" and rows[str(imgs / "1.jpg")]["score"] == 1.5
    assert rows[str(imgs / "2.jpg")]["split"] == "train" and rows[str(imgs / "2.jpg")]["caption"] == "a given caption"
    tar = str(tmp_path / "shard-000.tar")
    t0, t1 = rows[f"{tar}::000.jpg"], rows[f"{tar}::001.png"]
    assert (t0["txt"], t0["label"], t0["n"]) == ("a noisy square", "noise", 3)
    assert (t1["label"], t1["user_size"], t1["size"]) == ("more", 9, t1["size"])  # clash -> user_size
    assert t0["mtime"].timestamp() == 1_700_000_000
    assert any("missing.jpg" in s["path"] and "cannot stat" in s["reason"] for s in ix.info()["skipped"])
    q = duckdb.sql(f"SELECT path FROM '{tmp_path / 'index' / ix.manifest['metadata']}' WHERE label = 'dog'")
    assert [r[0] for r in q.fetchall()] == [str(imgs / "1.jpg")]
    # edited manifest metadata is refreshed without re-embedding
    (tmp_path / "list.csv").write_text("path,label,score\nimgs/0.jpg,lion,0.5\nimgs/1.jpg,dog,1.5\n")
    stats = build_index(model, sources, tmp_path / "index", cfg(), progress=False)
    assert (stats.embedded, stats.updated, stats.unchanged, stats.images) == (0, 1, 6, 6)
    rows = {r["path"]: r for r in Index.open(tmp_path / "index").metadata.to_pylist()}
    assert rows[str(imgs / "0.jpg")]["label"] == "lion" and rows[f"{tar}::000.jpg"]["label"] == "noise"
    # content already indexed (here: as a tar member) is not embedded again under a new path
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.jpg").write_bytes(jpeg_bytes(noise(20)))
    with pytest.raises(ModelMismatch):  # a re-run of this index with another model is refused
        other = _other_model(model)
        build_index(other, [tmp_path / "plain"], tmp_path / "index", cfg(), progress=False)
    stats = build_index(model, [tmp_path / "plain"], tmp_path / "index", cfg(), progress=False)
    assert stats.reused == 1 and stats.embedded == 0 and stats.images == 7


# ---- incremental updates -------------------------------------------------------------------------------------
def _paths(ix: Index) -> list[str]:
    return ix.metadata["path"].to_pylist()


def _assert_consistent(ix: Index) -> None:
    q = ix.manifest["num_queries"]
    assert ix.faiss_index.ntotal == q * len(ix)
    assert len(set(_paths(ix))) == len(ix)
    assert len(set(ix.image_ids().tolist())) == len(ix)


def test_incremental_add_change_delete_remove(model, tmp_path):
    d, idx = tmp_path / "imgs", tmp_path / "index"
    d.mkdir()
    for i in range(6):
        noise(30 + i).save(d / f"{i}.png")
    s1 = build_index(model, [d], idx, cfg(), progress=False)
    assert (s1.embedded, s1.images) == (6, 6)
    gen = s1.generation

    s2 = build_index(model, [d], idx, cfg(), progress=False)  # nothing to do: no new generation
    assert (s2.embedded, s2.unchanged, s2.generation) == (0, 6, gen)

    noise(40).save(d / "new.png")
    noise(41).save(d / "sub.png")
    s3 = build_index(model, [d], idx, cfg(), progress=False)
    assert (s3.embedded, s3.unchanged, s3.images) == (2, 6, 8)

    ix = Index.open(idx)
    old_id = int(ix.rows(ix.image_ids()).filter(pa.compute.equal(ix.metadata["path"], str(d / "3.png")))
                 ["image_id"][0].as_py())
    old_emb = ix.embeddings([old_id])
    noise(99).save(d / "3.png")  # change the content
    s4 = build_index(model, [d], idx, cfg(), progress=False)
    assert (s4.embedded, s4.removed, s4.images) == (1, 1, 8)
    ix = Index.open(idx)
    _assert_consistent(ix)
    assert old_id not in ix.image_ids()
    new_id = ix.image_ids()[_paths(ix).index(str(d / "3.png"))]
    assert not np.allclose(ix.embeddings([new_id]), old_emb)
    _, hits = ix.faiss_index.search(old_emb[0], 1)
    assert old_id not in hits  # its vectors left FAISS

    (d / "0.png").unlink()  # delete
    (d / "1.png").rename(d / "renamed.png")  # rename: same content, new path -> embeddings reused
    s5 = build_index(model, [d], idx, cfg(), progress=False)
    assert (s5.embedded, s5.reused, s5.removed, s5.images) == (0, 1, 2, 7)
    ix = Index.open(idx)
    _assert_consistent(ix)
    assert str(d / "0.png") not in _paths(ix) and str(d / "renamed.png") in _paths(ix)

    assert remove_from_index(idx, [d / "2.png", d / "not-indexed.png"]) == 1
    ix = Index.open(idx)
    _assert_consistent(ix)
    assert len(ix) == 6 and str(d / "2.png") not in _paths(ix)
    s6 = build_index(model, [d], idx, cfg(), progress=False)  # a re-run brings it back (the file is there)
    assert s6.images == 7 and s6.embedded == 1  # its shard was compacted: the features were really gone

    # a different FAISS factory rebuilds from the stored embeddings, no model work
    s7 = build_index(model, [d], idx, cfg(faiss_factory="HNSW8"), progress=False)
    assert s7.embedded == 0
    ix = Index.open(idx)
    import faiss

    assert ix.manifest["faiss"]["effective"] == "HNSW8"
    assert "HNSW" in type(faiss.downcast_index(ix.faiss_index.index)).__name__
    assert remove_from_index(idx, [d]) == 7  # a directory removes everything under it (HNSW: rebuilt)
    ix = Index.open(idx)
    assert len(ix) == 0 and ix.faiss_index.ntotal == 0
    # old generations are garbage-collected: only the current and the previous one stay
    assert len(list(idx.glob("gen-*.json"))) == 2 and len(list(idx.glob("queries-*.faiss"))) == 2


def test_rename_reuses_features_across_intermediate_commits(model, tmp_path):
    """A renamed file's old row is dropped at the run's first commit; its shard must survive the run's
    garbage collection until the new path, processed last, has reused it."""
    d, idx = tmp_path / "imgs", tmp_path / "index"
    d.mkdir()
    noise(60).save(d / "a.png")
    build_index(model, [d], idx, cfg(), progress=False)
    (d / "a.png").rename(d / "z.png")
    for i in range(4):
        noise(61 + i).save(d / f"m{i}.png")
    s = build_index(model, [d], idx, cfg(batch_size=1, commit_every=1), progress=False)
    assert (s.reused, s.embedded, s.removed, s.images) == (1, 4, 1, 5) and s.commits >= 4
    ix = Index.open(idx)
    _assert_consistent(ix)
    z = ix.image_ids()[_paths(ix).index(str(d / "z.png"))]
    assert ix.rows([z])["shard"][0].as_py() == 0  # still the shard written for a.png
    assert ix.features([z]).shape[0] == 1 and ix.manifest["counts"]["shards"] == 5
def test_ivf_falls_back_to_exact_until_trainable(model, tmp_path):
    import faiss

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        noise(50 + i).save(d / f"{i}.png")
    idx = tmp_path / "index"
    build_index(model, [d], idx, cfg(faiss_factory="IVF2,Flat", faiss_params="nprobe=2"), progress=False)
    ix = Index.open(idx)
    assert ix.manifest["faiss"]["effective"] == "Flat"  # 4 x 8 vectors < 39 x 2 needed to train
    for i in range(4, 10):
        noise(50 + i).save(d / f"{i}.png")
    build_index(model, [d], idx, cfg(faiss_factory="IVF2,Flat", faiss_params="nprobe=2"), progress=False)
    ix = Index.open(idx)
    assert ix.manifest["faiss"]["effective"] == "IVF2,Flat" and ix.faiss_index.ntotal == 80
    assert faiss.extract_index_ivf(ix.faiss_index).nprobe == 2
    emb = ix.embeddings(ix.image_ids()[:3])[:, 0]  # [3,D]
    _, hits = ix.faiss_index.search(np.ascontiguousarray(emb), 1)
    assert hits[:, 0].tolist() == ix.image_ids()[:3].tolist()  # each query vector finds its own image


# ---- crash safety --------------------------------------------------------------------------------------------
RUNNER = textwrap.dedent("""
    import sys, time
    from qformer.factory import create_model
    from indexer import IndexConfig, build_index

    model = create_model(sys.argv[1])
    model.encoder.image_size = int(sys.argv[4])
    fast = model.image_tokens
    def slow(pixels, *args):  # slow the model down so that the kill lands mid-run
        time.sleep(0.15)
        return fast(pixels, *args)
    model.image_tokens = slow
    build_index(model, [sys.argv[2]], sys.argv[3],
                IndexConfig(batch_size=8, commit_every=8, num_workers=1), progress=False)
""")


def test_kill_during_indexing_then_resume(model, small_model_dir, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(80):
        noise(100 + i, (48, 48)).save(d / f"{i:03d}.jpg")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = tmp_path / "run.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(small_model_dir), str(d), str(killed), str(SIZE)],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    opens, failures = 0, []
    deadline = time.monotonic() + 120
    kill_at = None
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if (killed / "CURRENT").exists():
                try:  # a reader opening the index while the writer commits never fails
                    ix = Index.open(killed)
                    _assert_consistent(ix)
                    if len(ix):
                        ix.features(ix.image_ids()[-1:])
                    opens += 1
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    failures.append(repr(e))
                if kill_at is None:
                    kill_at = time.monotonic() + random.uniform(0.0, 0.4)
            if kill_at is not None and time.monotonic() >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)  # the writer and its decoding worker
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0].decode(errors="replace")
    assert kill_at is not None, f"the writer never committed:\n{out[-3000:]}"
    assert proc.returncode == -signal.SIGKILL, f"the writer finished before the kill:\n{out[-3000:]}"
    assert not failures and opens >= 1, failures

    ix = Index.open(killed)  # readable at its last commit
    _assert_consistent(ix)
    assert 0 < len(ix) < 80 and not ix.manifest["complete"]
    done = len(ix)

    s = build_index(model, [d], killed, cfg(), progress=False)  # resume
    assert s.unchanged == done and s.embedded == 80 - done and s.images == 80
    build_index(model, [d], clean, cfg(), progress=False)

    a, b = Index.open(killed), Index.open(clean)
    for ix in (a, b):
        _assert_consistent(ix)
        assert len(ix) == 80 and ix.manifest["complete"]
        assert len(set(ix.metadata["sha256"].to_pylist())) == 80
    assert a.metadata.select(["image_id", "path", "sha256"]).equals(b.metadata.select(["image_id", "path", "sha256"]))
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((5, a.manifest["embed_dim"])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    da, ia = a.faiss_index.search(queries, 20)
    db, ib = b.faiss_index.search(queries, 20)
    assert np.array_equal(ia, ib) and np.allclose(da, db, atol=1e-5)
    fa, fb = a.features(a.image_ids()), b.features(b.image_ids())  # fp16; the killed run used 1 thread
    assert float((fa - fb).norm() / fb.norm()) < 1e-3
    assert not list(killed.rglob("*.tmp-*"))  # temporary files of the killed writer were cleaned up


def test_second_writer_is_refused(model, tmp_path):
    (tmp_path / "imgs").mkdir()
    noise(0).save(tmp_path / "imgs" / "a.png")
    with store.writer_lock(tmp_path / "index"), pytest.raises(IndexLocked):
        build_index(model, [tmp_path / "imgs"], tmp_path / "index", cfg(), progress=False)


# ---- features ------------------------------------------------------------------------------------------------
def test_quantisation_error():
    rng = np.random.default_rng(0)
    x = np.clip(rng.standard_normal((3, 49, 1280)) * 2, 0, 6).astype(np.float32)  # ReLU6-like tokens
    x[0, 0] = 0.0  # an all-zero token must survive
    for dtype, tol in (("fp16", 1e-3), ("int8", 1e-2)):
        stored, scale = quantize(x, dtype)
        y = dequantize(stored, scale)
        rel = np.linalg.norm(y - x) / np.linalg.norm(x)
        assert rel < tol, (dtype, rel)
        assert (scale is None) == (dtype == "fp16")
    assert np.abs(dequantize(*quantize(x, "int8"))[0, 0]).max() == 0


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_stored_features_match_the_encoder(model, tmp_path, dtype):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        noise(70 + i).save(d / f"{i}.png")
    build_index(model, [d], tmp_path / "index", cfg(feature_dtype=dtype), progress=False)
    ix = Index.open(tmp_path / "index")
    got = ix.features(ix.image_ids())
    pixels = torch.stack([model.preprocess()(load_image(p)) for p in _paths(ix)])
    emb, want = model.embed_images(pixels, ix.manifest["image_precision"])
    rel = float((got - want).norm() / want.norm())
    assert rel < (1e-3 if dtype == "fp16" else 1e-2), rel
    assert np.allclose(ix.embeddings(ix.image_ids()), emb.numpy(), atol=1e-5)
    assert ix.manifest["feature_dtype"] == dtype
    if dtype == "int8":
        scale = ix.manifest["shards"][0]["files"]["scale"]
        assert np.load(tmp_path / "index" / scale, mmap_mode="r").shape == (3, got.shape[1])


def test_image_precision_is_recorded_and_kept_by_later_runs(model, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        noise(80 + i).save(d / f"{i}.png")
    for precision in ("fp32", "bf16"):
        build_index(model, [d], tmp_path / precision, cfg(image_precision=precision), progress=False)
    fp32, bf16 = Index.open(tmp_path / "fp32"), Index.open(tmp_path / "bf16")
    assert (fp32.manifest["image_precision"], bf16.manifest["image_precision"]) == ("fp32", "bf16")
    assert fp32.info()["image_precision"] == "fp32"
    e32, e16 = fp32.embeddings(fp32.image_ids()), bf16.embeddings(bf16.image_ids())
    assert not np.array_equal(e32, e16)  # bf16 really ran ...
    assert float((e32 * e16).sum(-1).min()) > 0.99  # ... and moved the unit embeddings little
    # a later run with the default (auto) embeds new images as the index was created: fp32 here
    noise(90).save(d / "new.png")
    build_index(model, [d], tmp_path / "fp32", cfg(), progress=False)
    ix = Index.open(tmp_path / "fp32")
    assert ix.manifest["image_precision"] == "fp32" and len(ix) == 4
    pixels = torch.stack([model.preprocess()(load_image(p)) for p in _paths(ix)])
    assert np.allclose(ix.embeddings(ix.image_ids()), model.embed_images(pixels, "fp32")[0].numpy(), atol=1e-5)


# ---- errors and model identity -------------------------------------------------------------------------------
def _other_model(model):
    from qformer.factory import Blip2Retriever
    from qformer.model import QFormer

    torch.manual_seed(123)
    return Blip2Retriever(model.encoder, QFormer(model.qformer.config).eval(), model.tokenizer, "other")


def test_open_missing_and_model_mismatch(model, odd_index, tmp_path):
    with pytest.raises(IndexNotFound, match="no such directory"):
        Index.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFound, match="not a qsearch index"):
        Index.open(tmp_path / "empty")
    with pytest.raises(IndexNotFound):
        remove_from_index(tmp_path / "empty", ["x"])
    ix = Index.open(odd_index[0] / "index")
    ix.check_model(model)  # the same model passes
    with pytest.raises(ModelMismatch, match="small-random"):
        ix.check_model(_other_model(model))
    assert model_fingerprint(model) == ix.manifest["model"]["fingerprint"]


def test_captioner_hook(model, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        noise(80 + i, (40 + i, 30)).save(d / f"{i}.png")
    build_index(model, [d], tmp_path / "index", cfg(), progress=False)  # no captions yet
    assert Index.open(tmp_path / "index").metadata["caption"].null_count == 3
    seen: list[tuple[str, tuple[int, int]]] = []

    def captioner(images: list[Image.Image]) -> list[str]:
        seen.extend((im.mode, im.size) for im in images)
        return [f"an image {im.size[0]} wide" for im in images]

    s = build_index(model, [d], tmp_path / "index", cfg(), captioner=captioner, progress=False)
    assert s.embedded == 0 and s.updated == 3  # captions added without re-embedding
    rows = Index.open(tmp_path / "index").metadata.to_pylist()
    assert sorted(r["caption"] for r in rows) == ["an image 40 wide", "an image 41 wide", "an image 42 wide"]
    assert sorted(seen) == [("RGB", (40, 30)), ("RGB", (41, 30)), ("RGB", (42, 30))]
