"""The service side of query-side training (issue 32): a reload that brings a query encoder trained
against the served index swaps the checkpoint alone and keeps the loaded index (FAISS, passage store,
BM25); one whose passage encoder did not build the index is refused (409 naming both) while the old
one serves; a ``query_side`` training job runs ``dpr train --index`` and is promoted by a reload, with
no index build; the Train tab offers it."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import write_beir
from test_web import browser  # noqa: F401  (the headless chromium fixture)
from fastapi.testclient import TestClient

from dpr_service.api.app import create_app
from dpr_service.api.settings import Settings
from dpr_service.core.checkpoint import load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import pick_runtime
from dpr_service.core.inference import encode_texts
from dpr_service.core.search import Searcher
from index.build import build
from trainer.config import TrainConfig
from trainer.train import train

CPU = pick_runtime("cpu", "fp32")
CFG = dict(pooling="mean", similarity="cosine", temperature=0.05, query_max_length=16, passage_max_length=32)
QUERY = "what is the apple near the river"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A BEIR set, the checkpoint that indexed it (``built``), its index (Flat, with BM25), a query
    encoder trained against that index (``qside``, 3 steps of dpr train --index) and a checkpoint of
    another passage encoder (``other``: a passage prompt)."""
    root = tmp_path_factory.mktemp("qside-service")
    beir = write_beir(root / "data" / "beir", n=24, splits=("train", "dev"))
    encoder, tokenizer = load_base_model(str(tiny_model), EncoderConfig(**CFG, shared=True))
    save_checkpoint(root / "built", encoder, tokenizer)
    build(root / "built", beir, root / "index", factory="Flat", progress=False)
    cfg = TrainConfig.from_settings(model=str(root / "built"), train=str(beir), index=str(root / "index"),
                                    output=str(root / "qside-run"), batch_size=4, lr=1e-3, log_every=1, progress=False,
                                    seed=3, max_steps=3, index_negatives=3)
    shutil.copytree(train(cfg), root / "qside")
    encoder, tokenizer = load_base_model(str(tiny_model), EncoderConfig(**CFG, shared=True, passage_prompt="passage: "))
    save_checkpoint(root / "other", encoder, tokenizer)
    shutil.copytree(root / "other", root / "data" / "other")  # a job may name it as its model
    return root


def replace_dir(source: Path, target: Path) -> None:
    """Put a copy of ``source`` at ``target`` by a rename (as an operator deploying a checkpoint)."""
    tmp = target.with_name(target.name + ".new")
    shutil.copytree(source, tmp)
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)


def expected_ids(checkpoint: Path, index: Path, k: int = 5) -> list[str]:
    loaded = load_checkpoint(checkpoint, CPU.device)
    q = encode_texts(loaded.encoder, loaded.tokenizer, [QUERY], "query", CPU).numpy()
    return [h.id for h in Searcher(index, loaded.identity).search(q, k)[0]]


# ----------------------------------------------------------------------------- hot reload


