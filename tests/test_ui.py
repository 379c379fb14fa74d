"""The Streamlit search UI, driven with Streamlit's AppTest: queries, filters, paging, error messages, safety.

The browser test (a real Chromium driving the running app) is tests/test_ui_browser.py.
"""

from __future__ import annotations

import csv
import io

import pytest
from PIL import Image, ImageOps

from search.cli import main
from ui import core

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest

APP = str(core.__file__).replace("core.py", "app.py")
SAMPLES = ["chelsea", "astronaut", "coffee", "rocket", "camera", "moon", "brick", "grass", "hubble_deep_field",
           "retina"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """30 photos (scikit-image's samples, plus mirrored and cropped copies), a `kind` column, a broken file."""
    from skimage import data as samples

    root = tmp_path_factory.mktemp("ui_photos")
    rows = []
    for name in SAMPLES:
        im = Image.fromarray(getattr(samples, name)()).convert("RGB")
        im.thumbnail((256, 256))
        variants = {"": im, "_mirror": ImageOps.mirror(im), "_crop": im.crop((0, 0, im.width * 2 // 3, im.height))}
        for suffix, v in variants.items():
            p = root / f"{name}{suffix}.jpg"
            v.save(p)
            rows.append({"path": str(p), "kind": "cat" if name == "chelsea" else "other", "year": 2000 + len(rows),
                         "taken": f"2021-01-{len(rows) + 1:02d}"})
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows.append({"path": str(root / "broken.jpg"), "kind": "other", "year": 1999, "taken": "2020-12-31"})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "kind", "year", "taken"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def index_dir(collection, small_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ui_idx") / "index"
    assert main(["index", str(d), str(collection / "manifest.csv"), "--model", str(small_model_dir),
                 "--device", "cpu", "--workers", "0", "--json"]) == 0
    return d


# captions for the captioned index: each names its photo with words no other caption uses
CAPTIONS = {"chelsea": "a tabby cat looks up", "astronaut": "a woman in an orange space suit",
            "coffee": "a cup of coffee on a saucer", "rocket": "a rocket stands on the launch pad",
            "camera": "a man holds a tripod camera", "moon": "the grey surface of the moon",
            "brick": "a red brick wall", "grass": "a patch of green grass", "hubble_deep_field": "galaxies in space",
            "retina": "a scan of an eye"}


@pytest.fixture(scope="module")
def captioned_index(collection, small_model_dir, tmp_path_factory):
    """The ten original photos with a `caption` column, for hybrid (BM25 + dense) text search."""
    manifest = collection / "captioned.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption"])
        w.writeheader()
        w.writerows({"path": str(collection / f"{n}.jpg"), "caption": c} for n, c in CAPTIONS.items())
    d = tmp_path_factory.mktemp("ui_captioned") / "index"
    assert main(["index", str(d), str(manifest), "--model", str(small_model_dir),
                 "--device", "cpu", "--workers", "0", "--json"]) == 0
    return d


def app(index_dir, monkeypatch, **query_params) -> AppTest:
    monkeypatch.setenv("QSEARCH_INDEX", str(index_dir))
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in query_params.items():
        at.query_params[k] = v
    return at.run()


def results(at: AppTest) -> list[tuple[int, str]]:
    """(rank, path) of the result cards, by rank (the element tree lists the grid column by column)."""
    ranks = [int(m.value.split("**#")[1].split("**")[0]) for m in at.markdown if m.value.startswith("**#")]
    paths = [c.value for c in at.caption if c.value.endswith(".jpg")]
    assert len(ranks) == len(paths)
    return sorted(zip(ranks, paths, strict=True))


def result_ranks(at: AppTest) -> list[int]:
    return [r for r, _ in results(at)]


def result_paths(at: AppTest) -> list[str]:
    return [p for _, p in results(at)]


def test_text_query_shows_ranked_results_with_scores(index_dir, monkeypatch):
    at = app(index_dir, monkeypatch)
    assert not at.exception and not at.error
    at.text_input(key="q").input("a cat sitting on a sofa").run()
    assert not at.exception and not at.error
    assert result_ranks(at) == list(range(1, 13))  # first page: 12 results
    scores = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert all("fused" in s and "ITC" in s and "ITM" in s for s in scores)  # re-ranked by default
    assert len(at.image) == 12 and all(i.value[0].endswith(".jpg") for i in at.image)  # thumbnails (JPEG)
    assert all(p.startswith(str(index_dir.parent.parent)) or p.endswith(".jpg") for p in result_paths(at))


def test_rerank_toggle_off_shows_itc_only(index_dir, monkeypatch):
    at = app(index_dir, monkeypatch)
    at.toggle(key="rerank_on").set_value(False)
    at.text_input(key="q").input("a rocket").run()
    scores = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert scores and all("ITC" in s and "ITM" not in s for s in scores)


def score_lines(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("**#")]


def test_hybrid_toggle_fuses_bm25_over_stored_captions(captioned_index, monkeypatch):
    from search.engine import Searcher

    searcher = Searcher(captioned_index)
    at = app(captioned_index, monkeypatch)
    at.toggle(key="rerank_on").set_value(False)  # ITC only: the fused order is what the page shows
    for query, photo in (("a saucer", "coffee.jpg"), ("the launch pad", "rocket.jpg")):
        at.toggle(key="hybrid").set_value(False)
        at.text_input(key="q").input(query).run()
        dense = [h.path for h in searcher.search(query, k=12, rerank=0)]
        assert result_paths(at) == dense  # off: the dense ranking alone
        at.toggle(key="hybrid").set_value(True).run()
        assert not at.error and not at.exception
        fused = result_paths(at)
        assert fused == [h.path for h in searcher.search(query, k=12, rerank=0, hybrid=True)]
        assert fused[0].endswith(photo)  # the one caption with the query's words leads the fused ranking
    assert not at.toggle(key="expand").value  # the other expansion stays off


def test_caption_expansion_toggle_adds_the_image_caption_to_an_image_query(index_dir, monkeypatch, collection):
    at = app(index_dir, monkeypatch)
    data = (collection / "coffee.jpg").read_bytes()
    at.file_uploader(key="upload").set_value(("query.jpg", data, "image/jpeg")).run()
    assert score_lines(at) and all("image" in s and "ITC" not in s for s in score_lines(at))  # image only
    at.toggle(key="hybrid").set_value(True).run()  # hybrid is for text: an image query stays image only
    assert not at.error and all("ITC" not in s for s in score_lines(at))
    at.toggle(key="hybrid").set_value(False)
    at.toggle(key="expand").set_value(True).run()
    assert not at.error and not at.exception
    lines = score_lines(at)  # the generated caption is now the query's text: ITC and ITM scores appear
    assert lines and all("image" in s and "ITC" in s and "ITM" in s for s in lines)


def test_paging_walks_through_all_results(index_dir, monkeypatch):
    at = app(index_dir, monkeypatch)
    at.text_input(key="q").input("a photo").run()
    seen = result_paths(at)
    assert result_ranks(at) == list(range(1, 13)) and at.button(key="prev").disabled
    at.button(key="next").click().run()
    assert result_ranks(at) == list(range(13, 25))
    seen += result_paths(at)
    at.button(key="next").click().run()
    assert result_ranks(at) == list(range(25, 31))  # 30 images indexed (the broken file was skipped)
    assert at.button(key="next").disabled
    seen += result_paths(at)
    assert len(seen) == len(set(seen)) == 30
    at.button(key="prev").click().run()
    assert result_ranks(at) == list(range(13, 25))


def test_choice_filter_and_range_filter_narrow_the_results(index_dir, monkeypatch):
    at = app(index_dir, monkeypatch)
    at.text_input(key="q").input("an animal").run()
    assert len(result_ranks(at)) == 12
    at.multiselect(key="filter_kind").set_value(["cat"]).run()
    paths = result_paths(at)
    assert len(paths) == 3 and all("chelsea" in p for p in paths)
    at.multiselect(key="filter_kind").set_value([]).run()
    at.slider(key="filter_year").set_value((2000, 2002)).run()  # the first three manifest rows
    assert sorted(result_paths(at)) == sorted(p for p in result_paths(at) if "chelsea" in p)
    assert len(result_paths(at)) == 3


def test_date_filter_keeps_whole_days(index_dir, monkeypatch):
    import datetime as dt

    at = app(index_dir, monkeypatch)
    at.text_input(key="q").input("a photo").run()
    at.date_input(key="filter_taken").set_value((dt.date(2021, 1, 4), dt.date(2021, 1, 6))).run()
    paths = result_paths(at)  # manifest rows 4-6: the astronaut and its two copies
    assert len(paths) == 3 and all("astronaut" in p for p in paths)


def test_free_sql_where_filters_and_rejects_injection(index_dir, monkeypatch, collection):
    at = app(index_dir, monkeypatch)
    at.text_input(key="q").input("a photo").run()
    at.text_input(key="where").input("kind = 'cat' AND width > 10").run()
    assert len(result_paths(at)) == 3
    at.text_input(key="where").input("1=1; DROP TABLE meta").run()
    assert at.error and "not allowed" in at.error[0].value
    at.text_input(key="where").input("1=1) OR (SELECT count(*) FROM read_text('/etc/passwd')) > 0 OR (1=1").run()
    assert at.error  # external access is off in the filter's DuckDB: an error, not a read
    assert "root:" not in " ".join(e.value for e in at.error)
    at.text_input(key="where").input("").run()
    assert not at.error and len(result_ranks(at)) == 12  # nothing was dropped: the index is intact


def test_image_upload_searches_by_example(index_dir, monkeypatch, collection):
    at = app(index_dir, monkeypatch)
    data = (collection / "rocket.jpg").read_bytes()
    at.file_uploader(key="upload").set_value(("query.jpg", data, "image/jpeg")).run()
    assert not at.error and not at.exception
    scores = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert scores and all("image" in s for s in scores)
    assert "rocket" in result_paths(at)[0]  # the same photo is its own best match
    at.text_input(key="q").input("a rocket on a launch pad").run()  # combined text + image
    scores = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert scores and all("ITM" in s and "image" in s for s in scores)


def test_upload_that_is_not_an_image_gets_a_clear_message(index_dir, monkeypatch):
    at = app(index_dir, monkeypatch)
    at.file_uploader(key="upload").set_value(("notes.jpg", b"this is not a picture", "image/jpeg")).run()
    assert at.error and "not an image" in at.error[0].value
    assert not at.exception and not result_ranks(at)


def test_more_like_this_and_caption_on_demand(index_dir, monkeypatch):
    at = app(index_dir, monkeypatch)
    at.text_input(key="q").input("a cup of coffee").run()
    first = result_paths(at)[0]
    like_buttons = [b for b in at.button if b.key and b.key.startswith("like_")]
    like_buttons[0].click().run()
    assert any(f"Images like {first}" in i.value for i in at.info)
    assert result_paths(at)[0] == first  # an image is most like itself
    before = [m.value for m in at.markdown]
    cap = [b for b in at.button if b.key and b.key.startswith("cap_")][0]
    cap.click().run()
    assert not at.exception
    after = [m.value for m in at.markdown]
    assert after != before and "_no caption stored_" in before  # the first card now shows a generated caption
    at.button(key="clear_like").click().run()
    assert not result_ranks(at)  # the query text was replaced by the example image; clearing it clears all


def test_url_like_parameter_is_an_image_id_never_a_path(index_dir, monkeypatch):
    at = app(index_dir, monkeypatch, like="../../../../etc/passwd")
    assert at.error and "needs an image of this index" in at.error[0].value
    assert not result_ranks(at)
    at = app(index_dir, monkeypatch, like="0")
    assert result_ranks(at)[:1] == [1]


def test_index_page_shows_count_model_build_and_skipped(index_dir, monkeypatch):
    at = app(index_dir, monkeypatch)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "30" and metrics["Skipped files"] == "1"
    text = " ".join(m.value for m in at.markdown)
    assert "small-random" in text and "Built" in text
    skipped = at.dataframe[0].value
    assert "broken.jpg" in skipped["path"].iloc[0] and skipped["reason"].iloc[0]


def test_missing_and_empty_index_messages(tmp_path, monkeypatch, small_model_dir):
    at = app(tmp_path / "nowhere", monkeypatch)
    assert at.error and "No index at" in at.error[0].value
    empty = tmp_path / "empty_photos"
    empty.mkdir()
    assert main(["index", str(tmp_path / "empty"), str(empty), "--model", str(small_model_dir),
                 "--device", "cpu", "--workers", "0", "--json"]) == 0
    at = app(tmp_path / "empty", monkeypatch)
    assert at.warning and "empty" in at.warning[0].value


def test_no_results_message(index_dir, monkeypatch):
    at = app(index_dir, monkeypatch)
    at.text_input(key="q").input("a dog").run()
    at.text_input(key="where").input("year > 5000").run()
    assert any("No results" in i.value for i in at.info)


def test_core_reads_images_only_through_index_ids(index_dir, collection):
    from indexer import Index

    index = Index.open(index_dir)
    for crafted in ["../../../../etc/passwd", str(collection / "manifest.csv"), "/etc/passwd", "-1", "10**9",
                    "0 OR 1", str(len(index) + 100)]:
        with pytest.raises(core.NotIndexed):
            core.thumbnail_bytes(index, crafted)
    jpeg = core.thumbnail_bytes(index, 0)
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.format == "JPEG" and max(im.size) <= core.THUMBNAIL_SIZE


def test_thumbnail_of_a_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    from skimage import data as samples

    big = Image.fromarray(samples.astronaut()).resize((2400, 2400), Image.Resampling.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=92)

    class OneImage:  # what thumbnail_bytes needs of an index: the stored path of an id
        def paths(self, ids):
            return [str(tmp_path / "big.jpg") for _ in ids]

    with Image.open(io.BytesIO(core.thumbnail_bytes(OneImage(), 0))) as im:
        thumb = im.convert("RGB")
    assert thumb.size == (core.THUMBNAIL_SIZE, core.THUMBNAIL_SIZE)
    assert core.read_indexed_image(OneImage(), 0, draft_size=core.THUMBNAIL_SIZE).size == (600, 600)  # 1/4 scale
    full = big.copy()
    full.thumbnail((core.THUMBNAIL_SIZE,) * 2, Image.Resampling.BICUBIC)
    diff = sum(abs(a - b) for a, b in zip(thumb.tobytes(), full.tobytes(), strict=True)) / len(full.tobytes())
    assert diff < 6  # the same picture, within JPEG and resampling noise (mean abs difference per channel)
