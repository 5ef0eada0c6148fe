"""The FastAPI app: retrieval, the DPR loss, embeddings, health, metrics and hot reload.

Models and the index load in the lifespan (never at import). Routes are thin: they check limits,
then call the core (``score_items``, ``encode_texts``) and the index's ``Searcher``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dpr_service.core.checkpoint import CheckpointError, Loaded, load_checkpoint
from dpr_service.core.device import Runtime, pick_runtime
from dpr_service.core.formats import Passage
from dpr_service.core.inference import encode_texts
from dpr_service.core.scoring import ScoreItem, score_items
from index.artifact import ArtifactError
from index.search import Searcher

from .batching import Overloaded, QueryBatcher
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
    from index.artifact import read_manifest

    manifest = read_manifest(settings.index)
    checkpoint = settings.checkpoint or manifest.extra.get("checkpoint")
    if not checkpoint:
        raise ArtifactError(f"{settings.index}: the manifest names no checkpoint; set DPR_CHECKPOINT")
    loaded = load_checkpoint(checkpoint, runtime.device)
    searcher = Searcher(settings.index, loaded.fingerprint)
    res = Resources(loaded, searcher, runtime, None)
    res.searcher.search(res.encode_queries(["warm-up query"]), 1)  # warm-up: /readyz waits for this
    metrics.index_size.set(searcher.count)
    return res


def start_batcher(res: Resources, settings: Settings, metrics: Metrics) -> None:
    if settings.batching:
        res.batcher = QueryBatcher(res.encode_queries, settings.batch_max_size, settings.batch_max_wait_ms,
                                   settings.queue_max, observe=metrics.batch.observe)
        res.batcher.start()


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


def current_resources(request: Request) -> Resources:
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
        try:
            res = await asyncio.get_running_loop().run_in_executor(None, load_resources, settings, metrics)
            start_batcher(res, settings, metrics)
            app.state.resources = res
            log.info("serving %s (%d passages) with %s", settings.index, res.searcher.count, res.loaded.path)
        except (ArtifactError, CheckpointError, ValueError) as e:
            app.state.load_error = str(e)
            log.error("not ready: %s", e)
        yield
        if app.state.resources and app.state.resources.batcher:
            await app.state.resources.batcher.stop()

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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    def check(condition: bool, message: str) -> None:
        if not condition:
            raise HTTPException(422, message)

    def to_passage(p: str | PassageIn) -> Passage:
        return Passage(text=p, title="") if isinstance(p, str) else Passage(text=p.text, title=p.title)

    # ---- routes
    @app.post("/search", response_model=SearchResponse, dependencies=[Auth], tags=["retrieval"])
    async def search(body: SearchRequest, res: Res) -> SearchResponse:
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
        if res.batcher is not None:
            metrics.queue.set(res.batcher.depth)
            q_emb = await res.batcher.submit(texts)
        else:
            q_emb = await asyncio.get_running_loop().run_in_executor(None, res.encode_queries, texts)
        hits = await asyncio.get_running_loop().run_in_executor(None, res.searcher.search, q_emb, body.top_k)
        texts_by_row = res.searcher.passages_by_rows([h.row for hs in hits for h in hs]) if body.with_text else {}
        results = [[Hit(id=h.id, score=h.score,
                        **({"title": texts_by_row[h.row].title, "text": texts_by_row[h.row].text} if body.with_text else {}))
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
            for name, text in [("question", it.question), ("positive", to_passage(it.positive).text)] + [
                    (f"negatives[{j}]", to_passage(n).text) for j, n in enumerate(it.negatives)]:
                check(len(text) <= settings.max_text_chars, f"items[{i}].{name}: longer than {settings.max_text_chars} characters")
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
        for i, t in enumerate(items):
            check(len(t if isinstance(t, str) else t.text) <= settings.max_text_chars, f"texts[{i}]: longer than {settings.max_text_chars} characters")
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
        """Load the artifact named by the settings, verify it and swap it in atomically. Requests in
        flight finish on the old one; a failed load keeps the old one serving and says why."""
        fresh = settings  # the same DPR_INDEX path: rebuild or replace the artifact there, then reload
        try:
            res = await asyncio.get_running_loop().run_in_executor(None, load_resources, fresh, metrics)
        except (ArtifactError, CheckpointError, ValueError) as e:
            raise HTTPException(409, f"reload failed, still serving the previous index: {e}") from None
        start_batcher(res, fresh, metrics)
        old, request.app.state.resources = request.app.state.resources, res
        request.app.state.load_error = None
        if old is not None and old.batcher is not None:
            asyncio.get_running_loop().create_task(_retire(old.batcher))
        return {"status": "reloaded", "index": str(fresh.index), "passages": res.searcher.count}

    return app


def _printable(text: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate from the request (a field name, say) is escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def _retire(batcher: QueryBatcher, grace_s: float = 5.0) -> None:
    """Let the old batcher finish what is queued, then stop it."""
    deadline = time.monotonic() + grace_s
    while batcher.depth and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    await batcher.stop()
