"""The training service (dpr_service/api/jobs, routes/jobs.py, routes/datasets.py; docs/jobs.md):
a tiny job end to end (events equal the trainer's metrics.jsonl, promotion, /search from the new
index as the core's Searcher ranks it), cancel, SIGKILL of a real server during a job (the job
finishes with the weights of an uninterrupted run), names and uploads that leave the data root,
oversized uploads, the admin key on every route, and schemathesis over the new routes."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from safetensors.torch import load_file

from conftest import write_beir, write_plain
from test_web import browser  # noqa: F401  (the headless chromium fixture)
from dpr_service.api.app import app_routes, create_app
from dpr_service.api.jobs import JobSettings, runner
from dpr_service.api.settings import Settings
from dpr_service.core.checkpoint import load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import pick_runtime
from dpr_service.core.inference import encode_texts
from dpr_service.core.search import Searcher
from index.build import build

ADMIN, QUERY_KEY = "admin-s3cret", "query-s3cret"
H = {"X-Admin-Key": ADMIN}
CPU = pick_runtime("cpu", "fp32")
TINY_RUN = dict(model="tiny", train="train.jsonl", batch_size=4, pooling="mean", query_max_length=16,
                passage_max_length=32, log_every=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A data root (the tiny model, a plain training file, a BEIR set) and a served index of the tiny model."""
    root = tmp_path_factory.mktemp("jobs")
    data = root / "data"
    data.mkdir()
    shutil.copytree(tiny_model, data / "tiny")
    write_plain(data / "train.jsonl", n=24)
    write_beir(data / "beir", n=30)
    cfg = EncoderConfig(pooling="mean", similarity="dot", query_max_length=16, passage_max_length=32)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(root / "served", encoder, tokenizer)
    build(root / "served", data / "beir", root / "index", factory="Flat", progress=False)
    return root


def job_settings(world: Path, tmp: Path, **overrides) -> JobSettings:
    return JobSettings(admin_key=ADMIN, jobs_dir=tmp / "state", data_root=world / "data", jobs_poll_s=0.1, **overrides)


def make_client(world: Path, tmp: Path, index: Path | None = None, **settings) -> TestClient:
    app = create_app(Settings(index=index, device="cpu", batch_max_wait_ms=1, **settings), job_settings(world, tmp))
    return TestClient(app)


def wait_for(get, predicate, timeout: float = 240.0, what: str = "the job"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = get()
        if predicate(value):
            return value
        time.sleep(0.3)
    pytest.fail(f"{what} did not get there in {timeout:.0f} s: {value}")


def sse_events(lines) -> list[tuple[str, dict]]:
    """(event, data) of a Server-Sent Events stream, parsed as the spec says (fields, blank line ends an event)."""
    events, event, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                events.append((event, json.loads("\n".join(data))))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    return events


# ----------------------------------------------------------------------------- a job end to end


def test_a_tiny_job_end_to_end_events_promotion_and_search(world, tmp_path):
    """Submit, follow the event stream to the end, check it against the trainer's metrics.jsonl,
    refuse a promotion of a worse model, promote with force, and /search answers from the new index."""
    shutil.copytree(world / "index", tmp_path / "index")
    with make_client(world, tmp_path, index=tmp_path / "index") as c:
        r = c.post("/jobs", headers=H, json={**TINY_RUN, "dev": "beir", "max_steps": 6, "eval_every": 3, "save_every": 3})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        with c.stream("GET", f"/jobs/{job_id}/events", headers=H) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = sse_events(stream.iter_lines())
        assert events[-1] == ("end", {"id": job_id, "state": "succeeded"})
        run = tmp_path / "state" / job_id / "run"
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [data for name, data in events[:-1]] == logged  # one event per line, in order
        assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]
        assert [r["step"] for r in logged if "eval" in r] == [3, 6]

        job = c.get(f"/jobs/{job_id}", headers=H).json()
        assert (job["state"], job["step"], job["total"], job["error"]) == ("succeeded", 6, 6, None)
        assert job["metrics"] == [r for r in logged if "loss" in r][-1] and len(job["evals"]) == 2

        best = json.loads((run / "best" / "eval.json").read_text())
        (tmp_path / "served-better").mkdir()
        served = c.app.state.resources.loaded.path  # /info names it by its last part only (no absolute path)
        assert c.get("/info").json()["checkpoint"]["path"] == "/".join(served.parts[-3:])
        (served / "eval.json").write_text(json.dumps({"ndcg@10": best["ndcg@10"] + 0.1}))
        try:
            r = c.post(f"/jobs/{job_id}/promote", headers=H, json={"corpus": "beir"})
            assert r.status_code == 409 and r.json()["errors"][0]["field"] == "force", r.text
            r = c.post(f"/jobs/{job_id}/promote", headers=H, json={"corpus": "beir", "force": True})
        finally:
            (served / "eval.json").unlink()
        assert r.status_code == 200, r.text
        assert r.json()["passages"] == 30 and r.json()["comparison"]["job"] == best["ndcg@10"]
        info = c.get("/info").json()
        assert c.app.state.resources.loaded.path == run / "best" and info["checkpoint"]["path"] == "/".join((run / "best").parts[-3:])

        loaded = load_checkpoint(run / "best", CPU.device)
        query = "what is the apple near the river"
        expected = Searcher(tmp_path / "index", loaded.fingerprint).search(
            encode_texts(loaded.encoder, loaded.tokenizer, [query], "query", CPU).numpy(), 5)[0]
        got = c.post("/search", json={"query": query, "top_k": 5}).json()["results"][0]
        assert [h["id"] for h in got] == [h.id for h in expected]
        assert [h["score"] for h in got] == pytest.approx([h.score for h in expected], abs=1e-5)

        assert c.delete(f"/jobs/{job_id}", headers=H).status_code == 409  # its checkpoint serves


