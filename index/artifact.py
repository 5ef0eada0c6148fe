"""The index artifact: a FAISS index, its passages and a manifest that checks both.

Layout::

    manifest.json      format, checkpoint fingerprint, dim, similarity, count, factory, created,
                       and the sha256 of every other file
    index.faiss        faiss.write_index of a CPU index; row r of the index is passage row r
    passages.sqlite    table passages(row INTEGER PRIMARY KEY, id TEXT UNIQUE, title, text)

The SQLite table is the row-to-passage-id map and the passage store at once, so the vectors and the
texts cannot drift apart, and a server looks hits up by row without loading the corpus. Loading
checks the manifest and every checksum before ``faiss.read_index`` sees a byte, and refuses an
index made with another checkpoint than the one it is served with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

FORMAT = "dpr-index/1"
MANIFEST, INDEX_FILE, PASSAGES_FILE = "manifest.json", "index.faiss", "passages.sqlite"


class ArtifactError(Exception):
    """An index artifact that cannot be used; the message names the file and the problem."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- passages store


def create_passage_store(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE passages (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL, text TEXT NOT NULL)")
    return db


def insert_passages(db: sqlite3.Connection, first_row: int, passages: Iterable) -> None:
    """Insert passages at rows first_row, first_row + 1, ...; a duplicate id raises ArtifactError."""
    try:
        db.executemany(
            "INSERT INTO passages (row, id, title, text) VALUES (?, ?, ?, ?)",
            ((first_row + i, p.id, p.title, p.text) for i, p in enumerate(passages)),
        )
    except sqlite3.IntegrityError as e:
        raise ArtifactError(f"duplicate passage id ({e})") from None


class PassageStore:
    """Read-only lookups by row or by id.

    One connection is opened when the artifact is loaded and kept: it stays on the files that were
    verified, even after a new artifact is renamed into the same path (hot reload), and calls from
    several threads are serialised by a lock.
    """

    def __init__(self, path: Path):
        self.path = path
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _connect(self):
        with self._lock:
            yield self._db

    def count(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def by_rows(self, rows: Sequence[int]) -> dict[int, tuple[str, str, str]]:
        """row -> (id, title, text) for the given rows (missing rows are absent)."""
        wanted = sorted({int(r) for r in rows if r >= 0})
        out: dict[int, tuple[str, str, str]] = {}
        with self._connect() as db:
            for start in range(0, len(wanted), 900):  # SQLite's parameter limit
                chunk = wanted[start : start + 900]
                marks = ",".join("?" * len(chunk))
                for row, pid, title, text in db.execute(f"SELECT row, id, title, text FROM passages WHERE row IN ({marks})", chunk):
                    out[row] = (pid, title, text)
        return out

    def by_ids(self, ids: Sequence[str]) -> dict[str, tuple[int, str, str]]:
        """id -> (row, title, text)."""
        wanted = list(dict.fromkeys(ids))
        out: dict[str, tuple[int, str, str]] = {}
        with self._connect() as db:
            for start in range(0, len(wanted), 900):
                chunk = wanted[start : start + 900]
                marks = ",".join("?" * len(chunk))
                for row, pid, title, text in db.execute(f"SELECT row, id, title, text FROM passages WHERE id IN ({marks})", chunk):
                    out[pid] = (row, title, text)
        return out


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    checkpoint_fingerprint: str
    dim: int
    similarity: str
    count: int
    factory: str
    created: str
    files: dict
    extra: dict

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "checkpoint_fingerprint": self.checkpoint_fingerprint, "dim": self.dim,
            "similarity": self.similarity, "metric": "inner_product", "count": self.count,
            "factory": self.factory, "created": self.created, "files": self.files, **self.extra,
        }


def write_manifest(directory: Path, **fields) -> Manifest:
    files = {name: sha256_file(directory / name) for name in (INDEX_FILE, PASSAGES_FILE)}
    extra = fields.pop("extra", {})
    manifest = Manifest(files=files, extra=extra, **fields)
    (directory / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such index directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {directory} is not a dpr-service index")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else None
        raise ArtifactError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    known = {"format", "checkpoint_fingerprint", "dim", "similarity", "metric", "count", "factory", "created", "files"}
    try:
        return Manifest(
            checkpoint_fingerprint=str(raw["checkpoint_fingerprint"]), dim=int(raw["dim"]),
            similarity=str(raw["similarity"]), count=int(raw["count"]), factory=str(raw["factory"]),
            created=str(raw["created"]), files=dict(raw["files"]),
            extra={k: v for k, v in raw.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: missing or bad field ({e})") from None


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Every file the manifest names exists and has its checksum."""
    for name in (INDEX_FILE, PASSAGES_FILE):
        if name not in manifest.files:
            raise ArtifactError(f"{directory / MANIFEST}: no checksum for {name}")
    for name, expected in manifest.files.items():
        path = directory / name
        if Path(name).name != name:
            raise ArtifactError(f"{directory / MANIFEST}: bad file name {name!r}")
        if not path.is_file():
            raise ArtifactError(f"{path}: missing from the index")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path}: checksum does not match the manifest (the file was changed or truncated)")