def test_a_reload_of_a_query_encoder_trained_against_the_index_keeps_the_index_loaded(world, tmp_path):
    """DPR_CHECKPOINT replaced by the query-side checkpoint: /admin/reload swaps the checkpoint alone
    (the very FAISS index, passage store and BM25 objects stay), /info and /search show the new query
    encoder; a checkpoint of another passage encoder is refused (409 naming both checkpoints and both
    passage encoders) and the query-side one keeps serving; a reload with nothing changed still
    loads (and verifies) everything."""
    serving = tmp_path / "serving"
    replace_dir(world / "built", serving)
    qside, other = load_checkpoint(world / "qside"), load_checkpoint(world / "other")
    settings = Settings(index=world / "index", checkpoint=serving, device="cpu", batch_max_wait_ms=1)
    with TestClient(create_app(settings)) as c:
        before = c.app.state.resources
        replace_dir(world / "qside", serving)
        r = c.post("/admin/reload")
        assert r.status_code == 200, r.text
        assert r.json()["swapped"] == "query encoder" and r.json()["checkpoint"] == qside.fingerprint
        now = c.app.state.resources
        assert now is not before and now.loaded.fingerprint == qside.fingerprint
        assert now.searcher.index is before.searcher.index and now.searcher.store is before.searcher.store
        assert now.searcher.bm25 is before.searcher.bm25 is not None
        assert c.get("/info").json()["checkpoint"]["fingerprint"] == qside.fingerprint
        got = c.post("/search", json={"query": QUERY, "top_k": 5}).json()["results"][0]
        assert [h["id"] for h in got] == expected_ids(world / "qside", world / "index")
        assert c.post("/search", json={"query": QUERY, "mode": "hybrid"}).status_code == 200

        replace_dir(world / "other", serving)
        r = c.post("/admin/reload")
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert "still serving the previous checkpoint" in detail
        built = load_checkpoint(world / "built").fingerprint
        shown = re.search(r"built with checkpoint ([0-9a-f]{12,}), not with the checkpoint in use \(([0-9a-f]{12,})\)", detail)
        assert shown and built.startswith(shown.group(1)) and other.fingerprint.startswith(shown.group(2)), detail
        assert re.search(r"its passage encoder [0-9a-f]{12,} is not the checkpoint's \([0-9a-f]{12,}\)", detail), detail
        assert c.app.state.resources is now
        assert c.get("/info").json()["checkpoint"]["fingerprint"] == qside.fingerprint

        replace_dir(world / "qside", serving)  # the serving checkpoint again: a plain reload re-reads everything
        r = c.post("/admin/reload")
        assert r.status_code == 200 and r.json()["swapped"] == "checkpoint and index", r.text
        assert c.app.state.resources.searcher.index is not before.searcher.index


def test_every_worker_swaps_the_query_encoder_by_itself_after_a_query_side_promotion(world, tmp_path):
    """`dpr serve --workers N`: a query-side promotion renames the same index, under a manifest naming
    the new checkpoint, into DPR_INDEX; a worker that got no reload call notices it at its next
    request and swaps the query encoder alone (its FAISS index object stays)."""
    import time

    from dpr_service.api.jobs.service import rebind_index

    shutil.copytree(world / "index", tmp_path / "index")
    qside = load_checkpoint(world / "qside").fingerprint
    with TestClient(create_app(Settings(index=tmp_path / "index", device="cpu", batch_max_wait_ms=1))) as b:
        before = b.app.state.resources
        rebind_index(tmp_path / "index", tmp_path / "index", world / "qside", "job1")
        deadline = time.monotonic() + 60
        while b.get("/info").json()["checkpoint"]["fingerprint"] != qside:
            assert time.monotonic() < deadline, "the worker still serves the old checkpoint"
            time.sleep(0.2)
        assert b.app.state.reloader.swapped == "query encoder"
        assert b.app.state.resources.searcher.index is before.searcher.index
        assert b.get("/info").json()["index"]["rebound"]["job"] == "job1"


