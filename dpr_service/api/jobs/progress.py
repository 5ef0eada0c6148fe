"""What a job's files say about it: the trainer's ``run/metrics.jsonl`` (one strict-JSON line per
logged step, ``{"step", "epoch", "loss", "lr", "grad_norm", "examples_per_s"}``, and per evaluation,
``{"step", "eval": {...}, "best"}``; trainer/train.py writes them), the run's length from the
trainer's ``plan:`` log line, and the log's tail."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dpr_service.core.formats import metrics_lines

PLAN_LINE = re.compile(r"plan: .* = (\d+) steps of \d+")  # trainer/train.py's log line naming the run's length
TAIL_LINES = 30


@dataclass
class Progress:
    """``step`` and ``total`` (optimiser steps; total None before the trainer has planned the run),
    ``metrics`` the last logged step's line, ``evals`` every evaluation line, in order."""

    step: int = 0
    total: int | None = None
    metrics: dict | None = None
    evals: list[dict] = field(default_factory=list)


def read_progress(job_dir: Path) -> Progress:
    """The progress of the job in ``job_dir`` (its ``run/metrics.jsonl`` and ``train.log``)."""
    lines, _ = metrics_lines(job_dir / "run" / "metrics.jsonl")
    progress = Progress(total=planned_steps(job_dir / "train.log"))
    for line in lines:
        if "eval" in line:
            progress.evals.append(line)
        elif "loss" in line:
            progress.metrics = line
        progress.step = max(progress.step, int(line.get("step", 0)))
    return progress


def saved_progress(job_dir: Path) -> tuple[int, int] | None:
    """(step, total_steps) of the run's ``last/`` (its ``training_state/state.json``, written by the
    trainer with every save of ``last/``), or None when there is none or it cannot be read."""
    try:
        state = json.loads((job_dir / "run" / "last" / "training_state" / "state.json").read_text(encoding="utf-8"))
        progress = state["progress"]
        return int(progress["step"]), int(progress["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def planned_steps(log: Path) -> int | None:
    """The run's total steps from the last ``plan: ... = N steps of B`` line of ``log``, or None."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    found = PLAN_LINE.findall(text)
    return int(found[-1]) if found else None


def log_tail(log: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``log`` (progress-bar carriage returns resolved), or ''."""
    try:
        with open(log, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 64_000))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    rows = [row.rsplit("\r", 1)[-1] for row in text.splitlines()]
    return "\n".join([r for r in rows if r.strip()][-lines:])