def test_cancel_stops_a_running_job_with_last_saved_and_delete_removes_it(world, tmp_path):
    with make_client(world, tmp_path) as c:
        job_id = c.post("/jobs", headers=H, json={**TINY_RUN, "max_steps": 500, "save_every": 1000}).json()["id"]
        wait_for(lambda: c.get(f"/jobs/{job_id}", headers=H).json(), lambda j: j["step"] >= 2)
        assert c.delete(f"/jobs/{job_id}", headers=H).status_code == 409  # still running
        assert c.post(f"/jobs/{job_id}/cancel", headers=H).json()["cancel_requested"] is True
        job = wait_for(lambda: c.get(f"/jobs/{job_id}", headers=H).json(), lambda j: j["state"] != "running")
        assert job["state"] == "cancelled" and 2 <= job["step"] < 500
        state = json.loads((tmp_path / "state" / job_id / "run" / "last" / "training_state" / "state.json").read_text())
        assert state["progress"]["step"] >= job["step"]  # SIGTERM: the trainer saved last/ where it stopped
        assert c.delete(f"/jobs/{job_id}", headers=H).status_code == 204
        assert not (tmp_path / "state" / job_id).exists()
        assert c.get(f"/jobs/{job_id}", headers=H).status_code == 404


def test_a_job_of_several_processes_runs_under_torchrun_and_cancels_cleanly(world, tmp_path):
    """DPR_JOBS_NPROC=2: the job is torchrun --standalone with two processes (gloo on the CPU here,
    one GPU each with DPR_JOBS_GPUS); cancel reaches both, and last/ records a run of two."""
    js = job_settings(world, tmp_path, jobs_nproc=2)
    with TestClient(create_app(Settings(index=None, device="cpu"), js)) as c:
        job_id = c.post("/jobs", headers=H, json={**TINY_RUN, "max_steps": 500, "save_every": 1000}).json()["id"]
        wait_for(lambda: c.get(f"/jobs/{job_id}", headers=H).json(), lambda j: j["step"] >= 2)
        assert c.post(f"/jobs/{job_id}/cancel", headers=H).json()["cancel_requested"] is True
        job = wait_for(lambda: c.get(f"/jobs/{job_id}", headers=H).json(), lambda j: j["state"] != "running")
    assert job["state"] == "cancelled", job
    state = json.loads((tmp_path / "state" / job_id / "run" / "last" / "training_state" / "state.json").read_text())
    assert state["progress"]["world_size"] == 2 and state["progress"]["step"] >= 2
    assert "torch.distributed.run" in " ".join(runner.train_command(tmp_path, 2))


