"""The OpenAI-compatible routes: ``POST /v1/embeddings`` and ``GET /v1/models``, for the clients
users already have (the ``openai`` package, and through it LangChain, LlamaIndex, Haystack).

The embeddings are ``/encode``'s (the same :func:`.embeddings.embed`); the key, the limits and the
errors are the other routes', in OpenAI's error shape (``errors.OpenAIErrorShape``). docs/openai.md
says how a client uses them and why ``input_type`` is ``document`` by default.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request


from ..deps import JSON_BODY, KEY_REQUIRED, ServingResources, within_limits
from ..openai_schemas import (DIMENSIONS_RESPONSES, OPENAI_ERROR_RESPONSES, Embedding, EmbeddingsRequest, EmbeddingsResponse,
                              Model, ModelList, Usage)
from ..resources import Resources
from ..schemas import COST_RESPONSES, FieldError
from .embeddings import embed, encoder_inputs

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[KEY_REQUIRED], responses=OPENAI_ERROR_RESPONSES)
EmbeddingsBody = within_limits(EmbeddingsRequest)
KINDS = {"query": "query", "document": "passage"}  # input_type -> the encoder's kind


RUN_CHECKPOINTS = ("best", "last")  # what the trainer writes under its --output directory
JOB_RUN = "run"  # a job's trainer output: <jobs root>/<job id>/run/{best,last}


def model_id(path: Path, fingerprint: str) -> str:
    """A served checkpoint's model id: its name and the first 12 hex digits of its fingerprint,
    ``<name>-<fingerprint[:12]>`` (the name alone for a checkpoint without a fingerprint). A trainer's
    ``best``/``last`` is named with its run directory (``runs/tour/best`` -> ``tour-best-…``), a job's
    with the job id (``<job id>/run/last`` -> ``<job id>-last-…``). The id changes when the weights
    do, so a client that keeps embeddings by model id never mixes two checkpoints' vectors."""
    path = Path(path).resolve()
    name = path.name
    if name in RUN_CHECKPOINTS:
        run = path.parent.parent if path.parent.name == JOB_RUN else path.parent
        name = f"{run.name}-{name}" if run.name else name
    return f"{name}-{fingerprint[:12]}" if fingerprint else name


def served_model(res: Resources) -> Model:
    """The checkpoint serving now, as OpenAI's Model object (id: :func:`model_id`; created: the
    directory's mtime, 0 when it is not a local directory)."""
    loaded = res.loaded
    return Model(id=model_id(loaded.path, loaded.fingerprint),
                 created=int(loaded.path.stat().st_mtime) if loaded.path.is_dir() else 0,
                 dimensions=loaded.encoder.dim, fingerprint=loaded.fingerprint)


def encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One embedding as OpenAI sends it: floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/embeddings", response_model=EmbeddingsResponse, dependencies=[JSON_BODY], responses={**DIMENSIONS_RESPONSES, **COST_RESPONSES})
async def embeddings(body: EmbeddingsBody, request: Request, res: ServingResources) -> EmbeddingsResponse:
    """OpenAI's create-embeddings: one embedding per input, in input order, as ``/encode`` gives it
    (``input_type`` query or document, the default); ``usage`` counts the tokens the model read."""
    dim = res.loaded.encoder.dim
    if body.dimensions is not None and body.dimensions != dim:
        raise FieldError("dimensions", f"this checkpoint embeds in {dim} dimensions, not {body.dimensions} "
                                       "(embeddings are never shortened; leave dimensions out)", status=409)
    kind = KINDS[body.input_type]
    emb, counts = await embed(request.app, res, encoder_inputs(body.input, kind), kind, field="input")
    emb = emb.numpy()  # (N, D) float32
    data = [Embedding(index=i, embedding=encoded(v, body.encoding_format)) for i, v in enumerate(emb)]
    return EmbeddingsResponse(data=data, model=served_model(res).id,
                              usage=Usage(prompt_tokens=sum(counts), total_tokens=sum(counts)))


@router.get("/models", response_model=ModelList)
async def models(res: ServingResources) -> ModelList:
    """The checkpoint this server embeds with (one model)."""
    return ModelList(data=[served_model(res)])
