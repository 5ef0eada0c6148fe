"""Request and response bodies (OpenAPI documented, with examples).

Request models are strict (no coercion: ``"5"`` is not an integer, ``"yes"`` not a boolean) and
forbid unknown fields, so the published schema says exactly what is accepted. The rules that do not
depend on the settings (non-blank text, exactly one of ``query``/``queries``, string queries for
``/encode``) are checked by validators here and written into the schema beside them
(``NonBlank``, ``json_schema_extra``); the limits that come from the settings (``DPR_MAX_*``) are
one table in :mod:`dpr_service.api.limits`, which checks them and writes them into the schema.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

# Python's whitespace (str.isspace, what str.strip removes), written out so that the JSON Schema
# pattern and this check agree in every regex dialect: a text must hold one character outside it.
_SPACE = "".join(f"\\u{c:04x}" for c in range(0x3001) if chr(c).isspace())
NON_BLANK = f"[^{_SPACE}]"
_NON_BLANK = re.compile(NON_BLANK)

# A string that must hold a non-space character: checked by ``_not_blank`` (in the validators below,
# so that the error names the field, not a union branch), published as this pattern.
NonBlank = Annotated[str, WithJsonSchema({"type": "string", "pattern": NON_BLANK})]


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


STRICT = ConfigDict(extra="forbid", strict=True)


def _no_default(schema: dict) -> None:
    """Publish no ``"default": null`` for a field that is left out when not wanted (never null)."""
    schema.pop("default", None)
def _integral(value):
    """JSON Schema counts 5.0 as an integer (so the published schema admits it, and schemathesis sends
    it as valid data); strict pydantic would not. 5.5 stays a 422."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_integral)]


class PassageIn(BaseModel):
    """A passage: a title, a text or both, not both blank (the readers' rule, ``core.formats.is_passage``)."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"anyOf": [
        {"properties": {"text": {"pattern": NON_BLANK}}}, {"properties": {"title": {"pattern": NON_BLANK}}, "required": ["title"]}]})
    title: str = Field("", description="at most DPR_MAX_TEXT_CHARS characters, like the text")
    text: str = Field(description="may be empty when the title is not")

    _title = field_validator("title")(_valid_text)

    @field_validator("text")
    @classmethod
    def _text(cls, value: str, info: ValidationInfo) -> str:
        if not _NON_BLANK.search(value) and not _NON_BLANK.search(info.data.get("title", "")):
            raise ValueError("must not be empty when the title is empty (a passage is a title, a text or both)")
        return _valid_text(value)


class FieldError(ValueError):
    """A request whose ``field`` (as the client wrote it) is wrong for a reason the schema's types
    cannot say alone; answered with 422 (or ``status``) in the shape of any invalid field."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


# The fusion rules of SearchRequest.fusion_choice, as JSON Schema: fusion and alpha only in hybrid
# mode; "rrf" takes no alpha; "convex" needs one; alpha alone means "convex".
_FUSION_RULES = [
    {"not": {"anyOf": [{"required": ["fusion"]}, {"required": ["alpha"]}]}},
    {"properties": {"mode": {"const": "hybrid"}, "fusion": {"const": "rrf"}}, "required": ["mode", "fusion"],
     "not": {"required": ["alpha"]}},
    {"properties": {"mode": {"const": "hybrid"}, "fusion": {"const": "convex"}}, "required": ["mode", "alpha"]},
]


