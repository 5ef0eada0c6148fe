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
import math
import re
import shutil
import sys
from pathlib import Path

import yaml

from ..schemas import FieldError
from dpr_service.core.formats import read_eval

from .data import resolve_name
from .progress import log_tail, read_progress
from .settings import JobSettings
from .store import Job, JobStore

SERVER_SET = {  # settings a job may not give: the runner sets them
    "output": "set by the server (each job writes to its own directory)",
    "resume": "set by the server (a job is continued with --auto-resume after a restart)",
    "auto_resume": "set by the server (a job is continued with --auto-resume after a restart)",
}
DATA_SETTINGS = ("model", "train", "dev")
VALIDATE_TIMEOUT_S = 300
LOWER_IS_BETTER = {"dev_nll"}


class JobRefused(FieldError):
    """A request the job service refuses: ``field`` at fault, ``status`` to answer (422, 404, 409)."""


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
    """Run ``python -m trainer.validate`` on ``config_path``; raises JobRefused (422) with its error."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "trainer.validate", str(config_path),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), VALIDATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise JobRefused("body", f"checking the settings took over {VALIDATE_TIMEOUT_S} s; try again", status=503) from None
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise config_error(lines[-1] if lines else f"exit code {proc.returncode}", config_path)


async def submit(store: JobStore, js: JobSettings, settings: dict) -> Job:
    """Check ``settings`` and queue a job for them; raises JobRefused / DataRefused naming the field."""
    settings = normalised(settings)
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
        await validate_config(job_dir / "config.yaml")
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return store.create(settings, job_id)


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


def delete(store: JobStore, job: Job, served_ckpt: Path | None) -> None:
    """Remove a finished job's row and files; raises JobRefused (409) for one still queued or running,
    or one whose checkpoint is serving now."""
    if not job.finished_state:
        raise JobRefused("job_id", f"job {job.id} is {job.state}: cancel it first (only finished jobs are deleted)", 409)
    job_dir = store.job_dir(job.id).resolve()
    if served_ckpt is not None and Path(served_ckpt).resolve().is_relative_to(job_dir):
        raise JobRefused("job_id", f"job {job.id}'s checkpoint is serving now: promote another first", 409)
    if store.delete(job.id):
        shutil.rmtree(job_dir, ignore_errors=True)
