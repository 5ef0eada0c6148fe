"""``POST /score``: the DPR loss of question-passage sets, by the trainer's own loss function."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from fastapi import APIRouter

from dpr_service.core.formats import Passage
from dpr_service.core.scoring import ScoreItem, score_items

from ..deps import JSON_BODY, KEY_REQUIRED, ScoreBody, ServingResources
from ..schemas import BODY_RESPONSES, PassageIn, ScoreResponse, ScoreResult

router = APIRouter(tags=["loss"], dependencies=[KEY_REQUIRED, JSON_BODY], responses=BODY_RESPONSES)


def to_passage(p: str | PassageIn) -> Passage:
    """A request's passage (a plain string is a passage without a title) as the core's Passage."""
    return Passage(text=p, title="") if isinstance(p, str) else Passage(text=p.text, title=p.title)


@router.post("/score", response_model=ScoreResponse)
async def score(body: ScoreBody, res: ServingResources) -> ScoreResponse:
    """The DPR NLL of each item's positive among its candidates (the trainer's loss function)."""
    t0 = time.perf_counter()
    items = [ScoreItem(it.question, to_passage(it.positive), [to_passage(n) for n in it.negatives]) for it in body.items]
    scored = await asyncio.get_running_loop().run_in_executor(None, score_items, res.loaded, res.runtime, items, body.in_batch)
    results = [ScoreResult(loss=s.loss, probabilities=s.probabilities, rank=s.rank) for s in scored]
    return ScoreResponse(results=results, mean_loss=float(np.mean([s.loss for s in scored])),
                         took_ms=(time.perf_counter() - t0) * 1000)
