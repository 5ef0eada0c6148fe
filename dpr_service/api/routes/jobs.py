"""Training jobs over REST: submit, list, follow (Server-Sent Events), cancel, delete, promote.
Admin key only (``X-Admin-Key``: :mod:`dpr_service.api.jobs.deps`); docs/jobs.md has a session."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import StreamingResponse

from dpr_service.core.artifact import ArtifactError
from dpr_service.core.checkpoint import CheckpointError
from dpr_service.core.formats import metrics_lines

from ..deps import JSON_BODY, AppReloader, AppSettings
from ..jobs import service
from ..jobs.data import resolve_name
from ..jobs.deps import ADMIN_REQUIRED, AppJobSettings, Store, allow_only
from ..jobs.schemas import Created, JobList, JobOut, Promoted, PromoteRequest
from ..jobs.store import Job, JobStore
from ..lanes import LaneFull, run_in_lane
from ..schemas import ErrorResponse

BUSY = {"description": "the training service is at a bound (DPR_JOBS_MAX_*) or the admin lane is full; retry after "
                       "Retry-After seconds", "model": ErrorResponse}
router = APIRouter(prefix="/jobs", tags=["training"], dependencies=[ADMIN_REQUIRED], responses={
    401: {"model": ErrorResponse, "description": "missing or wrong admin key (X-Admin-Key)"},
    404: {"model": ErrorResponse, "description": "no such job"},
    503: BUSY})
CONFLICT = {409: {"model": ErrorResponse, "description": "the job is not in a state that allows it"}}
SSE_PING_S = 15.0
EVENT_POLL_S = 0.5


async def admin(request: Request, fn, *args):
    """``fn(*args)`` in the admin lane (file and table work never runs on the event loop, nor in the
    pool interactive requests use); LaneFull (503) when that lane is full."""
    return await run_in_lane(request.app, "admin", fn, *args)


def found(store: JobStore, job_id: str) -> Job:
    """The job, or 404 naming ``job_id``."""
    job = store.get(job_id)
    if job is None:
        raise service.JobRefused("job_id", f"no job {job_id!r}", status=404)
    return job


def served_checkpoint(request: Request) -> Path | None:
    """The checkpoint serving now (None before the first load)."""
    res = request.app.state.resources
    return Path(res.loaded.path) if res is not None else None


@router.post("", status_code=201, response_model=Created, dependencies=[JSON_BODY],
             responses={429: {**BUSY, "description": "DPR_JOBS_MAX_QUEUED jobs wait already; retry after Retry-After"}})
async def submit(request: Request, store: Store, js: AppJobSettings, served: AppSettings,
                 settings: dict[str, Any] = Body(..., description="dpr train's settings by the YAML config's names; "
                                                 "model, train, dev and index are names under DPR_DATA_ROOT; kind "
                                                 "full (default) or query_side")) -> Created:
    """Queue a training job; its settings are checked by the trainer's own rules (a bad one is 422
    naming it). ``kind: query_side`` trains the query encoder alone against ``index`` (default: the
    served index, from the served checkpoint), to be promoted by a reload. 429 when
    DPR_JOBS_MAX_QUEUED jobs wait, 503 when DPR_JOBS_MAX_VALIDATIONS checks run."""
    now = service.Served(served.index if not served.milvus_uri else None, served_checkpoint(request))
    job = await service.submit(store, js, settings, run=lambda fn, *args: admin(request, fn, *args), served=now)
    return Created(id=job.id, state=job.state)


def _describe_all(store: JobStore) -> JobList:
    return JobList(jobs=[JobOut(**service.describe(store, job)) for job in store.list()])


def _describe_one(store: JobStore, job_id: str) -> JobOut:
    return JobOut(**service.describe(store, found(store, job_id)))


@router.get("", response_model=JobList)
async def list_jobs(request: Request, store: Store) -> JobList:
    """Every job, oldest first, with its progress."""
    return await admin(request, _describe_all, store)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, request: Request, store: Store) -> JobOut:
    """One job: state, step and total, the last metrics, every evaluation, the error and log tail on failure."""
    return await admin(request, _describe_one, store, job_id)


class StreamCount:
    """Open event streams of this process, at most ``limit``: :meth:`enter` counts one or raises
    JobsBusy (503) and returns the function that gives it back (once, however often it is called:
    by the stream's end, and by weakref.finalize of a stream that never started, e.g. a client that
    left before the first byte)."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0
        self._lock = threading.Lock()

    def enter(self):
        with self._lock:
            if self.open >= self.limit:
                raise service.JobsBusy(503, f"server busy: {self.open} job event streams are open (DPR_JOBS_MAX_STREAMS="
                                            f"{self.limit}); retry later, or read GET /jobs/{{id}}")
            self.open += 1
        done = []

        def leave() -> None:
            with self._lock:
                if not done:
                    done.append(True)
                    self.open -= 1

        return leave


