"""Tests for qformer.datasets: caption processing and the retrieval-set readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from qformer.datasets import (
    RetrievalSet,
    load_flickr8k,
    load_karpathy,
    load_lavis,
    load_retrieval_set,
    pre_caption,
)

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = REPO.parent / "shared/data/flickr8k"
LAVIS_TINY = REPO / "tests/fixtures/lavis_tiny"


def check_consistent(rs: RetrievalSet) -> None:
    """img2txt and txt2img are inverse maps covering every caption exactly once."""
    assert len(rs.img2txt) == len(rs.image_paths)
    assert len(rs.txt2img) == len(rs.texts)
    seen = sorted(t for caps in rs.img2txt for t in caps)
    assert seen == list(range(len(rs.texts)))
    for i, caps in enumerate(rs.img2txt):
        assert caps, f"image {i} has no captions"
        for t in caps:
            assert rs.txt2img[t] == i


def touch_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)


# ---------------------------------------------------------------------------------------------------------
# pre_caption


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("A child in a pink dress is climbing up a set of stairs .", "a child in a pink dress is climbing up a set of stairs"),
        ("A DOG!!  Running (fast): on #grass; ~yes~", "a dog running fast on grass yes"),
        ('He said "hi"*.', "he said hi"),
        ("  leading and trailing   spaces  \n", "leading and trailing spaces"),
        ("don't-stop, it's 3.5m", "don't-stop, it's 3 5m"),  # only .!"()*#:;~ are replaced
        ("", ""),
    ],
)  # fmt: skip
def test_pre_caption(raw: str, want: str) -> None:
    assert pre_caption(raw) == want


def test_pre_caption_truncates() -> None:
    caption = " ".join(f"w{i}" for i in range(60))
    assert pre_caption(caption) == " ".join(f"w{i}" for i in range(50))
    assert pre_caption(caption, max_words=3) == "w0 w1 w2"
    assert pre_caption("a b c", max_words=3) == "a b c"


# ---------------------------------------------------------------------------------------------------------
# Karpathy


def write_karpathy(root: Path, with_filepath: bool) -> Path:
    entries = []
    for n, split in enumerate(["train", "val", "test", "restval", "test", "val"]):
        entry = {
            "filename": f"img{n}.jpg",
            "split": split,
            "sentences": [{"raw": f"Image {n}, caption {c}.", "tokens": []} for c in range(2 + n % 2)],
        }
        if with_filepath:
            entry["filepath"] = "val2014" if split in ("val", "test") else "train2014"
        entries.append(entry)
        touch_image(root / (entry.get("filepath", "") or "") / entry["filename"])
    path = root / "dataset_tiny.json"
    path.write_text(json.dumps({"images": entries, "dataset": "tiny"}))
    return path


@pytest.mark.parametrize("with_filepath", [True, False])
def test_load_karpathy(tmp_path: Path, with_filepath: bool) -> None:
    path = write_karpathy(tmp_path, with_filepath)
    test = load_karpathy(path, tmp_path, "test")
    sub = "val2014/" if with_filepath else ""
    assert test.image_paths == [tmp_path / f"{sub}img2.jpg", tmp_path / f"{sub}img4.jpg"]
    assert test.texts == [
        "image 2, caption 0",
        "image 2, caption 1",
        "image 4, caption 0",
        "image 4, caption 1",
    ]
    assert test.img2txt == [[0, 1], [2, 3]]
    assert test.txt2img == [0, 0, 1, 1]
    check_consistent(test)

    val = load_karpathy(path, tmp_path, "val")
    assert [p.name for p in val.image_paths] == ["img1.jpg", "img5.jpg"]
    assert val.img2txt == [[0, 1, 2], [3, 4, 5]]
    assert load_karpathy(path, tmp_path, "dev").texts == val.texts
    train = load_karpathy(path, tmp_path, "train")  # train includes restval
    assert [p.name for p in train.image_paths] == ["img0.jpg", "img3.jpg"]
    check_consistent(train)


def test_load_karpathy_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset_missing.json"):
        load_karpathy(tmp_path / "dataset_missing.json", tmp_path, "test")
    path = write_karpathy(tmp_path, with_filepath=False)
    with pytest.raises(ValueError, match="split"):
        load_karpathy(path, tmp_path, "nope")
    (tmp_path / "img4.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="img4.jpg"):
        load_karpathy(path, tmp_path, "test")
    path.write_text(json.dumps({"images": [{"filename": "img0.jpg", "split": "train", "sentences": []}]}))
    with pytest.raises(ValueError, match="no images"):
        load_karpathy(path, tmp_path, "test")


def test_load_retrieval_set_karpathy(tmp_path: Path) -> None:
    write_karpathy(tmp_path, with_filepath=True)
    rs = load_retrieval_set("karpathy-tiny", tmp_path, "test")
    assert rs.image_paths[0] == tmp_path / "val2014/img2.jpg"
    path = write_karpathy(tmp_path / "images", with_filepath=False)  # root/images/ is used when present
    path.rename(tmp_path / "dataset_coco.json")
    rs = load_retrieval_set("coco", tmp_path, "test")
    assert rs.image_paths[0] == tmp_path / "images/img2.jpg"
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
        load_retrieval_set("flickr30k", tmp_path, "test")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_retrieval_set("imagenet", tmp_path, "test")


# ---------------------------------------------------------------------------------------------------------
# LAVIS


def test_load_lavis(tmp_path: Path) -> None:
    ann = [
        {"image": "val2014/a.jpg", "caption": ["A cat.", "A CAT on a mat!"]},
        {"image": "val2014/b.jpg", "caption": "One string caption (only)."},
        {"image": "c.png", "caption": ["x", "y", "z"]},
    ]
    for entry in ann:
        touch_image(tmp_path / entry["image"])
    path = tmp_path / "test.json"
    path.write_text(json.dumps(ann))
    rs = load_lavis(path, tmp_path)
    assert rs.image_paths == [tmp_path / "val2014/a.jpg", tmp_path / "val2014/b.jpg", tmp_path / "c.png"]
    assert rs.texts == ["a cat", "a cat on a mat", "one string caption only", "x", "y", "z"]
    assert rs.img2txt == [[0, 1], [2], [3, 4, 5]]
    assert rs.txt2img == [0, 0, 1, 2, 2, 2]
    check_consistent(rs)
    assert load_retrieval_set("lavis", tmp_path, "test").texts == rs.texts
    with pytest.raises(FileNotFoundError, match="val.json"):
        load_retrieval_set("lavis", tmp_path, "val")
    path.write_text("[]")
    with pytest.raises(ValueError, match="no images"):
        load_lavis(path, tmp_path)


def test_lavis_tiny_fixture() -> None:
    rs = load_retrieval_set("lavis", LAVIS_TINY, "test")
    assert len(rs.image_paths) == 6 and len(rs.texts) == 12
    assert rs.img2txt == [[2 * i, 2 * i + 1] for i in range(6)]
    check_consistent(rs)
    for path in rs.image_paths:
        with Image.open(path) as im:
            assert im.size == (32, 32)
    assert len({Image.open(p).convert("RGB").getpixel((0, 0)) for p in rs.image_paths}) == 6
    assert sum(f.stat().st_size for f in LAVIS_TINY.rglob("*") if f.is_file()) < 50_000


# ---------------------------------------------------------------------------------------------------------
# Flickr8k


def write_flickr8k(root: Path) -> None:
    names = [f"{1000 + n}_abc.jpg" for n in range(5)]
    for name in names:
        touch_image(root / "images" / name)
    lines = []
    for name in names:
        for c in reversed(range(5)):  # out of order on purpose: captions must be sorted by #n
            lines.append(f"{name}#{c}\t{name[:4]} caption {c} .")
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:3]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text(f"{names[4]}\n{names[3]}\n")


def test_load_flickr8k_tiny(tmp_path: Path) -> None:
    write_flickr8k(tmp_path)
    dev = load_flickr8k(tmp_path, "dev")
    assert dev.image_paths == [tmp_path / "images/1004_abc.jpg", tmp_path / "images/1003_abc.jpg"]
    assert dev.texts[:5] == [f"1004 caption {c}" for c in range(5)]
    assert dev.texts[5:] == [f"1003 caption {c}" for c in range(5)]
    assert dev.img2txt == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    check_consistent(dev)
    train = load_retrieval_set("flickr8k", tmp_path, "train")
    assert len(train.image_paths) == 3 and len(train.texts) == 15
    check_consistent(train)

    with pytest.raises(FileNotFoundError, match="Flickr_8k.testImages.txt"):
        load_flickr8k(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_flickr8k(tmp_path, "validation")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("\n")
    with pytest.raises(ValueError, match="no images"):
        load_flickr8k(tmp_path, "test")
    (tmp_path / "images/1003_abc.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1003_abc.jpg"):
        load_flickr8k(tmp_path, "dev")


def test_load_flickr8k_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Flickr_8k.devImages.txt"):
        load_flickr8k(tmp_path, "dev")


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"real Flickr8k not present at {FLICKR8K}")
def test_load_flickr8k_real_dev() -> None:
    dev = load_flickr8k(FLICKR8K, "dev")
    assert len(dev.image_paths) == 1000
    assert len(dev.texts) == 5000
    assert all(len(caps) == 5 for caps in dev.img2txt)
    check_consistent(dev)
    names = (FLICKR8K / "Flickr_8k.devImages.txt").read_text().split()
    assert [p.name for p in dev.image_paths] == names
    assert all(t == pre_caption(t) for t in dev.texts[:50])  # already processed
