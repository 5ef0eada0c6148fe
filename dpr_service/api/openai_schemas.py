"""Bodies of the OpenAI-compatible routes (``/v1/embeddings``, ``/v1/models``), in the shapes of
OpenAI's API reference (https://platform.openai.com/docs/api-reference/embeddings), which the
``openai`` client parses, plus ``input_type`` (the name Cohere, Voyage and NVIDIA NIM use).

Strict like every request of this app (unknown fields refused, as OpenAI refuses them), with two
decisions of ours (docs/openai.md says why):

- ``input_type`` ``"document"`` by default: text sent without one is embedded as a passage.
- ``input`` as token-id lists (which OpenAI accepts) is refused with 422: ids from another tokenizer
  (tiktoken, as LangChain sends by default) would silently embed the wrong words.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, WithJsonSchema, field_validator, model_validator

from .schemas import NON_BLANK, STRICT, Integer, _no_default, _not_blank, _not_null

TOKEN_IDS = ("token-id lists are not accepted: this server tokenizes text with the checkpoint's own tokenizer "
             "(ids from another one, e.g. tiktoken, would embed the wrong words); send the text as strings "
             "(LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)")
_TEXT = {"type": "string", "pattern": NON_BLANK}

# A string or a list of strings, published so; parsed as a list (a string is a list of one).
InputTexts = Annotated[list[str], WithJsonSchema({"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1}]})]


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_ids(value: list) -> bool:
    """``[1, 2]`` or ``[[1, 2], [3]]``: what OpenAI takes as pre-tokenized input."""
    return bool(value) and all(_is_id(v) or (isinstance(v, list) and v and all(_is_id(t) for t in v)) for v in value)


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``: texts to embed as queries or as documents (passages without a title)."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [
        {"model": "dpr", "input": ["The Ember Light flashes red every ten seconds."]},
        {"model": "dpr", "input": "who built the Ember Light?", "input_type": "query", "encoding_format": "base64"}]})
    input: InputTexts = Field(..., description="a text or a list of texts (at most DPR_MAX_QUERIES, each at most "
                                               "DPR_MAX_TEXT_CHARS characters); token-id lists are refused (422)")
    model: str = Field(..., description="any name: the server embeds with the checkpoint it serves, named in the "
                                        "answer's model and by GET /v1/models")
    input_type: Literal["query", "document"] = Field(
        "document", description="query: embed as questions (the query encoder, its max length and prompt); "
                                "document: as passages without a title (the passage encoder)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: a list of numbers; base64: the little-endian float32 bytes, base64-encoded")
    dimensions: Integer = Field(None, ge=1, json_schema_extra=_no_default,
                                description="must equal the checkpoint's dimension if given (409 otherwise): "
                                            "embeddings are never shortened")
    user: str = Field(None, json_schema_extra=_no_default, description="accepted and ignored (OpenAI: an end-user id)")

    _present = field_validator("dimensions", "user", mode="before")(_not_null)
    _one_text: bool = PrivateAttr(False)  # input was sent as one string (parsed as a list of one)

    @model_validator(mode="wrap")
    @classmethod
    def _as_sent(cls, data, handler):
        request = handler(data)
        request._one_text = isinstance(data, dict) and isinstance(data.get("input"), str)
        return request

    def written_field(self, field: str) -> str:
        """``field`` as the client wrote it: ``input[0]`` is ``input`` when input was one string."""
        return "input" if self._one_text and field == "input[0]" else field

    @field_validator("input", mode="before")
    @classmethod
    def _listed(cls, value):
        if isinstance(value, list) and _is_token_ids(value):
            raise ValueError(TOKEN_IDS)
        if isinstance(value, list) and not value:
            raise ValueError("must hold at least one text")
        return [value] if isinstance(value, str) else value

    @field_validator("input")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        for text in value:
            _not_blank(text)
        return value


class Embedding(BaseModel):
    """One input's embedding, ``index`` its position in ``input``."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="D floats, or (base64) the base64 of D little-endian float32")


class Usage(BaseModel):
    """Tokens the model read, by the checkpoint's tokenizer: special tokens and the prompt included,
    after truncation to the max length of the input type."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """OpenAI's CreateEmbeddingResponse: one embedding per input, in input order."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str = Field(description="the id of the served checkpoint (GET /v1/models)")
    usage: Usage


class Model(BaseModel):
    """The served checkpoint as OpenAI's Model object, with its embedding dimension and fingerprint."""

    id: str = Field(description="the checkpoint's name and the first 12 hex digits of its fingerprint, e.g. "
                                "tour-best-275ab8a857fa (a trainer's best/last named with its run directory, a job's "
                                "with the job id); any model name is accepted by POST /v1/embeddings")
    object: Literal["model"] = "model"
    created: int = Field(description="when the checkpoint directory last changed (Unix seconds, its mtime)")
    owned_by: str = "dpr-service"
    dimensions: int
    fingerprint: str = Field(description="sha256 of the checkpoint's files, as GET /info gives it")


class ModelList(BaseModel):
    """``GET /v1/models``: the one checkpoint this server serves."""

    object: Literal["list"] = "list"
    data: list[Model]


# ---- errors: OpenAI's shape on the /v1 routes (errors.openai_shape writes them)


class OpenAIError(BaseModel):
    """What is wrong (the same text as ``detail`` on the other routes), the kind of error, the
    request field at fault (null when none) and a short code."""

    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer on /v1 (OpenAI's error object)."""

    error: OpenAIError


_RETRY = {"Retry-After": {"description": "seconds to wait before retrying", "required": True, "schema": {"type": "integer"}}}
OPENAI_ERROR_RESPONSES = {
    400: {"model": OpenAIErrorResponse, "description": "the body is not valid JSON, or Content-Length is not a number"},
    401: {"model": OpenAIErrorResponse, "description": "missing or wrong API key (X-API-Key or Authorization: Bearer)"},
    413: {"model": OpenAIErrorResponse, "description": "request body over DPR_MAX_BODY_BYTES"},
    415: {"model": OpenAIErrorResponse, "description": "the body was not sent as JSON: Content-Type must be application/json"},
    422: {"model": OpenAIErrorResponse, "description": "invalid request (param names the field), over a DPR_MAX_* limit, "
                                                       "or token-id input"},
    503: {"model": OpenAIErrorResponse, "description": "not ready yet, or busy: retry later", "headers": _RETRY},
}
DIMENSIONS_RESPONSES = {
    409: {"model": OpenAIErrorResponse, "description": "dimensions differs from the served checkpoint's (param: dimensions)"},
}
