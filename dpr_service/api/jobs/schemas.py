"""Bodies of the job and data set routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class JobOut(BaseModel):
    """A job: ``state`` queued / running / succeeded / failed / cancelled; ``kind`` full or query_side
    (``dpr train --index``: the query encoder alone, against ``index``) and ``promotion`` how it goes
    into service; ``step`` and ``total`` in
    optimiser steps (total null until the trainer has planned the run); ``metrics`` the last logged
    step (loss, lr, grad_norm, examples_per_s); ``evals`` every evaluation (``{"step", "eval", "best"}``);
    ``error`` and ``log_tail`` when it failed."""

    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    kind: Literal["full", "query_side"] = "full"
    index: str | None = Field(None, description="query_side: the index it trains against (a name under the data root, "
                              "or the served index)")
    promotion: str | None = Field(None, description="how it goes into service: an index build then a reload (full), or "
                                  "a reload, no index build (query_side)")
    settings: dict[str, Any]
    created: float
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total: int | None = None
    metrics: dict[str, Any] | None = None
    evals: list[dict[str, Any]] = []
    error: str | None = None
    attempts: int = 0
    promoted: str | None = None
    cancel_requested: bool = False
    log_tail: str | None = None


class JobList(BaseModel):
    """Every job, oldest first."""

    jobs: list[JobOut]


class Created(BaseModel):
    """A job queued: its id and its state (``queued``)."""

    id: str
    state: str


class PromoteRequest(BaseModel):
    """Promote a job: the corpus to index (a name under the data root; a full job only: a
    query_side job is promoted by a reload against its index, with no corpus), and ``force`` to
    promote a model whose dev metric is worse than the served one's."""

    model_config = ConfigDict(extra="forbid")
    corpus: str | None = Field(None, min_length=1, max_length=500, description="corpus name under DPR_DATA_ROOT (a "
                               "BEIR directory, a corpus.jsonl or DPR's psgs .tsv); required for a full job, refused "
                               "for a query_side one")
    force: StrictBool = Field(False, description="true or false (JSON booleans only: \"yes\" or 1 is refused)")


class Promoted(BaseModel):
    """The new model serving: the checkpoint, the corpus indexed (null for a query_side job), how many
    passages, the dev metrics compared (``job``/``served``: null when that checkpoint has no
    eval.json), ``promotion`` what it took, ``swapped`` what the reload loaded (``query encoder``:
    the index stayed loaded) and ``seconds`` from the request to the new model serving."""

    job: str
    kind: Literal["full", "query_side"] = "full"
    checkpoint: str
    corpus: str | None
    index: str
    passages: int
    comparison: dict[str, Any]
    promotion: str
    swapped: str
    seconds: float


class Dataset(BaseModel):
    """Data under the data root: ``kind`` beir, model, directory or file; ``bytes`` its size."""

    name: str
    kind: str
    bytes: int


class DatasetList(BaseModel):
    """The entries at the top of the data root."""

    datasets: list[Dataset]
