"""Data under the data root (``DPR_DATA_ROOT``): names, the listing, and uploads.

Jobs and promotions name data sets, corpora and starting models *by name*, a relative path under
the root (``scifact``, ``beir/nfcorpus``, ``models/minilm``); nothing else on the server's disk is
reachable. A name that is absolute, holds ``..`` (or ``.``, or an empty part), names a hidden file
(``.upload-*`` temporaries, ``.uploads.lock``) or resolves (through symbolic links) outside the root
or to a hidden file is refused. Uploads (a JSONL training file, or a zip of a BEIR directory) are
checked by the rules of the readers ``dpr train`` uses (:mod:`dpr_service.core.formats`), streaming,
in a claimed ``.upload-*`` directory outside the uploads' lock, then renamed into place under their
name (the lock covers that rename only); a bad line or zip entry is a :class:`DataRefused` naming it.
A delete (:func:`delete_data`) renames the entry into such a directory under the same lock, then
removes it there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
import struct
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from dpr_service.core import formats
from dpr_service.core.formats import DataError, check_beir_dir
from dpr_service.core.formats import read_train_data  # noqa: F401  (tests/test_jobs.py's race test patches it)
from dpr_service.core.fsio import exclusive, fsync_dir, fsync_path, fsync_tree, pid_alive, tree_bytes

from ..schemas import FieldError

UPLOAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # matched whole (fullmatch): no "$" before a newline
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ZIP_MAGIC = b"PK\x03\x04"
COPY_BLOCK = 1 << 20
TEMP_PREFIX = ".upload-"  # the route's body and each check's working directory, claimed while in use
OLD_TEMP = re.compile(r"\..+\.tmp-(\d+)-[0-9a-f]+")  # unpack directories of earlier versions (fsio.atomic_directory)
MAX_ZIP_ENTRIES = 5000  # DPR_MAX_ZIP_ENTRIES's default
MAX_ZIP_DEPTH = 32  # path parts of one zip entry
MAX_ZIP_PART_BYTES = 255  # one file or directory name (NAME_MAX)
MAX_ZIP_PATH_BYTES = 1024  # one entry's whole path
UNWRITABLE_NAME = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EILSEQ, errno.EINVAL}


class DataRefused(FieldError):
    """A name or an upload refused: ``field`` is the request field at fault, ``status`` the HTTP
    status to answer (422 bad input, 404 no such data, 409 the name is taken, 413 too large)."""

    def __reduce__(self):  # raised in the admin lane's child process (an upload's check), re-raised here
        return type(self), (self.field, self.message, self.status)


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
    """Entries at the top of ``root``: ``{"name", "kind", "bytes"}`` (bytes: a file's size, a
    directory's files' total). Hidden names (``.upload-*`` temporaries, ``.uploads.lock``), links
    leaving the root or leading to a hidden name, dangling links and entries removed meanwhile are
    skipped: what is listed is what :func:`resolve_name` accepts."""
    base = root.resolve()
    if not base.is_dir():
        return []
    out = []
    for entry in sorted(base.iterdir()):
        try:
            if entry.name.startswith(".") or not _plain_target(base, entry.resolve()):
                continue
            out.append({"name": entry.name, "kind": kind_of(entry), "bytes": tree_bytes(entry)})
        except OSError:  # removed (or made unreadable) while listed
            continue
    return out


def _plain_target(base: Path, path: Path) -> bool:
    """Whether a resolved ``path`` exists inside ``base`` with no hidden part."""
    return path.is_relative_to(base) and path != base and path.exists() and \
        not any(p.startswith(".") for p in path.relative_to(base).parts)




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


# ----------------------------------------------------------------------------- temporaries


def claim(path: Path) -> int:
    """An open descriptor of ``path`` (a file or a directory) holding an exclusive flock on it: the
    mark of a temporary in use, which :func:`sweep_stale_uploads` never removes. Close it (or end
    the process) to let go."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _in_use(path: Path) -> bool:
    """Whether some process (this one included) holds :func:`claim` on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep_stale_uploads(root: Path, older_than_s: float = 60.0, keep: Path | None = None) -> int:
    """Remove what a server killed during an upload left at the top of ``root``: ``.upload-*``
    files and directories that no process claims (:func:`claim`) and untouched for ``older_than_s``
    seconds (the moment between creating one and claiming it), and ``.<name>.tmp-<pid>-*``
    directories of unpacks by earlier versions whose process is gone. One in progress, in this
    worker or another, is kept, and so is ``keep`` (the upload being ingested). Returns how many
    were removed."""
    removed, kept = 0, os.path.abspath(keep) if keep is not None else None
    for path in root.iterdir() if root.is_dir() else []:
        try:
            if os.path.abspath(path) == kept:
                continue
            if path.name.startswith(TEMP_PREFIX):
                if time.time() - path.lstat().st_mtime < older_than_s or _in_use(path):
                    continue
            elif not ((m := OLD_TEMP.fullmatch(path.name)) and not pid_alive(int(m.group(1)))):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
    return removed


# ----------------------------------------------------------------------------- uploads


def ingest(root: Path, name: str, upload: Path, limit: int, max_entries: int = MAX_ZIP_ENTRIES) -> dict:
    """Check the uploaded file ``upload`` and move it under ``root`` as ``name`` (see :func:`upload_name`);
    returns ``{"name", "kind", "bytes"}``. ``upload`` must be on ``root``'s file system (it is moved,
    not copied). The check (a zip: unpacking too) runs in a claimed ``.upload-*`` directory of its
    own, without a lock; only the last step takes the uploads' lock (in ``root``, across worker
    processes): the name is checked again and the checked data renamed into place, so two uploads
    of one name cannot both be stored. Raises DataRefused: 409 when the name is taken; 413 for a zip
    that unpacks to more than ``limit`` bytes or holds more than ``max_entries`` entries; 422 for a
    bad name, a bad zip entry (named) or a bad line (file and line named)."""
    root.mkdir(parents=True, exist_ok=True)
    sweep_stale_uploads(root, keep=upload)
    with open(upload, "rb") as fh:
        is_zip = fh.read(4) == ZIP_MAGIC
    name = upload_name(name, is_zip)
    target = root / name
    _refuse_taken(target, name)  # early, to spare the work; checked again under the lock
    work = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))
    fd = claim(work)
    try:
        if is_zip:
            checked = _unpack_zip(upload, work, name, limit, max_entries)
        else:
            checked = work / name  # checked under its own name (the file's suffix picks the reader)
            os.rename(upload, checked)
            try:
                check_train_file(checked)
            except DataError as e:
                raise DataRefused("body", _shown(e, work, "")) from None
        size = tree_bytes(checked)
        if is_zip:
            fsync_tree(checked)
        else:
            fsync_path(checked)
        with exclusive(root / ".uploads.lock"):
            _refuse_taken(target, name)
            os.rename(checked, target)
            fsync_dir(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(fd)
    return {"name": name, "kind": "beir" if is_zip else "file", "bytes": size}


def _refuse_taken(target: Path, name: str) -> None:
    if target.exists() or target.is_symlink():
        raise DataRefused("name", f"{name!r} exists already under the data root (DELETE /datasets/{name} "
                                  "removes it; or choose another name)", 409)


# ----------------------------------------------------------------------------- deletes


def delete_data(root: Path, name: str, in_use: Callable[[Path, Path], str | None]) -> None:
    """Remove the entry ``name`` at the top of ``root`` (a file, a directory, or a link: the link
    itself, never what it points to), atomically: under the uploads' lock it is renamed into a
    claimed ``.upload-*`` directory (the name is gone at once; a server killed meanwhile leaves a
    temporary that :func:`sweep_stale_uploads` removes, never half a data set), then removed there.

    ``in_use(path, entry)`` (``path`` resolved, links followed; ``entry`` as named, ``root/name``)
    says why the data may not go (a job using it) or None; it is asked before the rename and again
    after it, so a job submitted meanwhile, which named the data before it vanished, is seen: the
    entry is then renamed back. Raises DataRefused naming ``name``: 422 for a name that is not a
    plain entry of the root (a path, ``..``, a hidden name), 404 for a missing one, 409 with
    ``in_use``'s reason."""
    if isinstance(name, str) and "/" in name:
        raise DataRefused("name", f"{name!r}: name an entry at the top of the data root, as GET /datasets lists it")
    path = resolve_name(root, name, "name")
    entry = root / name

    def refuse_if_used() -> None:
        reason = in_use(path, entry)
        if reason:
            raise DataRefused("name", f"{name!r} is in use: {reason}", 409)

    refuse_if_used()  # early, to spare the rename; checked again once the name is gone
    with exclusive(root / ".uploads.lock"):
        if not (entry.exists() or entry.is_symlink()):  # removed meanwhile (another delete)
            raise DataRefused("name", f"no data named {name!r} under the data root (GET /datasets lists them)", status=404)
        work = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))
        fd = claim(work)
        moved = False
        try:
            os.rename(entry, work / name)
            moved = True
            fsync_dir(root)
            refuse_if_used()
        except BaseException:
            try:
                if moved:  # put back under its name: nothing is removed
                    os.rename(work / name, entry)
                    fsync_dir(root)
                os.rmdir(work)
            finally:
                os.close(fd)
            raise
    try:  # outside the lock: a large data set's files need not hold up uploads
        shutil.rmtree(work, ignore_errors=True)
    finally:
        os.close(fd)


