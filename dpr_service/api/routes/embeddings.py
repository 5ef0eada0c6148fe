"""``POST /encode``: embeddings of queries or passages, for users with their own vector store."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from dpr_service.core.inference import encode_texts

from ..deps import JSON_BODY, KEY_REQUIRED, EncodeBody, ServingResources
from ..schemas import BODY_RESPONSES, EncodeResponse
from .loss import to_passage

router = APIRouter(tags=["embeddings"], dependencies=[KEY_REQUIRED, JSON_BODY], responses=BODY_RESPONSES)


@router.post("/encode", response_model=EncodeResponse)
async def encode(body: EncodeBody, res: ServingResources) -> EncodeResponse:
    """Embeddings of queries or passages (one list of ``dim`` floats per text, in request order)."""
    items = body.texts if body.kind == "query" else [to_passage(t) for t in body.texts]  # queries: strings (validated)
    emb = await asyncio.get_running_loop().run_in_executor(
        None, lambda: encode_texts(res.loaded.encoder, res.loaded.tokenizer, items, body.kind, res.runtime))  # (N, D)
    return EncodeResponse(embeddings=emb.tolist(), dim=int(emb.shape[1]), similarity=res.loaded.config.similarity)
