"""`qsearch serve` as programs call it: every endpoint and every bad input (in-process, TestClient), a real
server process on 127.0.0.1 that follows the index while `qsearch index` adds to it and drains on SIGTERM,
and a schemathesis run against its OpenAPI schema."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from PIL import Image
from test_search import COLOURS

from search.cli import main
from search.service import ServiceConfig, check_bind, create_app, is_loopback

KEY = "test-key-0123456789abcdef"
MAX_UPLOAD = 256 * 1024
MAX_PIXELS = 2_000_000


def png(rgb=(200, 20, 20), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "PNG")
    return buf.getvalue()


def write_collection(root: Path, names) -> Path:
    """Coloured PNGs plus a manifest with colour, year and caption columns -> the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(names):
        rgb = COLOURS[name]
        im = Image.new("RGB", (64, 48), rgb)
        im.paste((255 - rgb[0], 255 - rgb[1], 255 - rgb[2]), (i * 6, 10, i * 6 + 5, 20))
        im.save(root / f"{name}.png")
        rows.append({"path": str(root / f"{name}.png"), "colour": name, "year": 2000 + i,
                     "caption": f"a plain {name} card"})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "colour", "year", "caption"])
        w.writeheader()
        w.writerows(rows)
    return manifest


def build(index: Path, sources, model_dir) -> None:
    assert main(["index", str(index), *map(str, sources), "--model", str(model_dir), "--device", "cpu",
                 "--workers", "0", "--json"]) == 0


@pytest.fixture(scope="module")
def index_dir(small_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    build(root / "index", [write_collection(root / "photos", COLOURS)], small_model_dir)
    return root / "index"


def config(index, **kw) -> ServiceConfig:
    return ServiceConfig(index=str(index), device="cpu", max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, **kw)


@pytest.fixture(scope="module")
def client(index_dir):
    with TestClient(create_app(config(index_dir))) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(index_dir):
    with TestClient(create_app(config(index_dir, api_key=KEY))) as c:
        yield c


def cli_json(capsys, *argv) -> object:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def same_hits(service: list[dict], cli: list[dict]) -> None:
    """The same results with the same fields; scores equal up to the re-ranker's rounding."""
    assert [sorted(h) for h in service] == [sorted(h) for h in cli]
    assert [(h["rank"], h["image_id"], h["path"], h["metadata"]) for h in service] == \
        [(h["rank"], h["image_id"], h["path"], h["metadata"]) for h in cli]
    for a, b in zip(service, cli, strict=True):
        for key in ("score", "itc", "itm", "image_sim"):
            assert (a[key] is None) == (b[key] is None)
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], abs=1e-3)


