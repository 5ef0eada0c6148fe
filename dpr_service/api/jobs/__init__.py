"""The training service: training jobs and data sets over REST, on when ``DPR_ADMIN_KEY`` is set.

::

    settings.py   JobSettings (DPR_ADMIN_KEY, DPR_JOBS_DIR, DPR_DATA_ROOT, DPR_MAX_UPLOAD_BYTES, DPR_JOBS_*)
    store.py      the job table (SQLite in DPR_JOBS_DIR)
    runner.py     dpr train child processes: queue, slots, cancel, restart after a crash
    progress.py   step/total, metrics and evaluations from a run's files
    data.py       names under DPR_DATA_ROOT, uploads checked with the core's readers
    service.py    submit (checked by the trainer's rules in a child process), describe, delete, promote checks
    deps.py / schemas.py   the admin key and the bodies of routes/jobs.py and routes/datasets.py

Nothing here imports ``trainer`` or ``index``: both run as child processes (``dpr train``,
``python -m trainer.validate``, ``dpr index build``).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .data import sweep_stale_uploads
from .runner import Runner
from .service import JobsBusy
from .settings import JobSettings, get_job_settings
from .store import JobStore

log = logging.getLogger("dpr_service.api.jobs")

__all__ = ["JobSettings", "install_jobs"]


def install_jobs(app: FastAPI, settings: JobSettings | None = None) -> None:
    """Add the job and data set routes to ``app`` and run the job runner in its lifespan (started
    after the app's own start-up, stopped before its shutdown: running jobs get SIGTERM, save
    ``last/`` and continue at the next start). Does nothing unless ``DPR_ADMIN_KEY`` is set."""
    settings = settings or get_job_settings()
    app.state.job_settings = settings
    if not settings.enabled:
        return
    from ..routes import datasets, jobs  # the routes import this package's modules

    app.include_router(jobs.router)
    app.include_router(datasets.router)
    retry = {"Retry-After": str(settings.jobs_retry_after_s)}

    async def jobs_busy(request: Request, exc: JobsBusy) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=retry)

    app.add_exception_handler(JobsBusy, jobs_busy)
    # uploads are streamed to disk by the route: DPR_MAX_UPLOAD_BYTES, not DPR_MAX_BODY_BYTES, bounds them
    getattr(app.state, "body_limits", {})["/datasets"] = settings.max_upload_bytes
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with inner(app) as state:
            app.state.job_store = store = JobStore(settings.jobs_dir)
            if sweep_stale_uploads(settings.data_root):
                log.info("removed uploads a previous server left unfinished in %s", settings.data_root)
            served = getattr(app.state, "settings", None)
            index = served.index if served is not None and not served.milvus_uri else None
            runner = app.state.job_runner = Runner(store, settings.slots(), settings.jobs_poll_s, nproc=settings.jobs_nproc,
                                                   settings=settings, index=index)
            runner.start()
            try:
                yield state
            finally:
                await asyncio.get_running_loop().run_in_executor(None, runner.stop)

    app.router.lifespan_context = lifespan
