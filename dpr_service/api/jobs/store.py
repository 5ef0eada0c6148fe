"""The job table: one SQLite database (``jobs.sqlite``) in the state directory, shared by every
worker process of the server and kept across restarts.

A job moves queued -> running -> succeeded | failed | cancelled (queued -> cancelled too). A
running job found at start-up is continued (``--auto-resume``), so "running" survives a crash.
A finished job may be *claimed* by one operation at a time (a promotion or a delete: the ``claim``
column, taken in one statement), so a job is never deleted while it is promoted; a promotion's claim
records what it builds, for the start-up step that reconciles it after a crash.
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
    cancel INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, promoted TEXT, claim TEXT)"""
COLUMNS = ("id", "seq", "state", "settings", "created", "started", "finished", "pid", "slot", "error", "cancel",
           "attempts", "promoted", "claim")
ADDED_COLUMNS = {"claim": "TEXT"}  # columns a table made by an older version lacks


@dataclass
class Job:
    """One row of the table. Times are Unix seconds; ``settings`` the training settings as submitted
    (names of data under DPR_DATA_ROOT, not paths); ``attempts`` counts the child processes started
    (more than one after a restart); ``promoted`` the corpus name of its last promotion; ``claim``
    the operation that holds a finished job now (``{"op": "promote", "corpus", "checkpoint", "index"}``
    or ``{"op": "delete"}``), None when none does."""

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
    claim: dict | None = None

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
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in ADDED_COLUMNS.items():
                if name not in have:
                    try:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
                    except sqlite3.OperationalError as e:  # another worker added it first
                        if "duplicate column" not in str(e):
                            raise

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def job_dir(self, job_id: str) -> Path:
        """Where a job's files live: ``config.yaml``, ``train.log`` and ``run/`` (dpr train's output)."""
        return self.directory / job_id

    @staticmethod
    def new_id() -> str:
        """A fresh job id: 12 hex digits."""
        return uuid.uuid4().hex[:12]

    def create(self, settings: dict, job_id: str | None = None, state: str = "queued") -> Job:
        """A new job with ``settings`` (``job_id``: one from :meth:`new_id`, else a new one), queued
        (``state``: another, for tools and tests that record a job made elsewhere)."""
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}")
        job_id = job_id or self.new_id()
        with closing(self._connect()) as db, db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute("INSERT INTO jobs (id, seq, state, settings, created) VALUES (?, ?, ?, ?, ?)",
                       (job_id, seq, state, json.dumps(settings), time.time()))
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

    def count(self, states: tuple[str, ...] = STATES) -> int:
        """How many jobs are in ``states``."""
        marks = ", ".join("?" * len(states))
        with closing(self._connect()) as db:
            return db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", states).fetchone()[0]

    def claim(self, job_id: str, what: dict) -> bool:
        """Claim a finished job for one operation (``what``: ``{"op": "promote", ...}`` or ``{"op":
        "delete"}``), in one statement; False when it is not finished, gone, or claimed already."""
        with closing(self._connect()) as db, db:
            cur = db.execute(f"UPDATE jobs SET claim = ? WHERE id = ? AND claim IS NULL AND state IN "
                             f"({', '.join('?' * len(FINISHED))})", (json.dumps(what), job_id, *FINISHED))
        return cur.rowcount == 1

    def release(self, job_id: str, **values) -> None:
        """End a job's claim, setting ``values`` (``promoted="scifact"``) in the same statement."""
        self.update(job_id, claim=None, **values)

    def claimed(self) -> list[Job]:
        """Every job an operation holds now (after a crash: those it held when the server died)."""
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE claim IS NOT NULL ORDER BY seq").fetchall()
        return [_job(r) for r in rows]

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now; mark a running one for the runner to stop (SIGTERM). Returns the job."""
        with closing(self._connect()) as db, db:
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state = 'queued'",
                       (time.time(), job_id))
            db.execute("UPDATE jobs SET cancel = 1 WHERE id = ? AND state = 'running'", (job_id,))
        return self.get(job_id)

    def delete(self, job_id: str, any_state: bool = False) -> bool:
        """Remove a finished job's row (its files are the caller's); False when it is not finished.
        ``any_state``: whatever its state (a row whose directory is gone)."""
        with closing(self._connect()) as db, db:
            if any_state:
                cur = db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            else:
                cur = db.execute(f"DELETE FROM jobs WHERE id = ? AND state IN ({', '.join('?' * len(FINISHED))})",
                                 (job_id, *FINISHED))
        return cur.rowcount == 1


def _job(row: tuple) -> Job:
    values = dict(zip(COLUMNS, row))
    values["settings"] = json.loads(values["settings"])
    values["cancel"] = bool(values["cancel"])
    values["claim"] = json.loads(values["claim"]) if values["claim"] else None
    return Job(**values)
