"""Data under the data root (``DPR_DATA_ROOT``): names, the listing, and uploads.

Jobs and promotions name data sets, corpora and starting models *by name*, a relative path under
the root (``scifact``, ``beir/nfcorpus``, ``models/minilm``); nothing else on the server's disk is
reachable. A name that is absolute, holds ``..`` (or ``.``, or an empty part), or resolves (through
symbolic links) outside the root is refused. Uploads (a JSONL training file, or a zip of a BEIR
directory) are checked with the readers ``dpr train`` uses (:mod:`dpr_service.core.formats`) before
they are moved into place under their name; a bad line is a :class:`DataRefused` naming it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

from dpr_service.core.formats import DataError, check_beir_dir, read_corpus, read_eval_data, read_train_data
from dpr_service.core.fsio import atomic_directory, exclusive

from ..schemas import FieldError

UPLOAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # matched whole (fullmatch): no "$" before a newline
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ZIP_MAGIC = b"PK\x03\x04"
COPY_BLOCK = 1 << 20


class DataRefused(FieldError):
    """A name or an upload refused: ``field`` is the request field at fault, ``status`` the HTTP
    status to answer (422 bad input, 404 no such data, 409 the name is taken, 413 too large)."""


def check_split_name(value, field: str) -> str:
    """``value`` if it is a plain split name (``train``, ``dev``, ``test``: the stem of a BEIR
    directory's ``qrels/<split>.tsv``): letters, digits, ``.``, ``_`` and ``-``, at most 100, starting
    with a letter or digit, matched whole. Raises DataRefused (422 naming ``field``) for anything
    else: a path separator, ``..``, a hidden name (``.x``), a control character, a non-string."""
    if not isinstance(value, str):
        raise DataRefused(field, f"must be a split name such as 'train' or 'dev' (a string), got {type(value).__name__}")
    if not UPLOAD_NAME.fullmatch(value) or ".." in value or value.endswith("."):
        raise DataRefused(field, f"{value!r} is not a split name: use letters, digits, '.', '_' and '-' (at most 100, "
                                 "starting with a letter or digit; no '/', no '..')")
    return value


def resolve_name(root: Path, name, field: str) -> Path:
    """The path of data named ``name`` under ``root`` (resolved, links followed). Raises DataRefused
    (422) for a name that is not a plain relative path inside the root (absolute, ``..``, ``.``, an
    empty part, a hidden part such as an upload's ``.upload-*`` temporary or ``.uploads.lock``, a
    control character), also once links are followed; (404) for one that is missing."""
    if not isinstance(name, str) or not name.strip():
        raise DataRefused(field, "must be the name of data under the data root (a relative path such as 'scifact')")
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or CONTROL.search(name) or any(p in ("", ".", "..") for p in parts):
        raise DataRefused(field, f"{name!r} is not a plain name under the data root (no '..', no absolute paths)")
    if any(p.startswith(".") for p in parts):
        raise DataRefused(field, f"{name!r} names a hidden file (names starting with '.' are never data)")
    base = root.resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base) or path == base:
        raise DataRefused(field, f"{name!r} leaves the data root (a link pointing outside it)")
    if any(p.startswith(".") for p in path.relative_to(base).parts):
        raise DataRefused(field, f"{name!r} leads to a hidden file (names starting with '.' are never data)")
    if not path.exists():
        raise DataRefused(field, f"no data named {name!r} under the data root (GET /datasets lists them)", status=404)
    return path


def kind_of(path: Path) -> str:
    """``beir`` (a directory with corpus.jsonl), ``model`` (a directory with config.json), ``directory``
    or ``file``."""
    if path.is_dir():
        return "beir" if (path / "corpus.jsonl").is_file() else "model" if (path / "config.json").is_file() else "directory"
    return "file"


def list_data(root: Path) -> list[dict]:
    """Entries at the top of ``root`` (hidden ones and links leaving it skipped): ``{"name", "kind", "bytes"}``
    (bytes: a file's size, a directory's files' total)."""
    base = root.resolve()
    if not base.is_dir():
        return []
    out = []
    for entry in sorted(base.iterdir()):
        if entry.name.startswith(".") or not entry.resolve().is_relative_to(base):
            continue
        size = entry.stat().st_size if entry.is_file() else sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
        out.append({"name": entry.name, "kind": kind_of(entry), "bytes": size})
    return out


def upload_name(name: str, is_zip: bool) -> str:
    """The name an upload is stored under: ``name`` (a zip: a directory), a training file with
    ``.jsonl`` added unless it ends in ``.jsonl`` or ``.json``. Raises DataRefused (422) for a name
    that is not letters, digits, ``.``, ``_`` and ``-`` (at most 100, not starting with ``.``)."""
    if not isinstance(name, str) or not UPLOAD_NAME.fullmatch(name) or name.endswith("."):
        raise DataRefused("name", f"{name!r}: use letters, digits, '.', '_' and '-' (at most 100, starting with a letter or digit)")
    if not is_zip and not name.endswith((".jsonl", ".json")):
        name += ".jsonl"
    return name


def _shown(error: DataError, tmp: Path, name: str) -> str:
    """The reader's message with the temporary path replaced by the name the client gave."""
    where = str(error.path).replace(str(tmp) + "/", f"{name}/" if name else "")
    return f"{where}:{error.line}: {error.message}" if error.line else f"{where}: {error.message}"


def sweep_stale_uploads(root: Path, older_than_s: float = 3600.0) -> int:
    """Remove the ``.upload-*`` files and directories under ``root`` that a server killed during an
    upload left behind (untouched for ``older_than_s`` seconds: one in progress in another worker is
    kept). Returns how many were removed."""
    removed = 0
    for path in root.glob(".upload-*") if root.is_dir() else []:
        try:
            if time.time() - path.lstat().st_mtime < older_than_s:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
    return removed


def ingest(root: Path, name: str, upload: Path, limit: int) -> dict:
    """Check the uploaded file ``upload`` and move it under ``root`` as ``name`` (see :func:`upload_name`);
    returns ``{"name", "kind", "bytes"}``. ``upload`` must be on ``root``'s file system (it is moved,
    not copied). Uploads take turns (a lock in ``root``, across worker processes), so two of one
    name cannot both pass the name check. Raises DataRefused: 409 when the name is taken, 413 for a
    zip that unpacks to more than ``limit`` bytes, 422 for a bad zip entry or a bad line (file and
    line named)."""
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / ".uploads.lock"):
        with open(upload, "rb") as fh:
            is_zip = fh.read(4) == ZIP_MAGIC
        name = upload_name(name, is_zip)
        target = root / name
        if target.exists() or target.is_symlink():
            raise DataRefused("name", f"{name!r} exists already under the data root (delete it or choose another name)", 409)
        if is_zip:
            return _ingest_zip(upload, target, name, limit)
        tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=root))  # checked under its own name, then moved
        try:
            checked = tmp / name
            os.rename(upload, checked)
            try:
                read_train_data(checked)
            except DataError as e:
                raise DataRefused("body", _shown(e, tmp, "")) from None
            os.rename(checked, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"name": name, "kind": "file", "bytes": target.stat().st_size}