def test_under_onnx_the_query_encoder_swap_brings_the_new_checkpoints_export(world, tmp_path):
    """DPR_RUNTIME=onnx: the swap makes (or reads from the cache) the new checkpoint's ONNX export and
    encodes queries with it: /encode equals the new query encoder's torch vectors to 1e-4; the index stays loaded."""
    pytest.importorskip("onnxruntime")
    import torch

    serving = tmp_path / "serving"
    replace_dir(world / "built", serving)
    settings = Settings(index=world / "index", checkpoint=serving, device="cpu", runtime="onnx",
                        onnx_cache=tmp_path / "cache", batch_max_wait_ms=1)
    with TestClient(create_app(settings)) as c:
        before, export = c.app.state.resources, c.get("/info").json()["runtime"]["export"]
        replace_dir(world / "qside", serving)
        r = c.post("/admin/reload")
        assert r.status_code == 200 and r.json()["swapped"] == "query encoder", r.text
        info = c.get("/info").json()
        assert info["runtime"]["runtime"] == "onnx" and info["runtime"]["export"] != export
        assert c.app.state.resources.searcher.index is before.searcher.index
        r = c.post("/encode", json={"texts": [QUERY], "kind": "query"})
        assert r.status_code == 200, r.text
        qside = load_checkpoint(world / "qside", CPU.device)
        want = encode_texts(qside.encoder, qside.tokenizer, [QUERY], "query", CPU)
        torch.testing.assert_close(torch.tensor(r.json()["embeddings"]), want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- the training service

ADMIN = "admin-s3cret"
H = {"X-Admin-Key": ADMIN}
QS_RUN = dict(kind="query_side", train="beir", dev="beir", batch_size=4, lr=1e-3, max_steps=3, eval_every=3,
              log_every=1, index_negatives=3)


def jobs_client(world: Path, tmp: Path, index: Path) -> TestClient:
    from dpr_service.api.jobs import JobSettings

    js = JobSettings(admin_key=ADMIN, jobs_dir=tmp / "state", data_root=world / "data", jobs_poll_s=0.1)
    return TestClient(create_app(Settings(index=index, device="cpu", batch_max_wait_ms=1), js))


def field_of(r) -> str:
    return r.json()["errors"][0]["field"]


def test_a_query_side_job_trains_against_the_served_index_and_is_promoted_by_a_reload(world, tmp_path):
    """kind query_side: dpr train --index with the served index and checkpoint; the record and the
    event stream say "reload, no index build"; promotion links the same index under a manifest naming
    the job's checkpoint and swaps the query encoder alone (the loaded FAISS index stays; no dpr index
    build runs); /search ranks as the core's Searcher with the new checkpoint; a restarted server
    serves the job's checkpoint from the manifest. Bad settings are 4xx naming the field."""
    from test_jobs import sse_events, wait_for

    shutil.copytree(world / "index", tmp_path / "index")
    with jobs_client(world, tmp_path, tmp_path / "index") as c:
        for body, field, status in [({**QS_RUN, "kind": "both"}, "kind", 422),
                                    ({"train": "beir", "index": "beir"}, "index", 422),
                                    ({**QS_RUN, "index": "beir"}, "index", 422),
                                    ({**QS_RUN, "index": "../index"}, "index", 422),
                                    ({**QS_RUN, "model": "other"}, "model", 422)]:
            r = c.post("/jobs", headers=H, json=body)
            assert (r.status_code, field_of(r)) == (status, field), (body, r.text)
        r = c.post("/jobs", headers=H, json={**QS_RUN, "model": "other"})
        assert re.search(r"built with checkpoint [0-9a-f]{12,}, not with the checkpoint in use \([0-9a-f]{12,}\)",
                         r.json()["detail"]), r.text

        before = c.app.state.resources
        r = c.post("/jobs", headers=H, json=QS_RUN)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job_dir = tmp_path / "state" / job_id
        import yaml
        config = yaml.safe_load((job_dir / "config.yaml").read_text())
        assert Path(config["index"]) == (tmp_path / "index").resolve() and Path(config["model"]) == world / "built"
        assert "kind" not in config
        with c.stream("GET", f"/jobs/{job_id}/events", headers=H) as stream:
            events = sse_events(stream.iter_lines())
        assert events[-1] == ("end", {"id": job_id, "state": "succeeded", "kind": "query_side",
                                      "promotion": "reload, no index build"}), events[-1]
        job = c.get(f"/jobs/{job_id}", headers=H).json()
        assert (job["kind"], job["index"], job["promotion"], job["step"]) == (
            "query_side", "the served index (DPR_INDEX)", "reload, no index build", 3)

        r = c.post(f"/jobs/{job_id}/promote", headers=H, json={"corpus": "beir"})
        assert (r.status_code, field_of(r)) == (422, "corpus"), r.text
        manifest_before = json.loads((tmp_path / "index" / "manifest.json").read_text())
        r = c.post(f"/jobs/{job_id}/promote", headers=H, json={})
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["kind"], out["corpus"], out["promotion"], out["swapped"], out["passages"]) == (
            "query_side", None, "reload, no index build", "query encoder", 24)
        assert not (job_dir / "promote.log").exists()  # no dpr index build ran
        best = job_dir / "run" / "best"
        now = c.app.state.resources
        assert now.loaded.path == best and now.searcher.index is before.searcher.index
        info = c.get("/info").json()
        new_fp = load_checkpoint(best).fingerprint
        assert info["checkpoint"]["fingerprint"] == new_fp and info["index"]["rebound"]["checkpoint_fingerprint"] == new_fp
        manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
        assert manifest["files"] == manifest_before["files"] and manifest["checkpoint"] == str(best.resolve())
        assert manifest["checkpoint_fingerprint"] == manifest_before["checkpoint_fingerprint"]
        got = c.post("/search", json={"query": QUERY, "top_k": 5}).json()["results"][0]
        assert [h["id"] for h in got] == expected_ids(best, tmp_path / "index")
        assert c.get(f"/jobs/{job_id}", headers=H).json()["promoted"] == "index"
        assert c.delete(f"/jobs/{job_id}", headers=H).status_code == 409  # its checkpoint serves
    with jobs_client(world, tmp_path, tmp_path / "index") as c:  # a restart serves the job's checkpoint
        assert c.get("/info").json()["checkpoint"]["fingerprint"] == new_fp


