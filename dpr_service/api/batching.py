"""Dynamic batching: queries from concurrent requests are encoded together.

Requests put their texts on a bounded queue and await a future; one worker takes up to
``max_size`` texts (waiting at most ``max_wait_ms`` for more once it has one), encodes them in a
worker thread so the event loop never blocks, and resolves the futures. A full queue raises
:class:`Overloaded`, which the app turns into 503 with Retry-After. When a batch fails, its texts
are encoded one by one, so that only the request whose text fails gets the error.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import numpy as np


class Overloaded(Exception):
    pass


class QueryBatcher:
    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_size: int, max_wait_ms: float, queue_max: int,
                 observe: Callable[[int], None] | None = None):
        self.encode, self.max_size, self.max_wait = encode, max_size, max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=queue_max)
        self.observe = observe or (lambda n: None)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    async def submit(self, texts: list[str]) -> np.ndarray:
        """Embeddings (len(texts), D) for the texts, encoded with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        futures = []
        if self.queue.maxsize - self.queue.qsize() < len(texts):
            raise Overloaded()
        for text in texts:
            fut = loop.create_future()
            self.queue.put_nowait((text, fut))
            futures.append(fut)
        return np.stack(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_size:
                timeout = deadline - time.monotonic()
                try:
                    batch.append(self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
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