def test_relative_state_and_data_directories_work(world, tmp_path, monkeypatch):
    """DPR_JOBS_DIR and DPR_DATA_ROOT relative to the server's directory (the default `dpr-jobs`):
    the job's child runs in its own directory, and its paths must still hold."""
    monkeypatch.chdir(tmp_path)
    js = JobSettings(admin_key=ADMIN, jobs_dir="dpr-jobs", data_root=os.path.relpath(world / "data", tmp_path), jobs_poll_s=0.1)
    with TestClient(create_app(Settings(index=None, device="cpu"), js)) as c:
        job_id = c.post("/jobs", headers=H, json={**TINY_RUN, "max_steps": 2}).json()["id"]
        job = wait_for(lambda: c.get(f"/jobs/{job_id}", headers=H).json(), lambda j: j["state"] not in ("queued", "running"))
    assert job["state"] == "succeeded", job
    assert (tmp_path / "dpr-jobs" / job_id / "run" / "last").is_dir()


def test_the_runner_survives_a_failed_look_and_leaves_a_job_cancelled_meanwhile(tmp_path):
    """A look that raises is logged and the next one runs; a queued job cancelled between the look
    and its start is not started (the claim is one statement)."""
    store = runner.JobStore(tmp_path / "state")
    run = runner.Runner(store, [None], poll_s=0.05)
    job = store.create({"model": "m"})
    store.request_cancel(job.id)
    run._launch(job, None)  # the look saw it queued; it was cancelled since
    assert not run.procs and store.get(job.id).state == "cancelled"
    looks, real = [], run.tick

    def flaky():
        looks.append(1)
        if len(looks) == 1:
            raise OSError("disk full")
        real()

    run.tick = flaky
    run.start()
    try:
        wait_for(lambda: len(looks), lambda n: n >= 3, timeout=10, what="the runner's next looks")
        assert run._thread.is_alive()
    finally:
        run.stop(wait_s=1)


@pytest.mark.parametrize("variable, value", [("DPR_JOBS_NPROC", "0"), ("DPR_JOBS_GPUS", "0,1,2"), ("DPR_MAX_UPLOAD_BYTES", "lots")])
def test_a_bad_training_service_setting_is_a_one_line_error_exit_2(world, monkeypatch, capsys, variable, value):
    from dpr_service.api.jobs.settings import get_job_settings
    from dpr_service.api.serve import main
    from dpr_service.api.settings import get_settings

    monkeypatch.setenv(variable, value)
    if variable == "DPR_JOBS_GPUS":
        monkeypatch.setenv("DPR_JOBS_NPROC", "2")
    get_settings.cache_clear(), get_job_settings.cache_clear()
    try:
        assert main(["--index", str(world / "index")]) == 2
    finally:
        get_settings.cache_clear(), get_job_settings.cache_clear()
    err = capsys.readouterr().err
    assert "bad DPR_* setting" in err and "Traceback" not in err, err


def test_gpu_ids_are_grouped_into_jobs_of_nproc():
    assert JobSettings(jobs_gpus="0,1,2,3", jobs_nproc=2).slots() == ["0,1", "2,3"]
    assert JobSettings(jobs_gpus="0, 1").slots() == ["0", "1"]
    assert JobSettings().slots() == [None]
    with pytest.raises(ValidationError, match="DPR_JOBS_NPROC"):
        JobSettings(jobs_gpus="0,1,2", jobs_nproc=2)