class SearchRequest(BaseModel):
    """``POST /search``: one question (``query``) or several (``queries``), never both.

    ``query`` is shorthand for ``queries: [query]`` (:meth:`texts` gives the questions either way);
    limits and errors name the field the client wrote. ``mode`` picks the ranking (dense by
    default); hybrid mode fuses by the index's served default unless ``fusion``/``alpha`` say
    otherwise (:meth:`fusion_choice`)."""

    model_config = ConfigDict(**STRICT, json_schema_extra={
        "examples": [{"queries": ["who built the Ember Light?"], "top_k": 5},
                     {"query": "who built the Ember Light?", "mode": "hybrid", "fusion": "convex", "alpha": 0.6}],
        "oneOf": [{"required": ["query"]}, {"required": ["queries"]}],
        "anyOf": _FUSION_RULES})
    # no None in the types (left out is None, by default): an error names the field, not a union branch
    queries: list[NonBlank] = Field(None, description="questions, one ranked list each",
                                    json_schema_extra=lambda schema: (_no_default(schema), schema.update(minItems=1)))
    query: NonBlank = Field(None, json_schema_extra=_no_default, description="a single question (instead of queries)")
    top_k: Integer = Field(10, ge=1)
    with_text: bool = True
    mode: Literal["dense", "bm25", "hybrid"] = Field("dense", description="dense (the model), bm25 (the index's BM25), or hybrid (both, fused)")
    # no None in the types (left out is None, by default): an error names the field, not a union branch
    fusion: Literal["rrf", "convex"] = Field(
        None, json_schema_extra=_no_default,
        description="hybrid mode only: reciprocal rank fusion (k = 60), or alpha * dense + (1 - alpha) * BM25 over "
                    "min-max normalised scores; default: the index's served fusion (GET /info), else rrf")
    alpha: float = Field(None, ge=0, le=1, allow_inf_nan=False, json_schema_extra=_no_default,
                         description="hybrid mode only: the weight of the dense side of the convex fusion, in [0, 1] "
                                     "(given alone, it means fusion convex)")

    _present = field_validator("queries", "query", "fusion", "alpha", mode="before")(_not_null)

    def fusion_choice(self, served: tuple[str, float | None]) -> tuple[str, float | None]:
        """The (fusion, alpha) of a hybrid search: ``fusion``/``alpha`` as given (alpha alone is
        the convex fusion), else ``served`` (the index's default). Raises FieldError naming the field:
        fusion or alpha outside hybrid mode, alpha with ``"rrf"``, ``"convex"`` without alpha."""
        for name in ("fusion", "alpha"):
            if getattr(self, name) is not None and self.mode != "hybrid":
                raise FieldError(name, f"only for mode 'hybrid' (mode is {self.mode!r})")
        if self.fusion == "rrf" and self.alpha is not None:
            raise FieldError("alpha", "goes with fusion 'convex', not 'rrf'")
        if self.fusion == "convex" and self.alpha is None:
            raise FieldError("alpha", "fusion 'convex' needs alpha, the weight of the dense side in [0, 1] (leave out "
                                      "fusion and alpha for the index's served default)")
        if self.fusion is None and self.alpha is None:
            return served
        return ("convex" if self.alpha is not None else self.fusion), self.alpha

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

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchRequest":
        if (self.queries is None) == (self.query is None):
            raise ValueError("give exactly one of 'query' and 'queries'")
        return self

    def texts(self) -> list[str]:
        """The questions, in request order (one for ``query``)."""
        return [self.query] if self.query is not None else self.queries


class Hit(BaseModel):
    """A retrieved passage: its id and score (higher is better), with its title and text when the
    request asked for them. The score is the mode's: the inner product of the embeddings (dense),
    the BM25 score (bm25), or the fused score (hybrid: RRF's sum of 1 / (60 + rank), or the convex
    combination of normalised scores, in [0, 1])."""

    id: str
    score: float = Field(description="dense: inner product; bm25: BM25 score; hybrid: the fused score")
    title: str | None = None
    text: str | None = None


class SearchResponse(BaseModel):
    """One ranked list of hits per question, in request order; ``took_ms`` in milliseconds."""

    results: list[list[Hit]]
    took_ms: float


class ScoreItemIn(BaseModel):
    """A question, its positive passage and its negatives (plain strings or passages with titles)."""

    model_config = STRICT
    question: NonBlank
    positive: NonBlank | PassageIn
    negatives: list[NonBlank | PassageIn] = []

    _question = field_validator("question")(_not_blank)

    @field_validator("positive")
    @classmethod
    def _positive(cls, value):
        return _not_blank(value) if isinstance(value, str) else value

    _negatives = field_validator("negatives")(_strings_not_blank)


