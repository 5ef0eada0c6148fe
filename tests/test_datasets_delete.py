"""``DELETE /datasets/{name}`` (issue 31, item 10; dpr_service/api/jobs/data.py's delete_data,
routes/datasets.py; docs/jobs.md): the admin key, 404 and 422 naming ``name``, 409 naming the job
(queued, running, being submitted or promoting) that uses the data or the setting that names it, a
link removed as itself, and the removal atomic: the name is gone in one rename, nothing is left
behind, and the name can be uploaded again."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from conftest import write_beir, write_plain
from dpr_service.api.app import create_app
from dpr_service.api.jobs import JobSettings, data
from dpr_service.api.settings import Settings

ADMIN = "admin-s3cret"
H = {"X-Admin-Key": ADMIN}


def client(root: Path, tmp: Path, **overrides) -> TestClient:
    """The app with the training service; the runner looks once, at start (jobs made later stay as made)."""
    js = JobSettings(admin_key=ADMIN, jobs_dir=tmp / "state", data_root=root, jobs_poll_s=3600, **overrides)
    return TestClient(create_app(Settings(index=None, device="cpu"), js))


def upload(c: TestClient, name: str, path: Path) -> str:
    r = c.post(f"/datasets?name={name}", content=path.read_bytes(), headers=H)
    assert r.status_code == 201, r.text
    return r.json()["name"]


def listed(c: TestClient) -> list[str]:
    r = c.get("/datasets", headers=H)
    assert r.status_code == 200, r.text
    return [d["name"] for d in r.json()["datasets"]]


@pytest.fixture
def train_file(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return write_plain(tmp_path / "src" / "train.jsonl", n=6)


def test_delete_removes_the_data_and_frees_the_name(tmp_path, train_file):
    root = tmp_path / "data"
    with client(root, tmp_path) as c:
        name = upload(c, "demo", train_file)
        taken = c.post("/datasets?name=demo", content=train_file.read_bytes(), headers=H)
        assert taken.status_code == 409 and "DELETE /datasets/demo.jsonl" in taken.json()["detail"], taken.text
        r = c.delete(f"/datasets/{name}", headers=H)
        assert r.status_code == 204, r.text
        assert name not in listed(c)
        assert sorted(p.name for p in root.iterdir() if p.name != ".uploads.lock") == []  # no temporary left
        assert upload(c, "demo", train_file) == name  # the name is free again
        # a BEIR directory (an upload's zip, stored as a directory) goes whole
        beir = write_beir(root / "beir", n=4)
        assert c.delete("/datasets/beir", headers=H).status_code == 204 and not beir.exists()


def test_missing_bad_or_hidden_names_and_no_key(tmp_path, train_file):
    root = tmp_path / "data"
    with client(root, tmp_path) as c:
        name = upload(c, "demo", train_file)
        assert c.delete(f"/datasets/{name}").status_code == 401
        assert c.delete(f"/datasets/{name}", headers={"X-Admin-Key": "wrong"}).status_code == 401
        r = c.delete("/datasets/nothere", headers=H)
        assert r.status_code == 404 and "'nothere'" in r.json()["detail"] and r.json()["errors"][0]["field"] == "name", r.text
        for bad in (".uploads.lock", "..", "%2E%2E"):
            r = c.delete(f"/datasets/{bad}", headers=H)
            assert r.status_code in (404, 405, 422), (bad, r.status_code, r.text)
            assert r.status_code != 422 or r.json()["errors"][0]["field"] == "name"
        assert (root / ".uploads.lock").exists() and name in listed(c)
        r = c.get(f"/datasets/{name}", headers=H)
        assert r.status_code == 405 and r.headers["allow"] == "DELETE"


def test_a_link_is_removed_itself_not_what_it_points_to(tmp_path, train_file):
    root = tmp_path / "data"
    with client(root, tmp_path) as c:
        name = upload(c, "demo", train_file)
        (root / "alias.jsonl").symlink_to(root / name)
        assert c.delete("/datasets/alias.jsonl", headers=H).status_code == 204
        assert not (root / "alias.jsonl").is_symlink() and (root / name).is_file()
        assert listed(c) == [name]


def job_with_config(store, settings: dict, config: dict, state: str | None) -> str:
    """A job as ``POST /jobs`` leaves it: ``config.yaml`` (names resolved to paths) and, unless
    ``state`` is None (a submission still being checked), its row."""
    job_id = store.new_id()
    store.job_dir(job_id).mkdir(parents=True)
    (store.job_dir(job_id) / "config.yaml").write_text(yaml.safe_dump(config))
    if state is not None:
        store.create(settings, job_id, state=state)
    return job_id


@pytest.mark.parametrize("state", ["queued", "running", None])
def test_data_a_job_uses_is_409_naming_the_job(tmp_path, train_file, state):
    root = tmp_path / "data"
    with client(root, tmp_path) as c:
        name = upload(c, "demo", train_file)
        write_beir(root / "beir", n=4)
        store = c.app.state.job_store
        job_id = job_with_config(store, {"train": name, "dev": "beir"},
                                 {"train": str((root / name).resolve()), "dev": str((root / "beir").resolve())}, state)
        for used, setting in ((name, "train"), ("beir", "dev")):
            r = c.delete(f"/datasets/{used}", headers=H)
            assert r.status_code == 409, r.text
            detail = r.json()["detail"]
            assert job_id in detail and setting in detail and r.json()["errors"][0]["field"] == "name", detail
        assert sorted(listed(c)) == sorted([name, "beir"])  # nothing removed, nothing hidden left over
        assert sorted(p.name for p in root.iterdir() if p.name != ".uploads.lock") == sorted([name, "beir"])
        if state is not None:  # once the job has finished, the data may go
            store.update(job_id, state="cancelled", finished=time.time())
            assert c.delete(f"/datasets/{name}", headers=H).status_code == 204


def test_a_stale_submission_left_by_a_killed_server_does_not_hold_data(tmp_path, train_file):
    root = tmp_path / "data"
    with client(root, tmp_path) as c:
        name = upload(c, "demo", train_file)
        store = c.app.state.job_store
        job_id = job_with_config(store, {}, {"train": str((root / name).resolve())}, None)
        old = time.time() - 3600
        os.utime(store.job_dir(job_id) / "config.yaml", (old, old))
        assert c.delete(f"/datasets/{name}", headers=H).status_code == 204


def test_a_promotion_and_the_default_model_hold_their_data(tmp_path, train_file):
    root = tmp_path / "data"
    write_beir(root / "corpus", n=4)
    (root / "models" / "minilm").mkdir(parents=True)
    (root / "models" / "minilm" / "config.json").write_text("{}")
    with client(root, tmp_path, jobs_model=str(root / "models" / "minilm")) as c:
        store = c.app.state.job_store
        job = store.create({"train": "x"}, state="succeeded")
        assert store.claim(job.id, {"op": "promote", "corpus": "corpus", "at": time.time()})
        r = c.delete("/datasets/corpus", headers=H)
        assert r.status_code == 409 and job.id in r.json()["detail"] and "promot" in r.json()["detail"], r.text
        r = c.delete("/datasets/models", headers=H)
        assert r.status_code == 409 and "DPR_JOBS_MODEL" in r.json()["detail"], r.text
        store.release(job.id, promoted="corpus")
        assert c.delete("/datasets/corpus", headers=H).status_code == 204


def test_the_route_is_published(tmp_path):
    with client(tmp_path / "data", tmp_path) as c:
        op = c.get("/openapi.json").json()["paths"]["/datasets/{name}"]["delete"]
        assert {"204", "404", "409", "422"} <= set(op["responses"]), json.dumps(op["responses"])
        assert "training" in op["tags"]


def test_delete_data_checks_again_after_the_rename(tmp_path, train_file):
    """A job submitted while the delete runs names the data before it is renamed away: the check
    after the rename sees it, and the data is put back under its name."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "demo.jsonl").write_bytes(train_file.read_bytes())
    calls = []

    def in_use(path: Path, entry: Path) -> str | None:
        calls.append(entry.exists())
        return None if len(calls) == 1 else "job abc (queued) uses it as train"

    with pytest.raises(data.DataRefused) as e:
        data.delete_data(root, "demo.jsonl", in_use)
    assert e.value.status == 409 and "job abc" in e.value.message
    assert calls == [True, False]  # checked before, and again once the name was gone
    assert (root / "demo.jsonl").read_bytes() == train_file.read_bytes()
    assert sorted(p.name for p in root.iterdir() if p.name != ".uploads.lock") == ["demo.jsonl"]