# ----------------------------------------------------------------------------- a real server killed during a job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(world: Path, tmp: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "DPR_ADMIN_KEY": ADMIN, "DPR_JOBS_DIR": str(tmp / "state"), "DPR_DATA_ROOT": str(world / "data"),
           "DPR_DEVICE": "cpu", "DPR_JOBS_POLL_S": "0.1"}
    return subprocess.Popen([str(Path(sys.executable).parent / "dpr"), "serve", "--index", str(world / "index"),
                             "--checkpoint", str(world / "served"), "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _up(base: str) -> None:
    wait_for(lambda: _status(f"{base}/healthz"), lambda s: s == 200, 120, "the server")


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def test_a_server_killed_during_a_job_continues_it_on_restart_with_an_uninterrupted_runs_weights(world, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = _serve(world, tmp_path, port)
    try:
        _up(base)
        r = httpx.post(f"{base}/jobs", headers=H, json={**TINY_RUN, "max_steps": 16, "save_every": 2}, timeout=120)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_for(lambda: httpx.get(f"{base}/jobs/{job_id}", headers=H).json(), lambda j: j["step"] >= 3)
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = _serve(world, tmp_path, port)
        _up(base)
        job = wait_for(lambda: httpx.get(f"{base}/jobs/{job_id}", headers=H).json(), lambda j: j["state"] != "running")
    finally:
        server.terminate()
        server.wait(timeout=120)
    assert (job["state"], job["step"], job["attempts"]) == ("succeeded", 16, 2), job
    job_dir = tmp_path / "state" / job_id
    assert "restarted with --auto-resume" in (job_dir / "train.log").read_text()
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "dpr_service.cli", "train", "--config", str(job_dir / "config.yaml"),
                    "--output", str(reference)], check=True, capture_output=True)
    for weights in sorted((reference / "last").glob("*.safetensors")):
        mine, theirs = load_file(job_dir / "run" / "last" / weights.name), load_file(weights)
        assert mine.keys() == theirs.keys()
        assert all((mine[k] == theirs[k]).all() for k in mine), weights.name  # bit-identical


# ----------------------------------------------------------------------------- names, uploads, limits


def _zip(entries: dict[str, bytes], links: dict[str, str] = {}) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, target)
    return buf.getvalue()


def _beir_zip(src: Path, top: str = "") -> dict[str, bytes]:
    return {top + str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file()}


def test_names_and_uploads_that_leave_the_data_root_are_refused(world, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_plain(outside / "secret.jsonl")
    data = world / "data"
    link = data / "escape"
    os.symlink(outside, link)
    try:
        with make_client(world, tmp_path, max_body_bytes=50_000) as c:
            for name in ("../data/train.jsonl", str(data / "train.jsonl"), "escape/secret.jsonl", "./train.jsonl", "a//b"):
                r = c.post("/jobs", headers=H, json={**TINY_RUN, "train": name})
                assert r.status_code == 422 and r.json()["errors"][0]["field"] == "train", (name, r.text)
            assert c.post("/jobs", headers=H, json={**TINY_RUN, "train": "nothing-here"}).status_code == 404
            assert "escape" not in [d["name"] for d in c.get("/datasets", headers=H).json()["datasets"]]

            evil = _zip({"../evil.txt": b"x", **_beir_zip(data / "beir")})
            r = c.post("/datasets?name=evil", headers=H, content=evil)
            assert r.status_code == 422 and "escapes" in r.json()["detail"]
            r = c.post("/datasets?name=linked", headers=H, content=_zip(_beir_zip(data / "beir"), {"corpus2.jsonl": "/etc/passwd"}))
            assert r.status_code == 422 and "symbolic link" in r.json()["detail"]
            assert not (world / "evil.txt").exists() and not (data / "evil").exists() and not (data / "linked").exists()
            assert c.post("/datasets?name=../up", headers=H, content=b"{}").status_code == 422

            good = c.post("/datasets?name=mine", headers=H, content=_zip(_beir_zip(data / "beir", "top/")))
            assert good.status_code == 201 and good.json()["kind"] == "beir", good.text
            lines = (data / "train.jsonl").read_bytes().splitlines(keepends=True)
            r = c.post("/datasets?name=broken", headers=H, content=lines[0] + b'{"query": 3}\n')
            assert r.status_code == 422 and r.json()["detail"].startswith("body: broken.jsonl:2: "), r.text
            assert c.post("/datasets?name=plain", headers=H, content=b"".join(lines)).status_code == 201
            assert c.post("/datasets?name=plain", headers=H, content=b"".join(lines)).status_code == 409
            names = [d["name"] for d in c.get("/datasets", headers=H).json()["datasets"]]
            assert {"mine", "plain.jsonl", "train.jsonl", "beir", "tiny"} <= set(names)
            assert "broken.jsonl" not in names and not any(n.startswith(".") for n in names)
    finally:
        link.unlink()
        for name in ("mine", "plain.jsonl"):
            target = data / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)