def stream_count(request: Request, js) -> StreamCount:
    count = getattr(request.app.state, "job_streams", None)
    if count is None:
        count = request.app.state.job_streams = StreamCount(js.jobs_max_streams)
    return count


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "one `metrics` event per line "
                             "of the run's metrics.jsonl (its JSON as data), then one `end` event with the final state"}})
async def events(job_id: str, request: Request, store: Store, js: AppJobSettings) -> StreamingResponse:
    """Follow a job live (Server-Sent Events): every metrics line, past and new, as an event, until
    the job ends. 503 with Retry-After when DPR_JOBS_MAX_STREAMS streams are open."""
    await admin(request, found, store, job_id)
    leave = stream_count(request, js).enter()
    stream = event_stream(store, job_id, lambda fn, *args: run_in_lane(request.app, "events", fn, *args), leave)
    weakref.finalize(stream, leave)
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def poll_events(store: JobStore, job_id: str, path: Path, offset: int) -> tuple[Job | None, list[dict], int]:
    """One look of an event stream (blocking: run in the events lane): the job's row, then the new
    lines of ``path`` from ``offset`` (from 0 again when a resume truncated the file) and the next offset."""
    job = store.get(job_id)  # before reading: lines written before the end are all read below
    try:
        if path.stat().st_size < offset:
            offset = 0
    except FileNotFoundError:
        pass
    lines, offset = metrics_lines(path, offset)
    return job, lines, offset


async def event_stream(store: JobStore, job_id: str, run=None, on_close=None):
    """``event: metrics`` per metrics line (a line repeated after a resume truncated the file is sent
    once), ``: ping`` comments while quiet, ``event: end`` with the job's state when it has ended.
    ``run(fn, *args)`` runs each look off the event loop (the events lane); a look the full lane
    refuses is tried again at the next interval. ``on_close()`` is called when the stream ends."""
    try:
        async for chunk in _events(store, job_id, run):
            yield chunk
    finally:
        if on_close is not None:
            on_close()


async def _events(store: JobStore, job_id: str, run):
    if run is None:
        async def run(fn, *args):
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    path = store.job_dir(job_id) / "run" / "metrics.jsonl"
    offset, sent, quiet = 0, set(), 0.0
    while True:
        try:
            job, lines, offset = await run(poll_events, store, job_id, path, offset)
        except LaneFull:
            job, lines = ..., []
        for line in lines:
            key = ("eval" if "eval" in line else "log", line.get("step"))
            if key not in sent:
                sent.add(key)
                yield f"event: metrics\ndata: {json.dumps(line)}\n\n"
                quiet = 0.0
        if job is not ... and (job is None or job.finished_state):
            yield f"event: end\ndata: {json.dumps(end_event(job_id, job))}\n\n"
            return
        if quiet >= SSE_PING_S:
            yield ": ping\n\n"
            quiet = 0.0
        await asyncio.sleep(EVENT_POLL_S)
        quiet += EVENT_POLL_S