class ScoreRequest(BaseModel):
    """``POST /score``: items to score with the DPR loss, alone or as one in-batch training batch."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "items": [{"question": "when was Greywatch lit?", "positive": {"title": "Greywatch Light", "text": "Lit in 1712 ..."},
                   "negatives": ["The Ember Light flashes red ..."]}],
        "in_batch": False}]})
    items: list[ScoreItemIn] = Field(..., min_length=1)
    in_batch: bool = Field(False, description="score every question against every passage of the request, as in training")


class ScoreResult(BaseModel):
    """The loss of one item (natural log), the softmax over its candidates and the positive's rank."""

    loss: float = Field(description="-log softmax of the positive among the item's candidates")
    probabilities: list[float] = Field(description="softmax of the positive, then of each negative, in order")
    rank: int = Field(description="rank of the positive among the candidates (1 = best)")


class ScoreResponse(BaseModel):
    """One result per item, in request order, their mean loss, and ``took_ms`` in milliseconds."""

    results: list[ScoreResult]
    mean_loss: float
    took_ms: float


class EncodeRequest(BaseModel):
    """``POST /encode``: texts to embed as queries (strings) or as passages (strings or passages)."""

    model_config = ConfigDict(**STRICT, json_schema_extra={
        "examples": [{"texts": ["who built the Ember Light?"], "kind": "query"}],
        "anyOf": [{"properties": {"kind": {"const": "passage"}}, "required": ["kind"]},
                  {"properties": {"kind": {"const": "query"}, "texts": {"items": {"type": "string"}}}}]})
    kind: Literal["query", "passage"] = "query"
    texts: list[NonBlank | PassageIn] = Field(..., min_length=1)

    @field_validator("texts")
    @classmethod
    def _texts(cls, value: list, info: ValidationInfo) -> list:
        _strings_not_blank(value)
        if info.data.get("kind", "query") == "query" and not all(isinstance(t, str) for t in value):
            raise ValueError("queries are strings (a passage with a title needs kind 'passage')")
        return value


class EncodeResponse(BaseModel):
    """One embedding (``dim`` floats) per text, in request order, and the checkpoint's similarity."""

    embeddings: list[list[float]]
    dim: int
    similarity: str


# ---- errors: every 4xx/5xx body has a ``detail`` string


class ErrorField(BaseModel):
    """One field at fault, written as a client writes it (``items[0].positive.title``), and what is wrong."""

    field: str
    message: str


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    detail: str = Field(description="what is wrong, naming the field or the limit")
    errors: list[ErrorField] = Field(None, description="invalid requests (400 and 422): every field at fault")


SEARCH_RESPONSES = {
    409: {"model": ErrorResponse, "description": "mode bm25 or hybrid on an index built with --no-bm25 (the detail names "
                                                 "the field mode)"},
}

ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "the body is not valid JSON (the detail says where), or Content-Length is not a number"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when DPR_API_KEY is set)"},
    413: {"model": ErrorResponse, "description": "request body over DPR_MAX_BODY_BYTES"},
    422: {"model": ErrorResponse, "description": "invalid request; the detail names the field"},
    503: {"model": ErrorResponse, "description": "not ready yet, the query queue is full, or a reload is under way: retry later",
          "headers": {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                      "schema": {"type": "integer"}}}},
}

COST_RESPONSES = {  # the routes that encode texts: bounded by tokens, run in a lane (api/lanes.py)
    413: {"model": ErrorResponse, "description": "the request encodes more tokens than DPR_MAX_REQUEST_TOKENS"},
    503: {"model": ErrorResponse, "description": "the request's lane (interactive or heavy) is full; retry after Retry-After"},
}
BODY_RESPONSES = {  # the routes that take a JSON body
    415: {"model": ErrorResponse, "description": "the body was not sent as JSON: Content-Type must be application/json"},
}
