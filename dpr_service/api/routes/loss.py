"""``POST /score``: the DPR loss of question-passage sets, by the trainer's own loss function.

It runs in the heavy lane (:mod:`..lanes`): tokenised first (the request's cost in tokens, checked
against ``DPR_MAX_REQUEST_TOKENS``), then admitted by tokens in flight and encoded
``DPR_ENCODE_BATCH_SIZE`` texts at a time, so one request's memory is that of one chunk.
"""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Request

from dpr_service.core.formats import Passage
from dpr_service.core.scoring import ScoreItem, plan_scores, score_plan

from ..deps import JSON_BODY, KEY_REQUIRED, ScoreBody, ServingResources
from ..lanes import run_in_lane
from ..limits import check_tokens
from ..schemas import BODY_RESPONSES, COST_RESPONSES, PassageIn, ScoreResponse, ScoreResult

router = APIRouter(tags=["loss"], dependencies=[KEY_REQUIRED, JSON_BODY], responses=BODY_RESPONSES)


def to_passage(p: str | PassageIn) -> Passage:
    """A request's passage (a plain string is a passage without a title) as the core's Passage."""
    return Passage(text=p, title="") if isinstance(p, str) else Passage(text=p.text, title=p.title)


@router.post("/score", response_model=ScoreResponse, responses=COST_RESPONSES)
async def score(body: ScoreBody, request: Request, res: ServingResources) -> ScoreResponse:
    """The DPR NLL of each item's positive among its candidates (the trainer's loss function)."""
    t0 = time.perf_counter()
    app, settings = request.app, request.app.state.settings
    items = [ScoreItem(it.question, to_passage(it.positive), [to_passage(n) for n in it.negatives]) for it in body.items]
    plan = await run_in_lane(app, "heavy", plan_scores, res.loaded, items, body.in_batch)  # tokenised: its cost
    check_tokens(plan.tokens, settings, "items")  # 413
    scored = await run_in_lane(app, "heavy", score_plan, res.loaded, res.runtime, plan, settings.encode_batch_size,
                               cost=plan.tokens)
    results = [ScoreResult(loss=s.loss, probabilities=s.probabilities, rank=s.rank) for s in scored]
    return ScoreResponse(results=results, mean_loss=float(np.mean([s.loss for s in scored])),
                         took_ms=(time.perf_counter() - t0) * 1000)
