"""A real headless Chromium (Debian's `chromium`, driven by Playwright) against the running `qsearch ui`.

Indexes a few real photos, types a query, uploads an image, applies a filter, tries path-traversal URLs,
switches the two query expansions (hybrid text search, caption expansion) one at a time, and saves a screenshot to `out/test-artifacts/ui-search.png` (QSEARCH_ARTIFACTS overrides the folder).
`.ci/run` installs Chromium with apt-get; elsewhere the test skips when it is missing.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from search.cli import main

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (apt-get install chromium)")
ARTIFACTS = Path(os.environ.get("QSEARCH_ARTIFACTS", Path(__file__).resolve().parents[1] / "out" / "test-artifacts"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SECRET = "qsearch-secret-7f3a9c"  # a file beside the collection that must never be served
CAPTIONS = {"chelsea": "a tabby cat looks up", "astronaut": "a woman in an orange space suit",
            "coffee": "a cup of coffee on a saucer", "rocket": "a rocket stands on the launch pad",
            "camera": "a man holds a tripod camera", "moon": "the grey surface of the moon",
            "brick": "a red brick wall", "grass": "a patch of green grass"}  # stored captions, for BM25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_model_dir):
    """Index 8 real photos (with `kind` and `caption` columns), start `qsearch ui`, yield its base URL."""
    from skimage import data as samples

    root = tmp_path_factory.mktemp("browser")
    photos = root / "photos"
    photos.mkdir()
    rows = []
    for name, caption in CAPTIONS.items():
        im = Image.fromarray(getattr(samples, name)()).convert("RGB")
        im.thumbnail((256, 256))
        im.save(photos / f"{name}.jpg")
        rows.append({"path": str(photos / f"{name}.jpg"), "kind": "animal" if name == "chelsea" else "other",
                     "caption": caption})
    with open(photos / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "kind", "caption"])
        w.writeheader()
        w.writerows(rows)
    (root / "secret.txt").write_text(SECRET)
    index = root / "index"
    assert main(["index", str(index), str(photos / "manifest.csv"), "--model", str(small_model_dir),
                 "--device", "cpu", "--workers", "0", "--json"]) == 0

    port = _free_port()
    log = open(root / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "ui", str(index), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # up to 2 minutes for Streamlit to start
            if proc.poll() is not None:
                pytest.fail(f"qsearch ui exited early:\n{(root / 'ui.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"qsearch ui did not start:\n{(root / 'ui.log').read_text()}")
        yield {"base": base, "photos": photos, "root": root, "log": root / "ui.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    with pytest.raises(OSError):  # stopping `qsearch ui` stops the server: nothing keeps serving
        urllib.request.urlopen(f"{base}/_stcore/health", timeout=2)


@pytest.fixture(scope="module")
def page(served):
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(120_000)  # the first search loads the model on a 2-core machine
        yield pg
        browser.close()


def card_paths(pg) -> list[str]:
    """File paths shown under the result thumbnails."""
    return [t for t in pg.locator('[data-testid="stCaptionContainer"]').all_inner_texts() if t.endswith(".jpg")]


def wait_for_results(pg, until=bool) -> list[str]:
    """The result cards' paths once the app is idle (no run in progress, no stale elements left from the
    previous run, the same cards on two polls in a row) and `until(paths)` holds (default: any results)."""
    last = None
    for _ in range(240):
        pg.wait_for_timeout(500)
        paths = card_paths(pg)
        busy = (pg.locator('[data-testid="stStatusWidget"]').count() > 0
                or pg.locator('[data-stale="true"]').count() > 0)
        if not busy and until(paths) and paths == last:
            return paths
        last = None if busy else paths
    raise AssertionError(f"expected results did not appear (last seen: {card_paths(pg)})")


def test_search_upload_filter_and_traversal_in_a_real_browser(served, page):
    pg, base = page, served["base"]
    pg.goto(base)
    pg.get_by_text("qsearch").first.wait_for()

    # 1. a text query: result images appear
    box = pg.get_by_role("textbox", name="Search", exact=True)
    box.fill("a cat sitting on a sofa")
    box.press("Enter")
    text_results = wait_for_results(pg)
    assert len(text_results) == 8
    images = pg.locator('[data-testid="stImage"] img')
    images.first.wait_for()
    assert images.count() == 8
    assert pg.evaluate("(img) => img.naturalWidth", images.first.element_handle()) > 0  # decoded, not broken
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "ui-search.png"), full_page=True)

    # 2. upload an image (combined with the text): results for the example
    pg.locator('input[type="file"]').set_input_files(str(served["photos"] / "rocket.jpg"))
    pg.get_by_text("· image", exact=False).first.wait_for()  # image-similarity scores now shown
    upload_results = wait_for_results(pg)
    assert upload_results[0].endswith("rocket.jpg")
    pg.screenshot(path=str(ARTIFACTS / "ui-upload.png"), full_page=True)

    # 3. a filter: kind = animal leaves only the cat
    pg.get_by_role("textbox", name="SQL WHERE").fill("kind = 'animal'")
    pg.get_by_role("textbox", name="SQL WHERE").press("Enter")
    filtered = wait_for_results(pg, until=lambda paths: len(paths) < len(upload_results))
    assert filtered == [str(served["photos"] / "chelsea.jpg")]

    # 4. path traversal: nothing outside the index is served
    for url in [f"{base}/../secret.txt", f"{base}/media/../../secret.txt", f"{base}/media/..%2F..%2Fsecret.txt",
                f"{base}/app/static/..%2F..%2F..%2Fetc%2Fpasswd", f"{base}/..%2F..%2F..%2Fetc%2Fpasswd",
                f"{base}/media/{served['root'] / 'secret.txt'}", f"{base}/component/..%2F..%2Fsecret.txt"]:
        r = pg.request.get(url)
        body = r.body()
        assert SECRET.encode() not in body and b"root:x:0:0" not in body, url
    pg.goto(f"{base}/?like=../secret.txt")
    pg.get_by_text("needs an image of this index").wait_for()
    assert card_paths(pg) == []
    pg.goto(f"{base}/?like={served['root'] / 'secret.txt'}")
    pg.get_by_text("needs an image of this index").wait_for()
    assert SECRET not in pg.content()


def test_hybrid_and_caption_expansion_are_two_toggles_in_a_real_browser(served, page):
    pg, base = page, served["base"]
    pg.goto(base)  # a new session: both expansions off
    pg.get_by_text("qsearch").first.wait_for()
    hybrid, expand = (pg.get_by_role("switch", name=n) for n in ("Hybrid text search", "Caption expansion"))
    flip = {n: pg.locator("label", has_text=n) for n in ("Re-rank with ITM", "Hybrid text search", "Caption expansion")}
    flip["Re-rank with ITM"].click()  # ITC only: the page shows the fused order

    # 1. hybrid text search: BM25 over the stored captions puts the one caption with the query's words first
    box = pg.get_by_role("textbox", name="Search", exact=True)
    box.fill("the launch pad")
    box.press("Enter")
    wait_for_results(pg)
    flip["Hybrid text search"].click()
    fused = wait_for_results(pg, until=lambda paths: paths[:1] == [str(served["photos"] / "rocket.jpg")])
    assert len(fused) == 8 and not expand.is_checked() and hybrid.is_checked()
    pg.screenshot(path=str(ARTIFACTS / "ui-hybrid.png"), full_page=True)

    # 2. caption expansion: an image-only query gains the image's generated caption as its text (ITC scores)
    box.fill("")
    box.press("Enter")
    pg.locator('input[type="file"]').set_input_files(str(served["photos"] / "coffee.jpg"))
    pg.get_by_text("· image", exact=False).first.wait_for()
    wait_for_results(pg)
    assert pg.get_by_text("· ITC", exact=False).count() == 0  # image only, hybrid on or not
    flip["Caption expansion"].click()
    pg.get_by_text("· ITC", exact=False).first.wait_for()
    assert len(wait_for_results(pg)) == 8 and expand.is_checked()
