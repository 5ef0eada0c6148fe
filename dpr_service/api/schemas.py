"""Request and response bodies (OpenAPI documented, with examples)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _strings_not_blank(values: list) -> list:
    for v in values:
        if isinstance(v, str):
            _not_blank(v)
    return values


class PassageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = ""
    text: str

    _text = field_validator("text")(_not_blank)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"queries": ["who built the Ember Light?"], "top_k": 5}]})
    queries: list[str] | None = Field(None, description="questions, one ranked list each")
    query: str | None = Field(None, description="a single question (instead of queries)")
    top_k: int = Field(10, ge=1)
    with_text: bool = True

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
    model_config = ConfigDict(extra="forbid")
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
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
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
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"texts": ["who built the Ember Light?"], "kind": "query"}]})
    texts: list[str | PassageIn] = Field(..., min_length=1)
    kind: Literal["query", "passage"] = "query"

    _texts = field_validator("texts")(_strings_not_blank)


class EncodeResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    similarity: str
