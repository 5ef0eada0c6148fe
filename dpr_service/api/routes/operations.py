"""Operations: liveness, readiness, what is served, Prometheus metrics and hot reload."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from dpr_service.core.artifact import ArtifactError
from dpr_service.core.checkpoint import CheckpointError

from ..deps import KEY_REQUIRED, AppMetrics, AppReloader, AppSettings, ServingResources
from ..lanes import run_in_lane
from ..schemas import ErrorResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive (cheap; no auth)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, reloader: AppReloader):
    """200 once model and index are loaded and a warm-up query succeeded (with Milvus: while it
    answers and holds the collection loaded); 503 otherwise (no auth)."""
    reloader.check()  # probes also bring an idle worker to a new artifact
    res = request.app.state.resources
    reason = None if res is not None else request.app.state.load_error or "loading"
    if res is not None and hasattr(res.searcher, "ready"):  # Milvus: answering, with the collection loaded
        if not await run_in_lane(request.app, "interactive", res.searcher.ready):
            reason = "Milvus does not answer or the collection is not loaded"
    if reason is not None:
        return JSONResponse({"status": "not ready", "reason": reason, "detail": f"not ready: {reason}"},
                            status_code=503, headers={"Retry-After": "5"})
    return {"status": "ready"}


@router.get("/info", dependencies=[KEY_REQUIRED])
async def info(res: ServingResources) -> dict:
    """The checkpoint and the index manifest in use, and how ``/search`` serves them: the modes
    this index allows (bm25 and hybrid need its BM25 index) and the fusion of hybrid by default."""
    fusion, alpha = res.served_fusion
    return {"checkpoint": {"path": str(res.loaded.path), "fingerprint": res.loaded.fingerprint,
                           "base_model": res.loaded.base_model, **res.loaded.config.to_dict()},
            "index": {"path": str(res.searcher.directory), **res.searcher.manifest.to_dict()},
            "search": {"modes": res.modes, "hybrid": {"fusion": fusion, "alpha": alpha}},
            "device": str(res.runtime.device)}


@router.get("/metrics", dependencies=[KEY_REQUIRED], response_class=PlainTextResponse)
async def prometheus(metrics: AppMetrics) -> PlainTextResponse:
    """Prometheus metrics: requests, latencies, batch sizes, queue depth, index size."""
    return PlainTextResponse(metrics.exposition(), media_type=metrics.content_type)


@router.post("/admin/reload", dependencies=[KEY_REQUIRED],
             responses={409: {"model": ErrorResponse, "description": "the new artifact failed its checks; the old one still serves"}})
async def reload(reloader: AppReloader, settings: AppSettings) -> dict:
    """Load the artifact at DPR_INDEX, verify it and swap it in atomically. Requests in flight
    finish on the old one; a failed load keeps the old one serving and says why (409). With several
    worker processes this reloads the worker that got the request; every other worker notices
    the new artifact by itself at its next request (at most a second later). With Milvus it reads
    the collection (or alias) again: after ``dpr index export --alias`` moved it, each replica
    switches on its reload; Milvus not answering is a 503 (MilvusUnavailable), the old one serving."""
    try:
        res = await reloader.load()  # the same DPR_INDEX path: rebuild or replace the artifact there first
    except (ArtifactError, CheckpointError, ValueError, ImportError) as e:
        raise HTTPException(409, f"reload failed, still serving the previous index: {e}") from None
    served = res.searcher.directory if settings.milvus_uri else settings.index
    return {"status": "reloaded", "index": str(served), "passages": res.searcher.count}
