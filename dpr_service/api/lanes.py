"""Lanes: each kind of work runs in a thread pool of its own, with its own bounds and its own 503,
so that one heavy, slow or administrative client cannot stall interactive retrieval.

Usage::

    result = await run_in_lane(request.app, "heavy", score_plan, plan, cost=plan.tokens)

========== ======================================================== ============================
lane       what runs there                                          admitted while
========== ======================================================== ============================
interactive the query batcher's encoding, FAISS/BM25 search and the pending < threads + queue
           passage lookup of ``/search``; ``/encode`` and
           ``/v1/embeddings`` of at most ``DPR_INTERACTIVE_MAX_TOKENS``
heavy      ``/score``; larger ``/encode`` and ``/v1/embeddings``    pending < threads + queue, and
                                                                    in-flight tokens (queued and
                                                                    running) + this request's
                                                                    <= ``DPR_HEAVY_MAX_TOKENS``
admin      reloads, data set and job file work, uploads (their     pending < threads + queue
           check in a child process: :func:`in_child_process`)
events     the polling of ``/jobs/{id}/events`` streams             pending < threads + queue
========== ======================================================== ============================

A lane that is full raises :class:`LaneFull` at once (answered 503 with ``Retry-After``, naming the
lane): work is never queued without bound, and a full heavy lane never refuses a ``/search``.

Why threads of their own (and not asyncio's default executor, which Starlette's
``run_in_threadpool`` shares): a shared pool lets seven ``/score`` requests occupy every thread while
a 0.1 s ``/search`` waits 53 s. Qdrant runs search and optimisation on separate runtimes with their
own thread counts; text-embeddings-inference admits by tokens (``max_batch_tokens``), not requests.

The heavy and admin lanes' threads also run at a lower CPU priority (``DPR_LANE_NICE``, Linux's
per-thread nice value; the OpenMP threads torch starts from them inherit it): on a machine where every
core is busy, the scheduler gives interactive work the CPU first, and heavy work the rest.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

log = logging.getLogger("dpr_service.api")
T = TypeVar("T")
LANES = ("interactive", "heavy", "admin", "events")


class LaneFull(Exception):
    """The lane has no room: answered 503 with Retry-After; ``detail`` says which lane and why."""

    def __init__(self, lane: str, detail: str):
        super().__init__(detail)
        self.lane, self.detail = lane, detail


@dataclass(frozen=True)
class LaneSpec:
    """One lane's bounds: ``threads`` running at once, ``queue`` more waiting, ``max_cost`` cost
    units (tokens) queued and running together (None: not bounded by cost), ``nice`` the threads'
    CPU priority increment (0: none)."""

    threads: int
    queue: int
    max_cost: int | None = None
    nice: int = 0


class Lane:
    """A bounded thread pool with admission by count and, optionally, by cost.

    ``pending`` counts the calls submitted and not finished (a call whose request went away still
    counts until its thread is done with it); ``cost`` their cost units."""

    def __init__(self, name: str, spec: LaneSpec):
        self.name, self.spec = name, spec
        self.executor = ThreadPoolExecutor(spec.threads, thread_name_prefix=f"dpr-{name}",
                                           initializer=_lower_priority, initargs=(spec.nice,))
        self._lock = threading.Lock()
        self.pending = 0
        self.cost = 0

    def _admit(self, cost: int) -> None:
        spec = self.spec
        with self._lock:
            if self.pending >= spec.threads + spec.queue:
                raise LaneFull(self.name, f"server busy: the {self.name} lane has {self.pending} requests in progress "
                                          f"or waiting (at most {spec.threads + spec.queue}), retry later")
            if spec.max_cost is not None and self.cost > 0 and self.cost + cost > spec.max_cost:
                raise LaneFull(self.name, f"server busy: the {self.name} lane holds {self.cost} tokens in progress or "
                                          f"waiting and this request needs {cost} (at most {spec.max_cost} together), "
                                          "retry later")
            self.pending += 1
            self.cost += cost

    def _release(self, cost: int) -> None:
        with self._lock:
            self.pending -= 1
            self.cost -= cost

    async def run(self, fn: Callable[..., T], *args: Any, cost: int = 0) -> T:
        """``fn(*args)`` on one of this lane's threads, once admitted. Raises :class:`LaneFull` at once
        when the lane has no room, else what ``fn`` raises. ``cost`` (tokens) counts against
        ``max_cost`` until the call is done, even when the awaiting request is cancelled first."""
        self._admit(cost)
        try:
            future = self.executor.submit(fn, *args)
        except BaseException:
            self._release(cost)
            raise
        future.add_done_callback(lambda _: self._release(cost))
        return await asyncio.wrap_future(future)

    async def run_own(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on this lane's threads without admission: the server's own work (loading the
        index at start, a background reload), which must not be refused because clients filled the
        lane. It waits its turn behind what is queued."""
        return await asyncio.wrap_future(self.executor.submit(fn, *args))

    def shutdown(self) -> None:
        """Stop taking work; calls already running finish in their threads."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value by ``nice`` (Linux: per thread; elsewhere: the process's, so skipped)."""
    if nice <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as e:  # not permitted in some sandboxes: the lane still works, without the priority
        log.warning("could not lower the priority of a lane thread: %s", e)