def test_two_uploads_of_one_name_at_once_store_one_and_refuse_the_other(world, tmp_path, monkeypatch):
    """The name check and the commit are one step for uploads (a lock): with the check slowed down,
    two uploads racing for one name give one stored file and one 409, never a silent overwrite."""
    import threading

    from dpr_service.api.jobs import data

    real = data.read_train_data
    monkeypatch.setattr(data, "read_train_data", lambda path: (time.sleep(0.3), real(path))[1])
    lines = (world / "data" / "train.jsonl").read_bytes()
    root = tmp_path / "root"
    root.mkdir()
    outcomes, start = [], threading.Barrier(2)

    def upload(i: int):
        path = root / f".upload-{i}"
        path.write_bytes(lines if i == 0 else lines.splitlines(keepends=True)[0])
        start.wait()
        try:
            outcomes.append(data.ingest(root, "same", path, 10**9)["bytes"])
        except data.DataRefused as e:
            outcomes.append(e.status)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=str).count(409) == 1, outcomes
    stored = next(o for o in outcomes if o != 409)
    assert (root / "same.jsonl").stat().st_size == stored


def test_uploads_a_killed_server_left_are_swept_at_start_fresh_ones_kept(world, tmp_path):
    root = tmp_path / "root"
    (root / ".upload-dead-dir").mkdir(parents=True)
    (root / ".upload-dead-file").write_bytes(b"x" * 10)
    (root / ".upload-in-progress").write_bytes(b"y")
    (root / "kept.jsonl").write_bytes(b"z")
    hour_ago = time.time() - 7200
    for name in (".upload-dead-dir", ".upload-dead-file"):
        os.utime(root / name, (hour_ago, hour_ago))
    js = JobSettings(admin_key=ADMIN, jobs_dir=tmp_path / "state", data_root=root, jobs_poll_s=0.1)
    with TestClient(create_app(Settings(index=None, device="cpu"), js)):
        pass
    assert sorted(p.name for p in root.iterdir()) == [".upload-in-progress", "kept.jsonl"]


def test_oversized_uploads_are_413(world, tmp_path):
    big = (world / "data" / "train.jsonl").read_bytes()
    app = create_app(Settings(index=None, device="cpu"), job_settings(world, tmp_path, max_upload_bytes=len(big) - 1))
    with TestClient(app) as c:
        assert c.post("/datasets?name=big", headers=H, content=big).status_code == 413
        assert c.post("/datasets?name=big", headers=H, content=iter([big])).status_code == 413  # chunked
        bomb = _zip({"corpus.jsonl": b" " * (len(big) * 50)})  # small zipped, over the limit unpacked
        assert len(bomb) < len(big)
        assert c.post("/datasets?name=bomb", headers=H, content=bomb).status_code == 413
    assert not (world / "data" / "big.jsonl").exists() and not (world / "data" / "bomb").exists()


