"""The runner: starts queued jobs as ``dpr train`` child processes, one per slot (one per configured
GPU, else one on the CPU), follows them, and records how they end.

Each job is ``python -m dpr_service.cli train --config <job>/config.yaml --output <job>/run
--auto-resume``, its output in ``<job>/train.log``. Nothing is lost on a crash:

- a child dies with the server (Linux ``PR_SET_PDEATHSIG``: SIGTERM, on which the trainer finishes
  its step and saves ``last/``); at the next start the runner waits for any such process still
  saving, then starts every job found ``running`` again, and ``--auto-resume`` continues it from
  ``last/`` exactly (the trainer's resume is bit-identical);
- a server that stops cleanly (lifespan end) SIGTERMs its children and leaves them ``running``;
- a child that exits non-zero on its own is ``failed``, with the log's last line as the error.

Cancel is SIGTERM too (``last/`` saved and kept); the job is then ``cancelled``. A child that
exits 0 before its planned steps is ``failed`` (a job never says ``succeeded`` short of its plan).
Only one process per state directory runs jobs (an ``flock`` on ``runner.lock``): with ``dpr serve
--workers N`` the others serve the routes from the shared SQLite table and take over if the
runner's worker dies.

Housekeeping, at start and every :data:`HOUSEKEEPING_S` seconds: job directories without a row
(a kill during ``POST /jobs``) and rows without a directory are removed, while no submission is in
progress (every validation slot free); promotions a killed server left claimed are reconciled with
the index on disk (:meth:`Runner.reconcile_claims`). When a job finishes its weights are trimmed
(:func:`retain`) and ``DPR_JOBS_MAX_BYTES`` is enforced (:meth:`Runner.enforce_quota`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from dpr_service.core.artifact import ArtifactError, read_manifest
from dpr_service.core.fsio import exclusive, tree_bytes

from .progress import log_tail, saved_progress
from .service import child_env, holds, index_checkpoint, promotion_lock
from .settings import JobSettings
from .store import FINISHED, Job, JobStore

HOUSEKEEPING_S = 60.0
STALE_CLAIM_S = 600.0  # a delete or prune claim this old belongs to a process that died
JOB_ID = re.compile(r"[0-9a-f]{12}")

log = logging.getLogger("dpr_service.api.jobs")


def train_command(job_dir: Path, nproc: int = 1) -> list[str]:
    """The child process of a job: ``dpr train`` with the job's config and ``--auto-resume``; with
    ``nproc`` > 1, under ``torchrun --standalone --nproc-per-node nproc`` (DDP, docs/deployment.md)."""
    train = ["-m", "dpr_service.cli", "train", "--config", str(job_dir / "config.yaml"),
             "--output", str(job_dir / "run"), "--auto-resume"]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *train]
    return [sys.executable, *train]


# The child's first program: ask Linux to SIGTERM it when the runner's thread dies (PR_SET_PDEATHSIG = 1,
# kept across exec), give up if that already happened, then exec dpr train. A small interpreter of its own
# instead of Popen(preexec_fn=...): Python code between fork and exec in a threaded server can deadlock.
DIE_WITH_PARENT = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != parent:
    sys.exit(128 + signal.SIGTERM)
os.execv(sys.argv[2], sys.argv[2:])
"""


def child_command(job_dir: Path, nproc: int = 1) -> list[str]:
    """:func:`train_command` started through :data:`DIE_WITH_PARENT` (this process as its parent)."""
    return [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *train_command(job_dir, nproc)]


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a job's child runs in a session of its own, so that
    torchrun's workers die with it); nothing when it is gone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def runs_job(pid: int | None, job_dir: Path) -> bool:
    """Whether ``pid`` is a live process (not a zombie) whose command line names ``job_dir``:
    a job's child left from a previous server (a reused pid names something else)."""
    if not pid or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(job_dir).encode() in cmdline


