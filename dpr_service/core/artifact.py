"""The index artifact: a FAISS index, its passages and a manifest that checks both.

Layout::

    manifest.json      format, checkpoint fingerprint, passage fingerprint, dim, similarity, count,
                       factory, created, and the sha256 of every other file (``files``: relative
                       path -> sha256)
    index.faiss        faiss.write_index of a CPU index; row r of the index is passage row r
    passages.sqlite    table passages(row INTEGER PRIMARY KEY, id TEXT UNIQUE, title, text)
    bm25/              optional (``dpr index build --no-bm25`` leaves it out): a BM25 index of the same
                       passages, as :meth:`dpr_service.core.bm25.BM25.save` writes it (bm25s's numpy
                       arrays and JSON, no pickle, and ``ids.json``); each file is in ``files``

The manifest may also carry ``hybrid``, the fusion ``POST /search`` uses by default in hybrid mode:
``{"fusion": "rrf"}`` or ``{"fusion": "convex", "alpha": 0.3}`` (:func:`store_served_fusion`
writes it; ``dpr eval --tune-split S --store-alpha``).

The SQLite table is the row-to-passage-id map and the passage store at once, so the vectors and the
texts cannot drift apart, and a server looks hits up by row without loading the corpus. Loading
checks the manifest and every checksum before ``faiss.read_index`` sees a byte, and refuses an
index made with another passage encoder than the one of the checkpoint it is served with
(:func:`check_binding`): the checkpoint that built it, or a query encoder trained against it
(``dpr train --index``), which keeps that passage encoder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from .fsio import atomic_directory, readable_directory, sha256_fd, sha256_file
from .fusion import FUSIONS

log = logging.getLogger(__name__)

FORMAT = "dpr-index/1"
MANIFEST, INDEX_FILE, PASSAGES_FILE = "manifest.json", "index.faiss", "passages.sqlite"
BM25_DIR = "bm25"
BM25_IDS = f"{BM25_DIR}/ids.json"  # what says that an artifact holds a BM25 index
HYBRID = "hybrid"  # the manifest field of the served fusion


class ArtifactError(Exception):
    """An index artifact that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------- binding


@dataclass(frozen=True)
class EncoderIdentity:
    """Who would search an index: a checkpoint's ``fingerprint``, its ``passage_fingerprint`` (the
    passage side alone: :func:`dpr_service.core.checkpoint.passage_fingerprint`) and, for a query
    encoder trained against an index (``dpr train --index``), ``passage_source``: the fingerprint of
    the checkpoint whose passage encoder it keeps. Empty strings where unknown."""

    fingerprint: str
    passage_fingerprint: str = ""
    passage_source: str = ""


def binds(built_fingerprint: str, built_passage: str, identity: EncoderIdentity) -> bool:
    """Whether an index built by checkpoint ``built_fingerprint`` (passage side ``built_passage``, ""
    for artifacts older than the field) may be searched with query vectors of ``identity``: the
    same checkpoint, the same passage side, or a query encoder trained against an index of that
    checkpoint."""
    return (identity.fingerprint == built_fingerprint
            or bool(built_passage) and identity.passage_fingerprint == built_passage
            or bool(identity.passage_source) and identity.passage_source == built_fingerprint)


def binding_message(built_fingerprint: str, built_passage: str, identity: EncoderIdentity) -> str:
    """Why :func:`binds` refused: both checkpoints and both passage encoders, each shown to 12+
    characters (enough to tell them apart), and the two ways out."""
    def short(a: str, b: str) -> tuple[str, str]:
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 0) + 12
        return a[:n], b[:n]

    built, used = short(built_fingerprint, identity.fingerprint)
    text = f"the index was built with checkpoint {built}, not with the checkpoint in use ({used})"
    if built_passage and identity.passage_fingerprint:
        bp, up = short(built_passage, identity.passage_fingerprint)
        text += f", and its passage encoder {bp} is not the checkpoint's ({up})"
    return text + ("; rebuild the index with this checkpoint, or train a query encoder against this index "
                   "(dpr train --index)")


