"""What the job routes do, without the web layer: submit (settings checked by the trainer's own
rules), describe, delete, and the promotion checks.

A job's settings are ``dpr train``'s, by the YAML config's names, with data *named* under the data
root: ``{"model": "models/minilm", "train": "scifact", "dev": "scifact", "max_steps": 500, ...}``.
They are written to ``<job>/config.yaml`` (names replaced by paths) and checked by the trainer's
own ``build_config`` in a child process (``python -m trainer.validate``: the api never imports
``trainer``), so names, types, defaults and ranges are the YAML config's exactly.

A job's ``kind`` (the one setting that is the service's, not the trainer's) is ``full`` (default: a
fine-tune of both encoders, promoted by indexing a corpus) or ``query_side``: ``dpr train --index``,
the query encoder alone trained against an index's stored vectors, promoted by a reload of the new
checkpoint against that index, with no index build (:func:`rebind_index`). A ``query_side`` job's
``index`` is the served one (``DPR_INDEX``) unless it names an artifact under the data root; its
``model`` is the checkpoint serving that index (the one whose passage encoder built it) unless it
names one.
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
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import yaml

from ..resources import stated_identity
from ..schemas import FieldError
from dpr_service.core.artifact import (ArtifactError, Manifest, binding_message, binds, check_binding, read_manifest,
                                       relink)
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
DATA_SETTINGS = ("model", "train", "dev", "index")
QUERY_SIDE = "query_side"
#: a job's kind -> how it goes into service (``GET /jobs/{id}``'s ``promotion``)
PROMOTIONS = {"full": "index build (dpr index build of a corpus into DPR_INDEX), then reload",
              QUERY_SIDE: "reload, no index build"}
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


@dataclass(frozen=True)
class Served:
    """What the server serves now: the index artifact (``DPR_INDEX``; None with Milvus or none) and
    the checkpoint in use (None before the first load). A ``query_side`` job trains against them by default."""

    index: Path | None = None
    checkpoint: Path | None = None


def job_kind(settings: dict) -> str:
    """A job's kind from its settings: ``full`` (the default) or ``query_side``."""
    return str(settings.get("kind") or "full")


def normalised(settings: dict) -> dict:
    """The settings with ``-`` in names written ``_`` (the YAML file accepts both)."""
    return {str(k).replace("-", "_"): v for k, v in settings.items()}


def query_side_sources(settings: dict, js: JobSettings, served: Served) -> tuple[Path, Path | None]:
    """The index a ``query_side`` job trains against and its starting model when it names none:
    the served index and checkpoint, or the artifact ``index`` names under the data root and the
    checkpoint its manifest names (when that lies under the data root too). The model given or
    chosen must have built the index (its stated fingerprints: :func:`~dpr_service.core.artifact.binds`).
    Raises JobRefused naming ``kind``, ``index`` or ``model`` (422; 409 while nothing serves)."""
    named = settings.get("index")
    if named is None:
        if served.index is None:
            raise JobRefused("index", "this server serves no index artifact (DPR_INDEX): name one under the data root")
        if served.checkpoint is None and settings.get("model") is None:
            raise JobRefused("index", "no model is serving the index yet: wait until /readyz answers 200, or name "
                                      "the model that built it", 409)
        index, default_model = Path(served.index), served.checkpoint
    else:
        index = resolve_name(js.data_root, named, "index")
        default_model = None
    try:
        manifest = read_manifest(index)
    except ArtifactError as e:
        raise JobRefused("index", f"{named or 'the served index'} is not a usable index artifact: "
                                  f"{without_root(str(e), js.data_root)}") from None
    if named is not None and settings.get("model") is None:
        built = manifest.extra.get("checkpoint")
        base = js.data_root.resolve()
        if built and Path(built).resolve().is_relative_to(base) and Path(built).exists():
            default_model = Path(built).resolve()
        else:
            raise JobRefused("model", f"required: the index {named!r} names no checkpoint under the data root; name the "
                                      "model whose passage encoder built it")
    model = resolve_name(js.data_root, settings["model"], "model") if settings.get("model") is not None else default_model
    identity = stated_identity(model)
    built_passage = str(manifest.extra.get("passage_fingerprint", ""))
    if identity is not None and not binds(manifest.checkpoint_fingerprint, built_passage, identity):
        raise JobRefused("model" if settings.get("model") is not None else "index",
                         f"{binding_message(manifest.checkpoint_fingerprint, built_passage, identity)}")
    return Path(index).resolve(), model  # the path, not a replacement's leftover: the trainer resolves that itself


def without_root(text: str, root: Path) -> str:
    """``text`` with the data root's path left out (an error names data by its name)."""
    return text.replace(str(root.resolve()) + "/", "").replace(str(root) + "/", "")


