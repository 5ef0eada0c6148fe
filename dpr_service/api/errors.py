"""Every error a client can cause is a 4xx whose ``detail`` names the field (or header) at fault;
the server's own troubles are 503 (retry) or a bare 500 (logged, never a traceback to the client).

- 400: a body that is not JSON: ``body: not valid JSON (<reason> at character N)``;
  (the Guard middleware: a Content-Length that is not a number).
- 408: a body that did not arrive within its deadline (the Guard: ``DPR_BODY_TIMEOUT_S``; the
  connection is closed).
- 413: a body over ``DPR_MAX_BODY_BYTES``; a request that encodes more than ``DPR_MAX_REQUEST_TOKENS``.
- 415: a body not sent as JSON by its Content-Type: ``content-type: ...`` (``deps.json_body``).
- 409: a valid request the index cannot serve: ``mode: ...`` (bm25 or hybrid on an index built
  with ``--no-bm25``).
- 422: a field that fails its schema, a ``DPR_MAX_*`` limit or a rule between fields (``alpha`` only
  in hybrid mode): ``items[0].negatives[1]: ...``; a body that is not a JSON object:
  ``body: must be a JSON object, got an array``.
- 503 with Retry-After: not ready, the query queue is full, the request's lane is full (``lane``
  names it: ``lanes.py``), a reload retired the encoder, or Milvus (``DPR_MILVUS_URI``) did not answer.
- 500: anything unexpected: ``internal error`` (the traceback is logged, never sent).

Field names are written as a client writes them: ``items[0].positive.title``.

On the OpenAI-compatible routes (``/v1/...``) every one of these answers, the Guard's included, has
OpenAI's shape instead: ``{"error": {"message": <the detail>, "type", "param": <the first field>,
"code"}}`` (:class:`OpenAIErrorShape`, :func:`openai_shape`), which the ``openai`` client parses.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dpr_service.core.milvus import MilvusUnavailable

from .batching import Overloaded, Stopped
from .guard import BodyTimeout
from .lanes import LaneFull
from .schemas import FieldError
from .settings import Settings

log = logging.getLogger("dpr_service.api")


def field_name(loc: tuple | list, body=None, missing: bool = False) -> str:
    """A pydantic error location after ``body`` as a client writes it: ``("items", 0, "question")``
    -> ``items[0].question``; the empty location is ``body``. Given the request's ``body`` (the
    parsed JSON), the location is walked along it and the parts pydantic adds for a union's branch
    (``("query", "str")``, ``("items", 0, "positive", "PassageIn", "text")``) are left out: a string
    part is kept where it is a key of the object there, or, for a ``missing`` error (a required
    field left out), where it is the last part."""
    name, value = "", body
    for i, part in enumerate(loc):
        if isinstance(part, int):
            name += f"[{part}]"
            value = value[part] if isinstance(value, list) and 0 <= part < len(value) else None
            continue
        if body is not None and not (isinstance(value, dict) and (part in value or (missing and i == len(loc) - 1))):
            continue  # a union branch's tag, not a field the client wrote
        name += f".{part}" if name else str(part)
        value = value.get(part) if isinstance(value, dict) else None
    return printable(name or "body")


def printable(text: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate from the request (a field name, say) is escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, errors: list[dict], headers: dict | None = None) -> JSONResponse:
    """``{"detail": "<first field>: <its message>", "errors": [{"field", "message"}, ...]}``."""
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return JSONResponse({"detail": f"{first['field']}: {first['message']}", "errors": errors}, status_code=status,
                        headers=headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 for a body that is not JSON; 422 naming every field that fails the schema."""
    raw = exc.errors()
    bad_json = next((e for e in raw if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        reason = (bad_json.get("ctx") or {}).get("error", "cannot be parsed")
        at = bad_json["loc"][1] if len(bad_json["loc"]) > 1 else 0
        return error_response(400, [{"field": "body", "message": f"not valid JSON ({printable(str(reason))} at character {at})"}])
    errors = []
    for e in raw:
        error = {"field": field_name(e["loc"][1:], exc.body, e.get("type") == "missing"), "message": _message(e)}
        if error not in errors:  # one union's branches can say the same of one field
            errors.append(error)
    return error_response(422, errors)


OBJECT_EXPECTED = {"model_attributes_type", "model_type", "dict_type"}


def _message(error: dict) -> str:
    """pydantic's message, but "must be a JSON object, got an array" where an object was expected
    (pydantic says "a valid dictionary or object to extract fields from"), and without the "Value
    error, " pydantic puts before a validator's own message."""
    if error.get("type") in OBJECT_EXPECTED:
        return f"must be a JSON object, got {json_type(error.get('input'))}"
    message = error["msg"]
    if error.get("type") == "value_error" and message.startswith(VALUE_ERROR_PREFIX):
        message = message[len(VALUE_ERROR_PREFIX):]  # pydantic's wording, not the rule the field broke
    return printable(message)


VALUE_ERROR_PREFIX = "Value error, "


def json_type(value) -> str:
    """What a parsed JSON value is, in JSON's words: ``null``, ``a boolean``, ``a number``, ``a string``,
    ``an array`` or ``an object`` (``raw bytes`` for a body that was never parsed)."""
    for kinds, name in ((type(None), "null"), (bool, "a boolean"), ((int, float), "a number"), (str, "a string"),
                        (list, "an array"), (dict, "an object")):
        if isinstance(value, kinds):
            return name
    return "raw bytes"


async def field_error(request: Request, exc: FieldError) -> JSONResponse:
    """422 (or the error's own status) naming the field: over its ``DPR_MAX_*`` limit (LimitExceeded),
    against a rule between fields, or asking what the index cannot serve; the shape of any invalid field."""
    return error_response(exc.status, [{"field": printable(exc.field), "message": exc.message}])


def install_error_handlers(app: FastAPI, settings: Settings) -> None:
    """Register the handlers above and the 503/500 ones on ``app``."""
    retry = {"Retry-After": str(settings.retry_after_s)}

    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse({"detail": "server busy: the query queue is full, retry later"}, status_code=503, headers=retry)

    async def stopped(request: Request, exc: Stopped) -> JSONResponse:
        return JSONResponse({"detail": "server reloading: the query encoder was replaced, retry"}, status_code=503,
                            headers=retry)

    async def body_timeout(request: Request, exc: BodyTimeout) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=408, headers={"Connection": "close"})

    async def lane_full(request: Request, exc: LaneFull) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "lane": exc.lane}, status_code=503, headers=retry)

    async def milvus_unavailable(request: Request, exc: MilvusUnavailable) -> JSONResponse:
        log.warning("%s: %s", request.url.path, exc)
        return JSONResponse({"detail": "search backend unavailable: Milvus did not answer, retry later"},
                            status_code=503, headers=retry)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        body = {"detail": "internal error"}  # sent from outside every middleware: shaped here for /v1
        return JSONResponse(openai_shape(500, body) if request.url.path.startswith(OPENAI_PREFIX) else body, status_code=500)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(FieldError, field_error)  # LimitExceeded too
    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(Stopped, stopped)
    app.add_exception_handler(LaneFull, lane_full)
    app.add_exception_handler(BodyTimeout, body_timeout)
    app.add_exception_handler(MilvusUnavailable, milvus_unavailable)
    app.add_exception_handler(Exception, unexpected)


