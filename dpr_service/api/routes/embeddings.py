"""``POST /encode``: embeddings of queries or passages, for users with their own vector store.

:func:`embed` is the one way a route turns texts into embeddings (``/encode`` here, and the
OpenAI-compatible ``/v1/embeddings`` in :mod:`.openai`), so the two give the same vectors."""

from __future__ import annotations

import asyncio
from typing import Sequence

import torch
from fastapi import APIRouter

from dpr_service.core.formats import Passage
from dpr_service.core.inference import encode_texts

from ..deps import JSON_BODY, KEY_REQUIRED, EncodeBody, ServingResources
from ..resources import Resources
from ..schemas import BODY_RESPONSES, EncodeResponse, PassageIn
from .loss import to_passage

router = APIRouter(tags=["embeddings"], dependencies=[KEY_REQUIRED, JSON_BODY], responses=BODY_RESPONSES)


def encoder_inputs(texts: Sequence[str | PassageIn], kind: str) -> list[str] | list[Passage]:
    """What :func:`~dpr_service.core.inference.encode_texts` takes for ``kind``: queries as the strings
    themselves (validated as strings), passages as the core's Passage (a string is one without a title)."""
    return list(texts) if kind == "query" else [to_passage(t) for t in texts]


async def embed(res: Resources, items: list[str] | list[Passage], kind: str) -> torch.Tensor:
    """Embeddings of ``items`` (from :func:`encoder_inputs`) by the served checkpoint, (N, D) float32
    in request order, encoded in a worker thread (the event loop keeps serving)."""
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: encode_texts(res.loaded.encoder, res.loaded.tokenizer, items, kind, res.runtime))


@router.post("/encode", response_model=EncodeResponse)
async def encode(body: EncodeBody, res: ServingResources) -> EncodeResponse:
    """Embeddings of queries or passages (one list of ``dim`` floats per text, in request order)."""
    emb = await embed(res, encoder_inputs(body.texts, body.kind), body.kind)  # (N, D)
    return EncodeResponse(embeddings=emb.tolist(), dim=int(emb.shape[1]), similarity=res.loaded.config.similarity)
