"""The training service under hostile or unlucky use (issue 30, item 4, the job side): split names
that leave the data set, caps on validation children, the queue and event streams, numeric bounds
and strict types, deep nesting, deleting a job a promotion or the index needs, a promotion's outcome
after a crash, one promotion at a time across processes, crash leftovers, retention and the size
bound, runs that stop early, blame for a damaged checkpoint, and the environment of child processes.

Most tests fake a finished job (a row and a copy of a checkpoint as its ``run/best``) instead of
training one: what is tested is what the service does with a job, not the trainer."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from conftest import write_beir, write_plain
from dpr_service.api.app import create_app
from dpr_service.api.jobs import JobSettings, runner as runner_mod
from dpr_service.api.jobs.runner import Runner
from dpr_service.api.jobs.store import JobStore
from dpr_service.api.routes import jobs as jobs_routes
from dpr_service.api.settings import Settings
from dpr_service.core.checkpoint import load_base_model, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.fsio import exclusive
from index.build import build
from trainer.config import ConfigError, build_config, load_yaml, usable_cpus

ADMIN = "admin-s3cret"
H = {"X-Admin-Key": ADMIN}
TINY_RUN = dict(model="tiny", train="train.jsonl", batch_size=4, pooling="mean", query_max_length=16,
                passage_max_length=32, log_every=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A data root (the tiny model, a training file, a BEIR set), a checkpoint and its index."""
    root = tmp_path_factory.mktemp("jobs-safety")
    data = root / "data"
    data.mkdir()
    shutil.copytree(tiny_model, data / "tiny")
    write_plain(data / "train.jsonl", n=24)
    write_beir(data / "beir", n=30)
    (root / "outside").mkdir()
    (root / "outside" / "secret.tsv").write_text("query-id\tcorpus-id\tscore\nq\td\tTOP-SECRET-VALUE-1234\n")
    cfg = EncoderConfig(pooling="mean", similarity="dot", query_max_length=16, passage_max_length=32)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(root / "served", encoder, tokenizer)
    build(root / "served", data / "beir", root / "index", factory="Flat", progress=False)
    return root


def job_settings(world: Path, tmp: Path, **overrides) -> JobSettings:
    values = dict(admin_key=ADMIN, jobs_dir=tmp / "state", data_root=world / "data", jobs_poll_s=0.1)
    return JobSettings(**{**values, **overrides})


def client(world: Path, tmp: Path, index: Path | None = None, **overrides) -> TestClient:
    settings = Settings(index=index, device="cpu", batch_max_wait_ms=1)
    return TestClient(create_app(settings, job_settings(world, tmp, **overrides)))


def fake_finished_job(world: Path, store: JobStore, state: str = "succeeded") -> str:
    """A finished job whose run/best is a copy of the served checkpoint (the fingerprint of the index)."""
    job_id = store.new_id()
    run = store.job_dir(job_id) / "run"
    with exclusive(store.directory / "validate-0.lock"):  # as a submission does: the orphan sweep waits
        run.mkdir(parents=True)
        shutil.copytree(world / "served", run / "best")
        store.create({"train": "train.jsonl"}, job_id, state=state)  # never queued: the runner leaves it alone
    store.update(job_id, finished=time.time())
    return job_id


def copy_index(world: Path, tmp: Path, checkpoint: Path, name: str = "index") -> Path:
    """A copy of the world's index whose manifest names ``checkpoint`` (same weights, same fingerprint)."""
    index = tmp / name
    shutil.copytree(world / "index", index)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["checkpoint"] = str(checkpoint.resolve())
    (index / "manifest.json").write_text(json.dumps(manifest))
    return index


