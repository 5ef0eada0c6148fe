"""The FastAPI app: retrieval, the DPR loss, embeddings, health, metrics and hot reload.

Models and the index load in the lifespan (never at import). Routes are thin: they check limits,
then call the core (``score_items``, ``encode_texts``) and the index's ``Searcher``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dpr_service.core.checkpoint import CheckpointError, Loaded, load_checkpoint
from dpr_service.core.device import Runtime, pick_runtime
from dpr_service.core.formats import Passage
from dpr_service.core.fsio import readable_directory
from dpr_service.core.inference import encode_texts
from dpr_service.core.scoring import ScoreItem, score_items
from dpr_service.core.artifact import MANIFEST, ArtifactError, read_manifest
from dpr_service.core.search import Searcher

from .batching import Overloaded, QueryBatcher, Stopped
from .guard import AUTH_FAILED, Guard, check_key
from .openapi import install_openapi
from .schemas import (ERROR_RESPONSES, EncodeRequest, EncodeResponse, ErrorResponse, Hit, PassageIn, ScoreRequest,
                      ScoreResponse, ScoreResult, SearchRequest, SearchResponse)
from .settings import Settings, get_settings
from .web import index_page

log = logging.getLogger("dpr_service.api")
OPEN_ROUTES = {"/healthz", "/readyz", "/"}  # "/": the static web page; it sends the key with its API calls


@dataclass
class Resources:
    """What a request needs, loaded together and swapped together on reload."""

    loaded: Loaded
    searcher: Searcher
    runtime: Runtime
    batcher: QueryBatcher | None

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return encode_texts(self.loaded.encoder, self.loaded.tokenizer, texts, "query", self.runtime).numpy()


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("dpr_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("dpr_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch = Histogram("dpr_batch_size", "queries encoded together", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue = Gauge("dpr_queue_depth", "queries waiting to be encoded", registry=self.registry)
        self.index_size = Gauge("dpr_index_passages", "passages in the served index", registry=self.registry)


def load_resources(settings: Settings, metrics: Metrics) -> Resources:
    """Load and verify checkpoint and index (blocking; run it in a thread)."""
    if settings.index is None:
        raise ArtifactError("no index configured: set DPR_INDEX or pass --index")
    runtime = pick_runtime(settings.device, "auto")
    manifest = read_manifest(settings.index)
    checkpoint = settings.checkpoint or manifest.extra.get("checkpoint")
    if not checkpoint:
        raise ArtifactError(f"{settings.index}: the manifest names no checkpoint; set DPR_CHECKPOINT")
    loaded = load_checkpoint(checkpoint, runtime.device)
    searcher = Searcher(settings.index, loaded.fingerprint)
    res = Resources(loaded, searcher, runtime, None)
    res.searcher.search(res.encode_queries(["warm-up query"]), 1, with_text=True)  # warm-up: /readyz waits for this
    metrics.index_size.set(searcher.count)
    return res


def start_batcher(res: Resources, settings: Settings, metrics: Metrics) -> None:
    if settings.batching:
        res.batcher = QueryBatcher(res.encode_queries, settings.batch_max_size, settings.batch_max_wait_ms,
                                   settings.queue_max, observe=metrics.batch.observe)
        res.batcher.start()


def artifact_stamp(index: Path | None) -> tuple | None:
    """What identifies the artifact at ``index`` now (a cheap stat): a rebuild or ``dpr index add``
    renames a new directory into place; a manifest rewritten in place changes its inode or mtime.
    None when there is none to read."""
    if index is None:
        return None
    index = Path(index)
    directory = readable_directory(index)  # resolve_artifact's choice, without its log line
    try:
        d, m = os.stat(directory), os.stat(directory / MANIFEST)
    except OSError:
        return None
    return str(directory), d.st_dev, d.st_ino, m.st_ino, m.st_mtime_ns, m.st_size


class Reloader:
    """Loads the artifact at ``DPR_INDEX`` and swaps it in: at start, on ``POST /admin/reload``, and
    by itself when the artifact there changes (checked on requests, at most once a second).

    The check is what keeps every worker of ``dpr serve --workers N`` on the new artifact:
    ``/admin/reload`` reaches only the worker that got it; the others each notice the new artifact
    at their next request. A load that fails keeps the previous resources serving and is not retried
    until the artifact changes again. The batcher of the retired resources drains: everything
    queued on it is answered, and requests that reach it after the swap go to the new resources.
    """

    check_every_s = 1.0

    def __init__(self, app: FastAPI, settings: Settings, metrics: "Metrics"):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.seen: tuple | None = None  # the stamp of the artifact last loaded, or last tried
        self._lock = asyncio.Lock()
        self._checked = float("-inf")
        self._background: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # background reloads and retiring batchers, kept referenced

    async def load(self) -> Resources:
        """Load, verify and swap in the artifact; raises (and keeps the old one serving) when it fails."""
        async with self._lock:
            stamp = artifact_stamp(self.settings.index)  # before loading: a change during the load is seen next time
            try:
                res = await asyncio.get_running_loop().run_in_executor(None, load_resources, self.settings, self.metrics)
            finally:
                self.seen = stamp
            start_batcher(res, self.settings, self.metrics)
            old, self.app.state.resources = self.app.state.resources, res
            self.app.state.load_error = None
            if old is not None and old.batcher is not None:
                self._spawn(old.batcher.stop())  # drains: what is queued on it is still answered
            return res

    def check(self) -> None:
        """Start a reload in the background when the artifact changed (cheap; at most once a second)."""
        now = time.monotonic()
        if now - self._checked < self.check_every_s or self._lock.locked() or (self._background and not self._background.done()):
            return
        self._checked = now
        stamp = artifact_stamp(self.settings.index)
        if stamp is not None and stamp != self.seen:
            self._background = self._spawn(self._reload_changed())

    async def _reload_changed(self) -> None:
        try:
            res = await self.load()
        except Exception as e:  # logged; the previous artifact (if any) keeps serving
            log.error("the artifact at %s changed but does not load; still serving the previous one: %s", self.settings.index, e)
            if self.app.state.resources is None:
                self.app.state.load_error = str(e)
        else:
            log.info("the artifact at %s changed: now serving %d passages", self.settings.index, res.searcher.count)

    async def close(self) -> None:
        """At shutdown: no more reloads; every batcher drains."""
        if self._background is not None:
            self._background.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        res = self.app.state.resources
        if res is not None and res.batcher is not None:
            await res.batcher.stop()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# ---- dependencies (module level, so FastAPI can resolve the annotations)


def key_ok(request: Request) -> bool:
    """X-API-Key or Authorization: Bearer against DPR_API_KEY, in constant time (see guard.check_key)."""
    api_key = request.app.state.settings.api_key
    return check_key(api_key.get_secret_value() if api_key is not None else None,
                     request.headers.get("x-api-key") or "", request.headers.get("authorization") or "")


def require_key(request: Request) -> None:
    """The same check as a route dependency (the Guard middleware runs it first, before the body is read)."""
    if not key_ok(request):
        raise HTTPException(401, AUTH_FAILED, headers={"WWW-Authenticate": "Bearer"})


async def current_resources(request: Request) -> Resources:
    """The resources serving now (async: it runs on the event loop, where the reload check starts its task)."""
    request.app.state.reloader.check()
    res = request.app.state.resources
    if res is None:
        raise HTTPException(503, f"not ready: {request.app.state.load_error or 'loading'}", headers={"Retry-After": "5"})
    return res


Auth = Depends(require_key)
Res = Annotated[Resources, Depends(current_resources)]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.resources = None
        app.state.load_error = None
        app.state.reloader = reloader = Reloader(app, settings, metrics)
        try:
            res = await reloader.load()
            log.info("serving %s (%d passages) with %s", settings.index, res.searcher.count, res.loaded.path)
        except (ArtifactError, CheckpointError, ValueError) as e:
            app.state.load_error = str(e)
            log.error("not ready: %s", e)
        yield
        await reloader.close()  # the batcher drains: queued queries are still answered

    app = FastAPI(title="dpr-service", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="Dense passage retrieval and the DPR in-batch negative loss over REST.")
    install_openapi(app, settings, OPEN_ROUTES)  # the schema carries the DPR_MAX_* limits and the key scheme
    app.state.settings = settings
    app.state.metrics = metrics

    # ---- the API key, admission, then the body size, all before a byte of the body is read (guard.py)
    def observe(route: str, status: int, seconds: float) -> None:
        metrics.requests.labels(route, str(status)).inc()
        metrics.latency.labels(route).observe(seconds)

    app.add_middleware(Guard, settings=settings, open_routes=OPEN_ROUTES, observe=observe,
                       known_paths=lambda: {r.path for r in app.routes})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = [{"field": _printable(".".join(str(p) for p in e["loc"][1:]) or "body"), "message": _printable(e["msg"])}
                  for e in exc.errors()]
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        return JSONResponse({"detail": f"{first['field']}: {first['message']}", "errors": errors}, status_code=422)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        return JSONResponse({"detail": "server busy: the query queue is full, retry later"}, status_code=503,
                            headers={"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(Stopped)
    async def stopped(request: Request, exc: Stopped):
        return JSONResponse({"detail": "server reloading: the query encoder was replaced, retry"}, status_code=503,
                            headers={"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    def check(condition: bool, message: str) -> None:
        if not condition:
            raise HTTPException(422, message)

    def check_passage(p: str | PassageIn, name: str) -> None:
        """A passage's text and title each within DPR_MAX_TEXT_CHARS."""
        text, title = (p, "") if isinstance(p, str) else (p.text, p.title)
        check(len(text) <= settings.max_text_chars, f"{name}: longer than {settings.max_text_chars} characters")
        check(len(title) <= settings.max_text_chars, f"{name}.title: longer than {settings.max_text_chars} characters")

    def to_passage(p: str | PassageIn) -> Passage:
        return Passage(text=p, title="") if isinstance(p, str) else Passage(text=p.text, title=p.title)

    async def encode_for_search(res: Resources, texts: list[str]) -> np.ndarray:
        """Query embeddings (Q, D), through the batcher when there is one (raises Stopped when a reload retired it)."""
        if res.batcher is not None:
            metrics.queue.set(res.batcher.depth)
            return await res.batcher.submit(texts)
        return await asyncio.get_running_loop().run_in_executor(None, res.encode_queries, texts)

    # ---- routes
    @app.post("/search", response_model=SearchResponse, dependencies=[Auth], tags=["retrieval"])
    async def search(body: SearchRequest, request: Request, res: Res) -> SearchResponse:
        """Ranked passages for each query, in request order."""
        t0 = time.perf_counter()
        try:
            texts = body.texts()
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        check(len(texts) <= settings.max_queries, f"queries: at most {settings.max_queries} per request, got {len(texts)}")
        check(body.top_k <= settings.max_top_k, f"top_k: at most {settings.max_top_k}, got {body.top_k}")
        for i, t in enumerate(texts):
            check(len(t) <= settings.max_text_chars, f"queries[{i}]: longer than {settings.max_text_chars} characters")
        for _ in range(3):
            try:
                q_emb = await encode_for_search(res, texts)
                break
            except Stopped:  # a reload retired these resources meanwhile: encode and search on the new ones
                fresh = request.app.state.resources
                if fresh is None or fresh is res:
                    raise
                res = fresh
        else:
            raise Stopped("reloaded again and again")
        hits = await asyncio.get_running_loop().run_in_executor(None, res.searcher.search, q_emb, body.top_k, body.with_text)
        results = [[Hit(id=h.id, score=h.score, **({"title": h.title, "text": h.text} if body.with_text else {}))
                    for h in hs] for hs in hits]
        return SearchResponse(results=results, took_ms=(time.perf_counter() - t0) * 1000)

    @app.post("/score", response_model=ScoreResponse, dependencies=[Auth], tags=["loss"])
    async def score(body: ScoreRequest, res: Res) -> ScoreResponse:
        """The DPR NLL of each item's positive among its candidates (the trainer's loss function)."""
        t0 = time.perf_counter()
        check(len(body.items) <= settings.max_items, f"items: at most {settings.max_items} per request, got {len(body.items)}")
        items = []
        for i, it in enumerate(body.items):
            check(len(it.negatives) <= settings.max_passages_per_item,
                  f"items[{i}].negatives: at most {settings.max_passages_per_item}, got {len(it.negatives)}")
            check(len(it.question) <= settings.max_text_chars, f"items[{i}].question: longer than {settings.max_text_chars} characters")
            for name, p in [("positive", it.positive)] + [(f"negatives[{j}]", n) for j, n in enumerate(it.negatives)]:
                check_passage(p, f"items[{i}].{name}")
            items.append(ScoreItem(it.question, to_passage(it.positive), [to_passage(n) for n in it.negatives]))
        scored = await asyncio.get_running_loop().run_in_executor(None, score_items, res.loaded, res.runtime, items, body.in_batch)
        results = [ScoreResult(loss=s.loss, probabilities=s.probabilities, rank=s.rank) for s in scored]
        return ScoreResponse(results=results, mean_loss=float(np.mean([s.loss for s in scored])),
                             took_ms=(time.perf_counter() - t0) * 1000)

    @app.post("/encode", response_model=EncodeResponse, dependencies=[Auth], tags=["embeddings"])
    async def encode(body: EncodeRequest, res: Res) -> EncodeResponse:
        """Embeddings of queries or passages, for users with their own vector store."""
        check(len(body.texts) <= settings.max_queries, f"texts: at most {settings.max_queries} per request, got {len(body.texts)}")
        items = [t if body.kind == "query" and isinstance(t, str) else to_passage(t) for t in body.texts]
        if body.kind == "query":
            check(all(isinstance(t, str) for t in items), "texts: queries are strings")
        for i, t in enumerate(body.texts):
            check_passage(t, f"texts[{i}]")
        emb = await asyncio.get_running_loop().run_in_executor(
            None, lambda: encode_texts(res.loaded.encoder, res.loaded.tokenizer, items, body.kind, res.runtime))
        return EncodeResponse(embeddings=emb.tolist(), dim=int(emb.shape[1]), similarity=res.loaded.config.similarity)

    @app.get("/", include_in_schema=False)
    async def web_page() -> HTMLResponse:
        """The web page: search and score in the browser (static, no data in it, so no key)."""
        return index_page()

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict:
        """The process is alive (cheap; no auth)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz(request: Request):
        """200 once model and index are loaded and a warm-up query succeeded; 503 before (no auth)."""
        request.app.state.reloader.check()  # probes also bring an idle worker to a new artifact
        if request.app.state.resources is None:
            reason = request.app.state.load_error or "loading"
            return JSONResponse({"status": "not ready", "reason": reason, "detail": f"not ready: {reason}"},
                                status_code=503, headers={"Retry-After": "5"})
        return {"status": "ready"}

    @app.get("/info", dependencies=[Auth], tags=["operations"])
    async def info(res: Res) -> dict:
        """The checkpoint and the index manifest in use."""
        return {"checkpoint": {"path": str(res.loaded.path), "fingerprint": res.loaded.fingerprint,
                               "base_model": res.loaded.base_model, **res.loaded.config.to_dict()},
                "index": {"path": str(res.searcher.directory), **res.searcher.manifest.to_dict()},
                "device": str(res.runtime.device)}

    @app.get("/metrics", dependencies=[Auth], tags=["operations"], response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        """Prometheus metrics: requests, latencies, batch sizes, queue depth, index size."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", dependencies=[Auth], tags=["operations"],
              responses={409: {"model": ErrorResponse, "description": "the new artifact failed its checks; the old one still serves"}})
    async def reload(request: Request) -> dict:
        """Load the artifact at DPR_INDEX, verify it and swap it in atomically. Requests in flight
        finish on the old one; a failed load keeps the old one serving and says why. With several
        worker processes this reloads the worker that got the request; every other worker notices
        the new artifact by itself at its next request (at most a second later)."""
        try:
            res = await request.app.state.reloader.load()  # the same DPR_INDEX path: rebuild or replace the artifact there first
        except (ArtifactError, CheckpointError, ValueError) as e:
            raise HTTPException(409, f"reload failed, still serving the previous index: {e}") from None
        return {"status": "reloaded", "index": str(settings.index), "passages": res.searcher.count}

    return app


def _printable(text: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate from the request (a field name, say) is escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