def test_a_promotion_a_killed_server_left_is_settled_by_the_rebound_time(world, tmp_path):
    """The runner's reconciliation of a promotion claim: a query-side promotion landed when the
    manifest names the job's checkpoint and was rebound after the claim (its ``rebound.at``; the
    index's ``created`` is older); one rebound before the claim did not."""
    import time

    from dpr_service.api.jobs.runner import promotion_landed
    from dpr_service.api.jobs.service import rebind_index

    shutil.copytree(world / "index", tmp_path / "index")
    rebind_index(tmp_path / "index", tmp_path / "index", world / "qside", "job1")
    claim = {"op": "promote", "kind": "query_side", "checkpoint": str(world / "qside"), "index": str(tmp_path / "index")}
    assert not promotion_landed({**claim, "at": time.time() + 5})  # rebound before this claim: not this promotion
    at = time.time()
    rebind_index(tmp_path / "index", tmp_path / "index", world / "qside", "job1")
    assert promotion_landed({**claim, "at": at})
    assert not promotion_landed({**claim, "checkpoint": str(world / "built"), "at": at})
    with pytest.raises(Exception, match=r"built with checkpoint [0-9a-f]{12,}, not with the checkpoint in use"):
        rebind_index(tmp_path / "index", tmp_path / "index", world / "other", "job2")  # nothing changed on disk
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["rebound"]["job"] == "job1"


