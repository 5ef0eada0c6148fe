"""``POST /datasets`` (upload a training file or a zipped BEIR directory) and ``GET /datasets``:
data under ``DPR_DATA_ROOT``, for training jobs and promotions to name. Admin key only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request

from ..jobs.data import TEMP_PREFIX, DataRefused, claim, ingest, list_data
from ..lanes import LaneFull, in_child_process, run_in_lane
from ..jobs.deps import ADMIN_REQUIRED, AppJobSettings, allow_only
from ..jobs.schemas import Dataset, DatasetList
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


allow_only(router, "/datasets", ["GET", "POST"])
