"""Training jobs over REST: submit, list, follow (Server-Sent Events), cancel, delete, promote.
Admin key only (``X-Admin-Key``: :mod:`dpr_service.api.jobs.deps`); docs/jobs.md has a session."""

from __future__ import annotations

import asyncio
import json
import sys
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
from ..schemas import ErrorResponse

router = APIRouter(prefix="/jobs", tags=["training"], dependencies=[ADMIN_REQUIRED], responses={
    401: {"model": ErrorResponse, "description": "missing or wrong admin key (X-Admin-Key)"},
    404: {"model": ErrorResponse, "description": "no such job"}})
CONFLICT = {409: {"model": ErrorResponse, "description": "the job is not in a state that allows it"}}
SSE_PING_S = 15.0
EVENT_POLL_S = 0.5
_promoting = asyncio.Lock()


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


@router.post("", status_code=201, response_model=Created, dependencies=[JSON_BODY])
async def submit(store: Store, js: AppJobSettings,
                 settings: dict[str, Any] = Body(..., description="dpr train's settings by the YAML config's names; "
                                                 "model, train and dev are names under DPR_DATA_ROOT")) -> Created:
    """Queue a training job; its settings are checked by the trainer's own rules (a bad one is 422 naming it)."""
    job = await service.submit(store, js, settings)
    return Created(id=job.id, state=job.state)


# Plain functions where the route reads files and the job table (FastAPI runs them in its thread
# pool): the Train tab polls them, and they must not stall /search on the event loop.
@router.get("", response_model=JobList)
def list_jobs(store: Store) -> JobList:
    """Every job, oldest first, with its progress."""
    return JobList(jobs=[JobOut(**service.describe(store, job)) for job in store.list()])


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, store: Store) -> JobOut:
    """One job: state, step and total, the last metrics, every evaluation, the error and log tail on failure."""
    return JobOut(**service.describe(store, found(store, job_id)))


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "one `metrics` event per line "
                             "of the run's metrics.jsonl (its JSON as data), then one `end` event with the final state"}})
async def events(job_id: str, store: Store) -> StreamingResponse:
    """Follow a job live (Server-Sent Events): every metrics line, past and new, as an event, until the job ends."""
    found(store, job_id)
    return StreamingResponse(event_stream(store, job_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def event_stream(store: JobStore, job_id: str):
    """``event: metrics`` per metrics line (a line repeated after a resume truncated the file is sent
    once), ``: ping`` comments while quiet, ``event: end`` with the job's state when it has ended."""
    path = store.job_dir(job_id) / "run" / "metrics.jsonl"
    offset, sent, quiet = 0, set(), 0.0
    while True:
        job = store.get(job_id)  # before reading: lines written before the end are all read below
        if path.exists() and path.stat().st_size < offset:  # a resume truncated it
            offset = 0
        lines, offset = metrics_lines(path, offset)
        for line in lines:
            key = ("eval" if "eval" in line else "log", line.get("step"))
            if key not in sent:
                sent.add(key)
                yield f"event: metrics\ndata: {json.dumps(line)}\n\n"
                quiet = 0.0
        if job is None or job.finished_state:
            yield f"event: end\ndata: {json.dumps({'id': job_id, 'state': job.state if job else 'deleted'})}\n\n"
            return
        if quiet >= SSE_PING_S:
            yield ": ping\n\n"
            quiet = 0.0
        await asyncio.sleep(EVENT_POLL_S)
        quiet += EVENT_POLL_S


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel(job_id: str, store: Store) -> JobOut:
    """Cancel: a queued job at once; a running one by SIGTERM (it saves ``last/``, which is kept)."""
    found(store, job_id)
    return JobOut(**service.describe(store, store.request_cancel(job_id)))


@router.delete("/{job_id}", status_code=204, responses=CONFLICT)
def delete(job_id: str, store: Store, request: Request) -> None:
    """Delete a finished job and its files (409 for a queued or running one, or one serving now)."""
    service.delete(store, found(store, job_id), served_checkpoint(request))


@router.post("/{job_id}/promote", response_model=Promoted, dependencies=[JSON_BODY], responses=CONFLICT)
async def promote(job_id: str, body: PromoteRequest, request: Request, store: Store, js: AppJobSettings,
                  settings: AppSettings, reloader: AppReloader) -> Promoted:
    """Index ``corpus`` with the job's best checkpoint (else its last) by ``dpr index build`` into
    DPR_INDEX (built beside it, renamed into place), then reload: no request fails meanwhile. 409 when
    its dev metric is worse than the served model's (unless ``force``), or while another promotion runs."""
    job = found(store, job_id)
    if not job.finished_state:
        raise service.JobRefused("job_id", f"job {job.id} is {job.state}: promote it once it has finished", 409)
    checkpoint = service.job_checkpoint(store, job)
    if checkpoint is None:
        raise service.JobRefused("job_id", f"job {job.id} left no checkpoint (run/best or run/last)", 409)
    if settings.index is None or settings.milvus_uri:
        raise service.JobRefused("job_id", "this server serves no index artifact (DPR_INDEX) to promote into", 409)
    corpus = resolve_name(js.data_root, body.corpus, "corpus")
    comparison = service.promotion_check(checkpoint, served_checkpoint(request),
                                         job.settings.get("best_metric", "ndcg@10"), body.force)
    if _promoting.locked():
        raise service.JobRefused("job_id", "another promotion is running; try again when it has finished", 409)
    async with _promoting:
        await build_index(store.job_dir(job.id), checkpoint, corpus, settings.index)
        try:
            res = await reloader.load(if_changed=True)  # a request may have had it reloaded already
        except (ArtifactError, CheckpointError, ValueError) as e:
            raise service.JobRefused("job_id", f"the new index does not load, the previous one still serves: {e}", 409) from None
    store.update(job.id, promoted=body.corpus)
    return Promoted(job=job.id, checkpoint=str(checkpoint), corpus=body.corpus, index=str(settings.index),
                    passages=res.searcher.count, comparison=comparison)


async def build_index(job_dir: Path, checkpoint: Path, corpus: Path, output: Path) -> None:
    """``dpr index build`` as a child process (log: ``<job>/promote.log``); raises JobRefused (409,
    ``corpus`` for bad data) with the log's last line when it fails."""
    log = job_dir / "promote.log"
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dpr_service.cli", "index", "build", "--checkpoint", str(checkpoint), "--corpus",
            str(corpus), "--output", str(output), "--no-progress", stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL)
        rc = await proc.wait()
    if rc != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise service.JobRefused("corpus" if rc == 2 else "job_id",
                                 f"dpr index build failed (exit {rc}): {lines[-1] if lines else ''}", 409 if rc != 2 else 422)


allow_only(router, "", ["GET", "POST"])
allow_only(router, "/{job_id}", ["GET", "DELETE"])
