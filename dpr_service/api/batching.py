"""Adaptive batching: queries from concurrent requests are encoded together, at no cost to a lone one.

Requests put their texts on a bounded queue and await a future. One worker encodes, in a worker
thread so that the event loop never blocks, and resolves the futures. It dispatches the moment the
encoder is free: whatever is queued then (one text or ``max_size``) is the batch, with no waiting
window. While a batch is encoding, the texts that arrive queue up and become the next batch, so
batches grow with the load by themselves (continuous batching, as in the serving engines that
dispatch to an idle model at once). It replaced a first-come window (a batch started at most
``max_wait_ms`` after its first text), which made every request of a light load wait for the whole
window: ``max_wait_ms`` is now accepted and unused (no text ever waits for a window).

A full queue raises :class:`Overloaded`, which the app turns into 503 with Retry-After. When a
batch fails, its texts are encoded one by one, so that only the request whose text fails gets the
error.

:meth:`QueryBatcher.stop` drains: from then on :meth:`~QueryBatcher.submit` raises :class:`Stopped`,
and everything already queued, the batch being encoded included, is encoded and answered. Only
when that takes longer than ``timeout`` are the futures still pending failed, with
:class:`Stopped`; no future is ever left unresolved.

The seconds each request spent waiting and encoding go to :data:`stage_seconds` when the caller set
one (``POST /search`` does, for the ``dpr_search_stage_seconds`` histograms of ``/metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from contextvars import ContextVar
from typing import Callable

import numpy as np


class Overloaded(Exception):
    """The queue holds ``queue_max`` texts already: the request is answered 503 with Retry-After."""


class Stopped(Exception):
    """The batcher was stopped (a reload retired it): submit again to the one now serving."""


log = logging.getLogger("dpr_service.api")
_STOP = object()  # queued by stop(): everything queued before it is still answered

# Per request (a context variable, so each request task sees its own): a dict that submit() fills with
# "queue_wait" (seconds from the texts' arrival until their batch's encoding started: the longest of
# the request's texts) and "encode" (seconds their batch's encode call took). None: not recorded.
stage_seconds: ContextVar[dict[str, float] | None] = ContextVar("dpr_stage_seconds", default=None)


class _Item:
    """One queued text: its future, when it was queued, and (set by the worker) when its batch's
    encoding started and how long it took (``time.perf_counter`` seconds)."""

    __slots__ = ("text", "future", "queued", "started", "encode_s")

    def __init__(self, text: str, future: asyncio.Future):
        self.text, self.future, self.queued = text, future, time.perf_counter()
        self.started = self.encode_s = None


def _timed(encode: Callable[[list[str]], np.ndarray], texts: list[str]) -> tuple[np.ndarray, float, float]:
    """(embeddings, start, seconds) of one encode call, timed in the thread that runs it."""
    t0 = time.perf_counter()
    emb = encode(texts)
    return emb, t0, time.perf_counter() - t0


class QueryBatcher:
    """Encodes the texts of concurrent :meth:`submit` calls together: batches of at most
    ``max_size`` texts, at most ``queue_max`` texts waiting. ``encode`` maps a list of N texts to an
    (N, D) array (it runs on a thread of ``executor``, the app's interactive lane); ``observe`` is
    called with each batch's size.

    An idle encoder takes the texts queued at once (a lone query is never held back); a busy one's
    next batch is whatever queued while it worked, up to ``max_size``. ``max_wait_ms``
    (``DPR_BATCH_MAX_WAIT_MS``) is accepted for compatibility and unused: there is no window."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_size: int, max_wait_ms: float, queue_max: int,
                 observe: Callable[[int], None] | None = None, executor: Executor | None = None):
        self.encode, self.max_size, self.max_wait = encode, max_size, max_wait_ms / 1000
        self.executor = executor  # the interactive lane's threads (None: asyncio's default executor)
        self.queue_max = queue_max
        self.queue: asyncio.Queue = asyncio.Queue()  # bounded by submit() (queue_max), so that stop() can always queue _STOP
        self.observe = observe or (lambda n: None)
        self._task: asyncio.Task | None = None
        self._stopped = False
        self._stop_queued = False
        self._pending: set[asyncio.Future] = set()  # every future handed out and not resolved yet

    def start(self) -> None:
        """Start the worker task (call on the event loop that will submit)."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._worker_ended)

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called (submit raises Stopped from then on)."""
        return self._stopped

    async def stop(self, timeout: float | None = 60.0) -> None:
        """Refuse new texts, answer every queued one (waiting for the batch being encoded), then end
        the worker. After ``timeout`` seconds the futures still pending fail with :class:`Stopped`."""
        if not self._stopped:
            self._stopped, self._stop_queued = True, True
            self.queue.put_nowait(_STOP)
        if self._task is None:
            return self._fail_pending()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            self._task.cancel()  # its done callback (which runs first) fails what is still pending
            await asyncio.wait({self._task})
        except asyncio.CancelledError:
            self._task.cancel()
            raise

    def _worker_ended(self, task: asyncio.Task) -> None:
        """However the worker ended (stopped, cancelled, crashed), no future is left unresolved."""
        self._stopped = True
        if not task.cancelled() and task.exception() is not None:
            log.error("the query batcher failed", exc_info=task.exception())
        self._fail_pending()

    def _fail_pending(self) -> None:
        for f in list(self._pending):
            if not f.done():
                f.set_exception(Stopped("the query encoder was retired by a reload before it answered"))
        self._pending.clear()

    @property
    def depth(self) -> int:
        """Texts waiting to be encoded (not counting the batch being encoded)."""
        return self.queue.qsize() - self._stop_queued

    async def submit(self, texts: list[str]) -> np.ndarray:
        """Embeddings (len(texts), D) for the texts, encoded with whatever else is waiting.

        Raises :class:`Overloaded` when the queue has no room for them and :class:`Stopped` once
        :meth:`stop` was called. Records the request's queue wait and encoding seconds in
        :data:`stage_seconds` when the caller set it."""
        if self._stopped:
            raise Stopped("the query encoder was retired by a reload")
        loop = asyncio.get_running_loop()
        if self.queue_max - self.queue.qsize() < len(texts):
            raise Overloaded()
        items = []
        for text in texts:
            item = _Item(text, loop.create_future())
            self._pending.add(item.future)
            item.future.add_done_callback(self._pending.discard)
            self.queue.put_nowait(item)
            items.append(item)
        try:
            emb = np.stack(await asyncio.gather(*(i.future for i in items)))
        finally:
            for i in items:  # a request that went away (cancelled) does not keep its texts queued
                i.future.cancel()
        stages = stage_seconds.get()
        if stages is not None:
            stages["queue_wait"] = max(i.started - i.queued for i in items)
            stages["encode"] = max(i.encode_s for i in items)
        return emb

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()  # the encoder is free: take what is queued, waiting for nothing
            if first is _STOP:
                self._stop_queued = False
                return
            batch, stopping = [first], False
            while len(batch) < self.max_size and not self.queue.empty():
                item = self.queue.get_nowait()
                if item is _STOP:  # everything queued before it is in this batch
                    self._stop_queued, stopping = False, True
                    break
                batch.append(item)
            live = [i for i in batch if not i.future.done()]
            if live:
                self.observe(len(live))
                await self._encode(live)
            if stopping:
                return

    async def _encode(self, live: list[_Item]) -> None:
        """Encode ``live`` as one batch and resolve its futures; when that fails, encode each text
        alone, so that only the futures of texts that fail by themselves get the error."""
        loop = asyncio.get_running_loop()
        try:
            emb, t0, seconds = await loop.run_in_executor(self.executor, _timed, self.encode, [i.text for i in live])
        except Exception as e:
            if len(live) == 1:
                _settle(live[0], exception=e)
                return
            for i in live:  # one bad text must not fail the other requests of its batch
                if i.future.done():
                    continue
                try:
                    emb1, t0, seconds = await loop.run_in_executor(self.executor, _timed, self.encode, [i.text])
                except Exception as e1:
                    _settle(i, exception=e1)
                else:
                    _settle(i, emb1[0], t0, seconds)
            return
        for i, row in zip(live, emb):
            _settle(i, row, t0, seconds)


def _settle(item: _Item, row: np.ndarray | None = None, started: float = 0.0, seconds: float = 0.0,
            exception: BaseException | None = None) -> None:
    """Resolve ``item``'s future (unless its request went away) with its row or ``exception``,
    recording when its encoding started and how long it took."""
    if item.future.done():
        return
    if exception is not None:
        item.future.set_exception(exception)
        return
    item.started, item.encode_s = started, seconds
    item.future.set_result(row)
