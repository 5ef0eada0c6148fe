"""``POST /encode``: embeddings of queries or passages, for users with their own vector store.

:func:`embed` is the one way a route turns texts into embeddings (``/encode`` here, and the
OpenAI-compatible ``/v1/embeddings`` in :mod:`.openai`), so the two give the same vectors, with the
same cost rules: the texts are tokenised in the interactive lane (their cost in tokens, checked
against ``DPR_MAX_REQUEST_TOKENS``: 413), then encoded ``DPR_ENCODE_BATCH_SIZE`` at a time in the
interactive lane when they are at most ``DPR_INTERACTIVE_MAX_TOKENS``, else in the heavy lane,
admitted by tokens in flight (:mod:`..lanes`)."""

from __future__ import annotations

from typing import Sequence

import torch
from fastapi import APIRouter, FastAPI, Request

from dpr_service.core.formats import Passage
from dpr_service.core.inference import encode_texts
from dpr_service.core.tokenize import TextTokenizer

from ..deps import JSON_BODY, KEY_REQUIRED, EncodeBody, ServingResources
from ..lanes import run_in_lane
from ..limits import check_tokens
from ..resources import Resources
from ..schemas import BODY_RESPONSES, COST_RESPONSES, EncodeResponse, PassageIn
from .loss import to_passage

router = APIRouter(tags=["embeddings"], dependencies=[KEY_REQUIRED, JSON_BODY], responses=BODY_RESPONSES)


def encoder_inputs(texts: Sequence[str | PassageIn], kind: str) -> list[str] | list[Passage]:
    """What :func:`~dpr_service.core.inference.encode_texts` takes for ``kind``: queries as the strings
    themselves (validated as strings), passages as the core's Passage (a string is one without a title)."""
    return list(texts) if kind == "query" else [to_passage(t) for t in texts]


def token_counts(tokenizer: TextTokenizer, items: list[str] | list[Passage], kind: str) -> list[int]:
    """Tokens the encoder reads for each item: the checkpoint's tokenizer with its prompt and special
    tokens, truncated to the kind's max length (the attention mask of the encoder's own input)."""
    if not items:
        return []
    enc = tokenizer.queries(items) if kind == "query" else tokenizer.passages(items)
    return enc["attention_mask"].sum(dim=1).tolist()


async def embed(app: FastAPI, res: Resources, items: list[str] | list[Passage], kind: str,
                field: str = "texts") -> tuple[torch.Tensor, list[int]]:
    """Embeddings of ``items`` (from :func:`encoder_inputs`) by the served checkpoint, (N, D) float32
    in request order, and each item's tokens. Raises TooCostly (413 naming ``field``) over
    ``DPR_MAX_REQUEST_TOKENS``, LaneFull (503) when the lane it needs is full."""
    settings = app.state.settings
    counts = await run_in_lane(app, "interactive", token_counts, res.loaded.tokenizer, items, kind)
    tokens = sum(counts)
    check_tokens(tokens, settings, field)
    heavy = tokens > settings.interactive_max_tokens
    emb = await run_in_lane(app, "heavy" if heavy else "interactive", encode_texts, res.loaded.encoder,
                            res.loaded.tokenizer, items, kind, res.runtime, settings.encode_batch_size,
                            cost=tokens if heavy else 0)
    return emb, counts


@router.post("/encode", response_model=EncodeResponse, responses=COST_RESPONSES)
async def encode(body: EncodeBody, request: Request, res: ServingResources) -> EncodeResponse:
    """Embeddings of queries or passages (one list of ``dim`` floats per text, in request order)."""
    emb, _ = await embed(request.app, res, encoder_inputs(body.texts, body.kind), body.kind)  # (N, D)
    return EncodeResponse(embeddings=emb.tolist(), dim=int(emb.shape[1]), similarity=res.loaded.config.similarity)