def end_event(job_id: str, job: Job | None) -> dict:
    """The data of a stream's ``end`` event: the job's id and final state; a query_side job's also
    its kind and how it is promoted (``"reload, no index build"``)."""
    data = {"id": job_id, "state": job.state if job else "deleted"}
    if job is not None and service.job_kind(job.settings) == service.QUERY_SIDE:
        data.update(kind=service.QUERY_SIDE, promotion=service.PROMOTIONS[service.QUERY_SIDE])
    return data


def _cancel(store: JobStore, job_id: str) -> JobOut:
    found(store, job_id)
    return JobOut(**service.describe(store, store.request_cancel(job_id)))


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel(job_id: str, request: Request, store: Store) -> JobOut:
    """Cancel: a queued job at once; a running one by SIGTERM (it saves ``last/``, which is kept)."""
    return await admin(request, _cancel, store, job_id)


@router.delete("/{job_id}", status_code=204, responses=CONFLICT)
async def delete(job_id: str, request: Request, store: Store, settings: AppSettings) -> None:
    """Delete a finished job and its files. 409 naming why: it is queued or running, it is being
    promoted, or its checkpoint serves now or is the one the index on disk (DPR_INDEX) names."""
    index = settings.index if not settings.milvus_uri else None
    await admin(request, lambda: service.delete(store, found(store, job_id), served_checkpoint(request), index))


def _promotion_checks(store: JobStore, js, job_id: str, corpus_name: str | None, served: Path | None, force: bool,
                      settings) -> tuple[Job, Path, Path, dict]:
    """The job, its checkpoint, what it goes into service with (a full job: the corpus to index; a
    query_side job: the index it trained against) and the dev metrics compared; JobRefused otherwise."""
    job = found(store, job_id)
    if not job.finished_state:
        raise service.JobRefused("job_id", f"job {job.id} is {job.state}: promote it once it has finished", 409)
    query_side = service.job_kind(job.settings) == service.QUERY_SIDE
    if query_side and corpus_name is not None:
        raise service.JobRefused("corpus", f"job {job.id} is query_side: it is promoted by a reload against the index it "
                                           "trained against, with no corpus to index; leave corpus out")
    if not query_side and corpus_name is None:
        raise service.JobRefused("corpus", "required: the corpus to index with the job's checkpoint (a name under the "
                                           "data root)")
    checkpoint = service.job_checkpoint(store, job)
    if checkpoint is None:
        raise service.JobRefused("job_id", f"job {job.id} left no checkpoint (run/best or run/last)", 409)
    if settings.index is None or settings.milvus_uri:
        raise service.JobRefused("job_id", "this server serves no index artifact (DPR_INDEX) to promote into", 409)
    if query_side:
        source = service.job_index(store, job)
        if source is None:
            raise service.JobRefused("job_id", f"job {job.id}'s config.yaml names no index", 409)
    else:
        source = resolve_name(js.data_root, corpus_name, "corpus")
    comparison = service.promotion_check(checkpoint, served, job.settings.get("best_metric", "ndcg@10"), force)
    return job, checkpoint, source, comparison


