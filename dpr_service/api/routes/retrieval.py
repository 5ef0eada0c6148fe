"""``POST /search``: ranked passages for each question, by the model (dense), BM25, or both fused."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from fastapi import APIRouter, Request

from ..deps import JSON_BODY, KEY_REQUIRED, SearchBody, ServingResources
from ..resources import Resources, encode_for_search
from ..schemas import BODY_RESPONSES, SEARCH_RESPONSES, FieldError, Hit, SearchRequest, SearchResponse

router = APIRouter(tags=["retrieval"], dependencies=[KEY_REQUIRED, JSON_BODY], responses=BODY_RESPONSES)


@router.post("/search", response_model=SearchResponse, responses=SEARCH_RESPONSES)
async def search(body: SearchBody, request: Request, res: ServingResources) -> SearchResponse:
    """Ranked passages for each query, in request order: by the model (``mode`` dense, the default),
    by the index's BM25 index (bm25), or both fused (hybrid: ``fusion``/``alpha``, by default the
    index's served fusion, else reciprocal rank fusion)."""
    t0 = time.perf_counter()
    fusion = search_plan(body, res)  # 422/409 before anything is encoded
    q_emb = None
    if body.mode != "bm25":
        res, q_emb = await encode_for_search(request.app, res, body.texts())  # (Q, D); res: the resources that encoded them
        fusion = search_plan(body, res)
    loop = asyncio.get_running_loop()
    if body.mode == "dense":
        hits = await loop.run_in_executor(None, res.searcher.search, q_emb, body.top_k, body.with_text)
        text = body.with_text
        results = [[Hit(id=h.id, score=h.score, **({"title": h.title, "text": h.text} if text else {})) for h in hs] for hs in hits]
    else:
        results = await loop.run_in_executor(None, ranked_hits, res, body, q_emb, *fusion)
    return SearchResponse(results=results, took_ms=(time.perf_counter() - t0) * 1000)


def search_plan(body: SearchRequest, res: Resources) -> tuple[str, float | None]:
    """The (fusion, alpha) a search of ``body`` on ``res`` uses (meaningful in hybrid mode). Raises
    FieldError: 422 for fusion/alpha that do not fit the mode (:meth:`SearchRequest.fusion_choice`),
    409 naming ``mode`` for bm25 or hybrid on an index without a BM25 index (built with --no-bm25)."""
    fusion = body.fusion_choice(res.served_fusion)
    if body.mode != "dense" and res.searcher.bm25 is None:
        raise FieldError("mode", f"{body.mode!r} needs a BM25 index, and this index was built with --no-bm25 "
                                 "(rebuild it without --no-bm25, or search with mode 'dense')", status=409)
    return fusion


def ranked_hits(res: Resources, body: SearchRequest, q_emb: np.ndarray | None, fusion: str,
                alpha: float | None) -> list[list[Hit]]:
    """Per query, the top ``body.top_k`` hits of ``body.mode`` (bm25 or hybrid) by the core's
    :class:`~dpr_service.core.hybrid.Retriever`, with titles and texts from one read of the passage
    store when asked for. Blocking: run it off the event loop."""
    ranking = res.retriever.rank(body.mode, q_emb, body.texts(), body.top_k, fusion, alpha)
    passages = res.searcher.passages([pid for hits in ranking for pid, _ in hits]) if body.with_text else {}
    return [[Hit(id=pid, score=score, **({"title": passages[pid].title, "text": passages[pid].text} if body.with_text else {}))
             for pid, score in hits] for hits in ranking]
