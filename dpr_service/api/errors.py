"""Every error a client can cause is a 4xx whose ``detail`` names the field (or header) at fault;
the server's own troubles are 503 (retry) or a bare 500 (logged, never a traceback to the client).

- 400: a body that is not JSON: ``body: not valid JSON (<reason> at character N)``;
  (the Guard middleware: a Content-Length that is not a number).
- 415: a body not sent as JSON by its Content-Type: ``content-type: ...`` (``deps.json_body``).
- 409: a valid request the index cannot serve: ``mode: ...`` (bm25 or hybrid on an index built
  with ``--no-bm25``).
- 422: a field that fails its schema, a ``DPR_MAX_*`` limit or a rule between fields (``alpha`` only
  in hybrid mode): ``items[0].negatives[1]: ...``; a body that is not a JSON object:
  ``body: must be a JSON object, got an array``.
- 503 with Retry-After: not ready, the query queue is full, a reload retired the encoder, or Milvus
  (``DPR_MILVUS_URI``) did not answer.
- 500: anything unexpected: ``internal error`` (the traceback is logged, never sent).

Field names are written as a client writes them: ``items[0].positive.title``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dpr_service.core.milvus import MilvusUnavailable

from .batching import Overloaded, Stopped
from .schemas import FieldError
from .settings import Settings

log = logging.getLogger("dpr_service.api")


def field_name(loc: tuple | list) -> str:
    """A pydantic error location after ``body`` as a client writes it: ``("items", 0, "question")``
    -> ``items[0].question``; the empty location is ``body``."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
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
    errors = [{"field": field_name(e["loc"][1:]), "message": _message(e)} for e in raw]
    return error_response(422, errors)


OBJECT_EXPECTED = {"model_attributes_type", "model_type", "dict_type"}


def _message(error: dict) -> str:
    """pydantic's message, but "must be a JSON object, got an array" where an object was expected
    (pydantic says "a valid dictionary or object to extract fields from")."""
    if error.get("type") in OBJECT_EXPECTED:
        return f"must be a JSON object, got {json_type(error.get('input'))}"
    return printable(error["msg"])


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

    async def milvus_unavailable(request: Request, exc: MilvusUnavailable) -> JSONResponse:
        log.warning("%s: %s", request.url.path, exc)
        return JSONResponse({"detail": "search backend unavailable: Milvus did not answer, retry later"},
                            status_code=503, headers=retry)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(FieldError, field_error)  # LimitExceeded too
    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(Stopped, stopped)
    app.add_exception_handler(MilvusUnavailable, milvus_unavailable)
    app.add_exception_handler(Exception, unexpected)