def check_train_file(path: Path) -> None:
    """Read a training file (DPR JSON or JSONL, plain JSONL) by the rules of ``dpr train``'s reader
    (:func:`dpr_service.core.formats.read_train_data`), one record at a time, keeping none: memory
    grows by one line (a DPR JSON list: by the file, which its reader holds whole). Raises DataError
    naming the file and line, as that reader would."""
    records = formats.iter_json_array(path) if path.suffix == ".json" else formats.iter_jsonl(path)
    kind, count = None, 0
    for lineno, obj in records:
        if kind is None:
            kind = "dpr" if "question" in obj else "plain" if "query" in obj else None
            if kind is None:
                raise DataError(path, lineno, "neither 'question' (DPR format) nor 'query' (plain JSONL) found")
        (formats._dpr_record if kind == "dpr" else formats._plain_record)(obj, path, lineno)
        count += 1
    if not count:
        raise DataError(path, None, "no examples in the file")


# ----------------------------------------------------------------------------- zips


def _unpack_zip(upload: Path, work: Path, name: str, limit: int, max_entries: int) -> Path:
    """A zipped BEIR directory unpacked under ``work`` and checked; returns the directory to store
    (see :func:`ingest`)."""
    unpacked = work / "unpacked"
    unpacked.mkdir()
    beir = _unzip(upload, unpacked, limit, max_entries)
    try:
        _check_beir(beir)
    except DataError as e:
        raise DataRefused("body", _shown(e, beir, name)) from None
    return beir


