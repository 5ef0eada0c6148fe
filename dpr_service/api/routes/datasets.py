"""``POST /datasets`` (upload a training file or a zipped BEIR directory), ``GET /datasets`` and
``DELETE /datasets/{name}``: data under ``DPR_DATA_ROOT``, for training jobs and promotions to
name. Admin key only."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import yaml
from fastapi import APIRouter, Query, Request

from ..jobs.data import TEMP_PREFIX, DataRefused, claim, delete_data, ingest, list_data
from ..lanes import LaneFull, in_child_process, run_in_lane
from ..jobs.deps import ADMIN_REQUIRED, AppJobSettings, Store, allow_only
from ..jobs.schemas import Dataset, DatasetList
from ..jobs.service import DATA_SETTINGS, VALIDATE_TIMEOUT_S
from ..jobs.settings import JobSettings
from ..jobs.store import JobStore
from ..schemas import ErrorResponse

router = APIRouter(tags=["training"], dependencies=[ADMIN_REQUIRED],
                   responses={401: {"model": ErrorResponse, "description": "missing or wrong admin key (X-Admin-Key)"}})
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    "description": "the file's bytes (any Content-Type; a zip is known by its signature): a training file (DPR or plain JSONL, as dpr train reads) or a zip of a BEIR "
                   "directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"}}


@router.get("/datasets", response_model=DatasetList)
async def list_datasets(request: Request, js: AppJobSettings) -> DatasetList:
    """The data sets, corpora and models under the data root, by name (hidden names, such as an
    upload's temporaries, are never listed). Walked in the admin lane (503 when it is full)."""
    entries = await run_in_lane(request.app, "admin", list_data, js.data_root)
    return DatasetList(datasets=[Dataset(**e) for e in entries])


@router.post("/datasets", status_code=201, response_model=Dataset, openapi_extra=UPLOAD_BODY, responses={
    409: {"model": ErrorResponse, "description": "the name is taken"},
    413: {"model": ErrorResponse, "description": "over DPR_MAX_UPLOAD_BYTES (a zip: also unpacked), or a zip of more "
                                                 "than DPR_MAX_ZIP_ENTRIES entries"}})
async def upload(request: Request, js: AppJobSettings,
                 name: Annotated[str, Query(min_length=1, max_length=100, description="the name to store it under")]) -> Dataset:
    """Store an upload under ``name`` after reading it as ``dpr train`` would: a bad line is 422
    naming the file and the line; a zip entry that would leave its directory (absolute, ``..``, a
    link), is degenerate (empty, ``.``, too long, too deep) or conflicts with another (a file and a
    directory of one name) is 422 naming it; more than DPR_MAX_UPLOAD_BYTES (sent, or unpacked) or
    DPR_MAX_ZIP_ENTRIES entries is 413. The check runs in the admin lane (503 when it is full)."""
    js.data_root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=js.data_root)
    os.close(fd)
    claimed = claim(Path(tmp))  # in use until stored or refused: never swept meanwhile

    def done() -> None:
        Path(tmp).unlink(missing_ok=True)
        os.close(claimed)

    try:
        size = 0
        with open(tmp, "wb") as out:
            async for block in request.stream():
                size += len(block)
                if size > js.max_upload_bytes:
                    raise DataRefused("body", f"upload over {js.max_upload_bytes} bytes (DPR_MAX_UPLOAD_BYTES)", status=413)
                out.write(block)
        if size == 0:
            raise DataRefused("body", "empty upload: send the file's bytes as the body")
    except BaseException:
        done()
        raise

    def store() -> dict:  # in the admin lane; it cleans up after itself even if the client went away meanwhile
        args = (js.data_root, name, Path(tmp), js.max_upload_bytes, js.max_zip_entries)
        try:  # a large upload's check in a child process: parsing 50 MB here would hold the GIL /search needs
            if size >= request.app.state.settings.upload_child_bytes:
                return in_child_process(request.app, ingest, *args)
            return ingest(*args)
        finally:
            done()

    try:
        entry = await run_in_lane(request.app, "admin", store)
    except LaneFull:  # never started: nothing cleans up but here
        done()
        raise
    return Dataset(**entry)


