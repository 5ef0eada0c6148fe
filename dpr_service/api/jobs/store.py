"""The job table: one SQLite database (``jobs.sqlite``) in the state directory, shared by every
worker process of the server and kept across restarts.

A job moves queued -> running -> succeeded | failed | cancelled (queued -> cancelled too). A
running job found at start-up is continued (``--auto-resume``), so "running" survives a crash.
Connections are opened per call (SQLite's own locking orders writers; WAL lets readers go on).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL, settings TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, pid INTEGER, slot TEXT, error TEXT,
    cancel INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, promoted TEXT)"""
COLUMNS = ("id", "seq", "state", "settings", "created", "started", "finished", "pid", "slot", "error", "cancel",
           "attempts", "promoted")


@dataclass
class Job:
    """One row of the table. Times are Unix seconds; ``settings`` the training settings as submitted
    (names of data under DPR_DATA_ROOT, not paths); ``attempts`` counts the child processes started
    (more than one after a restart); ``promoted`` the corpus name of its last promotion."""

    id: str
    seq: int
    state: str
    settings: dict = field(default_factory=dict)
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    pid: int | None = None
    slot: str | None = None
    error: str | None = None
    cancel: bool = False
    attempts: int = 0
    promoted: str | None = None

    @property
    def finished_state(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.state in FINISHED


class JobStore:
    """The table in ``directory/jobs.sqlite`` (created with the directory when missing)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory).resolve()  # children run in their job directory: no relative paths
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "jobs.sqlite"
        with closing(self._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def job_dir(self, job_id: str) -> Path:
        """Where a job's files live: ``config.yaml``, ``train.log`` and ``run/`` (dpr train's output)."""
        return self.directory / job_id

    @staticmethod
    def new_id() -> str:
        """A fresh job id: 12 hex digits."""
        return uuid.uuid4().hex[:12]

    def create(self, settings: dict, job_id: str | None = None) -> Job:
        """A new queued job with ``settings`` (``job_id``: one from :meth:`new_id`, else a new one)."""
        job_id = job_id or self.new_id()
        with closing(self._connect()) as db, db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute("INSERT INTO jobs (id, seq, state, settings, created) VALUES (?, ?, 'queued', ?, ?)",
                       (job_id, seq, json.dumps(settings), time.time()))
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        """The job, or None when there is none with that id."""
        with closing(self._connect()) as db:
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, states: tuple[str, ...] = STATES) -> list[Job]:
        """Jobs in ``states``, oldest first."""
        marks = ", ".join("?" * len(states))
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE state IN ({marks}) ORDER BY seq", states).fetchall()
        return [_job(r) for r in rows]

    def update(self, job_id: str, only_if_state: str | None = None, **values) -> bool:
        """Set columns of a job (``state="running", pid=123``...); with ``only_if_state``, only while
        the job is in that state (one atomic statement). Returns whether a row changed. Raises
        ValueError for a column that does not exist."""
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns {sorted(unknown)}")
        sets = ", ".join(f"{k} = ?" for k in values)
        where, args = ("id = ? AND state = ?", (job_id, only_if_state)) if only_if_state else ("id = ?", (job_id,))
        with closing(self._connect()) as db, db:
            return db.execute(f"UPDATE jobs SET {sets} WHERE {where}", (*values.values(), *args)).rowcount == 1

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now; mark a running one for the runner to stop (SIGTERM). Returns the job."""
        with closing(self._connect()) as db, db:
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state = 'queued'",
                       (time.time(), job_id))
            db.execute("UPDATE jobs SET cancel = 1 WHERE id = ? AND state = 'running'", (job_id,))
        return self.get(job_id)

    def delete(self, job_id: str) -> bool:
        """Remove a finished job's row (its files are the caller's); False when it is not finished."""
        with closing(self._connect()) as db, db:
            cur = db.execute(f"DELETE FROM jobs WHERE id = ? AND state IN ({', '.join('?' * len(FINISHED))})",
                             (job_id, *FINISHED))
        return cur.rowcount == 1


def _job(row: tuple) -> Job:
    values = dict(zip(COLUMNS, row))
    values["settings"] = json.loads(values["settings"])
    values["cancel"] = bool(values["cancel"])
    return Job(**values)