# ----------------------------------------------------------------------------- OpenAI's shape on /v1

OPENAI_PREFIX = "/v1/"
OPENAI_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
                409: "unsupported_value", 413: "request_too_large", 415: "unsupported_media_type", 422: "invalid_value",
                500: "internal_error", 503: "unavailable"}


def openai_shape(status: int, body: dict) -> dict:
    """Our error body (``{"detail", "errors"?}``) as OpenAI's: ``{"error": {"message", "type", "param",
    "code"}}``; ``message`` is the detail, ``param`` the first field at fault (None for the whole body or
    a header), ``type`` ``invalid_request_error`` (4xx) or ``server_error`` (5xx), ``code`` by status
    (:data:`OPENAI_CODES`; the key's is OpenAI's own ``invalid_api_key``)."""
    detail = body.get("detail")
    fields = [e.get("field") for e in body.get("errors") or [] if isinstance(e, dict)]
    param = fields[0] if fields and fields[0] != "body" else None
    return {"error": {"message": detail if isinstance(detail, str) else json.dumps(detail),
                      "type": "server_error" if status >= 500 else "invalid_request_error",
                      "param": param, "code": OPENAI_CODES.get(status)}}


class OpenAIErrorShape:
    """ASGI middleware, outside the Guard: a JSON error answer (4xx/5xx with a ``detail``) on a path
    under ``/v1/`` is re-written in OpenAI's shape (:func:`openai_shape`), headers such as Retry-After
    kept. Other paths and answers pass through untouched."""

    def __init__(self, app, prefix: str = OPENAI_PREFIX):
        self.app, self.prefix = app, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        held: dict = {}  # the start of an error answer, and its body so far

        async def reshaping_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400 and _is_json(message["headers"]):
                held.update(start=message, body=b"")
                return
            if message["type"] != "http.response.body" or not held:
                return await send(message)
            held["body"] += message.get("body", b"")
            if message.get("more_body", False):
                return
            start, body = held["start"], _reshaped(held["start"]["status"], held["body"])
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshaping_send)


def _is_json(headers) -> bool:
    return any(k.lower() == b"content-type" and v.split(b";")[0].strip() == b"application/json" for k, v in headers)


def _reshaped(status: int, raw: bytes) -> bytes:
    """``raw`` (an error body) in OpenAI's shape; unchanged when it is not one of ours (no ``detail``)."""
    try:
        body = json.loads(raw)
    except ValueError:  # an empty body (HEAD) or not JSON after all
        return raw
    if not isinstance(body, dict) or "detail" not in body:
        return raw
    return json.dumps(openai_shape(status, body)).encode()
