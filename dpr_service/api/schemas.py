"""Request and response bodies (OpenAPI documented, with examples).

Request models are strict (no coercion: ``"5"`` is not an integer, ``"yes"`` not a boolean) and
forbid unknown fields, so the published schema says exactly what is accepted. The limits that come
from the settings (``DPR_MAX_*``) are written into the published schema by :func:`document_limits`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

# Python's whitespace (str.isspace, what str.strip removes), written out so that the JSON Schema
# pattern and this check agree in every regex dialect: a text must hold one character outside it.
_SPACE = "".join(f"\\u{c:04x}" for c in range(0x3001) if chr(c).isspace())
NON_BLANK = f"[^{_SPACE}]"
_NON_BLANK = re.compile(NON_BLANK)


def _valid_text(value: str) -> str:
    """Text the tokenizer can take: a lone surrogate (JSON ``"\\ud800"``) is not Unicode text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate such as \\ud800)") from None
    return value


def _not_blank(value: str) -> str:
    if not _NON_BLANK.search(value):
        raise ValueError("must not be empty")
    return _valid_text(value)


def _strings_not_blank(values: list) -> list:
    for v in values:
        if isinstance(v, str):
            _not_blank(v)
    return values


def _not_null(value):
    if value is None:
        raise ValueError("must not be null (leave the field out instead)")
    return value


def _integral(value):
    """JSON Schema counts 5.0 as an integer; strict pydantic would not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


STRICT = ConfigDict(extra="forbid", strict=True)
Integer = Annotated[int, BeforeValidator(_integral)]


class PassageIn(BaseModel):
    model_config = STRICT
    title: str = Field("", description="at most DPR_MAX_TEXT_CHARS characters, like the text")
    text: str

    _text = field_validator("text")(_not_blank)
    _title = field_validator("title")(_valid_text)


class SearchRequest(BaseModel):
    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{"queries": ["who built the Ember Light?"], "top_k": 5}]})
    queries: list[str] | SkipJsonSchema[None] = Field(None, description="questions, one ranked list each")
    query: str | SkipJsonSchema[None] = Field(None, description="a single question (instead of queries)")
    top_k: Integer = Field(10, ge=1)
    with_text: bool = True

    _present = field_validator("queries", "query", mode="before")(_not_null)

    @field_validator("queries")
    @classmethod
    def _queries(cls, value):
        if value is not None:
            if not value:
                raise ValueError("must hold at least one query")
            for q in value:
                _not_blank(q)
        return value

    _query = field_validator("query")(lambda v: v if v is None else _not_blank(v))

    def texts(self) -> list[str]:
        if (self.queries is None) == (self.query is None):
            raise ValueError("give exactly one of 'query' and 'queries'")
        return self.queries if self.queries is not None else [self.query]


class Hit(BaseModel):
    id: str
    score: float
    title: str | None = None
    text: str | None = None


class SearchResponse(BaseModel):
    results: list[list[Hit]]
    took_ms: float


class ScoreItemIn(BaseModel):
    model_config = STRICT
    question: str
    positive: str | PassageIn
    negatives: list[str | PassageIn] = []

    _question = field_validator("question")(_not_blank)

    @field_validator("positive")
    @classmethod
    def _positive(cls, value):
        return _not_blank(value) if isinstance(value, str) else value

    _negatives = field_validator("negatives")(_strings_not_blank)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "items": [{"question": "when was Greywatch lit?", "positive": {"title": "Greywatch Light", "text": "Lit in 1712 ..."},
                   "negatives": ["The Ember Light flashes red ..."]}],
        "in_batch": False}]})
    items: list[ScoreItemIn] = Field(..., min_length=1)
    in_batch: bool = Field(False, description="score every question against every passage of the request, as in training")


class ScoreResult(BaseModel):
    loss: float = Field(description="-log softmax of the positive among the item's candidates")
    probabilities: list[float] = Field(description="softmax of the positive, then of each negative, in order")
    rank: int = Field(description="rank of the positive among the candidates (1 = best)")


class ScoreResponse(BaseModel):
    results: list[ScoreResult]
    mean_loss: float
    took_ms: float


class EncodeRequest(BaseModel):
    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{"texts": ["who built the Ember Light?"], "kind": "query"}]})
    texts: list[str | PassageIn] = Field(..., min_length=1)
    kind: Literal["query", "passage"] = "query"

    _texts = field_validator("texts")(_strings_not_blank)


class EncodeResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    similarity: str


# ---- errors: every 4xx/5xx body has a ``detail`` string


class ErrorField(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong, naming the field or the limit")
    errors: list[ErrorField] = Field(None, description="validation errors (422 only): every field at fault")


ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "the body is not JSON the server can parse, or Content-Length is not a number"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when DPR_API_KEY is set)"},
    413: {"model": ErrorResponse, "description": "request body over DPR_MAX_BODY_BYTES"},
    422: {"model": ErrorResponse, "description": "invalid request; the detail names the field"},
    503: {"model": ErrorResponse, "description": "not ready yet, the query queue is full, or a reload is under way: retry later",
          "headers": {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                      "schema": {"type": "integer"}}}},
}


def document_limits(openapi: dict, settings) -> dict:
    """Write the limits of ``settings`` (``DPR_MAX_*``) and the rules checked in code (non-blank
    text, exactly one of ``query``/``queries``, string queries for ``/encode``) into the published
    schema, so that it describes exactly the requests the app accepts."""
    c = openapi["components"]["schemas"]
    text = {"maxLength": settings.max_text_chars, "pattern": NON_BLANK}
    c["PassageIn"]["properties"]["text"].update(text)
    c["PassageIn"]["properties"]["title"]["maxLength"] = settings.max_text_chars  # titles: the same limit, may be empty
    search = c["SearchRequest"]
    search["properties"]["queries"].update(minItems=1, maxItems=settings.max_queries)
    search["properties"]["queries"]["items"].update(text)
    search["properties"]["query"].update(text)
    search["properties"]["top_k"]["maximum"] = settings.max_top_k
    search["oneOf"] = [{"required": ["query"]}, {"required": ["queries"]}]
    c["ScoreRequest"]["properties"]["items"]["maxItems"] = settings.max_items
    item = c["ScoreItemIn"]["properties"]
    item["question"].update(text)
    item["positive"]["anyOf"][0].update(text)
    item["negatives"]["maxItems"] = settings.max_passages_per_item
    item["negatives"]["items"]["anyOf"][0].update(text)
    encode = c["EncodeRequest"]
    encode["properties"]["texts"]["maxItems"] = settings.max_queries
    encode["properties"]["texts"]["items"]["anyOf"][0].update(text)
    encode["anyOf"] = [{"properties": {"kind": {"const": "passage"}}, "required": ["kind"]},
                       {"properties": {"kind": {"const": "query"}, "texts": {"items": {"type": "string"}}}}]
    return openapi
