"""File helpers shared by both file formats (checkpoint and index artifact) and their readers.

- Atomic directory replacement with the ``.old`` recovery rule: :func:`atomic_directory` writes a
  directory beside its final place and swaps it in with two renames (``target -> .target.old``,
  ``tmp -> target``); a kill between them leaves ``.target.old``, the complete previous copy.
  :func:`recover_directory` (writers) puts it back; :func:`readable_directory` (readers, which may
  have the files read-only) reads it in place.
- :func:`pid_alive`: whether a process id names a live process (stale locks and temporaries).
- :func:`sha256_file` / :func:`sha256_fd` / :func:`sha256_update`: sha256 read in 1 MiB blocks.

Only the standard library: every stage may use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

BLOCK = 1 << 20  # bytes read at a time when hashing


# ----------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """True when ``pid`` names a running process (another user's counts as running).

    ``pid <= 0`` is False (``os.kill`` would signal a process group). Never raises.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process; anything else: assume alive, never delete its files
        return True
    return True


# ----------------------------------------------------------------------------- sha256


def sha256_update(h: "hashlib._Hash", read: Callable[[int], bytes]) -> "hashlib._Hash":
    """Feed ``read(BLOCK)`` into ``h`` until it returns ``b""``; returns ``h`` (for chaining)."""
    while block := read(BLOCK):
        h.update(block)
    return h


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of the file at ``path`` (64 characters). Raises OSError when it cannot be read."""
    with open(path, "rb") as fh:
        return sha256_update(hashlib.sha256(), fh.read).hexdigest()


def sha256_fd(fd: int) -> str:
    """Hex sha256 of an open file descriptor's whole file, read from offset 0 (the offset is left at
    the end). Raises OSError when it cannot be read."""
    os.lseek(fd, 0, os.SEEK_SET)
    return sha256_update(hashlib.sha256(), lambda n: os.read(fd, n)).hexdigest()


# ----------------------------------------------------------------------------- atomic directories


def old_path(target: Path | str) -> Path:
    """``.<name>.old`` beside ``target``: where a replacement keeps the previous copy during the swap."""
    target = Path(target)
    return target.with_name(f".{target.name}.old")


def readable_directory(target: Path | str) -> Path:
    """The directory a reader should read for ``target``: ``target`` itself, or ``.<name>.old`` when
    a replacement was killed between its two renames (``target`` missing, the old copy complete).
    Nothing is moved or logged (a reader may have the files read-only)."""
    target = Path(target)
    old = old_path(target)
    return old if not target.exists() and old.is_dir() else target


def recover_directory(target: Path | str) -> Path:
    """Return ``target``, first restoring it from ``.<name>.old`` if a swap was cut short.

    Raises OSError when the rename fails (e.g. a read-only file system)."""
    target = Path(target)
    old = old_path(target)
    if not target.exists() and old.exists():
        os.rename(old, target)
        log.warning("restored %s from an interrupted replacement", target)
    return target


@contextlib.contextmanager
def atomic_directory(target: Path | str, before_commit: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; when the block ends without an error,
    call ``before_commit(tmp)`` (if given: e.g. to write checksums), fsync, and replace ``target``
    with it. On an error the temporary directory is removed, ``target`` kept and the error re-raised.

    Before anything else, an interrupted swap is recovered (:func:`recover_directory`, so the
    previous complete copy is never deleted before the new one is in place) and temporaries of
    killed writers (``.<name>.tmp-<pid>-*`` of dead processes, or of this pid reused) are removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    _remove_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if before_commit is not None:
            before_commit(tmp)
        fsync_tree(tmp)
        old = old_path(target)
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(target.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temporaries(target: Path) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` directories of writers that died before their rename: their
    process is gone, or it is this very process (a pid reused, as after a container restart)."""
    prefix = f".{target.name}.tmp-"
    for tmp in target.parent.iterdir():
        if not tmp.name.startswith(prefix):
            continue
        try:
            pid = int(tmp.name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid() or not pid_alive(pid):
            log.info("removing %s, left by a writer that was killed", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (so the renames that follow are durable)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_path(path: Path) -> None:
    """fsync a file (its data) or a directory (its entries: names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path  # the name its callers use for a directory


@contextlib.contextmanager
def exclusive(path: Path | str, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on ``path`` (created if missing) for the duration of the block; it ends
    with the process too, so a killed holder never leaves it taken. With ``blocking=False`` the
    block gets whether the lock was taken (False: another process holds it) instead of waiting."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def tree_bytes(path: Path | str) -> int:
    """Bytes of a file, or of every file under a directory (links not followed; a file removed
    meanwhile counts 0; a path that does not exist counts 0)."""
    path = Path(path)
    if not path.is_dir():
        try:
            return os.lstat(path).st_size
        except OSError:
            return 0
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"():,;`]+/)*[^\s/'\"():,;`]*")


def without_dirs(text: str, keep: int = 2) -> str:
    """``text`` with every absolute path cut to its last ``keep`` parts (``/srv/x/runs/index`` ->
    ``runs/index``): what a server answers or an export writes must not map the machine's
    directories. URLs (``http://host/x``) are left alone."""
    return ABSOLUTE_PATH.sub(lambda m: "/".join(m.group(0).split("/")[-keep:]), text)