class Runner:
    """Runs the jobs of ``store`` in ``slots`` (each a CUDA_VISIBLE_DEVICES value, or None for the CPU),
    each job as ``nproc`` processes (torchrun above 1), looking every ``poll_s`` seconds, in a thread
    of its own: :meth:`start` and :meth:`stop`."""

    def __init__(self, store: JobStore, slots: list[str | None], poll_s: float = 0.5, orphan_wait_s: float = 600.0,
                 nproc: int = 1, settings: JobSettings | None = None, index: Path | None = None):
        self.store, self.slots, self.poll_s, self.orphan_wait_s = store, list(slots), poll_s, orphan_wait_s
        self.nproc = nproc
        self.settings = settings or JobSettings(jobs_dir=store.directory)
        self.index = index  # DPR_INDEX: the weights its manifest names are never removed
        self._housekept = 0.0
        self.procs: dict[str, tuple[subprocess.Popen, str | None]] = {}  # job id -> (child, slot)
        self._signalled: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._runner_lock: contextlib.ExitStack | None = None  # held while this process runs the jobs

    def start(self) -> None:
        """Start the runner's thread (it first waits for the state directory's lock)."""
        self._thread = threading.Thread(target=self._main, name="dpr-jobs-runner", daemon=True)
        self._thread.start()

    def stop(self, wait_s: float = 120.0) -> None:
        """SIGTERM every child and wait up to ``wait_s`` for them to save ``last/``; their jobs stay
        ``running``, for the next start to continue. Blocking."""
        self._stop.set()
        with self._lock:
            for proc, _ in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + wait_s
            for proc, _ in self.procs.values():
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    kill_group(proc.pid)
                    proc.wait()
            self.procs.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._release_lock()

    def _release_lock(self) -> None:
        if self._runner_lock is not None:
            self._runner_lock.close()  # releases the lock: another worker can take over
            self._runner_lock = None

    # ------------------------------------------------------------------ the thread

    def _main(self) -> None:
        while not self._stop.is_set() and not self._take_lock():
            self._stop.wait(2.0)  # another worker process runs the jobs; take over if it dies
        if self._stop.is_set():
            return
        try:
            self.housekeeping()
        except Exception:  # logged; tried again with the ticks
            log.exception("the job runner's housekeeping failed")
        try:
            self._recover()
        except Exception:  # logged; the jobs it could not restart are picked up by the ticks or stay in the table
            log.exception("the job runner could not recover the jobs of the previous server")
        while not self._stop.is_set():
            try:
                with self._lock:
                    if not self._stop.is_set():
                        self.tick()
            except Exception:  # one bad look (a job deleted meanwhile, a full disk) must not stop the runner
                log.exception("the job runner's look at its jobs failed; trying again")
            self._stop.wait(self.poll_s)

    def _take_lock(self) -> bool:
        """Whether this process now runs the jobs (one worker of several does: the state directory's lock)."""
        held = contextlib.ExitStack()
        if held.enter_context(exclusive(self.store.directory / "runner.lock", blocking=False)):
            self._runner_lock = held
            return True
        held.close()
        return False

    def _recover(self) -> None:
        """Jobs left ``running`` by a previous server: wait for a child of it that is still saving
        (SIGKILL after ``orphan_wait_s``), then start the job again with ``--auto-resume``."""
        for job in self.store.list(("running",)):
            job_dir = self.store.job_dir(job.id)
            deadline = time.monotonic() + self.orphan_wait_s
            while runs_job(job.pid, job_dir) and time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(0.2)
            if runs_job(job.pid, job_dir):
                kill_group(job.pid)  # torchrun's workers too
            if job.cancel:
                self.store.update(job.id, state="cancelled", finished=time.time(), pid=None)
                continue
            free = [s for s in self.slots if s not in {slot for _, slot in self.procs.values()}]
            if free:
                log.info("job %s was running when the server stopped: continuing it (--auto-resume)", job.id)
                self._launch(job, free[0])
            else:  # more running jobs than slots (the slots changed): wait in the queue
                self.store.update(job.id, state="queued", pid=None)

    def housekeeping(self) -> None:
        """Sweep crash leftovers (:meth:`sweep_orphans`), reconcile claims (:meth:`reconcile_claims`)
        and enforce the size bound (:meth:`enforce_quota`)."""
        self._housekept = time.monotonic()
        self.sweep_orphans()
        self.reconcile_claims()
        self.enforce_quota()

    def sweep_orphans(self) -> int:
        """Remove job directories without a row and rows without a directory (a server killed during
        ``POST /jobs`` or a delete), only while every validation slot is free: a submission in progress
        holds one from before its directory is made until its row is written. Returns how many went."""
        removed = 0
        with contextlib.ExitStack() as held:
            for i in range(self.settings.jobs_max_validations):
                if not held.enter_context(exclusive(self.store.directory / f"validate-{i}.lock", blocking=False)):
                    return 0  # a submission is in progress: next time
            jobs = {job.id: job for job in self.store.list()}
            for entry in self.store.directory.iterdir():
                if entry.is_dir() and JOB_ID.fullmatch(entry.name) and entry.name not in jobs:
                    shutil.rmtree(entry, ignore_errors=True)
                    log.warning("removed %s: a job directory without a job (left by a server killed during POST /jobs)",
                                entry)
                    removed += 1
            for job in jobs.values():
                if not self.store.job_dir(job.id).is_dir() and job.id not in self.procs:
                    self.store.delete(job.id, any_state=True)
                    log.warning("removed job %s: its directory is gone", job.id)
                    removed += 1
        return removed

    def reconcile_claims(self) -> None:
        """Claims a dead process left: a promotion's is settled by the index on disk (its manifest
        names the promoted checkpoint and was written after the claim: ``promoted`` is recorded;
        otherwise the promotion did not happen), once the promotion lock is free (a build child of a
        killed server holds it until it ends); a delete's or prune's is released after STALE_CLAIM_S."""
        claims = self.store.claimed()
        if not claims:
            return
        with promotion_lock(self.store.directory) as fd:
            for job in claims:
                op = job.claim.get("op")
                if op == "promote" and fd is not None:
                    done = promotion_landed(job.claim)
                    self.store.release(job.id, **({"promoted": job.claim.get("corpus")} if done else {}))
                    log.warning("job %s: a promotion a previous server left %s (reconciled with %s)", job.id,
                                "had finished: recorded" if done else "did not finish", job.claim.get("index"))
                elif op != "promote" and time.time() - float(job.claim.get("at", 0)) > STALE_CLAIM_S:
                    self.store.release(job.id)

    def enforce_quota(self) -> int:
        """Keep the jobs directory under ``DPR_JOBS_MAX_BYTES`` (0: unbounded) by removing finished
        jobs' weights, oldest unpromoted jobs first, then older promoted ones; never the weights the
        on-disk index names, nor a job that is running, queued or claimed. Their rows, logs and
        metrics stay. Returns the bytes freed."""
        limit = self.settings.jobs_max_bytes
        if not limit:
            return 0
        total = tree_bytes(self.store.directory)
        if total <= limit:
            return 0
        named = index_checkpoint(self.index)
        freed = 0
        for job in sorted(self.store.list(FINISHED), key=lambda j: (j.promoted is not None, j.seq)):
            if total - freed <= limit:
                break
            job_dir = self.store.job_dir(job.id)
            if holds(job_dir, named) or not (job_dir / "run").is_dir():
                continue
            if not self.store.claim(job.id, {"op": "prune", "at": time.time()}):
                continue
            try:
                if holds(job_dir, index_checkpoint(self.index)):  # promoted meanwhile
                    continue
                gone = remove_weights(job_dir)
            finally:
                self.store.release(job.id)
            if gone:
                freed += gone
                log.info("job %s: removed its weights (%d bytes) to keep DPR_JOBS_MAX_BYTES=%d", job.id, gone, limit)
        if total - freed > limit:
            log.warning("the jobs directory holds %d bytes, over DPR_JOBS_MAX_BYTES=%d, with nothing left to remove "
                        "(running jobs and the served one stay)", total - freed, limit)
        return freed

    def tick(self) -> None:
        """One look: record children that ended, SIGTERM cancelled ones, start queued jobs in free
        slots; housekeeping every :data:`HOUSEKEEPING_S` seconds."""
        finished = False
        for job_id, (proc, _) in list(self.procs.items()):
            rc = proc.poll()
            if rc is not None:
                del self.procs[job_id]
                self._signalled.discard(job_id)
                self._finish(job_id, rc)
                finished = True
        if finished or time.monotonic() - self._housekept >= HOUSEKEEPING_S:
            try:
                self.housekeeping()
            except Exception:  # the jobs still start; tried again at the next round
                log.exception("the job runner's housekeeping failed")
        for job in self.store.list(("running",)):
            if job.cancel and job.id in self.procs and job.id not in self._signalled:
                self.procs[job.id][0].send_signal(signal.SIGTERM)  # the trainer saves last/ and exits
                self._signalled.add(job.id)
        busy = {slot for _, slot in self.procs.values()}
        free = [s for s in self.slots if s not in busy]
        for job, slot in zip(self.store.list(("queued",)), free):
            self._launch(job, slot)

    def _launch(self, job: Job, slot: str | None) -> None:
        """Start ``job``'s child in ``slot``. A queued job is claimed first in one statement, so a job
        cancelled (or deleted) since the look is left alone; a child that cannot start fails the job."""
        job_dir = self.store.job_dir(job.id)
        if job.state == "queued" and not self.store.update(job.id, only_if_state="queued", state="running", pid=None):
            return
        env = child_env({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else None)  # never the keys
        try:
            with open(job_dir / "train.log", "ab") as out:
                if job.attempts:
                    out.write(f"\n--- restarted with --auto-resume (attempt {job.attempts + 1}) ---\n".encode())
                    out.flush()
                proc = subprocess.Popen(child_command(job_dir, self.nproc), stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=job_dir, env=env, start_new_session=True)
        except OSError as e:
            self.store.update(job.id, state="failed", error=f"could not start dpr train: {e}", finished=time.time(), pid=None)
            log.error("job %s could not start: %s", job.id, e)
            return
        self.procs[job.id] = (proc, slot)
        self.store.update(job.id, state="running", pid=proc.pid, slot=slot, attempts=job.attempts + 1,
                          started=job.started or time.time())
        log.info("job %s started (pid %d%s)", job.id, proc.pid, f", GPU {slot}" if slot is not None else "")

    def _finish(self, job_id: str, rc: int) -> None:
        job = self.store.get(job_id)
        if job is None:
            return
        job_dir = self.store.job_dir(job_id)
        saved = saved_progress(job_dir)
        if job.cancel:
            state, error = "cancelled", None
        elif rc == 0 and saved is not None and saved[0] < saved[1]:
            state, error = "failed", (f"dpr train exited at step {saved[0]} of {saved[1]} without an error: the run "
                                      "did not reach its planned end (last/ is kept: dpr train --resume continues it)")
        elif rc == 0:
            state, error = "succeeded", None
        else:
            last = log_tail(job_dir / "train.log", 1)
            state, error = "failed", f"dpr train exited with code {rc}" + (f": {last}" if last else "")
        self.store.update(job_id, state=state, error=error, finished=time.time(), pid=None)
        log.info("job %s %s", job_id, state)
        try:
            retain(job_dir, state)
        except OSError as e:
            log.warning("job %s: could not trim its checkpoints: %s", job_id, e)


def retain(job_dir: Path, state: str) -> None:
    """What a finished job keeps: a succeeded one its ``best/`` (``last/`` goes, or, without a
    ``best/``, only ``last/training_state``: the optimizer's state, about twice the weights, serves
    nothing once the run has ended); a failed or cancelled one keeps ``last/`` whole, to be resumed."""
    run = job_dir / "run"
    if state != "succeeded":
        return
    if (run / "best").is_dir() and (run / "last").is_dir():
        shutil.rmtree(run / "last")
    elif (run / "last" / "training_state").is_dir():
        shutil.rmtree(run / "last" / "training_state")


def remove_weights(job_dir: Path) -> int:
    """Remove every checkpoint directory under ``job_dir/run`` (``best/``, ``last/``, temporaries);
    a line in ``train.log`` says so. Returns the bytes freed."""
    run, freed = job_dir / "run", 0
    for entry in run.iterdir():
        if entry.is_dir():
            size = tree_bytes(entry)
            shutil.rmtree(entry, ignore_errors=True)
            freed += size
    if freed:
        with open(job_dir / "train.log", "a", encoding="utf-8") as out:
            out.write("\n--- weights removed to keep the jobs directory under DPR_JOBS_MAX_BYTES ---\n")
    return freed




def promotion_landed(claim: dict) -> bool:
    """Whether the index a promotion claim names holds its checkpoint in a manifest written after
    the claim was taken (so a re-promotion of the same checkpoint that died is not counted): built
    then (``created``), or bound to it then (a query_side promotion's ``rebound.at``)."""
    try:
        manifest = read_manifest(claim["index"])
    except (ArtifactError, KeyError, OSError):
        return False
    named = manifest.extra.get("checkpoint")
    if not named or Path(named).resolve() != Path(claim.get("checkpoint", "")).resolve():
        return False
    rebound = manifest.extra.get("rebound")
    written = rebound.get("at") if isinstance(rebound, dict) and rebound.get("at") else manifest.created
    try:
        created = datetime.fromisoformat(written).timestamp()
    except (TypeError, ValueError):
        return False
    return created >= float(claim.get("at", 0)) - 1.0  # the manifest's time is in whole seconds