def _zip_entry_count(fh, at_most: int) -> int:
    """How many entries the zip's central directory holds, counted up to ``at_most + 1`` (then it
    stops): the records are walked as :mod:`zipfile` walks them (by the directory's size, whatever
    the end record claims), without building them. 0 when the end record is not found (zipfile
    then says what is wrong)."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - 22 - 0xFFFF))
    tail = fh.read()
    base = size - len(tail)
    at = len(tail) - 22 if tail[-22:-18] == b"PK\x05\x06" else tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return 0
    cd_size = struct.unpack("<I", tail[at + 12:at + 16])[0]
    cd_end = base + at
    if at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":  # zip64: its own end record before the locator
        fh.seek(base + at - 20 - 56)
        record = fh.read(56)
        if record[:4] != b"PK\x06\x06":
            return 0
        cd_size = struct.unpack("<Q", record[40:48])[0]
        cd_end = base + at - 20 - 56
    pos, count = cd_end - cd_size, 0
    if pos < 0:
        return 0
    fh.seek(pos)
    while pos < cd_end and count <= at_most:
        header = fh.read(46)
        if len(header) < 46 or header[:4] != b"PK\x01\x02":
            break
        name_len, extra_len, comment_len = struct.unpack("<HHH", header[28:34])
        pos += 46 + name_len + extra_len + comment_len
        fh.seek(pos)
        count += 1
    return count


def _entry_parts(info: zipfile.ZipInfo) -> tuple[tuple[str, ...], bool]:
    """(path parts, is a directory) of a zip entry, or DataRefused (422) naming it: absolute, ``..``,
    a drive letter, a link, an empty name or part, ``.``, a control character, a part over
    MAX_ZIP_PART_BYTES bytes, more than MAX_ZIP_DEPTH parts or MAX_ZIP_PATH_BYTES bytes."""
    raw = info.filename.replace("\\", "/")
    shown = f"zip entry {info.filename[:120]!r}" + ("..." if len(info.filename) > 120 else "")
    is_dir = raw.endswith("/")
    parts = tuple((raw[:-1] if is_dir else raw).split("/"))
    if raw.startswith("/") or ".." in parts or ":" in parts[0]:
        raise DataRefused("body", f"{shown} escapes the data set's directory")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataRefused("body", f"{shown} is a symbolic link (not accepted)")
    if not raw or raw in (".", "./"):
        raise DataRefused("body", f"{shown} names no file (an empty name or '.')")
    if "" in parts or "." in parts:
        raise DataRefused("body", f"{shown} has an empty or '.' path part")
    if CONTROL.search(raw):
        raise DataRefused("body", f"{shown} holds a control character")
    if len(parts) > MAX_ZIP_DEPTH:
        raise DataRefused("body", f"{shown} is {len(parts)} deep (at most {MAX_ZIP_DEPTH})")
    if len(raw.encode("utf-8", "surrogateescape")) > MAX_ZIP_PATH_BYTES:
        raise DataRefused("body", f"{shown} is a path over {MAX_ZIP_PATH_BYTES} bytes")
    if any(len(p.encode("utf-8", "surrogateescape")) > MAX_ZIP_PART_BYTES for p in parts):
        raise DataRefused("body", f"{shown} has a name over {MAX_ZIP_PART_BYTES} bytes")
    return parts, is_dir


def _check_entries(infos: list[zipfile.ZipInfo]) -> list[tuple[zipfile.ZipInfo, tuple[str, ...], bool]]:
    """Every entry's parts (:func:`_entry_parts`), and DataRefused (422) naming the first entry that
    is a file and a directory at once (``extra`` and ``extra/inner.txt``, ``qrels/dev.tsv`` and
    ``qrels/dev.tsv/``) or a file given twice. Nothing is written before all pass."""
    entries = [(info, *_entry_parts(info)) for info in infos]
    files: dict[tuple[str, ...], str] = {}
    dirs: dict[tuple[str, ...], str] = {}
    for info, parts, is_dir in entries:
        for i in range(1, len(parts) + (1 if is_dir else 0)):
            dirs.setdefault(parts[:i], info.filename)
        if not is_dir:
            if parts in files:
                raise DataRefused("body", f"zip entry {info.filename!r} is given twice")
            files[parts] = info.filename
    for parts, entry in files.items():
        if parts in dirs:
            raise DataRefused("body", f"zip entry {entry!r} is a file and a directory (of {dirs[parts]!r})")
    return entries


def _unzip(upload: Path, into: Path, limit: int, max_entries: int = MAX_ZIP_ENTRIES) -> Path:
    """Unpack ``upload`` into ``into``, refusing (before anything is written) more than
    ``max_entries`` entries (413), entries that escape it (absolute, ``..``, links) or are degenerate
    or conflicting (:func:`_check_entries`, 422), and more than ``limit`` bytes unpacked (413, counted
    as written, whatever the headers say). Returns the BEIR root: ``into``, or the directory holding
    corpus.jsonl below a chain of single directories."""
    with open(upload, "rb") as fh:
        count = _zip_entry_count(fh, max_entries)
    if count > max_entries:
        raise DataRefused("body", f"the zip holds more than {max_entries} entries (DPR_MAX_ZIP_ENTRIES)", status=413)
    try:
        archive = zipfile.ZipFile(upload)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as e:
        raise DataRefused("body", f"not a readable zip file ({e})") from None
    written = 0
    with archive:
        infos = archive.infolist()
        if len(infos) > max_entries:  # the walk above and zipfile disagree: zipfile's count decides
            raise DataRefused("body", f"the zip holds more than {max_entries} entries (DPR_MAX_ZIP_ENTRIES)", status=413)
        if sum(info.file_size for info in infos) > limit:  # what the headers say; the bytes written are counted too
            raise DataRefused("body", f"the zip unpacks to more than {limit} bytes", status=413)
        for info, parts, is_dir in _check_entries(infos):
            path = into.joinpath(*parts)
            try:
                if is_dir:
                    path.mkdir(parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(path, "xb") as dst:
                    while block := src.read(COPY_BLOCK):
                        written += len(block)
                        if written > limit:
                            raise DataRefused("body", f"the zip unpacks to more than {limit} bytes", status=413)
                        dst.write(block)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, EOFError) as e:
                raise DataRefused("body", f"zip entry {info.filename!r} cannot be read ({e})") from None  # damaged, encrypted
            except OSError as e:
                if e.errno not in UNWRITABLE_NAME:
                    raise
                raise DataRefused("body", f"zip entry {info.filename!r} cannot be stored ({e.strerror})") from None
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
    """Read a BEIR directory by the rules of ``dpr train`` and ``dpr eval`` (the corpus, then each
    qrels split: ``train`` as training data, any other as evaluation data), refusing what they
    refuse with their messages, without holding the corpus: it is read line by line, keeping its
    ids (memory by the ids, not the texts). Raises DataError."""
    check_beir_dir(root)
    ids = _corpus_ids(root / "corpus.jsonl")
    for qrels in sorted((root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []:
        if qrels.stem == "train":
            _check_beir_train(root, qrels, ids)
        else:
            formats.read_judged(root, None, qrels.stem)  # read_eval_data's checks; its corpus is the one above


def _corpus_ids(path: Path) -> set[str]:
    """The passage ids of a BEIR corpus.jsonl, each line checked as read_corpus checks it (a duplicate
    id, an empty corpus: DataError)."""
    ids: set[str] = set()
    for lineno, passage in formats._beir_passages(path):
        if passage.id in ids:
            raise DataError(path, lineno, f"duplicate passage id {passage.id!r}")
        ids.add(passage.id)
    if not ids:
        raise DataError(path, None, "empty corpus")
    return ids


def _check_beir_train(root: Path, qrels_path: Path, ids: set[str]) -> None:
    """A ``train`` split as read_train_data reads it: queries, judgements, every judged query in
    queries.jsonl, and a judgement with score > 0 of a passage in the corpus. Raises DataError."""
    queries = formats.read_beir_queries(root / "queries.jsonl")
    qrels = formats.read_qrels(qrels_path)
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise DataError(qrels_path, None, f"{len(missing)} query ids not in queries.jsonl (first: {missing[0]!r})")
    if not any(score > 0 and pid in ids for rel in qrels.values() for pid, score in rel.items()):
        raise DataError(qrels_path, None, "no judgements with score > 0")