def test_the_train_tab_offers_a_query_side_job_and_promotes_it_by_a_reload(world, tmp_path, monkeypatch, browser):
    """The Train tab: "query encoder only, against the served index (reload only)" submits a
    query_side job (the served checkpoint as its model), its row says so, and Promote sends no corpus:
    the header names the job's checkpoint after a reload with no index build."""
    import functools

    import httpx
    import test_web
    from selenium.webdriver.support.ui import Select

    from dpr_service.api.jobs import JobSettings

    js = JobSettings(admin_key=ADMIN, jobs_dir=tmp_path / "state", data_root=world / "data", jobs_poll_s=0.1)
    monkeypatch.setattr(test_web, "create_app", functools.partial(create_app, jobs_settings=js))
    shutil.copytree(world / "index", tmp_path / "index")
    with test_web.Server(Settings(index=tmp_path / "index", device="cpu", batch_max_wait_ms=1)) as server:
        driver, base, by_id = browser, server.base, test_web.by_id
        test_web.open_page(driver, base)
        by_id(driver, "tab-train").click()
        by_id(driver, "admin-key").send_keys(ADMIN)
        by_id(driver, "admin-save").click()
        test_web.wait_for(driver, lambda d: "beir" in d.execute_script(
            "return [...document.getElementById('train-data').options].map((o) => o.value)"), what="the data sets")
        kinds = driver.execute_script("return [...document.getElementById('train-kind').options].map((o) => o.text)")
        assert kinds == ["full fine-tune (rebuilds the index)", "query encoder only, against the served index (reload only)"]
        Select(by_id(driver, "train-kind")).select_by_value("query_side")
        assert by_id(driver, "train-model").find_elements("css selector", "option")[0].text == "the served checkpoint"
        Select(by_id(driver, "train-data")).select_by_value("beir")
        Select(by_id(driver, "train-dev")).select_by_value("beir")
        for field, value in (("train-max-steps", 3), ("train-batch-size", 4), ("train-eval-every", 3), ("train-log-every", 1)):
            test_web.type_into(driver, field, str(value))
        by_id(driver, "train-submit").click()
        test_web.wait_for(driver, lambda d: by_id(d, "chart").get_attribute("data-ended"), timeout=300, what="the job's end event")
        job_id = by_id(driver, "chart").get_attribute("data-job")
        job = httpx.get(f"{base}/jobs/{job_id}", headers=H).json()
        assert (job["state"], job["kind"], job["settings"]["kind"]) == ("succeeded", "query_side", "query_side")
        assert "model" not in job["settings"]  # the served checkpoint
        row = f"document.querySelector('tr[data-job=\"{job_id}\"]')"
        test_web.wait_for(driver, lambda d: d.execute_script(f"return ({row} || {{dataset: {{}}}}).dataset.kind") == "query_side",
                          what="the job row's kind")
        assert "query encoder only" in driver.execute_script(f"return {row}.innerText")
        driver.execute_script(f"{row}.querySelector('button.promote').click()")
        test_web.wait_for(driver, lambda d: job_id in by_id(d, "info-checkpoint").get_attribute("title"), timeout=120,
                          what="the promoted checkpoint in the header")
        assert "reload, no index build" in by_id(driver, "toast").text
        assert httpx.get(f"{base}/jobs/{job_id}", headers=H).json()["promoted"] == "index"
        assert not (tmp_path / "state" / job_id / "promote.log").exists()


def test_a_query_side_job_may_name_an_index_under_the_data_root(world, tmp_path):
    """index: a name under the data root; its model defaults to the checkpoint its manifest names only
    when that lies under the data root too (else 422 naming model); a model given is checked against it."""
    import yaml

    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    shutil.copytree(world / "index", data / "idx")  # its manifest names world/built: outside this data root
    shutil.copytree(world / "built", data / "built")
    from dpr_service.api.jobs import JobSettings

    js = JobSettings(admin_key=ADMIN, jobs_dir=tmp_path / "state", data_root=data, jobs_poll_s=0.1)
    with TestClient(create_app(Settings(index=None, device="cpu"), js)) as c:  # serves no index at all
        body = {**QS_RUN, "max_steps": 1}
        r = c.post("/jobs", headers=H, json=body)
        assert (r.status_code, field_of(r)) == (422, "index") and "DPR_INDEX" in r.json()["detail"], r.text
        r = c.post("/jobs", headers=H, json={**body, "index": "idx"})
        assert (r.status_code, field_of(r)) == (422, "model"), r.text
        r = c.post("/jobs", headers=H, json={**body, "index": "idx", "model": "other"})
        assert (r.status_code, field_of(r)) == (422, "model") and "passage encoder" in r.json()["detail"], r.text
        c.app.state.job_runner.stop()  # the job is only checked and queued here, not run
        r = c.post("/jobs", headers=H, json={**body, "index": "idx", "model": "built"})
        assert r.status_code == 201, r.text
        config = yaml.safe_load((tmp_path / "state" / r.json()["id"] / "config.yaml").read_text())
        assert (Path(config["index"]), Path(config["model"])) == ((data / "idx").resolve(), (data / "built").resolve())
        job = c.get(f"/jobs/{r.json()['id']}", headers=H).json()
        assert (job["kind"], job["index"], job["promotion"]) == ("query_side", "idx", "reload, no index build")
