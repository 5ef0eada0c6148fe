"""The FastAPI app, assembled: settings, lifespan (models and index load here, never at import),
the Guard middleware, error handlers, the routers and the published schema.

::

    create_app(settings)            app.py        this file: puts the pieces together
      routes/{retrieval,loss,embeddings,operations,web,openai}.py   thin routes, one router per concern
      deps.py                       Annotated dependencies (settings, resources, checked bodies)
      resources.py                  checkpoint + index + batcher, loaded and hot-reloaded
      limits.py                     the DPR_MAX_* table: checks requests, writes the schema
      schemas.py / errors.py        bodies; every client error a 4xx naming the field
      lanes.py                      a thread pool, bounds and a 503 per kind of work (interactive, heavy, admin, events)
      guard.py / batching.py / metrics.py / openapi.py / settings.py
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import fastapi.routing
from fastapi import FastAPI

from dpr_service.core.artifact import ArtifactError
from dpr_service.core.checkpoint import CheckpointError
from dpr_service.core.milvus import MilvusUnavailable

from .errors import OpenAIErrorShape, install_error_handlers
from .guard import Guard
from .jobs import JobSettings, install_jobs
from .lanes import Lanes
from .metrics import Metrics
from .openapi import install_openapi
from .resources import Reloader
from .routes import ROUTERS, openai
from .schemas import ERROR_RESPONSES
from .settings import Settings, get_settings

log = logging.getLogger("dpr_service.api")
OPEN_ROUTES = {"/healthz", "/readyz", "/"}  # "/": the static web page; it sends the key with its API calls


def app_routes(app: FastAPI) -> dict[str, set[str]]:
    """Every route of ``app``, included routers' too: path -> HTTP methods (empty for a mount).
    (FastAPI 0.13x+ keeps an included router as one entry of ``app.routes``; this lists its routes.)"""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = contexts(app.routes) if contexts is not None else app.routes
    return {r.path: set(r.methods or ()) for r in routes if getattr(r, "path", None)}


def _lifespan(settings: Settings, metrics: Metrics):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.resources = None
        app.state.load_error = None
        app.state.lanes = Lanes(settings)  # interactive, heavy, admin, events: a thread pool and a 503 each (lanes.py)
        app.state.reloader = reloader = Reloader(app, settings, metrics)
        try:
            res = await reloader.load()
            log.info("serving %s (%d passages) with %s", settings.index, res.searcher.count, res.loaded.path)
        except (ArtifactError, CheckpointError, ValueError, MilvusUnavailable, ImportError) as e:
            app.state.load_error = str(e)
            log.error("not ready: %s", e)
            if settings.wait_for_index or settings.milvus_uri:  # Milvus may come up later: keep trying
                log.info("DPR_WAIT_FOR_INDEX: checking %s every second until an index there loads", settings.index)
                reloader.watch_until_loaded()
        try:
            yield
        finally:
            await reloader.close()  # the batcher drains: queued queries are still answered
            lanes, app.state.lanes = app.state.lanes, None  # a later lifespan (or a call without one) makes new ones
            if lanes is not None:
                lanes.shutdown()

    return lifespan


def create_app(settings: Settings | None = None, jobs_settings: JobSettings | None = None) -> FastAPI:
    """The service as an ASGI app, for ``settings`` (default: the ``DPR_*`` environment).

    Nothing is loaded here: the checkpoint and the index load in the lifespan (``/readyz`` is 503
    until they have, or while they cannot, with the reason). The docs at ``/docs`` and ``/redoc``
    are served with their assets from this server (they work offline)."""
    settings = settings or get_settings()
    metrics = Metrics()
    app = FastAPI(title="dpr-service", version="0.1.0", lifespan=_lifespan(settings, metrics), responses=ERROR_RESPONSES,
                  description="Dense passage retrieval and the DPR in-batch negative loss over REST.",
                  docs_url=None, redoc_url=None)  # routes/web.py serves them, with local assets
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.body_limits = {}  # paths whose route streams its body, and their limit (install_jobs adds /datasets)
    # the API key, admission, then the body size, all before a byte of the body is read (guard.py)
    app.add_middleware(Guard, settings=settings, open_routes=OPEN_ROUTES, observe=metrics.observe_request,
                       known_paths=lambda: set(app_routes(app)), body_limits=app.state.body_limits)
    app.add_middleware(OpenAIErrorShape)  # outside the Guard: its answers on /v1/... in OpenAI's shape too
    install_error_handlers(app, settings)
    for router in (*ROUTERS, openai.router):  # /v1/embeddings, /v1/models: routes/openai.py
        app.include_router(router)
    install_jobs(app, jobs_settings)  # /jobs, /datasets and the job runner, when DPR_ADMIN_KEY is set (jobs/)
    install_openapi(app, settings, OPEN_ROUTES)  # the schema carries the DPR_MAX_* limits and the key scheme
    return app
