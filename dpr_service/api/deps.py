"""Route dependencies, as ``Annotated`` aliases named for what they give.

- :data:`AppSettings`, :data:`AppMetrics`, :data:`AppReloader`: this app's settings, metrics and reloader.
- :data:`ServingResources`: checkpoint, index and batcher serving now (503 with Retry-After before
  the first load).
- :data:`KEY_REQUIRED` / :data:`JSON_BODY`: route-level checks (401 without the API key; 415 for a
  body whose Content-Type is not JSON).
- :data:`SearchBody`, :data:`ScoreBody`, :data:`EncodeBody`: the request body parsed (422 naming
  the field) and within the ``DPR_MAX_*`` limits (:mod:`dpr_service.api.limits`, 422 naming the field).
"""

from __future__ import annotations

import email.message
import inspect
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from pydantic import BaseModel

from .guard import AUTH_FAILED, check_key
from .limits import check_limits
from .metrics import Metrics
from .resources import Reloader, Resources
from .schemas import EncodeRequest, ScoreRequest, SearchRequest
from .settings import Settings

M = TypeVar("M", bound=BaseModel)


def app_settings(request: Request) -> Settings:
    """The settings this app was created with (``create_app(settings)``)."""
    return request.app.state.settings


def app_metrics(request: Request) -> Metrics:
    """This app's Prometheus metrics."""
    return request.app.state.metrics


def app_reloader(request: Request) -> Reloader:
    """This app's :class:`~dpr_service.api.resources.Reloader` (set in the lifespan)."""
    return request.app.state.reloader


AppSettings = Annotated[Settings, Depends(app_settings)]
AppMetrics = Annotated[Metrics, Depends(app_metrics)]
AppReloader = Annotated[Reloader, Depends(app_reloader)]


def require_key(request: Request) -> None:
    """X-API-Key or Authorization: Bearer against DPR_API_KEY, in constant time (see guard.check_key);
    raises 401. The Guard middleware runs the same check first, before the body is read."""
    api_key = request.app.state.settings.api_key
    if not check_key(api_key.get_secret_value() if api_key is not None else None,
                     request.headers.get("x-api-key") or "", request.headers.get("authorization") or ""):
        raise HTTPException(401, AUTH_FAILED, headers={"WWW-Authenticate": "Bearer"})


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type header names JSON: ``application/json`` or ``application/*+json``
    (parameters such as ``; charset=utf-8`` allowed), as FastAPI decides whether to parse a body."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


async def json_body(request: Request) -> None:
    """A body must be sent as JSON: one with another (or no) Content-Type is 415 naming the header,
    where FastAPI would hand the raw bytes to validation ("Input should be a valid dictionary")."""
    content_type = request.headers.get("content-type")
    if await request.body() and not is_json(content_type):
        got = repr(content_type) if content_type else "none"
        raise HTTPException(415, f"content-type: the body must be JSON sent with Content-Type: application/json (got {got})")


async def current_resources(request: Request) -> Resources:
    """The resources serving now; raises 503 with Retry-After before the first load succeeded
    (async: it runs on the event loop, where the reload check starts its task)."""
    request.app.state.reloader.check()
    res = request.app.state.resources
    if res is None:
        raise HTTPException(503, f"not ready: {request.app.state.load_error or 'loading'}", headers={"Retry-After": "5"})
    return res


ServingResources = Annotated[Resources, Depends(current_resources)]
KEY_REQUIRED = Depends(require_key)
JSON_BODY = Depends(json_body)


def within_limits(model: type[M]) -> Any:
    """``Annotated[model, Depends(...)]``: the body parsed as ``model`` and checked against the
    ``DPR_MAX_*`` limits of the app's settings (raises LimitExceeded, answered with 422)."""

    async def checked(request: Request, body: Any) -> Any:
        check_limits(body, request.app.state.settings)
        return body

    checked.__signature__ = inspect.Signature([  # the model as the body's annotation, for FastAPI
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        inspect.Parameter("body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=model)])
    checked.__name__ = f"{model.__name__}_within_limits"
    return Annotated[model, Depends(checked)]


SearchBody = within_limits(SearchRequest)
ScoreBody = within_limits(ScoreRequest)
EncodeBody = within_limits(EncodeRequest)