# ---- endpoints -------------------------------------------------------------------------------------------------
def test_search_returns_what_the_cli_prints(client, index_dir, capsys):
    r = client.post("/search", json={"text": "a red square", "k": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-index-generation"] == "1"
    hits = r.json()
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    same_hits(hits, cli_json(capsys, "search", str(index_dir), "a red square", "-k", "5", "--json"))
    for h in hits:
        assert h["score"] == pytest.approx(h["itm"] + h["itc"], abs=1e-5)


def test_search_options(client, index_dir, capsys):
    full = client.post("/search", json={"text": "a colourful picture", "k": 8, "rerank": 0}).json()
    assert all(h["itm"] is None for h in full) and len(full) == len(COLOURS)
    page = client.post("/search", json={"text": "a colourful picture", "k": 3, "offset": 3, "rerank": 0}).json()
    assert [h["image_id"] for h in page] == [h["image_id"] for h in full[3:6]]
    filtered = client.post("/search", json={"text": "anything", "k": 10, "where": "colour IN (?, ?) AND year > ?",
                                            "params": ["red", "blue", 1999]}).json()
    assert sorted(h["metadata"]["colour"] for h in filtered) == ["blue", "red"]
    cut = full[2]["score"]
    above = client.post("/search", json={"text": "a colourful picture", "k": 8, "rerank": 0, "min_score": cut}).json()
    assert above == full[:3] and all(h["score"] >= cut for h in above)
    assert cli_json(capsys, "search", str(index_dir), "a colourful picture", "-k", "8", "--rerank", "0",
                    "--min-score", str(cut), "--json") == above
    hybrid = client.post("/search", json={"text": "plain purple card", "k": 3, "rerank": 0, "hybrid": True}).json()
    assert len(hybrid) == 3


def test_search_by_image_finds_itself_first(client, index_dir):
    purple = (index_dir.parent / "photos" / "purple.png").read_bytes()
    r = client.post("/search/image", files={"image": ("q.png", purple, "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    hits = r.json()
    assert hits[0]["path"].endswith("purple.png") and hits[0]["image_sim"] == pytest.approx(1.0, abs=1e-3)
    combined = client.post("/search/image", files={"image": ("q.png", purple, "image/png")},
                           data={"text": "purple", "k": "3", "where": "year >= ?", "params": "[2003]"}).json()
    assert combined[0]["itm"] is not None and all(h["metadata"]["year"] >= 2003 for h in combined)


def test_captions_of(client, index_dir, capsys):
    green = index_dir.parent / "photos" / "green.png"
    r = client.post("/captions-of", files={"image": ("g.png", green.read_bytes(), "image/png")}, data={"k": "3"})
    assert r.status_code == 200
    assert r.json() == cli_json(capsys, "search", str(index_dir), "--captions-of", str(green), "-k", "3", "--json")
    assert [h["rank"] for h in r.json()] == [1, 2, 3] and {"caption", "score", "image_id"} <= set(r.json()[0])


def test_images_and_thumbnails_by_id_with_etags(client, index_dir):
    hit = client.post("/search", json={"text": "red", "k": 1, "rerank": 0}).json()[0]
    r = client.get(f"/images/{hit['image_id']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == Path(hit["path"]).read_bytes()
    assert r.headers["etag"] == f'"{hit["metadata"]["sha256"]}"' and "max-age" in r.headers["cache-control"]
    again = client.get(f"/images/{hit['image_id']}", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content
    t = client.get(f"/thumbnails/{hit['image_id']}")
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg" and t.headers["etag"] != r.headers["etag"]
    with Image.open(io.BytesIO(t.content)) as im:
        assert im.format == "JPEG" and im.size == (64, 48)
    assert client.get(f"/thumbnails/{hit['image_id']}", headers={"If-None-Match": t.headers["etag"]}).status_code == 304


def test_info_and_health(client, index_dir, capsys):
    r = client.get("/info")
    assert r.status_code == 200 and r.json() == cli_json(capsys, "info", str(index_dir), "--json")
    assert client.get("/health").json() == {"status": "ok", "generation": 1, "reload_error": False}
    schema = client.get("/openapi.json").json()
    assert {"/search", "/search/image", "/captions-of", "/images/{image_id}", "/thumbnails/{image_id}", "/info",
            "/health"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


# ---- bad input: 4xx JSON naming the problem --------------------------------------------------------------------
@pytest.mark.parametrize("body, status, words", [
    ({"text": ""}, 400, "empty"),
    ({"text": "   "}, 400, "empty"),
    ({"text": "a" * 2001}, 422, "text"),
    ({"text": "red", "k": 0}, 422, "k"),
    ({"text": "red", "k": 10**6}, 422, "k"),
    ({"text": "red", "rerank": -1}, 422, "rerank"),
    ({"text": "red", "offset": -5}, 422, "offset"),
    ({"text": "red", "colour": "red"}, 422, "colour"),
    ({"k": 3}, 422, "text"),
    ({"text": "red", "where": "colour = "}, 400, "bad filter"),
    ({"text": "red", "where": "1=1; DROP TABLE meta"}, 400, "filter"),
    ({"text": "red", "where": "EXISTS (SELECT * FROM read_csv('/etc/passwd'))"}, 400, "filter"),
    ({"text": "red", "where": "colour = ?", "params": [{"a": 1}]}, 422, "params"),
    ({"text": "red", "where": "year > ?"}, 400, "filter"),
])
def test_bad_search_requests(client, body, status, words):
    r = client.post("/search", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and words in r.json()["detail"]


def test_bad_bodies_and_uploads(client):
    r = client.post("/search", content=b'{"text": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    r = client.post("/search", json={"text": "red", "where": "x" * 70_000})
    assert r.status_code == 413 and "too large" in r.json()["detail"]

    def chunks():  # no Content-Length: the cap counts what arrives
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413

    def upload(data: bytes, **form):
        return client.post("/search/image", files={"image": ("q.png", data, "image/png")}, data=form)

    for data, status, words in [(b"", 400, "empty"), (b"GIF89a not really", 400, "not an image"),
                                (b"%PDF-1.4\n" * 100, 400, "not an image"),
                                (png(size=(2000, 1500)), 400, "decompression bomb"),  # 3 MP > MAX_PIXELS
                                (os.urandom(MAX_UPLOAD + 1), 413, "too large")]:
        r = upload(data)
        assert r.status_code == status and words in r.json()["detail"], (status, r.text)
    assert upload(png(), params="not json").status_code == 422
    assert upload(png(), params='[{"a": 1}]').status_code == 422
    assert upload(png(), k="many").status_code == 422
    assert upload(png(), where="colour = ", text="red").status_code == 400
    assert client.post("/search/image", data={"text": "red"}).status_code == 422  # no image
    r = client.post("/captions-of", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n broken", "image/png")})
    assert r.status_code == 400 and "not an image" in r.json()["detail"]


CRAFTED = ["../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "/etc/passwd",
           "..", "-1", "1e3", "0x1", "9" * 30, "0%20OR%201", "%00"]


@pytest.mark.parametrize("endpoint", ["images", "thumbnails"])
def test_files_only_through_ids_of_the_index(client, endpoint):
    for crafted in CRAFTED:
        r = client.get(f"/{endpoint}/{crafted}")
        assert r.status_code in (404, 422), (crafted, r.status_code)
        assert b"root:" not in r.content and r.headers["content-type"] == "application/json"
    r = client.get(f"/{endpoint}/{len(COLOURS) + 100}")
    assert r.status_code == 404 and "not an image of this index" in r.json()["detail"]
    for q in ("path=/etc/passwd", "path=../../etc/passwd", "file=%2Fetc%2Fpasswd"):  # unknown parameters: ignored
        r = client.get(f"/{endpoint}/0?{q}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/")
    for q in ("text=../../etc/passwd", "index=/etc"):
        assert client.get(f"/info?{q}").json()["counts"]["images"] == len(COLOURS)


def test_changed_and_removed_files_are_not_served(small_model_dir, tmp_path):
    build(tmp_path / "index", [write_collection(tmp_path / "photos", ["red", "green", "blue"])], small_model_dir)
    with TestClient(create_app(config(tmp_path / "index", reload_interval_s=3600))) as c:
        ids = {Path(h["path"]).stem: h["image_id"] for h in c.post("/search", json={"text": "x", "rerank": 0}).json()}
        (tmp_path / "photos" / "green.png").write_bytes(png((1, 2, 3)))  # changed since it was indexed
        r = c.get(f"/images/{ids['green']}")
        assert r.status_code == 404 and "changed since it was indexed" in r.json()["detail"]
        (tmp_path / "photos" / "blue.png").unlink()  # gone
        assert c.get(f"/thumbnails/{ids['blue']}").status_code == 404
        assert main(["remove", str(tmp_path / "index"), str(tmp_path / "photos" / "red.png"), "--json"]) == 0
        assert c.get(f"/images/{ids['red']}").status_code == 200  # generation 1 until the switch
        assert c.app.state.served.check()  # what the watcher thread does every reload_interval_s
        assert c.get("/health").json()["generation"] == 2
        r = c.get(f"/images/{ids['red']}")
        assert r.status_code == 404 and "not an image of this index" in r.json()["detail"]
        assert c.get(f"/thumbnails/{ids['red']}").status_code == 404
        hits = c.post("/search", json={"text": "x", "rerank": 0})
        assert hits.headers["x-index-generation"] == "2" and ids["red"] not in {h["image_id"] for h in hits.json()}
        assert not c.app.state.served.check()  # nothing newer


# ---- the API key -----------------------------------------------------------------------------------------------
def test_api_key_missing_wrong_right(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    body = {"text": "red", "k": 1}
    r = keyed.post("/search", json=body)
    assert r.status_code == 401 and "missing API key" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    for wrong in (f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer"):
        r = keyed.post("/search", json=body, headers={"Authorization": wrong})
        assert r.status_code == 401 and "wrong API key" in r.json()["detail"], wrong
    ok = {"Authorization": f"Bearer {KEY}"}
    assert keyed.post("/search", json=body, headers=ok).status_code == 200
    for path in ("/info", "/images/0", "/thumbnails/0"):
        assert keyed.get(path).status_code == 401 and keyed.get(path, headers=ok).status_code == 200
    r = keyed.post("/search/image", files={"image": ("q.png", os.urandom(MAX_UPLOAD + 1), "image/png")})
    assert r.status_code == 401  # refused before the body is read
    assert keyed.get("/health").status_code == 200  # liveness needs no key
    schema = keyed.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert KEY not in json.dumps(schema) and KEY not in caplog.text
    assert KEY not in repr(config("x", api_key=KEY))


def test_refuses_public_address_without_key(index_dir, tmp_path, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="API key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", KEY)
    assert main(["serve", str(index_dir), "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in capsys.readouterr().err
    (tmp_path / "short").write_text("abc\n")
    assert main(["serve", str(index_dir), "--host", "0.0.0.0", "--api-key-file", str(tmp_path / "short")]) == 2
    assert "too short" in capsys.readouterr().err
    assert main(["serve", str(index_dir), "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "API key file" in capsys.readouterr().err


def test_cors_is_off_unless_asked(client, index_dir):
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/search", headers=preflight).headers
    r = client.post("/search", json={"text": "red", "k": 1}, headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(config(index_dir, api_key=KEY, cors_origins=("https://app.example",)))) as c:
        r = c.options("/search", headers={**preflight, "Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in c.options("/search", headers=preflight).headers


# ---- a real server process -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            r = httpx.get(f"{base}/health", timeout=2)
            if r.status_code == 200 and r.json()["status"] == "ok":
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not come up")


def test_served_index_follows_new_generations_and_drains_on_sigterm(small_model_dir, tmp_path):
    manifest = write_collection(tmp_path / "photos", ["red", "green", "blue"])
    build(tmp_path / "index", [manifest], small_model_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "serve", str(tmp_path / "index"), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"], env=env, cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_healthy(base, proc)["generation"] == 1
        query = {"text": "a colourful card", "k": 10, "rerank": 4}
        first = httpx.post(f"{base}/search", json=query)
        assert first.status_code == 200 and len(first.json()) == 3 and first.headers["x-index-generation"] == "1"

        seen, errors, stop = [], [], threading.Event()

        def hammer():  # queries all along the update: none may fail, each sees a whole generation
            with httpx.Client(base_url=base, timeout=30) as c:
                while not stop.is_set():
                    r = c.post("/search", json=query)
                    if r.status_code != 200:
                        errors.append(r.text)
                    else:
                        seen.append((r.headers["x-index-generation"], len(r.json())))

        t = threading.Thread(target=hammer)
        t.start()
        more = write_collection(tmp_path / "more", ["yellow", "purple"])
        build(tmp_path / "index", [manifest, more], small_model_dir)  # commits generation 2 underneath
        deadline = time.time() + 30
        while httpx.get(f"{base}/health").json()["generation"] < 2 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        stop.set()
        t.join()
        assert not errors
        assert set(seen) <= {("1", 3), ("2", 5)} and ("2", 5) in seen  # never a half-written generation
        after = httpx.post(f"{base}/search", json=query)
        assert after.headers["x-index-generation"] == "2"
        assert {Path(h["path"]).stem for h in after.json()} == {"red", "green", "blue", "yellow", "purple"}
        new_id = next(h["image_id"] for h in after.json() if h["path"].endswith("yellow.png"))
        assert httpx.get(f"{base}/images/{new_id}").content == (tmp_path / "more" / "yellow.png").read_bytes()

        # SIGTERM while requests are in flight: they are answered, then the process exits 0
        results: list[int | str] = []
        answered = threading.Event()

        def one():
            for _ in range(3):
                try:
                    code = httpx.post(f"{base}/search", json={**query, "rerank": 5}, timeout=30).status_code
                except httpx.ConnectError:  # arrived after the listening socket closed: refused, never dropped
                    code = "refused"
                results.append(code)
                answered.set()

        threads = [threading.Thread(target=one) for _ in range(8)]
        for th in threads:
            th.start()
        assert answered.wait(timeout=60)  # the server is busy with the others now
        proc.send_signal(signal.SIGTERM)
        for th in threads:
            th.join()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert set(results) <= {200, "refused"} and 200 in results, results
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- schemathesis: no 5xx on any request the schema allows ------------------------------------------------------
@pytest.fixture(scope="module")
def live_url(index_dir):
    """The service in a uvicorn thread on 127.0.0.1 (loopback only), with an API key."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(config(index_dir, api_key=KEY)), host="127.0.0.1",
                                           port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_schemathesis_no_server_errors(live_url):
    """Every operation of the OpenAPI schema, a fixed number of generated requests each, against 127.0.0.1."""
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7
    calls: list[int] = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {KEY}"}
            response = case.call(base_url=live_url, timeout=30)
            calls.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                assert response.headers["content-type"][0].startswith("application/json"), response.headers
                assert response.json()["detail"]

        check()
    assert len(calls) >= 7 * 3 and calls.count(200) >= 7 and 401 not in calls