def config_for(settings: dict, js: JobSettings, run_dir: Path, served: Served | None = None) -> dict:
    """The YAML config of a job: ``settings`` with data names resolved to paths under the data root,
    ``output`` the job's run directory, progress bars off unless asked for; a ``query_side`` job's
    ``index`` and ``model`` as :func:`query_side_sources` chooses them (``kind`` itself is the
    service's: it is not written). Raises JobRefused for a server-set setting, a bad kind, an
    ``index`` on a full job, DataRefused for a bad or missing name."""
    for name in SERVER_SET:
        if name in settings:
            raise JobRefused(name, SERVER_SET[name])
    config = dict(settings)
    kind = config.pop("kind", None)
    if kind is not None and kind not in PROMOTIONS:
        raise JobRefused("kind", f"must be one of {', '.join(PROMOTIONS)}, got {kind!r}")
    if kind == QUERY_SIDE:
        if config.get("train") is None:
            raise JobRefused("train", "required: the name of a training data set under the data root")
        index, model = query_side_sources(config, js, served or Served())
        config["index"], config["model"] = str(index), str(model)
    elif config.get("index") is not None:
        raise JobRefused("index", "applies to query_side jobs only (kind: query_side trains the query encoder against "
                                  "an index); a full job rebuilds the index when it is promoted")
    if config.get("model") is None:
        if not js.jobs_model:
            raise JobRefused("model", "required: the name of a starting model under the data root (no DPR_JOBS_MODEL default)")
        config["model"] = js.jobs_model
    elif kind != QUERY_SIDE:
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


def prepare(store: JobStore, js: JobSettings, settings: dict, served: Served | None = None) -> tuple[dict, Path]:
    """The file and table work before a job's settings are checked (blocking; the route runs it in
    the admin lane): the checks that need no child (depth, server-set and split names, a
    ``query_side`` job's index and model against ``served``, the queue's bound), then
    ``<job>/config.yaml``. Returns the normalised settings and the config's path. Raises JobRefused
    / DataRefused naming the field, JobsBusy (429) when DPR_JOBS_MAX_QUEUED jobs wait."""
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
    config = config_for(settings, js, job_dir / "run", served)
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


async def submit(store: JobStore, js: JobSettings, settings: dict, run=None, served: Served | None = None) -> Job:
    """Check ``settings`` and queue a job for them; raises JobRefused / DataRefused naming the field,
    JobsBusy over the queue's or the validations' bound. ``run(fn, *args)`` runs the blocking parts
    (the route passes its admin lane; default: the event loop's executor); ``served`` is what a
    ``query_side`` job trains against unless it names an index."""
    if run is None:
        async def run(fn, *args):
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    with validation_slot(js):
        settings, config_path = await run(prepare, store, js, settings, served)
        try:
            await validate_config(config_path)
            return await run(store.create, settings, config_path.parent.name)
        except BaseException:
            shutil.rmtree(config_path.parent, ignore_errors=True)
            raise


def describe(store: JobStore, job: Job) -> dict:
    """A job as the API shows it: state, its kind and how it is promoted, settings, step/total, the
    last logged metrics, every evaluation, and on failure the error and the log's tail."""
    job_dir = store.job_dir(job.id)
    progress = read_progress(job_dir)
    kind = job_kind(job.settings)
    index = (job.settings.get("index") or "the served index (DPR_INDEX)") if kind == QUERY_SIDE else None
    return {"id": job.id, "state": job.state, "kind": kind, "index": index, "promotion": PROMOTIONS.get(kind),
            "settings": job.settings, "created": job.created, "started": job.started,
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
    if op == "promote" and job.claim.get("kind") == QUERY_SIDE:
        return f"job {job.id} is being promoted (a reload against its index): wait until the promotion has finished"
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


# ----------------------------------------------------------------------------- query-side promotion


def job_index(store: JobStore, job: Job) -> Path | None:
    """The index artifact a ``query_side`` job trained against (its config's ``index``), or None."""
    try:
        config = yaml.safe_load((store.job_dir(job.id) / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    return Path(config["index"]) if isinstance(config, dict) and config.get("index") else None


def rebind_index(source: Path, target: Path, checkpoint: Path, job_id: str = "") -> Manifest:
    """Make ``checkpoint`` (a query encoder trained against ``source``) the one ``target`` serves,
    with no index build: a new artifact at ``target`` holding ``source``'s files (hard links where
    the file system allows them, else copies; ``source`` may be ``target`` itself) and its manifest
    with ``checkpoint`` naming the new checkpoint and ``rebound`` saying so (``checkpoint_fingerprint``,
    ``passage_source``: the checkpoint that built the vectors, ``at``: ISO 8601, ``job``), verified
    against its checksums and swapped in atomically. A server sees the same index under a manifest
    naming a new checkpoint and swaps the query encoder alone
    (:func:`dpr_service.api.resources.swap_query_encoder`). Returns the new manifest. Raises
    JobRefused (409, ``job_id``) when the checkpoint's passage encoder did not build ``source``
    (naming both) or states no fingerprint, ArtifactError for an artifact that is missing, fails its
    checks or is replaced meanwhile (then nothing is changed)."""
    identity = stated_identity(checkpoint)
    if identity is None:
        raise JobRefused("job_id", f"the job's checkpoint {checkpoint.name}/ states no fingerprint (dpr_config.json)", 409)
    manifest = read_manifest(source)
    try:
        check_binding(manifest, identity, Path(source).name)
    except ArtifactError as e:
        raise JobRefused("job_id", f"the job's checkpoint cannot serve its index: {e}", 409) from None
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    new = replace(manifest, extra={**manifest.extra, "checkpoint": str(Path(checkpoint).resolve()),
                                   "rebound": {"checkpoint_fingerprint": identity.fingerprint,
                                               "passage_source": manifest.checkpoint_fingerprint, "at": at, "job": job_id}})
    relink(source, target, manifest, new, "the promotion was linking it")
    return new
