"""``POST /search``: ranked passages for each question."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from ..deps import JSON_BODY, KEY_REQUIRED, SearchBody, ServingResources
from ..resources import encode_for_search
from ..schemas import BODY_RESPONSES, Hit, SearchResponse

router = APIRouter(tags=["retrieval"], dependencies=[KEY_REQUIRED, JSON_BODY], responses=BODY_RESPONSES)


@router.post("/search", response_model=SearchResponse)
async def search(body: SearchBody, request: Request, res: ServingResources) -> SearchResponse:
    """Ranked passages for each query, in request order."""
    t0 = time.perf_counter()
    res, q_emb = await encode_for_search(request.app, res, body.texts())  # (Q, D); res: the resources that encoded them
    hits = await asyncio.get_running_loop().run_in_executor(None, res.searcher.search, q_emb, body.top_k, body.with_text)
    text = body.with_text
    results = [[Hit(id=h.id, score=h.score, **({"title": h.title, "text": h.text} if text else {})) for h in hs] for hs in hits]
    return SearchResponse(results=results, took_ms=(time.perf_counter() - t0) * 1000)
