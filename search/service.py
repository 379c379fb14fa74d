"""`qsearch serve`: the engine behind an HTTP API (FastAPI on uvicorn).

Endpoints (JSON; every result is its type's `to_dict()`, as `qsearch … --json` prints it):
    POST /search            text query: text, k, offset, rerank, where, params, hybrid, expand, min_score
    POST /search/image      query by example: a multipart upload `image`, the same options as form fields
    POST /captions-of       image -> the stored captions, ranked
    GET  /images/{id}       an indexed file; GET /thumbnails/{id}: its JPEG thumbnail (ETag, cache headers)
    GET  /info              what the index holds (`qsearch info --json`); GET /health: liveness, no key needed
The index generation a result came from is in the `X-Index-Generation` header.

Security: files are read only through image ids of the current index (`search.images`); the API key is a
bearer token compared in constant time and never logged; request bodies, uploads (bytes and pixels) and
queries are capped; CORS is off unless origins are given; bad input gets a 4xx JSON `{"detail": …}`.

Concurrency: the model and the index are loaded once. Every engine call runs on one engine thread, in
arrival order, so torch's threads are never oversubscribed; text searches waiting together run as one batch.
A watcher thread opens each newly committed generation (the writer's commit protocol: `indexer.store`),
warms it up, then switches to it; requests under way finish on the generation they started with.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import ipaddress
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from indexer.errors import IndexStoreError
from indexer.store import gen_file, read_current
from search.engine import MAX_QUERY_CHARS, CaptionHit, Hit, QueryError, Searcher
from search.first_stage import BATCH_SCAN_MIN
from search.images import NotIndexed, indexed_bytes, read_upload, thumbnail
from search.jsonout import dumps

log = logging.getLogger("qsearch.serve")

MAX_K = 1000  # results per request
MAX_OFFSET = 100_000
MAX_RERANK = 1024  # ITM re-ranking depth
MAX_PARAMS = 64  # values bound into a filter
PUBLIC_PATHS = {"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"}  # no key needed
GENERATION_HEADER = "X-Index-Generation"


@dataclass
class ServiceConfig:
    """How `qsearch serve` runs (the command line's options)."""

    index: str
    device: str = "cpu"
    api_key: str | None = field(default=None, repr=False)  # never printed
    itm_precision: str = "auto"
    rescore: int = 512
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024  # JSON requests
    max_upload_bytes: int = 20 * 1024 * 1024  # multipart requests (the image and its form fields)
    max_pixels: int = 40_000_000  # an upload's pixels, checked before it is decoded
    reload_interval_s: float = 0.5  # how often CURRENT is checked for a newer generation
    batch_wait_s: float = 0.003  # how long a re-ranked search waits for others to join its batch
    max_batch: int = 16
    max_queue: int = 256  # waiting engine calls; beyond that, 503


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the service on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def read_api_key(path: str | Path) -> str:
    """The API key in a file (surrounding whitespace dropped). ValueError when it is empty or unreadable."""
    try:
        key = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the API key file {path}: {e}") from e
    if len(key) < 16:
        raise ValueError(f"the API key in {path} is too short (at least 16 characters)")
    return key


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse a non-loopback address without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to listen on {host} without an API key: give --api-key-file, or bind "
                         "127.0.0.1")