def check_binding(manifest: "Manifest", identity: EncoderIdentity | str | None, where: str) -> None:
    """Raise ArtifactError (naming ``where``, both checkpoints and both passage encoders) unless
    ``identity`` (an :class:`EncoderIdentity`, a bare checkpoint fingerprint, or None: no check) may
    search the index of ``manifest``."""
    if identity is None:
        return
    if isinstance(identity, str):
        identity = EncoderIdentity(identity)
    built_passage = str(manifest.extra.get("passage_fingerprint", ""))
    if not binds(manifest.checkpoint_fingerprint, built_passage, identity):
        raise ArtifactError(f"{where}: {binding_message(manifest.checkpoint_fingerprint, built_passage, identity)}")


# ----------------------------------------------------------------------------- passages store


def create_passage_store(path: Path) -> sqlite3.Connection:
    """A new, empty passage store at ``path`` (the ``passages`` table of the layout above); raises
    sqlite3.OperationalError when the table exists already."""
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

    def __init__(self, path: Path, open_as: str | None = None):
        self.path = path  # for messages; ``open_as`` (a descriptor path of the verified file) is what is opened
        self._db = sqlite3.connect(f"file:{open_as or path}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _connect(self):
        with self._lock:
            yield self._db

    def count(self) -> int:
        """How many passages the store holds."""
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def by_rows(self, rows: Sequence[int], text: bool = True) -> dict[int, tuple]:
        """row -> (id, title, text), or (id,) without ``text``, for the given rows (missing rows are absent)."""
        wanted = sorted({int(r) for r in rows if r >= 0})
        columns = "row, id, title, text" if text else "row, id"
        out: dict[int, tuple] = {}
        with self._connect() as db:
            for start in range(0, len(wanted), 900):  # SQLite's parameter limit
                some = wanted[start : start + 900]
                marks = ",".join("?" * len(some))
                for row, *fields in db.execute(f"SELECT {columns} FROM passages WHERE row IN ({marks})", some):
                    out[row] = tuple(fields)
        return out

    def by_ids(self, ids: Sequence[str]) -> dict[str, tuple[int, str, str]]:
        """id -> (row, title, text)."""
        wanted = list(dict.fromkeys(ids))
        out: dict[str, tuple[int, str, str]] = {}
        with self._connect() as db:
            for start in range(0, len(wanted), 900):
                some = wanted[start : start + 900]
                marks = ",".join("?" * len(some))
                for row, pid, title, text in db.execute(f"SELECT row, id, title, text FROM passages WHERE id IN ({marks})", some):
                    out[pid] = (row, title, text)
        return out


def prepare_output(path: Path | str, directory: bool) -> Path:
    """Create the parent directories of an output ``path`` (a directory when ``directory``, else a
    file) before any work is done; a file in the way, or ``path`` of the other kind, is a
    ValueError naming it."""
    path = Path(path)
    blocking = next((p for p in (path.parent, *path.parent.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"{path}: cannot be created, {blocking} is a file and not a directory")
    if path.exists() and path.is_dir() != directory:
        raise ValueError(f"{path}: is {'a file' if directory else 'a directory'}; expected {'a directory' if directory else 'a file'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: the checkpoint's fingerprint (sha256 hex), the vector width ``dim``, the
    similarity the vectors were made for, the passage ``count``, the FAISS factory string, the
    creation time (ISO 8601), ``files`` (name -> sha256 hex) and any further fields (``extra``:
    ``checkpoint``, ``search_params``, ...)."""

    checkpoint_fingerprint: str
    dim: int
    similarity: str
    count: int
    factory: str
    created: str
    files: dict
    extra: dict

    @property
    def has_bm25(self) -> bool:
        """Whether the artifact holds a BM25 index (``bm25/``, listed in ``files``)."""
        return BM25_IDS in self.files

    def to_dict(self) -> dict:
        """The JSON object written to ``manifest.json`` (and shown by ``GET /info``)."""
        return {
            "format": FORMAT, "checkpoint_fingerprint": self.checkpoint_fingerprint, "dim": self.dim,
            "similarity": self.similarity, "metric": "inner_product", "count": self.count,
            "factory": self.factory, "created": self.created, "files": self.files, **self.extra,
        }


def write_manifest(directory: Path, **fields) -> Manifest:
    """Write ``manifest.json`` into ``directory`` with the sha256 of every other file below it (its
    index, passage store and ``bm25/`` files, by relative POSIX path) and the :class:`Manifest`
    ``fields`` (``extra`` optional); returns it. Raises OSError for a missing index or passage store."""
    names = sorted(p.relative_to(directory).as_posix() for p in Path(directory).rglob("*") if p.is_file())
    names = [name for name in names if name != MANIFEST]
    for name in (INDEX_FILE, PASSAGES_FILE):
        if name not in names:
            raise FileNotFoundError(f"{directory / name}: missing")
    files = {name: sha256_file(directory / name) for name in names}
    extra = fields.pop("extra", {})
    manifest = Manifest(files=files, extra=extra, **fields)
    (directory / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


def resolve_artifact(directory: Path | str) -> Path:
    """The artifact to read at ``directory``. A replacement (``atomic_directory``) renames the old
    artifact to ``.<name>.old`` and then the new one into place; when it was killed between the two
    renames, ``directory`` is missing and ``.<name>.old`` is the complete previous artifact: that
    one is read, in place (a server may have the artifacts read-only; the next build or add moves
    it back)."""
    directory = Path(directory)
    found = readable_directory(directory)
    if found != directory:
        log.warning("%s is missing after an interrupted replacement; reading the previous artifact %s", directory, found)
    return found


CHECKPOINT_CONFIG = "dpr_config.json"  # checkpoint.CONFIG_FILE: what tells a checkpoint given for an index


def read_manifest(directory: Path | str) -> Manifest:
    """Read and check ``manifest.json`` of the artifact at ``directory`` (or of the previous
    artifact, after an interrupted replacement: :func:`resolve_artifact`). The files it lists are
    not checked here (:class:`PinnedDirectory` does that). Raises ArtifactError naming the path: no
    such directory, a checkpoint rather than an index, no manifest, or a manifest that is not JSON,
    of another format, or with a missing or bad field."""
    directory = resolve_artifact(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such index directory")
    if not path.is_file() and (directory / CHECKPOINT_CONFIG).is_file():
        raise ArtifactError(f"{directory}: is a checkpoint, not an index (build one with: dpr index build --checkpoint "
                            f"{directory} --corpus ... --output ...)")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {directory} is not a dpr-service index")
    try:
        return parse_manifest(path.read_bytes(), path)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot be read ({e.strerror or e})") from None


SEARCH_PARAMS = ("nprobe", "efSearch")


def parse_manifest(data: bytes, path: Path) -> Manifest:
    """The manifest in ``data`` (the bytes of ``path``, named in errors). Raises ArtifactError: not
    UTF-8 JSON, another format, a missing or mistyped field, bad ``search_params``, a file entry
    that is not a plain name, or no checksum for the index or the passage store."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else None
        raise ArtifactError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    known = {"format", "checkpoint_fingerprint", "dim", "similarity", "metric", "count", "factory", "created", "files"}
    try:
        manifest = Manifest(
            checkpoint_fingerprint=str(raw["checkpoint_fingerprint"]), dim=int(raw["dim"]),
            similarity=str(raw["similarity"]), count=int(raw["count"]), factory=str(raw["factory"]),
            created=str(raw["created"]), files=dict(raw["files"]),
            extra={k: v for k, v in raw.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: missing or bad field ({e})") from None
    params = manifest.extra.get("search_params", {})
    if not isinstance(params, dict) or any(k not in SEARCH_PARAMS or type(v) is not int or v < 1 for k, v in params.items()):
        raise ArtifactError(f"{path}: bad search_params {params!r} (expected positive integers for {', '.join(SEARCH_PARAMS)})")
    for name, expected in manifest.files.items():
        if not _relative_name(name) or not isinstance(expected, str):
            raise ArtifactError(f"{path}: bad file entry {name!r}: {expected!r}")
    for name in (INDEX_FILE, PASSAGES_FILE):
        if name not in manifest.files:
            raise ArtifactError(f"{path}: no checksum for {name}")
    if any(name.startswith(BM25_DIR + "/") for name in manifest.files) and not manifest.has_bm25:
        raise ArtifactError(f"{path}: lists {BM25_DIR}/ files but not {BM25_IDS}")
    if HYBRID in manifest.extra:
        try:
            served_fusion(manifest)
        except ValueError as e:
            raise ArtifactError(f"{path}: bad {HYBRID} {manifest.extra[HYBRID]!r} ({e})") from None
    return manifest


def _relative_name(name) -> bool:
    """A file entry: a relative POSIX path of plain names (``index.faiss``, ``bm25/ids.json``), never
    absolute, never ``.`` or ``..``, no backslash."""
    return (isinstance(name, str) and bool(name) and "\\" not in name
            and all(part and part not in (".", "..") for part in name.split("/")))


def served_fusion(manifest: Manifest) -> tuple[str, float | None]:
    """The fusion hybrid search uses by default: the manifest's ``hybrid`` field (``(fusion, alpha)``,
    alpha None for RRF), else ``("rrf", None)``. Raises ValueError for a malformed field."""
    stored = manifest.extra.get(HYBRID)
    if stored is None:
        return "rrf", None
    if not isinstance(stored, dict) or set(stored) - {"fusion", "alpha"}:
        raise ValueError('expected {"fusion": "rrf"} or {"fusion": "convex", "alpha": A}')
    fusion, alpha = stored.get("fusion"), stored.get("alpha")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if fusion == "rrf" and alpha is not None:
        raise ValueError("alpha goes with the convex fusion only")
    if fusion == "convex" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
        raise ValueError(f"the convex fusion needs alpha, a number in [0, 1], got {alpha!r}")
    return fusion, None if alpha is None else float(alpha)


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Every file the manifest names exists and has its checksum."""
    with PinnedDirectory(directory) as pinned:
        pinned.verify(manifest)


def _descriptor_path(fd: int) -> str | None:
    """``/proc/self/fd/N`` (Linux) or ``/dev/fd/N``: a path that opens what ``fd`` holds; None without either."""
    for base in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(base):
            return f"{base}/{fd}"
    return None


class PinnedDirectory:
    """An artifact directory opened once, with every file read through that one handle.

    A new artifact renamed into the same path while this one is being read (a rebuild during
    ``/admin/reload``) cannot mix into it: the files checked against the manifest are the files
    handed to FAISS and SQLite, by descriptor (``fd_path``), never looked up by name again.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._fds: dict[str, int] = {}
        self._dir_fd = None
        try:
            if os.open in os.supports_dir_fd:  # else (Windows) files are opened by name, once each
                self._dir_fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            elif not self.directory.is_dir():
                raise FileNotFoundError(self.directory)
        except FileNotFoundError:
            raise ArtifactError(f"{self.directory}: no such index directory") from None
        except OSError as e:
            raise ArtifactError(f"{self.directory}: cannot be opened ({e.strerror or e})") from None

    def __enter__(self) -> "PinnedDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every descriptor opened (idempotent)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def inode(self) -> tuple[int, int]:
        """(device, inode) of the directory opened: another one at the same path is another artifact."""
        st = os.fstat(self._dir_fd) if self._dir_fd is not None else os.stat(self.directory)
        return st.st_dev, st.st_ino

    def open(self, name: str) -> int:
        """A read-only descriptor of ``name`` in this directory (kept open until ``close``)."""
        if name not in self._fds:
            try:
                if self._dir_fd is None:
                    self._fds[name] = os.open(self.directory / name, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                else:
                    self._fds[name] = os.open(name, os.O_RDONLY, dir_fd=self._dir_fd)
            except FileNotFoundError:
                listed = f" ({MANIFEST} lists it)" if name != MANIFEST else ""
                raise ArtifactError(f"{self.directory / name}: missing from the index{listed}") from None
            except OSError as e:
                raise ArtifactError(f"{self.directory / name}: cannot be opened ({e.strerror or e})") from None
        return self._fds[name]

    def read(self, name: str) -> bytes:
        """The whole file ``name`` through this handle; raises ArtifactError when it is missing."""
        fd = self.open(name)
        blocks = []
        os.lseek(fd, 0, os.SEEK_SET)
        while block := os.read(fd, 1 << 20):
            blocks.append(block)
        return b"".join(blocks)

    def sha256(self, name: str) -> str:
        """Hex sha256 of ``name`` read through this handle."""
        return sha256_fd(self.open(name))

    def fd_path(self, name: str) -> str:
        """A path that opens the very file behind the descriptor (Linux /proc, else /dev/fd)."""
        return _descriptor_path(self.open(name)) or str(self.directory / name)  # no descriptor paths: the name

    def subdirectory_path(self, name: str) -> str:
        """A path to the subdirectory ``name`` of the very directory opened (through a descriptor, so
        a new artifact renamed into the same path meanwhile is not read); its files are opened by
        name within it. Raises ArtifactError when it is missing."""
        key = name + "/"  # never a file's key
        if self._dir_fd is None:
            return str(self.directory / name)
        if key not in self._fds:
            try:
                self._fds[key] = os.open(name, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0), dir_fd=self._dir_fd)
            except OSError as e:
                raise ArtifactError(f"{self.directory / name}: cannot be opened ({e.strerror or e})") from None
        return _descriptor_path(self._fds[key]) or str(self.directory / name)

    def link_or_copy(self, name: str, target: Path) -> None:
        """Put the file ``name`` at ``target`` (its parent created): a hard link where the file system
        allows one (artifact files are never changed in place), else a copy read through this handle."""
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self._dir_fd is not None:
                os.link(name, target, src_dir_fd=self._dir_fd, follow_symlinks=False)
            else:
                os.link(self.directory / name, target)
        except OSError:
            shutil.copyfile(self.fd_path(name), target)

    def manifest(self) -> Manifest:
        """This directory's manifest (:func:`parse_manifest`); raises ArtifactError naming the file."""
        path = self.directory / MANIFEST
        try:
            data = self.read(MANIFEST)
        except ArtifactError:
            if not os.path.exists(path):
                raise ArtifactError(f"{path}: missing; {self.directory} is not a dpr-service index") from None
            raise
        return parse_manifest(data, path)

    def verify(self, manifest: Manifest) -> None:
        """Every file the manifest names is here and has its checksum (read through this handle)."""
        for name, expected in manifest.files.items():
            if self.sha256(name) != expected:
                raise ArtifactError(f"{self.directory / name}: checksum does not match {MANIFEST} (the file, or the manifest, "
                                    "was changed or truncated)")


# ----------------------------------------------------------------------------- a new manifest over the same files


def relink(source: Path | str, target: Path | str, expected: Manifest, new: Manifest, doing: str) -> None:
    """Write at ``target`` an artifact with ``source``'s files (hard links where the file system allows
    them, else copies) under the manifest ``new``, verified against its checksums, then swapped in
    atomically (:func:`~dpr_service.core.fsio.atomic_directory`). Raises ArtifactError, changing
    nothing, when ``source`` was replaced meanwhile (its manifest is no longer ``expected``; the
    message says it happened while ``doing``) or a file fails its check."""
    with atomic_directory(target) as tmp:
        with PinnedDirectory(resolve_artifact(source)) as pinned:
            if pinned.manifest() != expected:
                raise ArtifactError(f"{source}: replaced while {doing}; try again")
            for name in expected.files:
                pinned.link_or_copy(name, tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(new.to_dict(), indent=2) + "\n")
        verify_files(tmp, read_manifest(tmp))


# ----------------------------------------------------------------------------- the served fusion


def store_served_fusion(directory: Path | str, fusion: str, alpha: float | None = None) -> Manifest:
    """Make ``fusion`` (``"rrf"``, or ``"convex"`` with ``alpha`` in [0, 1], the weight of the dense
    side) the default of hybrid search on the artifact at ``directory``: a new artifact with the same
    files (hard links where the file system allows them, else copies) and a manifest whose ``hybrid``
    field says so, verified against its checksums, then swapped in atomically
    (:func:`~dpr_service.core.fsio.atomic_directory`; a server notices it as any new artifact).
    Returns the new manifest. Raises ValueError for a bad fusion or alpha, ArtifactError for an
    artifact that is missing or fails its checks (then nothing is changed)."""
    directory = Path(directory)
    stored = {"fusion": fusion} if alpha is None else {"fusion": fusion, "alpha": alpha}
    manifest = read_manifest(directory)  # a missing or foreign directory fails here, before anything is written
    new = replace(manifest, extra={**manifest.extra, HYBRID: stored})
    served_fusion(new)  # ValueError for a bad fusion or alpha
    relink(directory, directory, manifest, new, "the served fusion was being set")
    log.info("%s: hybrid search now uses %s by default", directory, ", ".join(f"{k} {v}" for k, v in stored.items()))
    return new
