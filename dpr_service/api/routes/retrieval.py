"""``POST /search``: ranked passages for each question, by the model (dense), BM25, or both fused."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import numpy as np
from fastapi import APIRouter, Request

from dpr_service.core.search import Searcher

from ..batching import stage_seconds
from ..lanes import run_in_lane
from ..deps import JSON_BODY, KEY_REQUIRED, SearchBody, ServingResources
from ..resources import Resources, encode_for_search
from ..schemas import BODY_RESPONSES, SEARCH_RESPONSES, FieldError, Hit, SearchRequest, SearchResponse

T = TypeVar("T")
router = APIRouter(tags=["retrieval"], dependencies=[KEY_REQUIRED, JSON_BODY], responses=BODY_RESPONSES)


@router.post("/search", response_model=SearchResponse, responses=SEARCH_RESPONSES)
async def search(body: SearchBody, request: Request, res: ServingResources) -> SearchResponse:
    """Ranked passages for each query, in request order: by the model (``mode`` dense, the default),
    by the index's BM25 index (bm25), or both fused (hybrid: ``fusion``/``alpha``, by default the
    index's served fusion, else reciprocal rank fusion). The seconds of each stage go to the
    ``dpr_search_stage_seconds`` histograms of ``/metrics``."""
    t0 = time.perf_counter()
    fusion = search_plan(body, res)  # 422/409 before anything is encoded
    q_emb, stages = None, {}
    token = stage_seconds.set(stages)  # the batcher records queue wait and encoding here
    try:
        if body.mode != "bm25":
            res, q_emb = await encode_for_search(request.app, res, body.texts())  # (Q, D); res: the resources that encoded them
            fusion = search_plan(body, res)
    finally:
        stage_seconds.reset(token)
    if body.mode == "dense":
        results, waited, _ = await in_thread(request.app, dense_hits, res, body, q_emb, stages)
    else:
        results, waited, _ = await in_thread(request.app, ranked_hits, res, body, q_emb, *fusion, stages)
    stages["search"] += waited  # the wait for a worker thread counts in the search stage
    request.app.state.metrics.observe_stages(stages)
    return SearchResponse(results=results, took_ms=(time.perf_counter() - t0) * 1000)


async def in_thread(app, fn: Callable[..., T], *args) -> tuple[T, float, float]:
    """``fn(*args)`` in ``app``'s interactive lane (:mod:`..lanes`): (its result, seconds it waited for
    a thread, seconds it ran). Raises LaneFull when that lane is full, else what ``fn`` raises."""
    handed = time.perf_counter()

    def timed() -> tuple[T, float, float]:
        started = time.perf_counter()
        out = fn(*args)
        return out, started - handed, time.perf_counter() - started

    return await run_in_lane(app, "interactive", timed)


def dense_hits(res: Resources, body: SearchRequest, q_emb: np.ndarray, stages: dict[str, float]) -> list[list[Hit]]:
    """Per query, the top ``body.top_k`` hits of the index for ``q_emb`` (Q, D), with titles and
    texts when asked for; the seconds of the FAISS search and of the passage lookup in ``stages``
    (a Milvus collection answers both in one call: all of it is ``search``). Blocking: run it off
    the event loop."""
    t0 = time.perf_counter()
    if isinstance(res.searcher, Searcher):
        scores, rows = res.searcher.nearest(q_emb, body.top_k)
        t1 = time.perf_counter()
        hits = res.searcher.hits(scores, rows, with_text=body.with_text)
        stages["search"], stages["lookup"] = t1 - t0, time.perf_counter() - t1
    else:
        hits = res.searcher.search(q_emb, body.top_k, body.with_text)
        stages["search"] = time.perf_counter() - t0
    text = body.with_text
    return [[Hit(id=h.id, score=h.score, **({"title": h.title, "text": h.text} if text else {})) for h in hs] for hs in hits]


def search_plan(body: SearchRequest, res: Resources) -> tuple[str, float | None]:
    """The (fusion, alpha) a search of ``body`` on ``res`` uses (meaningful in hybrid mode). Raises
    FieldError: 422 for fusion/alpha that do not fit the mode (:meth:`SearchRequest.fusion_choice`),
    409 naming ``mode`` for bm25 or hybrid on an index without a BM25 index (built with --no-bm25, or
    a Milvus collection)."""
    fusion = body.fusion_choice(res.served_fusion)
    if body.mode != "dense" and res.searcher.bm25 is None:
        raise FieldError("mode", f"{body.mode!r} needs a BM25 index, and {res.searcher.no_bm25}", status=409)
    return fusion


def ranked_hits(res: Resources, body: SearchRequest, q_emb: np.ndarray | None, fusion: str,
                alpha: float | None, stages: dict[str, float] | None = None) -> list[list[Hit]]:
    """Per query, the top ``body.top_k`` hits of ``body.mode`` (bm25 or hybrid) by the core's
    :class:`~dpr_service.core.hybrid.Retriever`, with titles and texts from one read of the passage
    store when asked for; the seconds of the ranking (``search``) and of the read (``lookup``) in
    ``stages`` when given. Blocking: run it off the event loop."""
    t0 = time.perf_counter()
    ranking = res.retriever.rank(body.mode, q_emb, body.texts(), body.top_k, fusion, alpha)
    t1 = time.perf_counter()
    passages = res.searcher.passages([pid for hits in ranking for pid, _ in hits]) if body.with_text else {}
    if stages is not None:
        stages["search"] = t1 - t0
        if body.with_text:
            stages["lookup"] = time.perf_counter() - t1
    return [[Hit(id=pid, score=score, **({"title": passages[pid].title, "text": passages[pid].text} if body.with_text else {}))
             for pid, score in hits] for hits in ranking]