def _die_with_parent() -> None:
    """In a child process of :meth:`Lanes.processes`: on Linux, ask the kernel for SIGTERM when the
    server that spawned it dies (``prctl(PR_SET_PDEATHSIG)``), so a killed server leaves no child."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the executor's own shutdown still ends them
        pass


def lane_specs(settings) -> dict[str, LaneSpec]:
    """Each lane's bounds from the service settings (``DPR_LANE_*``, ``DPR_HEAVY_MAX_TOKENS``)."""
    return {
        "interactive": LaneSpec(settings.lane_interactive_threads, settings.lane_interactive_queue),
        "heavy": LaneSpec(settings.lane_heavy_threads, settings.lane_heavy_queue, settings.heavy_max_tokens,
                          settings.lane_nice),
        "admin": LaneSpec(settings.lane_admin_threads, settings.lane_admin_queue, None, settings.lane_nice),
        "events": LaneSpec(settings.lane_events_threads, settings.lane_events_queue),
    }


class Lanes:
    """The app's lanes, by name (``app.state.lanes``), made from its settings, and the admin lane's
    child processes (:meth:`processes`)."""

    def __init__(self, settings):
        self.by_name = {name: Lane(name, spec) for name, spec in lane_specs(settings).items()}
        self.process_count = settings.lane_admin_processes
        self._processes: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Lane:
        return self.by_name[name]

    def processes(self) -> ProcessPoolExecutor:
        """Child processes (``DPR_LANE_ADMIN_PROCESSES``, spawned at first use) for the admin lane's
        CPU-bound pure-Python work, such as checking a 50 MB upload line by line: in a thread of the
        server it would hold the GIL that the event loop and the interactive lane need (a nice value
        does not help there), in a child it holds only its own."""
        with self._lock:
            if self._processes is None:
                self._processes = ProcessPoolExecutor(self.process_count, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_die_with_parent)
            return self._processes

    def shutdown(self) -> None:
        for lane in self.by_name.values():
            lane.shutdown()
        with self._lock:
            processes, self._processes = self._processes, None
        if processes is not None:  # waited for: a check in progress ends (or its process does), none is left behind
            processes.shutdown(wait=True, cancel_futures=True)


def lane(app, name: str) -> Lane:
    """The lane ``name`` of ``app`` (made on first use from ``app.state.settings``)."""
    lanes = getattr(app.state, "lanes", None)
    if lanes is None:
        lanes = app.state.lanes = Lanes(app.state.settings)
    return lanes[name]


def in_child_process(app, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in one of the admin lane's child processes (:meth:`Lanes.processes`), waited for
    (blocking: call it from a lane's thread). ``fn``, its arguments, its result and what it raises
    must pickle. Raises what ``fn`` raises."""
    lanes = getattr(app.state, "lanes", None)
    if lanes is None:
        lanes = app.state.lanes = Lanes(app.state.settings)
    return lanes.processes().submit(fn, *args).result()


async def run_in_lane(app, name: str, fn: Callable[..., T], *args: Any, cost: int = 0) -> T:
    """``fn(*args)`` in ``app``'s lane ``name`` (:meth:`Lane.run`): raises :class:`LaneFull` when
    that lane is full, else what ``fn`` raises."""
    return await lane(app, name).run(fn, *args, cost=cost)
