"""The request limits from the settings (``DPR_MAX_*``): one table that both checks requests and
writes the published OpenAPI schema, so the two cannot disagree.

Each row says: in this request model, this field is bounded by this setting, counting

- ``"items"``: the length of the list (JSON Schema ``maxItems``);
- ``"maximum"``: the number itself (``maximum``);
- ``"characters"``: the length of the string, or of each string in the list; passages given as
  objects are bounded by :class:`~dpr_service.api.schemas.PassageIn`'s own rows (``maxLength`` on
  every string the field's schema allows).

:func:`check_limits` walks a parsed request (nested models included) and raises
:class:`LimitExceeded` naming the field as a client wrote it (``items[0].negatives[1].title``);
:func:`document_limits` writes the same rows into the schema.

Counts and characters bound what a request may *say*; what it *costs* is bounded by tokens after
truncation (:func:`check_tokens`, ``DPR_MAX_REQUEST_TOKENS``: 413), counted once the texts are
tokenised, and the heavy lane admits by tokens in flight (:mod:`.lanes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal

from pydantic import BaseModel

from .openai_schemas import EmbeddingsRequest
from .schemas import EncodeRequest, FieldError, PassageIn, ScoreItemIn, ScoreRequest, SearchRequest
from .settings import Settings


@dataclass(frozen=True)
class Limit:
    """``model.field`` is bounded by ``getattr(settings, setting)``, counting ``bound``."""

    model: type[BaseModel]
    field: str
    setting: str
    bound: Literal["items", "maximum", "characters"]


LIMITS: tuple[Limit, ...] = (
    Limit(SearchRequest, "queries", "max_queries", "items"),
    Limit(SearchRequest, "top_k", "max_top_k", "maximum"),
    Limit(SearchRequest, "queries", "max_text_chars", "characters"),
    Limit(SearchRequest, "query", "max_text_chars", "characters"),  # shorthand for queries: [query], named as written
    Limit(ScoreRequest, "items", "max_items", "items"),
    Limit(ScoreItemIn, "negatives", "max_passages_per_item", "items"),
    Limit(ScoreItemIn, "question", "max_text_chars", "characters"),
    Limit(ScoreItemIn, "positive", "max_text_chars", "characters"),
    Limit(ScoreItemIn, "negatives", "max_text_chars", "characters"),
    Limit(EncodeRequest, "texts", "max_queries", "items"),
    Limit(EncodeRequest, "texts", "max_text_chars", "characters"),
    Limit(EmbeddingsRequest, "input", "max_queries", "items"),  # /v1/embeddings: /encode's limits
    Limit(EmbeddingsRequest, "input", "max_text_chars", "characters"),
    Limit(PassageIn, "text", "max_text_chars", "characters"),
    Limit(PassageIn, "title", "max_text_chars", "characters"),  # titles: the same limit (and may be empty)
)


class LimitExceeded(FieldError):
    """A request over a ``DPR_MAX_*`` limit: ``field`` as the client wrote it, ``message`` what is wrong.
    The app answers it with 422, like any invalid field."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)


class TooCostly(FieldError):
    """A request that would encode more tokens than ``DPR_MAX_REQUEST_TOKENS``: answered with 413
    naming the field and the limit."""

    def __init__(self, field: str, tokens: int, limit: int):
        super().__init__(field, f"this request encodes {tokens} tokens (after truncation to the checkpoint's max "
                                f"lengths); at most {limit} per request (DPR_MAX_REQUEST_TOKENS): send fewer or "
                                "shorter texts, or split the request")
        self.status = 413


def check_tokens(tokens: int, settings: Settings, field: str) -> None:
    """Raise :class:`TooCostly` when ``tokens`` is over ``settings.max_request_tokens``."""
    if tokens > settings.max_request_tokens:
        raise TooCostly(field, tokens, settings.max_request_tokens)


# ----------------------------------------------------------------------------- checking requests


def check_limits(body: BaseModel, settings: Settings, path: str = "") -> None:
    """Raise :class:`LimitExceeded` for the first field of ``body`` (a parsed request, walked depth
    first in table order, then its nested models) over its limit in ``settings``; return None when
    every field is within its limits. The field is named as the client wrote it: a model that
    parses a field into another shape (``/v1/embeddings``' one string ``input`` into a list) names
    it back by its ``written_field`` method."""
    for limit in LIMITS:
        if type(body) is limit.model:
            try:
                _check(limit, getattr(body, limit.field), _join(path, limit.field), getattr(settings, limit.setting))
            except LimitExceeded as e:
                if hasattr(body, "written_field"):
                    raise LimitExceeded(body.written_field(e.field), e.message) from None
                raise
    for name in type(body).model_fields:
        for where, model in _models(getattr(body, name), _join(path, name)):
            check_limits(model, settings, where)


def _check(limit: Limit, value: Any, where: str, bound: int) -> None:
    if value is None:
        return
    if limit.bound == "items" and len(value) > bound:
        raise LimitExceeded(where, f"at most {bound}, got {len(value)}")
    if limit.bound == "maximum" and value > bound:
        raise LimitExceeded(where, f"at most {bound}, got {value}")
    if limit.bound == "characters":
        for at, text in _strings(value, where):
            if len(text) > bound:
                raise LimitExceeded(at, f"longer than {bound} characters")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(field, text) for a string value, or for each string in a list value (``where[i]``)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, list):
        yield from ((f"{where}[{i}]", v) for i, v in enumerate(value) if isinstance(v, str))


def _models(value: Any, where: str) -> Iterator[tuple[str, BaseModel]]:
    """(field, model) for a nested model value, or for each model in a list value (``where[i]``)."""
    if isinstance(value, BaseModel):
        yield where, value
    elif isinstance(value, list):
        yield from ((f"{where}[{i}]", v) for i, v in enumerate(value) if isinstance(v, BaseModel))


# ----------------------------------------------------------------------------- the published schema


def document_limits(openapi: dict, settings: Settings) -> dict:
    """Write every row of :data:`LIMITS`, with the values of ``settings``, into ``openapi`` (the
    dict FastAPI generated; changed in place and returned). A model or field missing from it is a
    KeyError: the table names something the app does not publish."""
    schemas = openapi["components"]["schemas"]
    for limit in LIMITS:
        field = schemas[limit.model.__name__]["properties"][limit.field]
        value = getattr(settings, limit.setting)
        if limit.bound == "items":
            for schema in _schemas_of_type(field, "array"):
                schema["maxItems"] = value
        elif limit.bound == "maximum":
            field["maximum"] = value
        else:
            for schema in _schemas_of_type(field, "string"):
                schema["maxLength"] = value
    return openapi


def _schemas_of_type(schema: dict, kind: str) -> Iterator[dict]:
    """The schemas of JSON type ``kind`` that ``schema`` allows: itself, its union branches
    (``anyOf``/``oneOf``) and, for strings, the items of its arrays (references are not followed:
    a referenced model has its own rows)."""
    if schema.get("type") == kind:
        yield schema
    for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
        yield from _schemas_of_type(branch, kind)
    if kind == "string" and isinstance(schema.get("items"), dict):
        yield from _schemas_of_type(schema["items"], kind)
