"""What the job routes do, without the web layer: submit (settings checked by the trainer's own
rules), describe, delete, and the promotion checks.

A job's settings are ``dpr train``'s, by the YAML config's names, with data *named* under the data
root: ``{"model": "models/minilm", "train": "scifact", "dev": "scifact", "max_steps": 500, ...}``.
They are written to ``<job>/config.yaml`` (names replaced by paths) and checked by the trainer's
own ``build_config`` in a child process (``python -m trainer.validate``: the api never imports
``trainer``), so names, types, defaults and ranges are the YAML config's exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import yaml

from ..schemas import FieldError
from dpr_service.core.artifact import ArtifactError, read_manifest
from dpr_service.core.formats import read_eval
from dpr_service.core.fsio import exclusive

from .data import check_split_name, resolve_name
from .progress import log_tail, read_progress
from .settings import JobSettings
from .store import Job, JobStore

SERVER_SET = {  # settings a job may not give: the runner sets them
    "output": "set by the server (each job writes to its own directory)",
    "resume": "set by the server (a job is continued with --auto-resume after a restart)",
    "auto_resume": "set by the server (a job is continued with --auto-resume after a restart)",
    "stop_after": "a job runs to its planned end (max_steps or epochs); cancel stops it early, with last/ saved",
}
DATA_SETTINGS = ("model", "train", "dev")
SPLIT_SETTINGS = ("train_split", "dev_split")  # qrels/<split>.tsv inside a data set: plain names, as data names
VALIDATE_TIMEOUT_S = 300
LOWER_IS_BETTER = {"dev_nll"}
MAX_SETTING_DEPTH = 8  # every setting is a scalar; nesting is refused long before YAML or JSON recursion
# keys a child process must never see: the job's code (a starting model's remote code, a data set's
# reader) need not be trusted with the service's keys
SECRET_VARIABLES = ("DPR_API_KEY", "DPR_ADMIN_KEY", "DPR_MILVUS_TOKEN")


class JobRefused(FieldError):
    """A request the job service refuses: ``field`` at fault, ``status`` to answer (422, 404, 409)."""


class JobsBusy(Exception):
    """The training service is at a bound (``status`` 429: the queue is full; 503: every validation
    slot is taken); answered with Retry-After."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the service's keys (:data:`SECRET_VARIABLES`, and any
    other ``DPR_*_KEY`` / ``DPR_*_TOKEN``), plus ``extra``: what every child process gets."""
    env = {k: v for k, v in os.environ.items()
           if k not in SECRET_VARIABLES and not (k.startswith("DPR_") and k.endswith(("_KEY", "_TOKEN")))}
    env.update(extra or {})
    return env


def check_depth(settings: dict) -> None:
    """Refuse a setting nested more than :data:`MAX_SETTING_DEPTH` deep (422 naming it), without
    recursion: a JSON body 900 levels deep must not reach YAML's recursive writer."""
    for name, value in settings.items():
        stack = [(value, 1)]
        while stack:
            item, depth = stack.pop()
            if isinstance(item, (dict, list)):
                if depth > MAX_SETTING_DEPTH:
                    raise JobRefused(str(name), f"is nested more than {MAX_SETTING_DEPTH} deep (settings are "
                                                "numbers, strings and booleans)")
                stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))


