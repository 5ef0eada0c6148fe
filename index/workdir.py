"""The resumable work directory of an index build (``.<output>.partial/``): the job it belongs to
(``build.json``: checkpoint fingerprint, part size, corpus sha256), its set-up under an exclusive
lock, the merge lock, and the removal of what killed builds left behind.

Embeddings are written one file at a time (``emb-000123.npy``) as they are computed, so a killed build
resumes at the first missing file, and ``--shard i/n`` processes split the parts between them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

from dpr_service.core.artifact import ArtifactError
from dpr_service.core.formats import Passage
from dpr_service.core.fsio import exclusive, pid_alive

log = logging.getLogger("index")


def part_path(work: Path, c: int) -> Path:
    """The embeddings file of part ``c``."""
    return work / f"emb-{c:06d}.npy"


def take_lock(path: Path) -> bool:
    """One builder: the first process to create the lock file. The file appears with its owner's
    pid already in it (written beside it, then hard-linked into place), so an empty or unreadable
    lock, or one whose process is gone (killed mid-build), is stale and taken over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                try:
                    pid = int(path.read_text())
                except (ValueError, FileNotFoundError):
                    pid = 0
                if pid != os.getpid() and pid_alive(pid):
                    return False  # its owner is alive (or another user's process)
                path.unlink(missing_ok=True)
        return False
    finally:
        tmp.unlink(missing_ok=True)


def finish(work: Path) -> None:
    """Remove a merged build's work directory and its lock file: renamed first, so a kill during the
    removal never leaves a directory that looks resumable."""
    done = work.with_name(f"{work.name}.done-{os.getpid()}")
    os.rename(work, done)
    shutil.rmtree(done)
    lock_path(work).unlink(missing_ok=True)


def corpus_sha256(corpus: Sequence[Passage]) -> str:
    """sha256 over every passage's id, title and text, in order (each field length-prefixed)."""
    h = hashlib.sha256()
    for p in corpus:
        for field in (p.id, p.title, p.text):
            data = field.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


JOB_IDENTITY = ("checkpoint_fingerprint", "part_size", "dim")  # differing: refuse; a differing corpus: start over


def read_job(work: Path) -> dict | None:
    """The job in ``work/build.json``; ``{}`` for a directory without a readable one, None for no directory."""
    try:
        job = json.loads((work / "build.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable or not JSON
        return {} if work.is_dir() else None
    if not isinstance(job, dict):
        return {}
    if "chunk" in job and "part_size" not in job:  # written before the rename (same meaning)
        job["part_size"] = job.pop("chunk")
    return job


def same_job(found: dict | None, job: dict) -> bool:
    """Whether the work directory was started for the same checkpoint, corpus and index settings (so its parts can be reused)."""
    return bool(found) and all(found.get(k) == v for k, v in job.items() if k != "corpus")  # a moved corpus file is the same


def prepare_work(work: Path, job: dict) -> None:
    """Make ``work`` this build job's directory, keeping the parts of an interrupted run of the same job.

    Processes starting together (torchrun ranks, shards on one machine) take turns under an
    exclusive lock on a file beside it (``flock``, which the kernel releases when a process dies):
    the first one decides and the others find its directory. Whatever has to go (a leftover without
    build.json, or the parts of a corpus that was edited since) is renamed aside before it is
    removed, and the new directory appears with its build.json already in it, so a kill at any point
    leaves either nothing or a directory the next build understands. Parts of another checkpoint
    (or --part-size) are an error, not discarded.
    """
    work.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(lock_path(work)):
        found = read_job(work)
        if same_job(found, job):
            return
        if found:
            other = [k for k in JOB_IDENTITY if found.get(k) != job[k]]
            if other:
                raise ArtifactError(f"{work}: a build with another checkpoint or --part-size was interrupted here "
                                    f"({', '.join(other)} differ); remove {work} to start over")
            why = ("its build.json, from an older version, has no corpus hash" if "corpus_sha256" not in found else
                   f"{found.get('count')} passages, sha256 {str(found.get('corpus_sha256'))[:12]} then; "
                   f"{job['count']}, sha256 {job['corpus_sha256'][:12]} now")
            log.warning("%s: the corpus changed since this build was interrupted (%s): its encoded parts are discarded "
                        "and encoding starts over", work, why)
        elif found is not None:
            log.info("%s: parts without the build.json of their job (a kill mid-cleanup, or an older version): removed", work)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if found is not None:
            aside = work.with_name(f"{work.name}.stale-{tag}")
            os.rename(work, aside)
            shutil.rmtree(aside, ignore_errors=True)
        tmp = work.with_name(f"{work.name}.new-{tag}")
        tmp.mkdir()
        (tmp / "build.json").write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
        os.rename(tmp, work)


def lock_path(work: Path) -> Path:
    """The merge lock's path inside the work directory."""
    return work.with_suffix(".lock")  # .<index>.partial -> .<index>.lock




def remove_leftovers(work: Path) -> None:
    """Directories that killed processes left beside ``work``: a finished build's removal
    (``.done-<pid>``), a discarded one's (``.stale-<pid>-*``) and a work directory never renamed into
    place (``.new-<pid>-*``). The last two only of dead processes: a live one is still using its own."""
    for path in work.parent.glob(f"{work.name}.*-*"):
        kind, _, rest = path.name[len(work.name) + 1 :].partition("-")
        if kind not in ("done", "new", "stale"):
            continue
        if kind != "done":
            try:
                pid = int(rest.split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and pid_alive(pid):
                continue
        shutil.rmtree(path, ignore_errors=True)