def _ingest_zip(upload: Path, target: Path, name: str, limit: int) -> dict:
    """A zipped BEIR directory unpacked, checked and committed at ``target`` (see :func:`ingest`)."""
    with atomic_directory(target) as tmp:
        beir = _unzip(upload, tmp, limit)
        try:
            _check_beir(beir)
        except DataError as e:
            raise DataRefused("body", _shown(e, tmp, name)) from None
        if beir != tmp:  # the zip held a directory: its contents become the data set
            top = tmp / beir.relative_to(tmp).parts[0]
            for item in list(beir.iterdir()):
                item.rename(tmp / item.name)
            shutil.rmtree(top)
    return {"name": name, "kind": "beir", "bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file())}


def _unzip(upload: Path, into: Path, limit: int) -> Path:
    """Unpack ``upload`` into ``into``, refusing entries that escape it (absolute, ``..``, links) and
    more than ``limit`` bytes unpacked (counted as written, whatever the headers say). Returns the BEIR
    root: ``into``, or the directory holding corpus.jsonl below a chain of single directories."""
    try:
        archive = zipfile.ZipFile(upload)
    except zipfile.BadZipFile as e:
        raise DataRefused("body", f"not a readable zip file ({e})") from None
    written = 0
    with archive:
        for info in archive.infolist():
            entry = PurePosixPath(info.filename.replace("\\", "/"))
            mode = info.external_attr >> 16
            if entry.is_absolute() or ".." in entry.parts or info.filename.startswith("/") or ":" in entry.parts[0]:
                raise DataRefused("body", f"zip entry {info.filename!r} escapes the data set's directory")
            if stat.S_ISLNK(mode):
                raise DataRefused("body", f"zip entry {info.filename!r} is a symbolic link (not accepted)")
            path = into.joinpath(*entry.parts)
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as src, open(path, "wb") as dst:
                    while block := src.read(COPY_BLOCK):
                        written += len(block)
                        if written > limit:
                            raise DataRefused("body", f"the zip unpacks to more than {limit} bytes", status=413)
                        dst.write(block)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:  # damaged, unsupported, encrypted
                raise DataRefused("body", f"zip entry {info.filename!r} cannot be read ({e})") from None
    root = into
    while not (root / "corpus.jsonl").is_file():  # a zip of a directory (or of its path): down to the data set
        entries = [p for p in root.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) != 1 or not entries[0].is_dir():
            break
        root = entries[0]
    if (root / "corpus.jsonl").is_file():
        return root
    raise DataRefused("body", "the zip holds no BEIR directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), "
                              "at its top or under its one top directory")


def _check_beir(root: Path) -> None:
    """Read a BEIR directory as ``dpr train`` and ``dpr eval`` would: the corpus, then each qrels split
    (``train`` as training data, any other as evaluation data). Raises DataError."""
    check_beir_dir(root)
    read_corpus(root)
    for qrels in sorted((root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []:
        (read_train_data if qrels.stem == "train" else read_eval_data)(root, qrels.stem)
