"""The `qsearch` command line as a user runs it: demo and bench retrieval, and their errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import FLICKR8K, LAVIS_TINY, needs_flickr8k

from search.cli import main

ROWS = ("itc", "itc+itm")
KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean")


def check_results(res: dict, n_images: int, n_texts: int) -> None:
    assert res["n_images"] == n_images and res["n_texts"] == n_texts
    for row in ROWS:
        for k in KEYS:
            assert 0.0 <= res[row][k] <= 100.0, (row, k, res[row][k])
        assert res[row]["txt_r1"] <= res[row]["txt_r5"] <= res[row]["txt_r10"]
        assert res[row]["img_r1"] <= res[row]["img_r5"] <= res[row]["img_r10"]


def test_demo_indexes_sample_photos_and_searches(tmp_path):
    cmd = [sys.executable, "-m", "search.cli", "demo", "a cat", "--dir", str(tmp_path), "--device", "cpu"]
    env = {**_env(), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^this run +10 scanned: 10 embedded, 0 reused, 0 unchanged", out.stdout, re.M), out.stdout
    assert "IndexStats" not in out.stdout and "timings" not in out.stdout  # a summary, not a repr
    ranked = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in ranked] == [1, 2, 3, 4, 5]
    scores = [float(r[1]) for r in ranked]
    assert scores == sorted(scores, reverse=True)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)  # incremental: no re-embedding
    assert again.returncode == 0 and re.search(r"10 scanned: 0 embedded, 0 reused, 10 unchanged", again.stdout)


def _env() -> dict:
    return dict(os.environ)


def test_bench_retrieval_lavis_fixture(small_model_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["bench", "retrieval", "--dataset", "lavis", "--root", str(LAVIS_TINY), "--split", "test",
               "--model", str(small_model_dir), "--k-test", "128", "--workers", "0", "--quiet", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "itc+itm" in printed and "txt_r1" in printed
    res = json.loads(out.read_text())
    check_results(res, 6, 12)
    assert res["k_test"] == 128 and res["model"] == "small-random"


@needs_flickr8k
def test_bench_retrieval_flickr8k_dev(small_model_dir, tmp_path):
    out = tmp_path / "res.json"
    rc = main(["bench", "retrieval", "--dataset", "flickr8k", "--root", str(FLICKR8K), "--split", "dev",
               "--model", str(small_model_dir), "--k-test", "8", "--quiet", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    check_results(res, 1000, 5000)
    # a random model is near chance: R@10 of 1000 images is 1% by chance (5% for i2t with 5 captions)
    assert res["itc"]["img_r10"] < 10 and res["itc"]["txt_r10"] < 25


def test_bench_errors_are_clear(tmp_path, capsys):
    assert main(["bench", "retrieval", "--dataset", "lavis", "--root", str(tmp_path / "nope"), "--split", "test"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "retrieval", "--dataset", "imagenet", "--root", str(tmp_path), "--split", "test"]) == 2
    assert "imagenet" in capsys.readouterr().err
    assert main(["bench", "retrieval", "--dataset", "lavis", "--root", str(LAVIS_TINY), "--split", "test",
                 "--model", str(tmp_path)]) == 2
    assert "neither" in capsys.readouterr().err


def test_bench_corrupt_image_names_the_file(small_model_dir, tmp_path, capsys):
    import shutil

    root = tmp_path / "lavis"
    shutil.copytree(LAVIS_TINY, root)
    (root / "images" / "red.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rc = main(["bench", "retrieval", "--dataset", "lavis", "--root", str(root), "--split", "test",
               "--model", str(small_model_dir), "--workers", "0", "--quiet"])
    assert rc == 2
    assert "red.png" in capsys.readouterr().err


def test_caption_cli_json_and_bad_files(small_model_dir, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    rc = main(["caption", str(tmp_path / "red.jpg"), str(tmp_path / "broken.jpg"), "--model", str(small_model_dir),
               "--json", "--max-length", "6", "--min-length", "3", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1  # one file failed, and the run still captioned the other
    assert "broken.jpg" in captured.err
    out = json.loads(captured.out)
    assert [r["path"] for r in out] == [str(tmp_path / "red.jpg")]
    assert isinstance(out[0]["caption"], str) and 1 <= len(out[0]["caption"].split()) <= 5  # at most 5 word pieces


def test_index_and_search_output_for_people_and_programs(small_model_dir, tmp_path, capsys):
    d = tmp_path / "index"
    args = ["--model", str(small_model_dir), "--device", "cpu", "--workers", "0"]
    assert main(["index", str(d), str(LAVIS_TINY / "images"), *args]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(None, 1) for line in out.splitlines() if line and not line.startswith("this run"))
    assert rows["index"].startswith(f"{d} (generation 1)") and rows["images"] == "6 in the index"
    assert re.search(r"^this run +6 scanned: 6 embedded, 0 reused", out, re.M)
    assert "IndexStats" not in out
    assert main(["index", str(d), str(LAVIS_TINY / "images"), *args, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["unchanged"] == 6 and stats["embedded"] == 0 and isinstance(stats["timings"], dict)
    assert main(["search", str(d), "a red square", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert set(hits[0]) == {"rank", "image_id", "path", "score", "itc", "itm", "image_sim", "caption", "metadata"}
    assert main(["search", str(d), "a red square", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3"] and all("itm" in line for line in lines)
    cut = hits[1]["score"]
    assert main(["search", str(d), "a red square", "-k", "3", "--min-score", str(cut), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == hits[:2]


def test_json_into_a_closed_pipe_ends_quietly(small_model_dir, tmp_path):
    """`qsearch search ... --json | head`: the reader goes away first; no BrokenPipeError traceback."""
    d = tmp_path / "index"
    assert main(["index", str(d), str(LAVIS_TINY / "images"), "--model", str(small_model_dir), "--device", "cpu",
                 "--workers", "0", "--json"]) == 0
    r, w = os.pipe()
    os.close(r)  # the reader has gone before anything is written
    proc = subprocess.run([sys.executable, "-m", "search.cli", "search", str(d), "red", "--json"], stdout=w,
                          stderr=subprocess.PIPE, text=True, timeout=300, env={**_env(), "HF_HUB_OFFLINE": "1"})
    os.close(w)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