# ---- the served index ------------------------------------------------------------------------------------------
class ServedIndex:
    """The `Searcher` over the index's current generation. `watch()` switches to each newer committed
    generation, with the same model, once it has opened and answered a first query."""

    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.searcher = Searcher(cfg.index, device=cfg.device, rescore=cfg.rescore, itm_precision=cfg.itm_precision)
        self.reload_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warm(self.searcher)

    @property
    def generation(self) -> int:
        return int(self.searcher.index.manifest["generation"])

    def _warm(self, s: Searcher) -> None:
        # memory maps touched, the scan copies built: one query's, and a batch's (search.first_stage)
        s.search_many([{"text": "warm up", "k": 1, "rerank": 0}])
        s.search_many([{"text": "warm up", "k": 1, "rerank": 0}] * BATCH_SCAN_MIN)

    def check(self) -> bool:
        """Switch to a newer committed generation if there is one -> whether it switched. A generation that
        cannot be opened leaves the current one serving, and the reason in `reload_error`."""
        try:
            name = read_current(Path(self.cfg.index))
        except IndexStoreError as e:
            self.reload_error = str(e)
            return False
        if name == gen_file(self.generation):
            return False
        try:
            new = Searcher(self.cfg.index, model=self.searcher.model, device=self.cfg.device,
                           rescore=self.cfg.rescore, itm_precision=self.cfg.itm_precision)
            if new.index.manifest["generation"] <= self.generation:
                return False
            self._warm(new)
        except (IndexStoreError, OSError, ValueError) as e:
            self.reload_error = f"generation {name} not loaded: {e}"
            log.warning("keeping generation %d: %s", self.generation, self.reload_error)
            return False
        old, self.searcher, self.reload_error = self.generation, new, None  # one reference swap
        log.info("switched from generation %d to %d (%d images)", old, self.generation, len(new.index))
        return True

    def watch(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.cfg.reload_interval_s):
                try:
                    self.check()
                except Exception:  # the watcher must outlive any surprise; the old generation keeps serving
                    log.exception("index reload failed")

        self._thread = threading.Thread(target=loop, name="qsearch-reload", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ---- the engine thread -----------------------------------------------------------------------------------------
class Busy(Exception):
    """The engine's queue is full."""


@dataclass
class _Job:
    fn: Callable[[Searcher], Any] | None  # a plain call, or None for a batchable text search
    future: concurrent.futures.Future
    search: dict[str, Any] | None = None  # Searcher.search keyword arguments


def run_searches(searcher: Searcher, searches: list[dict[str, Any]]) -> list[list[Hit] | Exception]:
    """Text searches that arrived together, each result (or its error) in order: one `Searcher.search_many`,
    so their texts are embedded in one pass and their ITC scans share one matrix product."""
    return searcher.search_many(searches)


class EngineThread:
    """Runs engine calls on one thread in arrival order; text searches queued together run as one batch,
    and a batch with ITM re-ranking waits up to `batch_wait_s` for more to join it."""

    def __init__(self, served: ServedIndex, cfg: ServiceConfig):
        self.served, self.cfg = served, cfg
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=cfg.max_queue)
        self._held: collections.deque[_Job | None] = collections.deque()
        self._thread = threading.Thread(target=self._loop, name="qsearch-engine", daemon=True)
        self._thread.start()

    def _put(self, job: _Job) -> concurrent.futures.Future:
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise Busy() from None
        return job.future

    def call(self, fn: Callable[[Searcher], Any]) -> concurrent.futures.Future:
        """Run fn(searcher) on the engine thread."""
        return self._put(_Job(fn, concurrent.futures.Future()))

    def search(self, **kwargs: Any) -> concurrent.futures.Future:
        """Searcher.search(**kwargs) on the engine thread, batched with others waiting."""
        return self._put(_Job(None, concurrent.futures.Future(), kwargs))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    def _next(self, timeout: float | None = None) -> _Job | None:
        if self._held:
            return self._held.popleft()
        return self._q.get(timeout=timeout) if timeout is None or timeout > 0 else self._q.get_nowait()

    def _loop(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            searcher = self.served.searcher  # this batch's generation, whatever the watcher does meanwhile
            if job.fn is not None:
                _settle(job.future, job.fn, searcher)
                continue
            batch = [job]
            deadline = time.monotonic() + (self.cfg.batch_wait_s if job.search.get("rerank", 0) else 0.0)
            while len(batch) < self.cfg.max_batch:
                try:
                    nxt = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if nxt is None or nxt.fn is not None:
                    self._held.append(nxt)
                    break
                batch.append(nxt)
            results = run_searches(searcher, [j.search for j in batch])
            for j, r in zip(batch, results, strict=True):
                if isinstance(r, Exception):
                    j.future.set_exception(r)
                else:
                    j.future.set_result((r, searcher))


def _settle(future: concurrent.futures.Future, fn: Callable[[Searcher], Any], searcher: Searcher) -> None:
    try:
        future.set_result(fn(searcher))
    except Exception as e:
        future.set_exception(e)


# ---- requests and responses ------------------------------------------------------------------------------------
ParamValue = str | int | float | bool | None
ImageId = Annotated[int, PathParam(ge=0, le=2**62, description="an image id from a search result")]


class SearchRequest(BaseModel):
    """A text query, with the options of `qsearch search`."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=MAX_QUERY_CHARS, description="the query")
    k: int = Field(10, ge=1, le=MAX_K, description="results to return")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="skip this many results (paging)")
    rerank: int = Field(128, ge=0, le=MAX_RERANK, description="ITM re-ranks this many ITC candidates (0: off)")
    where: str | None = Field(None, max_length=MAX_QUERY_CHARS,
                              description='SQL predicate over the metadata, values as ? (e.g. "width > ?")')
    params: list[ParamValue] = Field(
        default_factory=list, max_length=MAX_PARAMS, description="the values of the ?s in `where`")
    hybrid: bool = Field(False, description="fuse BM25 over the stored captions with dense ITC")
    expand: bool = Field(False, description="image queries: add the image's generated caption")
    min_score: float | None = Field(None, allow_inf_nan=False, description="keep hits scoring at least this")


class Problem(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": what}
    for code, what in ((400, "bad query, filter or upload"), (401, "missing or wrong API key"),
                       (404, "not an image of this index"), (413, "body or upload too large"),
                       (422, "invalid field"), (503, "busy, or the index is unavailable"))
}


def _json(obj: Any, generation: int) -> Response:
    return Response(dumps(obj), media_type="application/json", headers={GENERATION_HEADER: str(generation)})


def _search_kwargs(text: str | None, k: int, offset: int, rerank: int, where: str | None, params: list[Any],
                   hybrid: bool, expand: bool, min_score: float | None) -> dict[str, Any]:
    return {"text": text, "k": k, "offset": offset, "rerank": rerank, "where": where or None,
            "params": params, "hybrid": hybrid, "expand": expand, "min_score": min_score}


def _form_params(raw: str | None) -> list[Any]:
    """The `params` form field: a JSON array of filter values."""
    if not raw:
        return []
    try:
        values = json.loads(raw)
    except ValueError:
        values = None
    if not isinstance(values, list) or len(values) > MAX_PARAMS or \
            not all(v is None or isinstance(v, str | int | float | bool) for v in values):
        raise HTTPException(422, f"params: a JSON array of at most {MAX_PARAMS} strings, numbers, booleans "
                                 'or nulls, e.g. ["red", 2003]')
    return values


# ---- middleware ------------------------------------------------------------------------------------------------
class _TooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body too large (at most {limit} bytes)")


class Guard:
    """ASGI middleware in front of every route: the API key (before any body is read), then the body cap."""

    def __init__(self, app: Any, cfg: ServiceConfig):
        self.app, self.cfg = app, cfg
        self.key = cfg.api_key.encode() if cfg.api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
            if not ok:
                detail = "wrong API key" if auth else "missing API key: send 'Authorization: Bearer <key>'"
                return await _send_json(send, 401, {"detail": detail}, {"www-authenticate": "Bearer"})
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/")
        limit = self.cfg.max_upload_bytes if multipart else self.cfg.max_body_bytes
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await _send_json(send, 400, {"detail": "bad Content-Length header"})
        if length > limit:
            return await _send_json(send, 413, {"detail": f"request body too large ({length} bytes, at most "
                                                          f"{limit})"})
        seen = 0

        async def capped_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        await self.app(scope, capped_receive, send)


async def _send_json(send: Callable, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


# ---- the app ---------------------------------------------------------------------------------------------------
def create_app(cfg: ServiceConfig) -> FastAPI:
    """The service over `cfg.index`, switching to its newer generations as they are committed."""
    async def lifespan(app: FastAPI):
        state.served = await run_in_threadpool(ServedIndex, cfg)
        state.engine = EngineThread(state.served, cfg)
        state.served.watch()
        yield
        state.engine.close()  # uvicorn has drained the requests in flight by now
        state.served.close()

    app = FastAPI(title="qsearch", summary="BLIP-2 image-text search", version="1", lifespan=lifespan,
                  redoc_url=None, responses=ERRORS)
    state = app.state  # .served (ServedIndex) and .engine (EngineThread), from startup on

    async def on_engine(fn: Callable[[Searcher], Any]) -> Any:
        try:
            return await asyncio.wrap_future(state.engine.call(fn))
        except Busy:
            raise HTTPException(503, "busy: too many requests waiting, retry shortly") from None

    async def searched(kwargs: dict[str, Any]) -> Response:
        try:
            hits, searcher = await asyncio.wrap_future(state.engine.search(**kwargs))
        except Busy:
            raise HTTPException(503, "busy: too many requests waiting, retry shortly") from None
        return _json([h.to_dict() for h in hits], searcher.index.manifest["generation"])

    async def upload(image: UploadFile) -> Any:
        data = await image.read()
        try:
            return await run_in_threadpool(read_upload, data, cfg.max_pixels)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    @app.post("/search", response_model=list[Hit], summary="Search by text")
    async def search(body: SearchRequest) -> Response:
        return await searched(_search_kwargs(**body.model_dump()))

    @app.post("/search/image", response_model=list[Hit], summary="Search by example image (and text)")
    async def search_image(
        image: Annotated[UploadFile, File(description="the query image")],
        text: Annotated[str | None, Form(max_length=MAX_QUERY_CHARS)] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        offset: Annotated[int, Form(ge=0, le=MAX_OFFSET)] = 0,
        rerank: Annotated[int, Form(ge=0, le=MAX_RERANK)] = 128,
        where: Annotated[str | None, Form(max_length=MAX_QUERY_CHARS)] = None,
        params: Annotated[str | None, Form(max_length=MAX_QUERY_CHARS,
                                           description='a JSON array of the ? values, e.g. ["red", 2003]')] = None,
        hybrid: Annotated[bool, Form()] = False,
        expand: Annotated[bool, Form()] = False,
        min_score: Annotated[float | None, Form(allow_inf_nan=False)] = None,
    ) -> Response:
        values = _form_params(params)
        kwargs = _search_kwargs(text, k, offset, rerank, where, values, hybrid, expand, min_score)
        kwargs["image"] = await upload(image)
        return await searched(kwargs)

    @app.post("/captions-of", response_model=list[CaptionHit], summary="Rank the stored captions for an image")
    async def captions_of(image: Annotated[UploadFile, File(description="the image")],
                          k: Annotated[int, Form(ge=1, le=MAX_K)] = 10) -> Response:
        im = await upload(image)
        hits, g = await on_engine(lambda s: (s.search_captions(im, k=k), s.index.manifest["generation"]))
        return _json([h.to_dict() for h in hits], g)

    def indexed(image_id: int) -> tuple[Searcher, dict[str, Any]]:
        s = state.served.searcher
        try:
            row = s.index.rows([image_id]).to_pylist()[0]
        except KeyError:
            raise HTTPException(404, f"not an image of this index: {image_id}") from None
        return s, row

    def read_verified(s: Searcher, row: dict[str, Any]) -> bytes:
        try:
            data = indexed_bytes(s.index, row["image_id"])
        except (OSError, NotIndexed) as e:
            raise HTTPException(404, f"image {row['image_id']}: its file is gone ({e})") from None
        import hashlib

        if hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise HTTPException(404, f"image {row['image_id']}: its file changed since it was indexed "
                                     "(re-run qsearch index)")
        return data

    def cached(request: Request, etag: str, make: Callable[[], tuple[bytes, str]], generation: int) -> Response:
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600", GENERATION_HEADER: str(generation)}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        data, media_type = make()
        return Response(data, media_type=media_type, headers=headers)

    image_responses = {200: {"content": {"image/*": {}}, "description": "the image"}, 304: {"description": "not modified"}}

    @app.get("/images/{image_id}", response_class=Response, responses=image_responses, summary="An indexed image")
    def image_file(image_id: ImageId, request: Request) -> Response:
        s, row = indexed(image_id)

        def make() -> tuple[bytes, str]:
            from PIL import Image

            return read_verified(s, row), Image.MIME.get(row.get("format") or "", "application/octet-stream")

        return cached(request, f'"{row["sha256"]}"', make, s.index.manifest["generation"])

    @app.get("/thumbnails/{image_id}", response_class=Response, responses=image_responses,
             summary="An indexed image's JPEG thumbnail")
    def image_thumbnail(image_id: ImageId, request: Request) -> Response:
        s, row = indexed(image_id)

        def make() -> tuple[bytes, str]:
            try:
                return thumbnail(read_verified(s, row)), "image/jpeg"
            except ValueError as e:
                raise HTTPException(404, f"image {image_id}: its file is no longer readable ({e})") from None

        return cached(request, f'"thumb-{row["sha256"]}"', make, s.index.manifest["generation"])

    @app.get("/info", summary="What the index holds (qsearch info --json)")
    def info() -> Response:
        s = state.served.searcher
        return _json(s.index.info(), s.index.manifest["generation"])

    @app.get("/health", summary="Liveness: the generation served (no API key needed)")
    def health() -> dict[str, Any]:
        served = getattr(state, "served", None)
        return {"status": "ok" if served else "starting", "generation": served.generation if served else None,
                "reload_error": bool(served and served.reload_error)}

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, e: QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:5]:
            if err.get("type") == "json_invalid":
                parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
                continue
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(IndexStoreError)
    async def unavailable(request: Request, e: IndexStoreError) -> JSONResponse:
        return JSONResponse({"detail": f"index unavailable: {e}"}, status_code=503)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    app.add_middleware(Guard, cfg=cfg)
    if cfg.cors_origins:  # outermost, so preflight requests are answered before the key is checked
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=[GENERATION_HEADER])
    if cfg.api_key:
        _document_bearer(app)
    return app


def _document_bearer(app: FastAPI) -> None:
    """Declare the bearer key in the OpenAPI schema (the Guard middleware enforces it)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer"}
            for path, ops in schema.get("paths", {}).items():
                if path not in PUBLIC_PATHS:
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---- running it ------------------------------------------------------------------------------------------------
CONFIG_ENV = "QSEARCH_SERVE_CONFIG"  # --workers > 1: each server process reads its configuration from here


def app_from_env() -> FastAPI:
    """The app of one server process of `serve(workers > 1)` (uvicorn's factory)."""
    import os

    fields = json.loads(os.environ[CONFIG_ENV])
    key_file = fields.pop("api_key_file", None)
    fields["cors_origins"] = tuple(fields.get("cors_origins", ()))
    return create_app(ServiceConfig(**fields, api_key=read_api_key(key_file) if key_file else None))


def serve(cfg: ServiceConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          log_level: str = "info", api_key_file: str | None = None) -> None:
    """Run the service until SIGINT/SIGTERM; both drain the requests in flight, then return normally.
    workers > 1: that many server processes on one port (each loads the model; the key is re-read from
    api_key_file, never passed through the environment)."""
    import dataclasses
    import os
    import signal

    import uvicorn

    check_bind(host, cfg.api_key)
    options = dict(host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60,
                   limit_concurrency=cfg.max_queue * 2, server_header=False, proxy_headers=False)
    if workers > 1:
        if cfg.api_key and not api_key_file:
            raise ValueError("serve(workers > 1) with an API key needs api_key_file")
        fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "api_key"}
        os.environ[CONFIG_ENV] = json.dumps({**fields, "api_key_file": api_key_file if cfg.api_key else None})
        # the supervisor stops its server processes on SIGINT/SIGTERM and returns; they must not inherit
        # ignored signals, so nothing is changed here
        uvicorn.run("search.service:app_from_env", factory=True, workers=workers, **options)
        return
    server = uvicorn.Server(uvicorn.Config(create_app(cfg), **options))
    # uvicorn re-raises the signal that stopped it once it has shut down; with these ignored by then, the
    # process ends as the command returns (exit status 0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server.run()
