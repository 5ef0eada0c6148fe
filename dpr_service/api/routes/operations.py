"""Operations: liveness, readiness, what is served, Prometheus metrics and hot reload."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from dpr_service.core.artifact import ArtifactError
from dpr_service.core.checkpoint import CheckpointError
from dpr_service.core.fsio import without_dirs

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
    reason = None if res is not None else without_paths(request.app.state.load_error or "loading")
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
    this index allows (bm25 and hybrid need its BM25 index) and the fusion of hybrid by default.
    ``runtime`` says what encodes queries and passages (torch, or ONNX Runtime and its quantisation).
    Paths are shown by their last parts (the checkpoint's last three, ``<job id>/run/best``; the
    index's name), never from the root: no answer maps the server's directories."""
    fusion, alpha = res.served_fusion
    return redacted({"checkpoint": {"path": without_dirs(str(res.loaded.path), keep=3), "fingerprint": res.loaded.fingerprint,
                                    "base_model": res.loaded.base_model, **res.loaded.config.to_dict()},
                     "index": {**res.searcher.manifest.to_dict(), "path": Path(str(res.searcher.directory)).name},
                     "search": {"modes": res.modes, "hybrid": {"fusion": fusion, "alpha": alpha}},
                     "device": str(res.runtime.device),
                     "runtime": getattr(res.runtime, "description", None) or {"runtime": "torch"}})


@router.get("/metrics", dependencies=[KEY_REQUIRED], response_class=PlainTextResponse)
async def prometheus(request: Request, metrics: AppMetrics) -> PlainTextResponse:
    """Prometheus metrics: requests, latencies, batch sizes, queue depth, index size, each lane's work."""
    metrics.observe_lanes(getattr(request.app.state, "lanes", None))
    return PlainTextResponse(metrics.exposition(), media_type=metrics.content_type)


def without_paths(text: str) -> str:
    """``text`` with every absolute path cut to its last two parts (``/srv/x/runs/index: ...`` ->
    ``runs/index: ...``, ``.../index/bm25/vocab.index.json`` -> ``bm25/vocab.index.json``): what an
    open route says must not map the server's directories (the core's :func:`without_dirs`)."""
    return without_dirs(text)


def redacted(value):
    """``value`` (JSON-like) with :func:`without_paths` applied to every string in it."""
    if isinstance(value, str):
        return without_paths(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v) for v in value]
    return value




def same_origin(request: Request) -> None:
    """Without an API key, refuse (403) a state-changing request a browser sent from another site:
    a page elsewhere can make a visitor's browser POST a form here with no CORS preflight. Browsers
    say where a request comes from (``Sec-Fetch-Site``, ``Origin``: OWASP's CSRF check by standard
    headers); curl and scripts send neither and pass. With a key, the key is the proof."""
    if request.app.state.settings.api_key is not None:
        return
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    host = request.headers.get("host", "")
    cross = site in ("cross-site", "same-site") or (origin is not None and urlsplit(origin).netloc != host)
    if cross:
        raise HTTPException(403, "a cross-site browser request cannot reload the server (set DPR_API_KEY, or call "
                                 "it from this server's own page, curl or a script)")


@router.post("/admin/reload", dependencies=[KEY_REQUIRED, Depends(same_origin)],
             responses={409: {"model": ErrorResponse, "description": "the new artifact failed its checks; the old one still serves"},
                        403: {"model": ErrorResponse, "description": "no API key is set and a browser sent this from another site"}})
async def reload(reloader: AppReloader, settings: AppSettings) -> dict:
    """Load the artifact at DPR_INDEX, verify it and swap it in atomically. Requests in flight
    finish on the old one; a failed load keeps the old one serving and says why (409). With several
    worker processes this reloads the worker that got the request; every other worker notices
    the new artifact by itself at its next request (at most a second later). With Milvus it reads
    the collection (or alias) again: after ``dpr index export --alias`` moved it, each replica
    switches on its reload; Milvus not answering is a 503 (MilvusUnavailable), the old one serving.

    When the artifact is the index serving now and only the checkpoint changed (``DPR_CHECKPOINT``
    replaced, or a query-side promotion's manifest naming a new one), the checkpoint alone is loaded
    and warmed up on the loaded index: ``swapped`` is ``"query encoder"`` (else ``"checkpoint and
    index"``). A checkpoint whose passage encoder did not build the index is refused (409 naming
    both checkpoints and both passage encoders), the old one serving."""
    try:
        res = await reloader.load()  # the same DPR_INDEX path: rebuild or replace the artifact there first
    except (ArtifactError, CheckpointError, ValueError, ImportError) as e:
        raise HTTPException(409, f"reload failed, still serving the previous checkpoint and index: "
                                 f"{without_paths(str(e))}") from None
    served = res.searcher.directory if settings.milvus_uri else settings.index
    return {"status": "reloaded", "index": Path(str(served)).name, "passages": res.searcher.count,
            "swapped": reloader.swapped, "checkpoint": res.loaded.fingerprint}
