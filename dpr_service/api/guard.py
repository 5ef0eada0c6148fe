"""The first thing every request meets (a plain ASGI middleware, cheap enough to run at several
times the server's capacity): the API key, admission, the body size, then the request metrics.

In this order, and all before a byte of the body is read:

1. **API key.** Every path but the open ones (health, the web page) needs ``DPR_API_KEY`` as
   ``X-API-Key`` or ``Authorization: Bearer``; unknown paths and the OpenAPI docs too, so nothing is
   parsed, and no route listed, for a client without the key. The comparison hashes both sides and
   compares the digests with :func:`hmac.compare_digest`: its time depends neither on how much of the
   key is right nor on its length.
2. **Admission.** At most ``DPR_MAX_IN_FLIGHT`` requests are in progress; one more gets 503 with
   Retry-After at once. Under overload the server spends almost nothing on the requests it sheds,
   and the memory held by bodies in progress is bounded by ``max_in_flight x max_body_bytes``.
3. **Body size.** A Content-Length that is not a number gets 400; one over ``DPR_MAX_BODY_BYTES``
   gets 413 unread; a body without one (chunked) is counted as it arrives and refused as soon as it
   passes the limit. A path in ``body_limits`` (the data set upload, whose route streams the body
   to disk and counts it itself) has its own limit (``DPR_MAX_UPLOAD_BYTES``) and is not buffered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Callable

AUTH_FAILED = "missing or wrong API key (X-API-Key or Authorization: Bearer)"


def check_key(expected: str | None, x_api_key: str, authorization: str) -> bool:
    """Whether the request's key is ``expected`` (always true when no key is configured)."""
    if expected is None:
        return True
    given = x_api_key
    if not given and authorization.lower().startswith("bearer "):
        given = authorization[7:]
    want = hashlib.sha256(expected.encode("utf-8", "backslashreplace")).digest()
    got = hashlib.sha256(given.encode("utf-8", "backslashreplace")).digest()
    return hmac.compare_digest(got, want)  # equal lengths, constant time


async def _respond(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: key, admission and body size, then counts the request in the metrics."""

    def __init__(self, app, settings, open_routes: set[str], observe: Callable[[str, int, float], None] | None = None,
                 known_paths: Callable[[], set[str]] | None = None, body_limits: dict[str, int] | None = None):
        self.app, self.settings, self.open_routes = app, settings, open_routes
        self.body_limits = body_limits if body_limits is not None else {}  # path -> bytes; the route streams it
        self.observe = observe or (lambda path, status, seconds: None)
        self._known_paths, self._known = known_paths, None
        self.in_flight = 0

    def _label(self, path: str) -> str:
        if self._known is None:
            self._known = frozenset(self._known_paths()) if self._known_paths else frozenset()
        return path if path in self._known else "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path, s = scope["path"], self.settings
        headers = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        guarded = path not in self.open_routes
        length = headers.get("content-length")
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if guarded and not check_key(s.api_key.get_secret_value() if s.api_key is not None else None,
                                         headers.get("x-api-key", ""), headers.get("authorization", "")):
                return await _respond(counted_send, 401, AUTH_FAILED, {"WWW-Authenticate": "Bearer"})
            if guarded and self.in_flight >= s.max_in_flight:
                return await _respond(counted_send, 503, f"server busy: {self.in_flight} requests in progress, retry later",
                                      {"Retry-After": str(s.retry_after_s)})
            if length is not None and not (length.isascii() and length.isdigit()):
                return await _respond(counted_send, 400, f"invalid Content-Length header {_shown(length)}: not a number of bytes")
            limit = self.body_limits.get(path, s.max_body_bytes)
            if length is not None and int(length) > limit:
                return await _respond(counted_send, 413, f"request body over {limit} bytes")
            self.in_flight += guarded
            try:
                if length is None and scope["method"] in ("POST", "PUT", "PATCH") and path not in self.body_limits:
                    body = bytearray()
                    while True:  # chunked upload: count as it arrives, keep at most the limit
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return
                        body += message.get("body", b"")
                        if len(body) > s.max_body_bytes:
                            return await _respond(counted_send, 413, f"request body over {s.max_body_bytes} bytes")
                        if not message.get("more_body", False):
                            break
                    receive = _replay(bytes(body), receive)
                await self.app(scope, receive, counted_send)
            finally:
                self.in_flight -= guarded
        finally:
            self.observe(self._label(path), status[0], time.perf_counter() - t0)


def _shown(value: str, limit: int = 40) -> str:
    """A header value quoted for a message: printable ASCII, at most ``limit`` characters."""
    text = value[:limit].encode("ascii", "backslashreplace").decode("ascii")
    return json.dumps(text + ("..." if len(value) > limit else ""))


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then whatever comes: a disconnect

    return replay