@contextlib.contextmanager
def promotion_lock(jobs_dir: Path):
    """The promotion lock (an flock on ``<jobs dir>/promote.lock``, taken without waiting): yields
    its file descriptor, or None when another promotion holds it, in this process or another worker
    (``dpr serve --workers N``). A promotion passes the descriptor to its ``dpr index build`` child,
    so the lock stays taken while a build left by a killed server still runs."""
    fd = os.open(Path(jobs_dir) / "promote.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def validation_slot(js: JobSettings):
    """One of ``DPR_JOBS_MAX_VALIDATIONS`` slots for a validation child: an flock on
    ``<jobs dir>/validate-<i>.lock``, so the bound holds across ``dpr serve --workers N`` and a killed
    holder frees its slot. Raises JobsBusy (503) when every slot is taken."""
    with contextlib.ExitStack() as held:
        for i in range(js.jobs_max_validations):
            if held.enter_context(exclusive(js.jobs_dir / f"validate-{i}.lock", blocking=False)):
                yield
                return
        raise JobsBusy(503, f"server busy: {js.jobs_max_validations} job submissions are being checked "
                            "(DPR_JOBS_MAX_VALIDATIONS); retry later")


def normalised(settings: dict) -> dict:
    """The settings with ``-`` in names written ``_`` (the YAML file accepts both)."""
    return {str(k).replace("-", "_"): v for k, v in settings.items()}


def config_for(settings: dict, js: JobSettings, run_dir: Path) -> dict:
    """The YAML config of a job: ``settings`` with data names resolved to paths under the data root,
    ``output`` the job's run directory, progress bars off unless asked for. Raises JobRefused for a
    server-set setting, DataRefused for a bad or missing name."""
    for name in SERVER_SET:
        if name in settings:
            raise JobRefused(name, SERVER_SET[name])
    config = dict(settings)
    if config.get("model") is None:
        if not js.jobs_model:
            raise JobRefused("model", "required: the name of a starting model under the data root (no DPR_JOBS_MODEL default)")
        config["model"] = js.jobs_model
    else:
        config["model"] = str(resolve_name(js.data_root, config["model"], "model"))
    if config.get("train") is None:
        raise JobRefused("train", "required: the name of a training data set under the data root")
    for name in ("train", "dev"):
        if config.get(name) is not None:
            config[name] = str(resolve_name(js.data_root, config[name], name))
    config.setdefault("progress", False)
    config["output"] = str(run_dir)
    return config


def config_error(message: str, config_path: Path) -> JobRefused:
    """The trainer's one-line ConfigError as a 422 naming the setting: ``<file>:<line>: 'lr' must be
    float, got 'x'`` and ``<file>:3: unknown setting 'x'`` name the quoted key; ``--batch-size must be
    ...`` names the flag (as its setting, ``batch_size``)."""
    text = message.strip().replace(str(config_path), "settings")
    located = re.match(r"settings:\d+: (.*)", text)
    text = located.group(1) if located else text
    quoted = re.match(r"(?:unknown setting )?'([^']+)'", text)
    flag = re.search(r"--([a-z0-9][a-z0-9-]*)", text)
    field = quoted.group(1) if quoted else flag.group(1) if flag else "body"
    return JobRefused(field.replace("-", "_"), text)


async def validate_config(config_path: Path) -> None:
    """Run ``python -m trainer.validate`` on ``config_path`` (an environment without the keys:
    :func:`child_env`); raises JobRefused (422) with its error."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "trainer.validate", str(config_path),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.DEVNULL, env=child_env())
    try:
        _, err = await asyncio.wait_for(proc.communicate(), VALIDATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise JobRefused("body", f"checking the settings took over {VALIDATE_TIMEOUT_S} s; try again", status=503) from None
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise config_error(lines[-1] if lines else f"exit code {proc.returncode}", config_path)


def prepare(store: JobStore, js: JobSettings, settings: dict) -> tuple[dict, Path]:
    """The file and table work before a job's settings are checked (blocking; the route runs it in
    the admin lane): the checks that need no child (depth, server-set and split names, the queue's
    bound), then ``<job>/config.yaml``. Returns the normalised settings and the config's path.
    Raises JobRefused / DataRefused naming the field, JobsBusy (429) when DPR_JOBS_MAX_QUEUED jobs wait."""
    if not isinstance(settings, dict):
        raise JobRefused("body", "must be a JSON object of settings")
    check_depth(settings)
    settings = normalised(settings)
    for name in SPLIT_SETTINGS:
        if name in settings:
            check_split_name(settings[name], name)
    queued = store.count(("queued",))
    if queued >= js.jobs_max_queued:
        raise JobsBusy(429, f"the job queue is full: {queued} jobs wait (DPR_JOBS_MAX_QUEUED={js.jobs_max_queued}); "
                            "retry when one has started, or cancel one")
    job_id = store.new_id()
    job_dir = store.job_dir(job_id)
    config = config_for(settings, js, job_dir / "run")
    try:
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError as e:
        raise JobRefused("body", f"settings cannot be written as YAML ({e})") from None
    job_dir.mkdir(parents=True)
    try:
        (job_dir / "config.yaml").write_text(text, encoding="utf-8")
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return settings, job_dir / "config.yaml"


async def submit(store: JobStore, js: JobSettings, settings: dict, run=None) -> Job:
    """Check ``settings`` and queue a job for them; raises JobRefused / DataRefused naming the field,
    JobsBusy over the queue's or the validations' bound. ``run(fn, *args)`` runs the blocking parts
    (the route passes its admin lane; default: the event loop's executor)."""
    if run is None:
        async def run(fn, *args):
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    with validation_slot(js):
        settings, config_path = await run(prepare, store, js, settings)
        try:
            await validate_config(config_path)
            return await run(store.create, settings, config_path.parent.name)
        except BaseException:
            shutil.rmtree(config_path.parent, ignore_errors=True)
            raise


def describe(store: JobStore, job: Job) -> dict:
    """A job as the API shows it: state, settings, step/total, the last logged metrics, every
    evaluation, and on failure the error and the log's tail."""
    job_dir = store.job_dir(job.id)
    progress = read_progress(job_dir)
    return {"id": job.id, "state": job.state, "settings": job.settings, "created": job.created, "started": job.started,
            "finished": job.finished, "step": progress.step, "total": progress.total, "metrics": progress.metrics,
            "evals": progress.evals, "error": job.error, "attempts": job.attempts, "promoted": job.promoted,
            "cancel_requested": job.cancel,
            "log_tail": log_tail(job_dir / "train.log") if job.state == "failed" else None}


def job_checkpoint(store: JobStore, job: Job) -> Path | None:
    """The checkpoint a job promotes: ``run/best`` (by its dev metric), else ``run/last``; None without either."""
    run = store.job_dir(job.id) / "run"
    for name in ("best", "last"):
        if (run / name / "dpr_config.json").is_file() or (run / name / "config.json").is_file():
            return run / name
    return None


def dev_metric(checkpoint: Path, metric: str) -> float | None:
    """``metric`` from ``checkpoint/eval.json`` (the trainer writes it into best/), or None."""
    value = (read_eval(checkpoint) or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def promotion_check(job_ckpt: Path, served_ckpt: Path | None, metric: str, force: bool) -> dict:
    """Compare the job's dev ``metric`` with the served checkpoint's (both from their eval.json).
    Returns ``{"metric", "job", "served"}``; raises JobRefused (409, field ``force``) when the job's is
    worse, or missing while the served one has it, unless ``force``."""
    mine = dev_metric(job_ckpt, metric)
    served = dev_metric(served_ckpt, metric) if served_ckpt is not None else None
    result = {"metric": metric, "job": mine, "served": served}
    if force or served is None:
        return result
    if mine is None:
        raise JobRefused("force", f"the job has no dev {metric} to compare with the served model's ({served:.4f}); "
                                  "pass force to promote it anyway", 409)
    worse = mine > served if metric in LOWER_IS_BETTER else mine < served
    if worse:
        raise JobRefused("force", f"the job's dev {metric} {mine:.4f} is worse than the served model's {served:.4f}; "
                                  "pass force to promote it anyway", 409)
    return result


def index_checkpoint(index: Path | None) -> Path | None:
    """The checkpoint the index artifact on disk at ``index`` names (its manifest's ``checkpoint``),
    or None: no index, none there, or a manifest without one."""
    if index is None:
        return None
    try:
        named = read_manifest(index).extra.get("checkpoint")
    except ArtifactError:
        return None
    return Path(named) if named else None


def holds(job_dir: Path, checkpoint: Path | None) -> bool:
    """Whether ``checkpoint`` lies in ``job_dir``."""
    return checkpoint is not None and Path(checkpoint).resolve().is_relative_to(job_dir.resolve())


def busy_reason(job: Job) -> str:
    """Why an operation cannot take ``job`` now (it is not finished, or another operation holds it)."""
    if not job.finished_state:
        return f"job {job.id} is {job.state}: cancel it first, or wait until it has finished"
    op = (job.claim or {}).get("op")
    if op == "prune":
        return f"job {job.id}'s weights are being removed (DPR_JOBS_MAX_BYTES)"
    if op == "promote":
        return (f"job {job.id} is being promoted (corpus {job.claim.get('corpus')!r}): wait until the promotion "
                "has finished")
    return f"job {job.id} is being deleted"


def delete(store: JobStore, job: Job, served_ckpt: Path | None, index: Path | None = None) -> None:
    """Remove a finished job's row and files. The job is claimed first (one statement: never while a
    promotion holds it), then refused while the served checkpoint or the on-disk index (``index``'s
    manifest) is the job's. Raises JobRefused (409, naming which) for one still queued or running,
    one being promoted, or one whose checkpoint serves or the index on disk names."""
    if not store.claim(job.id, {"op": "delete", "at": time.time()}):
        now = store.get(job.id)
        if now is None:
            raise JobRefused("job_id", f"no job {job.id!r}", status=404)
        raise JobRefused("job_id", busy_reason(now), 409)
    job_dir = store.job_dir(job.id)
    try:
        if holds(job_dir, served_ckpt):
            raise JobRefused("job_id", f"job {job.id}'s checkpoint is serving now (the served index's): promote "
                                       "another first", 409)
        if holds(job_dir, index_checkpoint(index)):
            raise JobRefused("job_id", f"the index on disk (DPR_INDEX's manifest) names job {job.id}'s checkpoint: "
                                       "promote another first", 409)
    except BaseException:
        store.release(job.id)
        raise
    if store.delete(job.id):
        shutil.rmtree(job_dir, ignore_errors=True)