ACTIVE = ("queued", "running")
SUBMISSION_S = VALIDATE_TIMEOUT_S + 60  # a job directory without a row, this young: a POST /jobs being checked


def data_user(store: JobStore, js: JobSettings, path: Path, entry: Path) -> str | None:
    """Why the data at ``path`` (resolved; ``entry``: the entry as named at the top of the data
    root) may not be removed now, or None. It is in use when a queued or running job, or one being
    submitted (its directory and ``config.yaml`` written, its row not yet: at most SUBMISSION_S old),
    names it (or data inside it) as ``model``, ``train`` or ``dev``, by name or, in its
    ``config.yaml``, by path; when a promotion indexes it as its corpus; or when DPR_JOBS_MODEL is
    inside it. A link at the top of the root is used only by jobs that name the link."""
    root = js.data_root.resolve()
    is_link = path != root / entry.name

    def named(value) -> bool:  # a name under the data root, as a job's settings give it
        return isinstance(value, str) and value.split("/")[0] == entry.name

    def inside(value) -> bool:  # an absolute path, as config.yaml gives it
        return not is_link and isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(path)

    jobs = {job.id: job for job in store.list()}
    for job in jobs.values():
        if job.state in ACTIVE:
            for setting in DATA_SETTINGS:
                if named(job.settings.get(setting)):
                    return f"job {job.id} ({job.state}) uses it as {setting}: cancel the job or wait until it has finished"
    for job_dir in store.directory.iterdir():
        job = jobs.get(job_dir.name)
        if job is not None and job.state not in ACTIVE:
            continue
        config_path = job_dir / "config.yaml"
        try:
            if job is None and time.time() - config_path.stat().st_mtime > SUBMISSION_S:
                continue  # a killed server's leftover (the runner sweeps it), not a submission
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        for setting in DATA_SETTINGS:
            if isinstance(config, dict) and inside(config.get(setting)):
                state = "being submitted" if job is None else job.state
                return f"job {job_dir.name} ({state}) uses it as {setting}: cancel the job or wait until it has finished"
    for job in store.claimed():
        corpus = (job.claim or {}).get("corpus")
        if (job.claim or {}).get("op") == "promote" and (named(corpus) or inside(str(root / str(corpus)))):
            return f"job {job.id} is being promoted with it as its corpus: wait until the promotion has finished"
    if js.jobs_model and inside(js.jobs_model):
        return "DPR_JOBS_MODEL (the starting model of a job that names none) is inside it: set another first"
    return None


@router.delete("/datasets/{name}", status_code=204, responses={
    404: {"model": ErrorResponse, "description": "no data of that name"},
    409: {"model": ErrorResponse, "description": "in use: the detail names the queued, running or promoting job (or "
                                                 "DPR_JOBS_MODEL) that uses it"},
    422: {"model": ErrorResponse, "description": "not an entry of the data root (a hidden name, '..')"}})
async def delete_dataset(name: str, request: Request, js: AppJobSettings, store: Store) -> None:
    """Remove the data named ``name`` (an entry of ``GET /datasets``: a file, a directory, or a link,
    which goes itself, not what it points to), at once: renamed away in one step, then removed. 409
    naming the job while a queued or running job (or one being submitted) uses it, or a promotion
    indexes it; 404 when there is none. Runs in the admin lane (503 when it is full)."""
    await run_in_lane(request.app, "admin", delete_data, js.data_root, name,
                      lambda path, entry: data_user(store, js, path, entry))


allow_only(router, "/datasets", ["GET", "POST"])
allow_only(router, "/datasets/{name}", ["DELETE"])
