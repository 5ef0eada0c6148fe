"""Dynamic batching: queries from concurrent requests are encoded together.

Requests put their texts on a bounded queue and await a future; one worker takes up to
``max_size`` texts (waiting at most ``max_wait_ms`` for more once it has one), encodes them in a
worker thread so the event loop never blocks, and resolves the futures. A full queue raises
:class:`Overloaded`, which the app turns into 503 with Retry-After. When a batch fails, its texts
are encoded one by one, so that only the request whose text fails gets the error.

:meth:`QueryBatcher.stop` drains: from then on :meth:`~QueryBatcher.submit` raises :class:`Stopped`,
and everything already queued, the batch being encoded included, is encoded and answered. Only
when that takes longer than ``timeout`` are the futures still pending failed, with
:class:`Stopped`; no future is ever left unresolved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import numpy as np


class Overloaded(Exception):
    """The queue holds ``queue_max`` texts already: the request is answered 503 with Retry-After."""


class Stopped(Exception):
    """The batcher was stopped (a reload retired it): submit again to the one now serving."""


log = logging.getLogger("dpr_service.api")
_STOP = object()  # queued by stop(): everything queued before it is still answered


class QueryBatcher:
    """Encodes the texts of concurrent :meth:`submit` calls together: batches of at most
    ``max_size`` texts, each started at most ``max_wait_ms`` after its first text arrived, at most
    ``queue_max`` texts waiting. ``encode`` maps a list of N texts to an (N, D) array (it runs in a
    worker thread); ``observe`` is called with each batch's size."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_size: int, max_wait_ms: float, queue_max: int,
                 observe: Callable[[int], None] | None = None):
        self.encode, self.max_size, self.max_wait = encode, max_size, max_wait_ms / 1000
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
        """Texts waiting to be encoded."""
        return self.queue.qsize() - self._stop_queued

    async def submit(self, texts: list[str]) -> np.ndarray:
        """Embeddings (len(texts), D) for the texts, encoded with whatever else is waiting.

        Raises :class:`Overloaded` when the queue has no room for them and :class:`Stopped` once
        :meth:`stop` was called."""
        if self._stopped:
            raise Stopped("the query encoder was retired by a reload")
        loop = asyncio.get_running_loop()
        if self.queue_max - self.queue.qsize() < len(texts):
            raise Overloaded()
        futures = []
        for text in texts:
            fut = loop.create_future()
            self._pending.add(fut)
            fut.add_done_callback(self._pending.discard)
            self.queue.put_nowait((text, fut))
            futures.append(fut)
        try:
            return np.stack(await asyncio.gather(*futures))
        finally:
            for f in futures:  # a request that went away (cancelled) does not keep its texts queued
                f.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self.queue.get()
            if first is _STOP:
                self._stop_queued = False
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_size:
                timeout = deadline - time.monotonic()
                try:
                    item = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if item is _STOP:  # everything queued before it is in this batch
                    stopping, self._stop_queued = True, False
                    break
                batch.append(item)
            live = [(t, f) for t, f in batch if not f.done()]
            if not live:
                continue
            self.observe(len(live))
            try:
                emb = await loop.run_in_executor(None, self.encode, [t for t, _ in live])
            except Exception as e:
                if len(live) == 1:
                    if not live[0][1].done():
                        live[0][1].set_exception(e)
                    continue
                # one bad text must not fail the other requests of its batch: encode each alone
                for text, f in live:
                    if f.done():
                        continue
                    try:
                        row = (await loop.run_in_executor(None, self.encode, [text]))[0]
                    except Exception as e1:
                        if not f.done():
                            f.set_exception(e1)
                    else:
                        if not f.done():
                            f.set_result(row)
                continue
            for (_, f), row in zip(live, emb):
                if not f.done():
                    f.set_result(row)
