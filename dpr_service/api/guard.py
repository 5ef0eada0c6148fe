"""The first thing every request meets (a plain ASGI middleware, cheap enough to run at several
times the server's capacity): the API key, admission, the body size, then the request metrics.

In this order:

1. **API key.** Every path but the open ones (health, the web page) needs ``DPR_API_KEY`` as
   ``X-API-Key`` or ``Authorization: Bearer``; unknown paths and the OpenAPI docs too, so nothing is
   parsed, and no route listed, for a client without the key. The comparison hashes both sides and
   compares the digests with :func:`hmac.compare_digest`: its time depends neither on how much of the
   key is right nor on its length.
2. **Body size.** A Content-Length that is not a number gets 400; one over ``DPR_MAX_BODY_BYTES``
   gets 413 unread; a body without one (chunked) is counted as it arrives and refused as soon as it
   passes the limit. A path in ``body_limits`` (the data set upload, whose route streams the body
   to disk and counts it itself) has its own limit (``DPR_MAX_UPLOAD_BYTES``) and is not buffered.
3. **Body deadline (slow clients).** The body is read whole before anything else happens, within
   ``DPR_BODY_TIMEOUT_S`` plus its size at ``DPR_BODY_MIN_BYTES_PER_S`` (:func:`body_deadline_s`);
   past it the answer is 408 and the connection is closed. A streamed upload's parts must each come
   within ``DPR_BODY_TIMEOUT_S`` and the whole within the same deadline (:class:`BodyTimeout`, 408).
   nginx does this with ``client_body_timeout``; a bare uvicorn does not time out a body at all.
4. **Admission.** Only then, with the body in hand: at most ``DPR_MAX_IN_FLIGHT`` requests are in
   progress; one more gets 503 with Retry-After at once. A client that sends headers and then holds
   its body back never takes a slot, so 256 such sockets cannot refuse everybody else (they did,
   when admission came first). The work itself is then bounded by its lane (``lanes.py``).
"""

from __future__ import annotations

import asyncio
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
    """ASGI middleware: key, body size, body deadline, admission; then counts the request in the metrics."""

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
            if length is not None and not (length.isascii() and length.isdigit()):
                return await _respond(counted_send, 400, f"invalid Content-Length header {_shown(length)}: not a number of bytes")
            limit = self.body_limits.get(path, s.max_body_bytes)
            if length is not None and int(length) > limit:
                return await _respond(counted_send, 413, f"request body over {limit} bytes")
            if path in self.body_limits:  # streamed by its route: each part under the deadline
                receive = _paced(receive, int(length) if length is not None else None, s)
            elif (int(length) if length is not None else scope["method"] in ("POST", "PUT", "PATCH")):
                body = await _read_body(receive, counted_send, int(length) if length is not None else None, s)
                if body is None:  # answered (408, 413) or the client went away
                    return
                receive = _replay(body, receive)
            # admission only now: a client whose body is slow or never comes holds no slot (slowloris)
            if guarded and self.in_flight >= s.max_in_flight:
                return await _respond(counted_send, 503, f"server busy: {self.in_flight} requests in progress, retry later",
                                      {"Retry-After": str(s.retry_after_s)})
            self.in_flight += guarded
            try:
                await self.app(scope, receive, counted_send)
            finally:
                self.in_flight -= guarded
        finally:
            self.observe(self._label(path), status[0], time.perf_counter() - t0)


class BodyTimeout(Exception):
    """A request body that did not arrive in time (:func:`body_deadline_s`): answered 408."""

    def __init__(self, seconds: float, received: int):
        super().__init__(f"request body not received in time: {received} bytes in {seconds:.1f} s (a body must "
                         "arrive within DPR_BODY_TIMEOUT_S plus its size at DPR_BODY_MIN_BYTES_PER_S)")


def body_deadline_s(length: int | None, settings) -> float:
    """Seconds a body of ``length`` bytes may take to arrive: ``DPR_BODY_TIMEOUT_S`` plus its size at
    ``DPR_BODY_MIN_BYTES_PER_S`` (a body without a Content-Length: the size limit's)."""
    size = length if length is not None else settings.max_body_bytes
    return settings.body_timeout_s + size / settings.body_min_bytes_per_s


async def _read_body(receive, send, length: int | None, settings) -> bytes | None:
    """The whole body, read under its deadline (:func:`body_deadline_s`) and size limit; None when it
    was answered instead (408 past the deadline, with ``Connection: close``; 413 over the limit) or the
    client went away."""
    loop = asyncio.get_running_loop()
    started, body = loop.time(), bytearray()
    try:
        async with asyncio.timeout(body_deadline_s(length, settings)):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                body += message.get("body", b"")
                if len(body) > settings.max_body_bytes:  # chunked: counted as it arrives, kept at most the limit
                    await _respond(send, 413, f"request body over {settings.max_body_bytes} bytes")
                    return None
                if not message.get("more_body", False):
                    return bytes(body)
    except TimeoutError:
        await _respond(send, 408, str(BodyTimeout(loop.time() - started, len(body))), {"Connection": "close"})
        return None


def _paced(receive, length: int | None, settings):
    """``receive`` for a route that streams its body: each part must come within ``DPR_BODY_TIMEOUT_S``
    of the last and the whole within :func:`body_deadline_s`, else :class:`BodyTimeout` (408)."""
    loop = asyncio.get_running_loop()
    started, received = loop.time(), 0
    deadline = started + body_deadline_s(length, settings) if length is not None else None

    async def paced():
        nonlocal received
        wait = settings.body_timeout_s if deadline is None else min(settings.body_timeout_s, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                message = await receive()
        except TimeoutError:
            raise BodyTimeout(loop.time() - started, received) from None
        received += len(message.get("body", b""))
        return message

    return paced


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