def wait_for(get, predicate, timeout: float = 60.0, what: str = "it"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = get()
        if predicate(value):
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen in {timeout:.0f} s: {value}")


def field_of(r) -> str:
    return r.json()["errors"][0]["field"]


# ----------------------------------------------------------------------------- 1. split names


@pytest.mark.parametrize("name", ["../../../../outside/secret", "a/b", ".hidden", "..", "train\n", ""])
def test_a_split_name_that_is_not_a_plain_name_is_422_and_nothing_is_queued(world, tmp_path, name):
    with client(world, tmp_path) as c:
        for field in ("train_split", "dev_split"):
            r = c.post("/jobs", headers=H, json={**TINY_RUN, "train": "beir", "dev": "beir", field: name})
            assert r.status_code == 422 and field_of(r) == field, (name, r.text)
        assert c.get("/jobs", headers=H).json() == {"jobs": []}
    assert [p.name for p in (tmp_path / "state").iterdir() if p.is_dir()] == []  # no job directory either


def test_the_trainers_own_config_reader_refuses_a_split_path_exit_2_naming_it(world, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": str(world / "data" / "tiny"), "train": str(world / "data" / "beir"),
                                      "output": str(tmp_path / "run"), "train_split": "../../../../outside/secret"}))
    r = subprocess.run([sys.executable, "-m", "dpr_service.cli", "train", "--config", str(config)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "--train-split" in r.stderr and "Traceback" not in r.stderr and "TOP-SECRET" not in r.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 2. caps


def test_validation_children_are_capped_across_processes_503_with_retry_after(world, tmp_path):
    """Every validation slot taken (here by this test's own flock, as another worker's child would)."""
    with client(world, tmp_path, jobs_max_validations=1) as c:
        with exclusive(tmp_path / "state" / "validate-0.lock") as taken:
            assert taken
            r = c.post("/jobs", headers=H, json={**TINY_RUN, "max_steps": 2})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
        assert "DPR_JOBS_MAX_VALIDATIONS" in r.json()["detail"]
        assert c.get("/jobs", headers=H).json() == {"jobs": []}


def test_the_queue_is_capped_429_with_retry_after(world, tmp_path):
    with client(world, tmp_path, jobs_max_queued=2, jobs_poll_s=3600) as c:  # the runner looks once, at start
        store = c.app.state.job_store
        time.sleep(0.5)
        for _ in range(2):
            store.create({"train": "train.jsonl"})
        r = c.post("/jobs", headers=H, json={**TINY_RUN, "max_steps": 2})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
        assert "DPR_JOBS_MAX_QUEUED" in r.json()["detail"]
        assert store.count(("queued",)) == 2


# ----------------------------------------------------------------------------- 3. bounds, types, depth


def test_numeric_settings_have_upper_bounds_in_the_service(world, tmp_path):
    with client(world, tmp_path) as c:
        for body, field in (({"num_workers": usable_cpus() + 1}, "num_workers"), ({"max_steps": 10**30}, "max_steps")):
            r = c.post("/jobs", headers=H, json={**TINY_RUN, **body})
            assert r.status_code == 422 and field_of(r) == field, (body, r.text)
        assert c.get("/jobs", headers=H).json() == {"jobs": []}


@pytest.mark.parametrize("setting, value", [
    ("max_steps", 10**30), ("batch_size", 10**9), ("epochs", 1e9), ("lr", 1e31), ("seed", 2**64), ("seed", -1),
    ("hard_negatives", 10**6), ("mine_depth", 10**7), ("eval_batch_size", 10**9), ("length_buckets", 10**6),
    ("query_max_length", 10**7), ("temperature", 1e9), ("max_grad_norm", 1e30), ("warmup_steps", 10**12),
    ("save_every", 10**12), ("log_every", 10**12), ("eval_every", 10**12), ("lora_r", 10**6),
    ("max_steps", 1.0), ("batch_size", 4.0)])
def test_every_numeric_setting_is_bounded_and_an_int_is_an_int(tmp_path, setting, value):
    config = tmp_path / "c.yaml"
    base = {"model": "m", "train": "t", "output": "o"}
    if setting == "lora_r":
        base["lr"] = 1e-4
    config.write_text(yaml.safe_dump({**base, setting: value}))
    with pytest.raises(ConfigError, match=setting.replace("_", "[-_]")):
        build_config({}, str(config))
    config.write_text(yaml.safe_dump(base))
    build_config({}, str(config))  # the defaults pass


def test_force_must_be_a_json_boolean(world, tmp_path):
    store_dir = tmp_path / "state"
    with client(world, tmp_path, index=copy_index(world, tmp_path, world / "served")) as c:
        job_id = fake_finished_job(world, c.app.state.job_store)
        for force in ("yes", 1, "true"):
            r = c.post(f"/jobs/{job_id}/promote", headers=H, json={"corpus": "beir", "force": force})
            assert r.status_code == 422 and field_of(r) == "force", (force, r.text)
    assert store_dir.is_dir()


def test_a_setting_nested_900_deep_is_a_422_naming_it_logged_in_at_most_one_line(world, tmp_path, caplog):
    deep: list = []
    for _ in range(900):
        deep = [deep]
    with client(world, tmp_path) as c, caplog.at_level(logging.INFO):
        caplog.clear()
        r = c.post("/jobs", headers=H, json={**TINY_RUN, "train_split": deep})
        assert r.status_code == 422 and field_of(r) == "train_split", r.text[:300]
        assert "nested" in r.json()["errors"][0]["message"]
    lines = sum(len(record.getMessage().splitlines()) + len((record.exc_text or "").splitlines())
                for record in caplog.records)
    assert lines <= 1, caplog.text[:2000]


def test_a_yaml_config_nested_900_deep_is_one_config_error_naming_the_setting(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\ntrain: t\nlr: " + "[" * 900 + "]" * 900 + "\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: 'lr' is nested more than"):
        load_yaml(config)
    r = subprocess.run([sys.executable, "-m", "trainer.validate", str(config)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "'lr'" in r.stderr, r.stderr[-500:]


# ----------------------------------------------------------------------------- 4. delete safety


def test_a_job_being_promoted_cannot_be_deleted_409_naming_the_promotion(world, tmp_path, monkeypatch):
    """DELETE while the promotion's build runs: 409 (today 204, and the promotion then fails with a 500)."""
    building, release = threading.Event(), threading.Event()

    async def slow_build(job_dir, checkpoint, corpus, output, lock_fd=None):
        building.set()
        while not release.is_set():
            await __import__("asyncio").sleep(0.05)

    monkeypatch.setattr(jobs_routes, "build_index", slow_build)
    with client(world, tmp_path, index=copy_index(world, tmp_path, world / "served")) as c:
        job_id = fake_finished_job(world, c.app.state.job_store)
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=c.post(f"/jobs/{job_id}/promote", headers=H,
                                                                         json={"corpus": "beir", "force": True})))
        thread.start()
        assert building.wait(60)
        r = c.delete(f"/jobs/{job_id}", headers=H)
        release.set()
        thread.join(60)
        assert r.status_code == 409 and "being promoted" in r.json()["errors"][0]["message"], r.text
        assert result["r"].status_code == 200, result["r"].text
        assert c.get(f"/jobs/{job_id}", headers=H).json()["promoted"] == "beir"
        assert (tmp_path / "state" / job_id / "run" / "best").is_dir()


def test_a_job_the_index_on_disk_names_cannot_be_deleted_409_naming_the_index(world, tmp_path):
    """The promotion renamed the new index into place; the server still serves the old one from memory."""
    index = copy_index(world, tmp_path, world / "served")
    with client(world, tmp_path, index=index) as c:
        store = c.app.state.job_store
        job_id = fake_finished_job(world, store)
        other = fake_finished_job(world, store)
        copy_index(world, tmp_path, store.job_dir(job_id) / "run" / "best", name="new")
        shutil.rmtree(index)
        os.rename(tmp_path / "new", index)  # what the promotion's build does
        r = c.delete(f"/jobs/{job_id}", headers=H)
        assert r.status_code == 409 and "index on disk" in r.json()["errors"][0]["message"], r.text
        assert (tmp_path / "state" / job_id / "run" / "best").is_dir()
        assert c.delete(f"/jobs/{other}", headers=H).status_code == 204  # another job still goes
        assert store.get(job_id).claim is None  # the refused delete left no claim behind


def test_a_job_whose_checkpoint_serves_cannot_be_deleted(world, tmp_path):
    with client(world, tmp_path) as c:
        job_id = fake_finished_job(world, c.app.state.job_store)
    index = copy_index(world, tmp_path, tmp_path / "state" / job_id / "run" / "best")
    with client(world, tmp_path, index=index) as c:
        wait_for(lambda: c.get("/readyz"), lambda r: r.status_code == 200, what="the server's load")
        r = c.delete(f"/jobs/{job_id}", headers=H)
        assert r.status_code == 409 and "serving now" in r.json()["errors"][0]["message"], r.text


# ----------------------------------------------------------------------------- 5. promotions: truth, one at a time


def test_a_promotion_refuses_while_another_process_holds_the_promotion_lock(world, tmp_path):
    """With dpr serve --workers N a promotion in another worker holds the file lock: 409, not a second build."""
    with client(world, tmp_path, index=copy_index(world, tmp_path, world / "served")) as c:
        job_id = fake_finished_job(world, c.app.state.job_store)
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                                   "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                                   "print('held', flush=True)\ntime.sleep(120)", str(tmp_path / "state" / "promote.lock")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            r = c.post(f"/jobs/{job_id}/promote", headers=H, json={"corpus": "beir", "force": True})
        finally:
            holder.kill()
            holder.wait()
        assert r.status_code == 409 and "another promotion" in r.json()["errors"][0]["message"], r.text
        assert c.get(f"/jobs/{job_id}", headers=H).json()["promoted"] is None


def test_a_promotion_a_killed_server_left_is_recorded_from_the_index_on_disk(world, tmp_path):
    """The server died after claiming; its build child swapped the index in: the runner's start-up
    step records ``promoted``. A claim whose build never landed is released without it."""
    store = JobStore(tmp_path / "state")
    landed, lost = fake_finished_job(world, store), fake_finished_job(world, store)
    best = store.job_dir(landed) / "run" / "best"
    started = time.time() - 5
    index = copy_index(world, tmp_path, best)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    (index / "manifest.json").write_text(json.dumps(manifest))
    for job_id in (landed, lost):
        claim = {"op": "promote", "corpus": "beir", "checkpoint": str((store.job_dir(job_id) / "run" / "best").resolve()),
                 "index": str(index), "at": started}
        assert store.claim(job_id, claim)
    run = Runner(store, [None], poll_s=0.05, settings=job_settings(world, tmp_path), index=index)
    with exclusive(tmp_path / "state" / "promote.lock"):  # the build child still runs: nothing is decided
        run.reconcile_claims()
        assert store.get(landed).claim is not None
    run.reconcile_claims()
    assert (store.get(landed).promoted, store.get(landed).claim) == ("beir", None)
    assert (store.get(lost).promoted, store.get(lost).claim) == (None, None)


def test_the_build_child_holds_the_promotion_lock_while_it_runs(world, tmp_path, monkeypatch):
    """The lock's descriptor goes to ``dpr index build``: a build left by a killed server keeps
    other promotions (and the start-up reconciliation) waiting until it ends."""
    seen = {}
    real = jobs_routes.asyncio.create_subprocess_exec

    async def spy(*args, **kwargs):
        seen.update(kwargs)
        return await real(*args, **kwargs)

    monkeypatch.setattr(jobs_routes.asyncio, "create_subprocess_exec", spy)
    with client(world, tmp_path, index=copy_index(world, tmp_path, world / "served")) as c:
        job_id = fake_finished_job(world, c.app.state.job_store)
        r = c.post(f"/jobs/{job_id}/promote", headers=H, json={"corpus": "beir", "force": True})
        assert r.status_code == 200, r.text
    assert len(seen["pass_fds"]) == 1
    assert not any(k in seen["env"] for k in ("DPR_API_KEY", "DPR_ADMIN_KEY", "DPR_MILVUS_TOKEN"))


def test_crash_leftovers_are_swept_at_start(world, tmp_path):
    """A job directory without a row (a kill during POST /jobs) and a row without a directory."""
    store = JobStore(tmp_path / "state")
    orphan_dir = tmp_path / "state" / "0123456789ab"
    orphan_dir.mkdir()
    (orphan_dir / "config.yaml").write_text("model: x\n")
    row = store.create({"train": "train.jsonl"})
    store.update(row.id, state="failed")
    kept = fake_finished_job(world, store)
    with client(world, tmp_path) as c:
        wait_for(lambda: (orphan_dir.exists(), store.get(row.id)), lambda v: v == (False, None), what="the sweep")
        assert c.get(f"/jobs/{kept}", headers=H).status_code == 200


# ----------------------------------------------------------------------------- 6. retention


def fake_run(job_dir: Path, step: int, total: int, best: bool = True, weights: int = 100_000) -> None:
    run = job_dir / "run"
    for name in (["best", "last"] if best else ["last"]):
        (run / name).mkdir(parents=True, exist_ok=True)
        (run / name / "model.safetensors").write_bytes(b"\0" * weights)
    (run / "last" / "training_state").mkdir()
    (run / "last" / "training_state" / "state.json").write_text(json.dumps({"progress": {"step": step, "total_steps": total}}))
    (run / "last" / "training_state" / "optimizer.safetensors").write_bytes(b"\0" * 2 * weights)


def test_a_finished_job_keeps_its_best_and_last_only_while_resumable(tmp_path):
    store = JobStore(tmp_path / "state")
    run = Runner(store, [None])
    jobs = {}
    for name, best, cancel, rc in (("succeeded", True, False, 0), ("no-dev", False, False, 0),
                                   ("cancelled", True, True, 0), ("failed", True, False, 1)):
        job = store.create({})
        store.update(job.id, state="running", cancel=cancel)
        fake_run(store.job_dir(job.id), 2 if rc == 0 and not cancel else 1, 2, best=best)
        run._finish(job.id, rc)
        jobs[name] = store.job_dir(job.id) / "run"
    assert (jobs["succeeded"] / "best").is_dir() and not (jobs["succeeded"] / "last").exists()
    assert (jobs["no-dev"] / "last" / "model.safetensors").is_file()  # its only checkpoint
    assert not (jobs["no-dev"] / "last" / "training_state").exists()  # nothing to resume
    for name in ("cancelled", "failed"):
        assert (jobs[name] / "last" / "training_state" / "state.json").is_file(), name  # resumable: kept


def test_the_jobs_directory_is_bounded_oldest_unpromoted_weights_first_never_the_indexed_ones(world, tmp_path):
    store = JobStore(tmp_path / "state")
    ids = []
    for i in range(4):
        job = store.create({})
        fake_run(store.job_dir(job.id), 2, 2, weights=1_000_000)
        store.update(job.id, state="succeeded", promoted="beir" if i == 0 else None)
        ids.append(job.id)
    indexed = store.job_dir(ids[1]) / "run" / "best"
    index = copy_index(world, tmp_path, indexed)
    running = store.create({})
    fake_run(store.job_dir(running.id), 1, 2, weights=1_000_000)
    store.update(running.id, state="running")
    per_job = runner_mod.tree_bytes(store.job_dir(ids[0]))
    limit = runner_mod.tree_bytes(tmp_path / "state") - per_job // 2  # one job's weights must go
    run = Runner(store, [None], settings=job_settings(world, tmp_path, jobs_max_bytes=limit), index=index)
    assert run.enforce_quota() > 0
    has = {job_id: (store.job_dir(job_id) / "run" / "best").is_dir() for job_id in ids}
    assert has == {ids[0]: True, ids[1]: True, ids[2]: False, ids[3]: True}, has  # oldest unpromoted, not indexed
    assert (store.job_dir(running.id) / "run" / "last").is_dir()
    assert "DPR_JOBS_MAX_BYTES" in (store.job_dir(ids[2]) / "train.log").read_text()
    assert all(store.get(job_id) is not None for job_id in ids)  # rows and logs stay
    assert runner_mod.tree_bytes(tmp_path / "state") <= limit


# ----------------------------------------------------------------------------- 7. early stops, blame


def test_stop_after_is_the_servers_and_a_run_ending_early_is_not_succeeded(world, tmp_path):
    with client(world, tmp_path) as c:
        r = c.post("/jobs", headers=H, json={**TINY_RUN, "max_steps": 2, "stop_after": 1})
        assert r.status_code == 422 and field_of(r) == "stop_after", r.text
    store = JobStore(tmp_path / "state")
    job = store.create({})
    store.update(job.id, state="running")
    fake_run(store.job_dir(job.id), 1, 2)
    Runner(store, [None])._finish(job.id, 0)  # exit 0 at step 1 of 2
    done = store.get(job.id)
    assert done.state == "failed" and "step 1 of 2" in done.error, done


def test_a_damaged_checkpoint_is_blamed_on_the_job_not_the_corpus(world, tmp_path):
    with client(world, tmp_path, index=copy_index(world, tmp_path, world / "served")) as c:
        job_id = fake_finished_job(world, c.app.state.job_store)
        weights = next((tmp_path / "state" / job_id / "run" / "best").rglob("*.safetensors"))
        weights.write_bytes(b"not safetensors")
        r = c.post(f"/jobs/{job_id}/promote", headers=H, json={"corpus": "beir", "force": True})
        assert r.status_code == 409 and field_of(r) == "job_id", r.text
        assert "checkpoint" in r.json()["errors"][0]["message"]


# ----------------------------------------------------------------------------- 8. child environments


def test_training_children_get_no_key_in_their_environment(tmp_path, monkeypatch):
    for name in ("DPR_API_KEY", "DPR_ADMIN_KEY", "DPR_MILVUS_TOKEN"):
        monkeypatch.setenv(name, f"secret-{name}")
    monkeypatch.setattr(runner_mod, "train_command", lambda job_dir, nproc=1: [
        sys.executable, "-c", f"import json, os; open({str(job_dir / 'env.json')!r}, 'w').write(json.dumps(dict(os.environ)))"])
    store = JobStore(tmp_path / "state")
    job = store.create({})
    store.job_dir(job.id).mkdir()
    run = Runner(store, [None], poll_s=0.05)
    run.start()
    try:
        wait_for(lambda: store.get(job.id).state, lambda s: s not in ("queued", "running"), what="the child")
    finally:
        run.stop(wait_s=5)
    env = json.loads((store.job_dir(job.id) / "env.json").read_text())
    assert not {"DPR_API_KEY", "DPR_ADMIN_KEY", "DPR_MILVUS_TOKEN"} & set(env)
    assert env.get("PATH") == os.environ.get("PATH")  # the rest is kept


# ----------------------------------------------------------------------------- 9. event streams


def test_event_streams_poll_in_the_events_lane_and_are_capped_503(world, tmp_path, monkeypatch):
    threads = []
    real = jobs_routes.poll_events

    def spy(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(jobs_routes, "poll_events", spy)
    with client(world, tmp_path, jobs_max_streams=1, jobs_poll_s=3600) as c:
        store = c.app.state.job_store
        time.sleep(0.3)
        job = store.create({}, state="running")  # no child: the stream stays open until the job ends
        store.job_dir(job.id).mkdir()
        with c.stream("GET", f"/jobs/{job.id}/events", headers=H) as first:
            assert first.status_code == 200
            r = c.get(f"/jobs/{job.id}/events", headers=H)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
            assert "DPR_JOBS_MAX_STREAMS" in r.json()["detail"]
            store.update(job.id, state="cancelled")
            assert any(line.startswith("event: end") for line in first.iter_lines())
        assert threads and all(name.startswith("dpr-events") for name in threads), threads
        wait_for(lambda: c.app.state.job_streams.open, lambda n: n == 0, what="the stream's slot to free")
        with c.stream("GET", f"/jobs/{job.id}/events", headers=H) as again:  # the slot came back
            assert again.status_code == 200


# ----------------------------------------------------------------------------- a real server killed during a promotion


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(world: Path, tmp: Path, index: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "DPR_ADMIN_KEY": ADMIN, "DPR_JOBS_DIR": str(tmp / "state"), "DPR_DATA_ROOT": str(world / "data"),
           "DPR_DEVICE": "cpu", "DPR_JOBS_POLL_S": "0.1"}
    return subprocess.Popen([str(Path(sys.executable).parent / "dpr"), "serve", "--index", str(index), "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_server_killed_during_a_promotion_records_it_once_the_build_child_has_swapped_the_index(world, tmp_path):
    """kill -9 of `dpr serve` while `dpr index build` runs: the child still swaps the index in; at
    the next start the job says ``promoted`` (today it stays null), and it cannot be deleted."""
    import httpx

    index = copy_index(world, tmp_path, world / "served")
    store = JobStore(tmp_path / "state")
    job_id = fake_finished_job(world, store)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = _serve(world, tmp_path, index, port)
    try:
        wait_for(lambda: _get(f"{base}/readyz"), lambda s: s == 200, 180, "the server")
        threading.Thread(target=lambda: _post(f"{base}/jobs/{job_id}/promote", {"corpus": "beir", "force": True}),
                         daemon=True).start()
        wait_for(lambda: store.get(job_id).claim, lambda claim: claim is not None, 60, "the promotion's claim")
        server.send_signal(9)
        server.wait()
        best = (store.job_dir(job_id) / "run" / "best").resolve()
        wait_for(lambda: json.loads((index / "manifest.json").read_text()).get("checkpoint") if (index / "manifest.json").is_file() else None,
                 lambda named: named == str(best), 180, "the orphaned build child's swap")
        server = _serve(world, tmp_path, index, port)
        wait_for(lambda: _get(f"{base}/readyz"), lambda s: s == 200, 180, "the restarted server")
        job = wait_for(lambda: httpx.get(f"{base}/jobs/{job_id}", headers=H).json(), lambda j: j["promoted"] == "beir",
                       60, "the promotion to be recorded")
        r = httpx.delete(f"{base}/jobs/{job_id}", headers=H)
        assert r.status_code == 409, r.text
        assert job["promoted"] == "beir" and store.get(job_id).claim is None
    finally:
        server.kill()
        server.wait()


def _get(url: str) -> int | None:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def _post(url: str, body: dict) -> None:
    import httpx

    try:
        httpx.post(url, headers=H, json=body, timeout=300)
    except httpx.TransportError:
        pass  # the server is killed meanwhile