def test_uploads_have_their_own_limit_not_the_request_body_limit(world, tmp_path):
    """DPR_MAX_UPLOAD_BYTES bounds /datasets (streamed to disk, never buffered), DPR_MAX_BODY_BYTES
    the other routes: an upload far over the body limit is stored, sent whole or chunked."""
    lines = (world / "data" / "train.jsonl").read_bytes()
    small = Settings(index=None, device="cpu", max_body_bytes=len(lines) // 4)
    try:
        with TestClient(create_app(small, job_settings(world, tmp_path))) as c:
            assert c.post("/datasets?name=whole", headers=H, content=lines).status_code == 201
            assert c.post("/datasets?name=chunked", headers=H, content=iter([lines[:100], lines[100:]])).status_code == 201
            assert c.post("/jobs", headers=H, content=b" " * len(lines)).status_code == 413  # other routes: the body limit
    finally:
        for name in ("whole", "chunked"):
            (world / "data" / f"{name}.jsonl").unlink(missing_ok=True)


def test_a_bad_setting_is_422_naming_it_by_the_trainers_own_rules(world, tmp_path):
    with make_client(world, tmp_path) as c:
        for body, field in (({"batch_size": 1}, "batch_size"), ({"lr": "fast"}, "lr"), ({"no_such": 1}, "no_such"),
                            ({"output": "/tmp/x"}, "output"), ({"train-split": 3}, "train_split")):
            r = c.post("/jobs", headers=H, json={**TINY_RUN, **body})
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == field, (body, r.text)
        assert c.get("/jobs", headers=H).json() == {"jobs": []}  # nothing queued


# ----------------------------------------------------------------------------- the admin key


JOB_ROUTES = [("GET", "/datasets"), ("POST", "/datasets"), ("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/{job_id}"),
              ("DELETE", "/jobs/{job_id}"), ("GET", "/jobs/{job_id}/events"), ("POST", "/jobs/{job_id}/cancel"),
              ("POST", "/jobs/{job_id}/promote"), ("DELETE", "/datasets/{name}")]


def test_every_job_route_needs_the_admin_key_and_the_query_key_never_opens_one(world, tmp_path):
    with make_client(world, tmp_path, api_key=QUERY_KEY) as c:
        paths = {p for p in app_routes(c.app) if p.startswith(("/jobs", "/datasets"))}
        assert paths == {p for _, p in JOB_ROUTES}  # every route of the app under these prefixes is checked
        for method, path in JOB_ROUTES:
            url = path.replace("{job_id}", "abc").replace("{name}", "abc")
            for headers in ({"X-API-Key": QUERY_KEY}, {"Authorization": f"Bearer {QUERY_KEY}"},
                            {"X-API-Key": QUERY_KEY, "X-Admin-Key": QUERY_KEY},
                            {"X-API-Key": QUERY_KEY, "X-Admin-Key": ADMIN[:-1]},
                            {"X-API-Key": QUERY_KEY, "Authorization": f"Bearer {ADMIN}"}):
                r = c.request(method, url, headers=headers)
                assert r.status_code == 401, (method, url, headers, r.status_code)
            ok = c.request(method, url, headers={"X-API-Key": QUERY_KEY, "X-Admin-Key": ADMIN})
            assert ok.status_code not in (401, 405), (method, url, ok.status_code)
        # the published schema says the same: both keys on each job route (OpenAPI ANDs one entry's schemes)
        schema = c.get("/openapi.json", headers={"X-API-Key": QUERY_KEY}).json()
        assert {"APIKeyHeader", "Bearer", "AdminKey"} <= set(schema["components"]["securitySchemes"])
        for method, path in JOB_ROUTES:
            security = schema["paths"][path][method.lower()]["security"]
            assert security and all("AdminKey" in entry and ({"APIKeyHeader", "Bearer"} & set(entry)) for entry in security), security
        assert schema["paths"]["/search"]["post"]["security"] == [{"APIKeyHeader": []}, {"Bearer": []}]
    off = create_app(Settings(index=None, device="cpu"), JobSettings(admin_key=None, jobs_dir=tmp_path / "off"))
    with TestClient(off) as c:
        assert c.get("/jobs").status_code == 404 and not (tmp_path / "off").exists()


# ----------------------------------------------------------------------------- schemathesis


try:
    import schemathesis
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings
    from schemathesis.checks import positive_data_acceptance
except ImportError:  # the `test` extra installs it
    schemathesis = None

from conftest import AsgiForward  # noqa: E402

JOBS_FUZZ = AsgiForward()


@pytest.fixture(scope="module")
def jobs_fuzz_app(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    app = create_app(Settings(index=None, device="cpu"), job_settings(world, tmp, max_upload_bytes=10_000))
    with TestClient(app):  # the lifespan: the store and the runner
        JOBS_FUZZ.target = app
        yield JOBS_FUZZ


if schemathesis is not None:
    _schema_app = create_app(Settings(index=None), JobSettings(admin_key=ADMIN, jobs_dir=Path("/nonexistent-unused")))
    jobs_schema = schemathesis.openapi.from_dict(_schema_app.openapi()).include(path_regex="^/(jobs|datasets)")
    jobs_schema.app = JOBS_FUZZ

    @jobs_schema.parametrize()
    @hypothesis_settings(max_examples=15, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))
    def test_schemathesis_over_the_job_routes(case, jobs_fuzz_app):
        """Every check but positive-data acceptance (a schema-valid object of settings is still 422
        when the trainer's rules or the data root refuse it): no 5xx, statuses, bodies and headers
        as documented, the admin key not ignored."""
        case.call_and_validate(headers=H, excluded_checks=[positive_data_acceptance])
else:
    def test_schemathesis_over_the_job_routes():
        pytest.skip("schemathesis is not installed: pip install -e '.[test]'")


# ----------------------------------------------------------------------------- the Train tab, in the browser


@pytest.fixture
def train_server(world, tmp_path, monkeypatch):
    """The real app under uvicorn (test_web's Server) with the training service on."""
    import functools

    import test_web

    monkeypatch.setattr(test_web, "create_app", functools.partial(create_app, jobs_settings=job_settings(world, tmp_path)))
    shutil.copytree(world / "index", tmp_path / "index")
    with test_web.Server(Settings(index=tmp_path / "index", device="cpu", batch_max_wait_ms=1)) as server:
        yield server


def test_the_train_tab_uploads_trains_charts_the_event_stream_and_promotes(world, tmp_path, train_server, browser):
    """Upload a file, start a job with the main settings, follow its curve (SVG from the event stream)
    to the end, promote it; the chart and the job row agree with the API. Screenshot: h18-train-tab.png."""
    import test_web
    from selenium.webdriver.support.ui import Select

    driver, base, by_id = browser, train_server.base, test_web.by_id
    test_web.open_page(driver, base)
    by_id(driver, "tab-train").click()
    by_id(driver, "admin-key").send_keys(ADMIN)
    by_id(driver, "admin-save").click()
    test_web.wait_for(driver, lambda d: "train.jsonl" in d.execute_script(
        "return [...document.getElementById('train-data').options].map((o) => o.value)"), what="the data sets")
    upload = tmp_path / "web-upload.jsonl"
    write_plain(upload, n=8, seed=3)
    try:
        by_id(driver, "upload-file").send_keys(str(upload))
        test_web.type_into(driver, "upload-name", "web-upload")
        by_id(driver, "upload-submit").click()
        test_web.wait_for(driver, lambda d: d.execute_script("return document.getElementById('train-data').value")
                          == "web-upload.jsonl", what="the upload")  # read by script: the list is re-rendered meanwhile
        assert (world / "data" / "web-upload.jsonl").read_bytes() == upload.read_bytes()
    finally:
        (world / "data" / "web-upload.jsonl").unlink(missing_ok=True)

    Select(by_id(driver, "train-model")).select_by_value("tiny")
    Select(by_id(driver, "train-data")).select_by_value("train.jsonl")
    Select(by_id(driver, "train-dev")).select_by_value("beir")
    for field, value in (("train-max-steps", 8), ("train-batch-size", 4), ("train-eval-every", 4), ("train-log-every", 1)):
        test_web.type_into(driver, field, str(value))
    by_id(driver, "train-submit").click()
    test_web.wait_for(driver, lambda d: by_id(d, "chart").get_attribute("data-ended"), timeout=300, what="the job's end event")
    job_id = by_id(driver, "chart").get_attribute("data-job")
    job = httpx.get(f"{base}/jobs/{job_id}", headers=H).json()
    assert job["state"] == "succeeded" and by_id(driver, "chart").get_attribute("data-ended") == "succeeded"
    assert job["settings"] == {"train": "train.jsonl", "model": "tiny", "dev": "beir", "max_steps": 8, "batch_size": 4,
                               "eval_every": 4, "log_every": 1}
    chart = by_id(driver, "chart")
    assert chart.find_element("css selector", "path.loss").get_attribute("data-points") == "8"
    assert chart.find_element("css selector", "path.ndcg").get_attribute("data-points") == str(len(job["evals"])) == "2"
    row_text = f"return (document.querySelector('tr[data-job=\"{job_id}\"]') || {{}}).innerText || ''"
    row = test_web.wait_for(driver, lambda d: (lambda t: t if "succeeded" in t else None)(d.execute_script(row_text)),
                            what="the job row")  # read by script: the table is re-rendered every 2 s
    assert f"{job['metrics']['loss']:.4f}" in row and f"{job['evals'][-1]['eval']['ndcg@10']:.4f}" in row
    shot = test_web.screenshot(driver, tmp_path, "h18-train-tab")
    if Path("/work/exp/helpers").is_dir():
        shutil.copy(shot, "/work/exp/helpers/h18-train-tab.png")

    Select(by_id(driver, "promote-corpus")).select_by_value("beir")
    driver.execute_script(f"document.querySelector('tr[data-job=\"{job_id}\"] button.promote').click()")  # no stale row
    test_web.wait_for(driver, lambda d: job_id in by_id(d, "info-checkpoint").get_attribute("title"), timeout=180,
                      what="the promoted checkpoint in the header")
    assert httpx.get(f"{base}/jobs/{job_id}", headers=H).json()["promoted"] == "beir"
    by_id(driver, "tab-search").click()  # the other tabs still work
    test_web.search(driver, "what is the apple near the river", 3)
    test_web.wait_for(driver, lambda d: len(test_web.results(d)) == 3, what="search results")


# ----------------------------------------------------------------------------- docs/jobs.md


ROOT = Path(__file__).resolve().parents[1]


def doc_session() -> str:
    """The sh block of docs/jobs.md marked as the session this test runs."""
    text = (ROOT / "docs" / "jobs.md").read_text()
    marker = text.index("<!-- session: run by tests/test_jobs.py")
    return text[marker:].split("```sh\n", 1)[1].split("```", 1)[0]


def json_values(text: str) -> list:
    """The JSON values printed one after another (curl -s adds no newline)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


def test_the_docs_curl_session_runs_as_written(world, tmp_path):
    """docs/jobs.md's curl session, run by bash against a real `dpr serve` (the tiny model as `minilm`,
    served from a checkpoint whose dev nDCG@10 is 1.0, so the first promotion is refused), with only the
    URL and the zip's path replaced."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(world / "data" / "tiny", data / "minilm")
    shutil.copytree(world / "served", tmp_path / "served")
    (tmp_path / "served" / "eval.json").write_text(json.dumps({"step": 0, "ndcg@10": 1.0}))
    build(tmp_path / "served", world / "data" / "beir", tmp_path / "index", factory="Flat", progress=False)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DPR_ADMIN_KEY": ADMIN, "DPR_JOBS_DIR": str(tmp_path / "jobs"), "DPR_DATA_ROOT": str(data),
           "DPR_DEVICE": "cpu", "DPR_MAX_BODY_BYTES": "50000000", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "dpr"), "serve", "--index", str(tmp_path / "index"),
                               "--port", str(port), "--log-level", "warning"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _up(base)
        script = doc_session().replace("http://localhost:8000", base).replace("/tmp/demo.zip", str(tmp_path / "demo.zip"))
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    finally:
        server.terminate()
        server.wait(timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert '"name":"demo","kind":"beir"' in out
    events = sse_events(out[out.index("event: "):].splitlines())
    end = [data for name, data in events if name == "end"]
    assert len(end) == 1 and end[0]["state"] == "succeeded", out[-2000:]
    assert [d["step"] for name, d in events if name == "metrics" and "eval" in d] == [20, 40, 60]
    job, refused, promoted, search = json_values(out[out.index("event: end"):].split("\n\n", 1)[1])
    assert job["state"] == "succeeded" and job["step"] == job["total"] == 60 and len(job["evals"]) == 3
    assert refused["errors"][0]["field"] == "force"  # refused: the served checkpoint's dev nDCG@10 is 1.0
    assert promoted["corpus"] == "demo" and promoted["comparison"]["served"] == 1.0
    demo_ids = {json.loads(line)["_id"] for line in (ROOT / "dpr_service" / "demo_data" / "corpus.jsonl").read_text().splitlines()}
    assert len(search["results"][0]) == 3 and {h["id"] for h in search["results"][0]} <= demo_ids