@router.post("/{job_id}/promote", response_model=Promoted, dependencies=[JSON_BODY], responses=CONFLICT)
async def promote(job_id: str, body: PromoteRequest, request: Request, store: Store, js: AppJobSettings,
                  settings: AppSettings, reloader: AppReloader) -> Promoted:
    """Index ``corpus`` with the job's best checkpoint (else its last) by ``dpr index build`` into
    DPR_INDEX (built beside it, renamed into place), then reload: no request fails meanwhile. A
    ``query_side`` job takes no corpus: DPR_INDEX becomes the index it trained against (the same
    files, hard-linked) under a manifest naming its checkpoint (:func:`~dpr_service.api.jobs.service.rebind_index`),
    and the reload swaps the query encoder alone: no index build. 409 when
    its dev metric is worse than the served model's (unless ``force``), or while another promotion
    runs (in any worker: a file lock). The job is claimed meanwhile (no delete), and ``promoted`` is
    recorded once the index on disk is the job's (after a crash, by the runner's start-up step)."""
    started = time.perf_counter()
    job, checkpoint, source, comparison = await admin(
        request, _promotion_checks, store, js, job_id, body.corpus, served_checkpoint(request), body.force, settings)
    kind = service.job_kind(job.settings)
    with service.promotion_lock(js.jobs_dir) as lock_fd:
        if lock_fd is None:
            raise service.JobRefused("job_id", "another promotion is running; try again when it has finished", 409)
        claim = {"op": "promote", "corpus": body.corpus, "checkpoint": str(checkpoint.resolve()),
                 "index": str(Path(settings.index).resolve()), "at": time.time()}
        if kind == service.QUERY_SIDE:
            claim.update(kind=kind, source=str(source))
        if not await admin(request, store.claim, job.id, claim):
            now = await admin(request, store.get, job.id)
            if now is None:
                raise service.JobRefused("job_id", f"no job {job.id!r}", status=404)
            raise service.JobRefused("job_id", service.busy_reason(now), 409)
        released = False
        try:
            if kind == service.QUERY_SIDE:
                try:
                    await admin(request, service.rebind_index, source, Path(settings.index), checkpoint, job.id)
                except ArtifactError as e:
                    raise service.JobRefused("job_id", f"the index the job trained against cannot be served: {e}", 409) from None
                promoted = source.name
            else:
                await build_index(store.job_dir(job.id), checkpoint, source, settings.index, lock_fd)
                promoted = body.corpus
            await admin(request, lambda: store.release(job.id, promoted=promoted))  # the index on disk is the job's
            released = True
            try:
                res = await reloader.load(if_changed=True)  # a request may have had it reloaded already
            except (ArtifactError, CheckpointError, ValueError) as e:
                raise service.JobRefused("job_id", f"the new index is in place on disk but does not load; the previous "
                                                   f"one still serves from memory: {e}", 409) from None
        finally:
            if not released:
                await admin(request, store.release, job.id)
    swapped = reloader.swapped  # what the reload that brought it in loaded (this request's, or a request's before it)
    return Promoted(job=job.id, kind=kind, checkpoint=str(checkpoint), corpus=body.corpus, index=str(settings.index),
                    passages=res.searcher.count, comparison=comparison, promotion=service.PROMOTIONS[kind],
                    swapped=swapped, seconds=round(time.perf_counter() - started, 3))


async def build_index(job_dir: Path, checkpoint: Path, corpus: Path, output: Path, lock_fd: int | None = None) -> None:
    """``dpr index build`` as a child process (log: ``<job>/promote.log``; an environment without the
    keys; ``lock_fd``, the promotion lock, passed on so that it stays taken while the child runs even
    if this server dies). Raises JobRefused with the log's last line when it fails: 422 ``corpus``
    for bad corpus data, 409 ``job_id`` when the job's checkpoint cannot be read, 409 otherwise."""
    log = job_dir / "promote.log"
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dpr_service.cli", "index", "build", "--checkpoint", str(checkpoint), "--corpus",
            str(corpus), "--output", str(output), "--no-progress", stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL,
            env=service.child_env(), pass_fds=(lock_fd,) if lock_fd is not None else ())
        rc = await proc.wait()
    if rc != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        last = lines[-1] if lines else ""
        message = f"dpr index build failed (exit {rc}): {last}"
        if rc == 2 and blames_checkpoint(last, checkpoint):
            raise service.JobRefused("job_id", f"the job's checkpoint {checkpoint.name}/ cannot be used: {message}", 409)
        raise service.JobRefused("corpus" if rc == 2 else "job_id", message, 422 if rc == 2 else 409)


def blames_checkpoint(line: str, checkpoint: Path) -> bool:
    """Whether ``dpr index build``'s one-line error is about the checkpoint (it names the checkpoint's
    path, as every CheckpointError does) rather than the corpus."""
    return str(checkpoint) in line or str(checkpoint.resolve()) in line


allow_only(router, "", ["GET", "POST"])
allow_only(router, "/{job_id}", ["GET", "DELETE"])
