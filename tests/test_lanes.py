"""One client must not stall the service (issue 30): lanes, cost-bounded requests, slow clients.

Each test holds one kind of the fix, and fails on the code before it:

* a full heavy lane (``/score``, large ``/encode``) refuses its own clients with 503 + Retry-After and
  never delays ``/search`` (before: every kind of work shared asyncio's default pool of 6 threads
  here, and seven ``/score`` calls made a 0.1 s ``/search`` wait 53 s);
* a request is bounded by its tokens (413 naming ``DPR_MAX_REQUEST_TOKENS``), and ``/score`` encodes
  in chunks of ``DPR_ENCODE_BATCH_SIZE`` with the loss unchanged (before: one pass over every text);
* the heavy lane admits by tokens in flight;
* a body that does not arrive within its deadline gets 408 and holds no admission slot (before: 256
  such sockets made every other request 503);
* ``/readyz`` and ``/info`` show no absolute path; ``/admin/reload`` without a key refuses a
  cross-site browser request.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import write_beir
from fastapi.testclient import TestClient

import dpr_service.api.routes.embeddings as embeddings_route
import dpr_service.api.routes.loss as loss_route
from dpr_service.api.app import create_app
from dpr_service.api.lanes import Lane, LaneFull, LaneSpec
from dpr_service.api.settings import Settings
from dpr_service.core.checkpoint import load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import Passage
from dpr_service.core.scoring import ScoreItem, plan_scores, score_items
from index.build import build

CPU = pick_runtime("cpu", "fp32")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("lanes")
    cfg = EncoderConfig(pooling="mean", similarity="dot", query_max_length=16, passage_max_length=32)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(root / "ckpt", encoder, tokenizer)
    build(root / "ckpt", write_beir(root / "beir", n=30), root / "index", factory="Flat", progress=False)
    return root


def client(artifact: Path, **overrides) -> TestClient:
    return TestClient(create_app(Settings(index=artifact / "index", device="cpu", **overrides)))


SCORE = {"items": [{"question": "what is the apple near the river", "positive": "the apple is near the river fact",
                    "negatives": ["the comet and the walnut story", "the zebra and the guitar story"]}]}


class Gate:
    """Makes a function block until :meth:`open` (and counts who is waiting)."""

    def __init__(self):
        self.event, self.entered = threading.Event(), threading.Semaphore(0)

    def wrap(self, fn):
        def blocked(*args, **kwargs):
            self.entered.release()
            assert self.event.wait(60), "the gate was never opened"
            return fn(*args, **kwargs)
        return blocked

    def open(self):
        self.event.set()


# ----------------------------------------------------------------------------- lanes


def test_a_full_heavy_lane_refuses_its_own_clients_and_never_delays_search(artifact, monkeypatch):
    """Eight /score requests block the heavy lane (one running, seven queued: more than the six
    threads asyncio's shared pool had here); a ninth gets 503 with Retry-After naming the heavy lane;
    /search and a small /encode still answer 200 at once; once released, all eight get 200."""
    gate = Gate()
    monkeypatch.setattr(loss_route, "score_plan", gate.wrap(loss_route.score_plan))
    with client(artifact, lane_heavy_threads=1, lane_heavy_queue=7) as c, ThreadPoolExecutor(8) as pool:
        held = [pool.submit(c.post, "/score", json=SCORE) for _ in range(8)]
        assert gate.entered.acquire(timeout=30)  # the first one is running (and blocked)
        deadline = time.monotonic() + 30
        while c.app.state.lanes["heavy"].pending < 8 and time.monotonic() < deadline:
            time.sleep(0.01)  # the seven others are tokenised and queued behind it
        refused = c.post("/score", json=SCORE)
        assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
        assert refused.json()["lane"] == "heavy" and "heavy lane" in refused.json()["detail"]
        t0 = time.perf_counter()
        r = c.post("/search", json={"query": "apple river", "top_k": 3})
        e = c.post("/encode", json={"texts": ["apple river"], "kind": "query"})
        search_s = time.perf_counter() - t0
        assert r.status_code == 200 and e.status_code == 200, (r.text, e.text)
        assert search_s < 5, f"/search and /encode took {search_s:.1f} s beside a full heavy lane"
        assert not any(f.done() for f in held)
        scraped = c.get("/metrics").text
        assert 'dpr_lane_pending{lane="heavy"} 8.0' in scraped and 'dpr_lane_pending{lane="interactive"} 0.0' in scraped
        gate.open()
        assert [f.result(timeout=60).status_code for f in held] == [200] * 8


def test_large_encode_goes_to_the_heavy_lane_small_encode_stays_interactive(artifact, monkeypatch):
    """/encode of a few tokens runs in the interactive lane; one over DPR_INTERACTIVE_MAX_TOKENS in the
    heavy lane (so a full heavy lane refuses it, 503, and not the small one)."""
    gate = Gate()
    monkeypatch.setattr(loss_route, "score_plan", gate.wrap(loss_route.score_plan))
    big = {"texts": ["the apple is near the river fact " * 4] * 8, "kind": "passage"}
    with client(artifact, lane_heavy_threads=1, lane_heavy_queue=0, interactive_max_tokens=40) as c, \
            ThreadPoolExecutor(1) as pool:
        assert c.post("/encode", json=big).status_code == 200  # heavy, but the lane is free
        held = pool.submit(c.post, "/score", json=SCORE)
        assert gate.entered.acquire(timeout=30)
        r = c.post("/encode", json=big)
        assert r.status_code == 503 and r.json()["lane"] == "heavy", r.text
        r = c.post("/v1/embeddings", json={"model": "m", "input": big["texts"]})
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert c.post("/encode", json={"texts": ["apple"], "kind": "query"}).status_code == 200
        gate.open()
        assert held.result(timeout=60).status_code == 200


def test_the_heavy_lane_admits_by_tokens_in_flight():
    """Admission counts tokens queued and running, not requests; a lone request larger than the
    budget is still admitted when nothing else is in flight (the per-request limit bounds it)."""
    lane = Lane("heavy", LaneSpec(threads=1, queue=10, max_cost=100))
    gate = threading.Event()

    async def scenario():
        first = asyncio.ensure_future(lane.run(gate.wait, 30, cost=60))
        await asyncio.sleep(0.05)
        with pytest.raises(LaneFull, match="60 tokens"):
            await lane.run(lambda: None, cost=50)
        second = asyncio.ensure_future(lane.run(lambda: "ok", cost=40))
        await asyncio.sleep(0.05)
        assert lane.cost == 100 and lane.pending == 2
        gate.set()
        assert await first and await second == "ok"
        assert lane.cost == 0 and lane.pending == 0
        assert await lane.run(lambda: "alone", cost=500) == "alone"

    asyncio.run(scenario())
    lane.shutdown()


def test_a_cancelled_request_holds_its_tokens_until_its_thread_is_done():
    """A client that goes away does not free the lane while its work still runs on a thread."""
    lane = Lane("heavy", LaneSpec(threads=1, queue=0, max_cost=100))
    gate = threading.Event()

    async def scenario():
        task = asyncio.ensure_future(lane.run(gate.wait, 30, cost=80))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert lane.pending == 1 and lane.cost == 80
        with pytest.raises(LaneFull):
            await lane.run(lambda: None, cost=30)
        gate.set()
        for _ in range(100):
            if lane.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert lane.cost == 0 and await lane.run(lambda: 1, cost=30) == 1

    asyncio.run(scenario())
    lane.shutdown()


# ----------------------------------------------------------------------------- cost, not count


def test_requests_over_the_token_budget_get_413_naming_the_limit(artifact):
    """/score, /encode and /v1/embeddings count tokens after truncation; over DPR_MAX_REQUEST_TOKENS
    is 413 naming the field and the limit (OpenAI's shape on /v1), under it 200."""
    many = {"items": [{**SCORE["items"][0], "negatives": ["the comet and the walnut story"] * 20}]}
    with client(artifact, max_request_tokens=60) as c:
        assert c.post("/score", json=SCORE).status_code == 200
        r = c.post("/score", json=many)
        assert r.status_code == 413, r.text
        assert r.json()["errors"][0]["field"] == "items" and "at most 60" in r.json()["detail"]
        assert "DPR_MAX_REQUEST_TOKENS" in r.json()["detail"]
        texts = ["the apple is near the river fact"] * 12
        r = c.post("/encode", json={"texts": texts, "kind": "passage"})
        assert r.status_code == 413 and r.json()["errors"][0]["field"] == "texts", r.text
        r = c.post("/v1/embeddings", json={"model": "m", "input": texts})
        assert r.status_code == 413 and r.json()["error"]["param"] == "input", r.text
        assert c.post("/encode", json={"texts": texts[:2], "kind": "passage"}).status_code == 200


def test_score_encodes_in_chunks_and_gives_the_unchunked_loss(artifact, monkeypatch):
    """score_items with encode_batch_size k never encodes more than k texts at once, and its losses
    and probabilities equal one pass over the whole request (the trainer's batch)."""
    loaded = load_checkpoint(artifact / "ckpt")
    items = [ScoreItem(f"what is the {a} near the river", Passage(f"the {a} is near the river fact"),
                       [Passage(f"the {b} and the comet story") for b in ("zebra", "walnut", "guitar")])
             for a in ("apple", "falcon", "copper", "meadow", "lantern")]
    whole = score_items(loaded, CPU, items, in_batch=True, encode_batch_size=None)
    rows = []
    for name in ("encode_queries", "encode_passages"):
        original = getattr(loaded.encoder, name)

        def spy(*args, _original=original, **kwargs):
            rows.append(kwargs["input_ids"].shape[0])
            return _original(*args, **kwargs)
        monkeypatch.setattr(loaded.encoder, name, spy)
    chunked = score_items(loaded, CPU, items, in_batch=True, encode_batch_size=3)
    assert max(rows) <= 3 and sum(rows) == len(items) * 5, rows
    for a, b in zip(whole, chunked):
        assert a.loss == pytest.approx(b.loss, abs=1e-5) and a.rank == b.rank
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
    plan = plan_scores(loaded, items, in_batch=True)
    assert plan.tokens == int(plan.batch.queries["attention_mask"].sum() + plan.batch.passages["attention_mask"].sum())


# ----------------------------------------------------------------------------- slow clients


class LiveServer:
    """uvicorn serving ``app`` on a free port, in a thread, with the options `dpr serve` uses."""

    def __init__(self, app, settings: Settings):
        import uvicorn

        from dpr_service.api.serve import uvicorn_options

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **uvicorn_options(settings)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("the server never became ready")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def test_slow_bodies_hold_no_admission_slot_and_get_408(artifact):
    """Sockets that send headers promising 1,000 bytes, then 11 bytes, then nothing, hold no slot
    (DPR_MAX_IN_FLIGHT is 4 here, and 16 such sockets are open): other clients get 200 meanwhile;
    each slow socket gets 408 once its deadline (DPR_BODY_TIMEOUT_S plus its size at the minimum
    rate) passes, and its connection is closed."""
    import httpx

    settings = Settings(index=artifact / "index", device="cpu", max_in_flight=4, body_timeout_s=1.5,
                        body_min_bytes_per_s=10_000)
    with LiveServer(create_app(settings), settings) as live:
        slow = []
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", live.port), timeout=10)
            s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b'{"query": "a')
            slow.append(s)
        t0 = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{live.port}", timeout=10) as h:
            statuses = [h.post("/search", json={"query": "apple river", "top_k": 3}).status_code for _ in range(10)]
        assert statuses == [200] * 10, statuses
        assert time.monotonic() - t0 < 1.5, "the other clients waited for the slow ones"
        answers = []
        for s in slow:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            answers.append(data)  # recv returned b"": the server closed the connection
            s.close()
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0][:200]
        assert b"DPR_BODY_TIMEOUT_S" in answers[0]
        elapsed = time.monotonic() - t0
        assert elapsed < 1.5 + 1000 / 10_000 + 5, elapsed


def test_a_streamed_upload_that_stalls_gets_408(artifact, tmp_path):
    """The data set upload streams its body to disk: a part that does not come within
    DPR_BODY_TIMEOUT_S is 408, and the server keeps answering."""
    import httpx

    from dpr_service.api.jobs.settings import JobSettings

    settings = Settings(index=artifact / "index", device="cpu", body_timeout_s=1.0)
    js = JobSettings(admin_key="admin-key-0123456789", jobs_dir=tmp_path / "jobs", data_root=tmp_path / "data")
    with LiveServer(create_app(settings, js), settings) as live:
        s = socket.create_connection(("127.0.0.1", live.port), timeout=15)
        s.sendall(b"POST /datasets?name=slow HTTP/1.1\r\nHost: x\r\nX-Admin-Key: admin-key-0123456789\r\n"
                  b"Content-Type: application/zip\r\nContent-Length: 100000\r\n\r\n" + b"PK\x03\x04" + b"\0" * 100)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                break
        s.close()
        assert data.startswith(b"HTTP/1.1 408"), data[:300]
        assert httpx.get(f"http://127.0.0.1:{live.port}/readyz").status_code == 200


# ----------------------------------------------------------------------------- what admin routes show


def test_readyz_and_info_show_no_absolute_path(artifact, tmp_path):
    """/readyz (open even with a key) says why it is not ready without the server's directories;
    /info names the checkpoint and index by their directory names."""
    missing = tmp_path / "deep" / "secret-place" / "index"
    with TestClient(create_app(Settings(index=missing, checkpoint=artifact / "ckpt", device="cpu"))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and str(tmp_path) not in r.text and "index" in r.json()["reason"], r.text
    with client(artifact) as c:
        info = c.get("/info").json()
        assert str(artifact) not in json.dumps(info), info
        assert info["checkpoint"]["path"] == f"{artifact.parent.name}/{artifact.name}/ckpt" and info["index"]["path"] == "index"
        assert info["runtime"] == {"runtime": "torch"}


def test_reload_without_a_key_refuses_a_cross_site_browser_request(artifact):
    """With no API key, a page on another site must not be able to make a visitor's browser reload
    the server (a form POST needs no CORS preflight): a cross-site Origin or Sec-Fetch-Site is 403;
    curl (no Origin) and the server's own page (same origin) still reload."""
    with client(artifact) as c:
        r = c.post("/admin/reload", headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
        assert r.status_code == 403 and "cross-site" in r.json()["detail"], r.text
        r = c.post("/admin/reload", headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403, r.text
        assert c.post("/admin/reload").status_code == 200
        assert c.post("/admin/reload", headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}).status_code == 200


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux's")
def test_heavy_lane_threads_run_at_a_lower_cpu_priority():
    """A heavy lane's threads run at DPR_LANE_NICE more than the server's own (Linux nice values are
    per thread, and the OpenMP threads torch starts from one inherit it); interactive ones do not."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    heavy = Lane("heavy", LaneSpec(threads=1, queue=0, nice=5))
    interactive = Lane("interactive", LaneSpec(threads=1, queue=0))

    def nice_here() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def scenario():
        return await heavy.run(nice_here), await interactive.run(nice_here)

    got_heavy, got_interactive = asyncio.run(scenario())
    assert got_heavy == min(base + 5, 19) and got_interactive == base
    heavy.shutdown()
    interactive.shutdown()


def test_a_large_upload_is_checked_in_a_child_process(artifact, tmp_path):
    """An upload of at least DPR_UPLOAD_CHILD_BYTES is checked in the admin lane's child process (a
    50 MB check in a server thread holds the GIL that /search needs): a good file is stored, a bad
    line is still 422 naming the file and the line (the refusal crosses the process boundary)."""
    from dpr_service.api.jobs.settings import JobSettings

    js = JobSettings(admin_key="admin-key-0123456789", jobs_dir=tmp_path / "jobs", data_root=tmp_path / "data")
    good = b"".join(json.dumps({"query": f"q{i}", "positive": {"title": "", "text": f"passage {i}", "id": f"p{i}"}}).encode()
                    + b"\n" for i in range(50))
    app = create_app(Settings(index=artifact / "index", device="cpu", upload_child_bytes=1), js)
    headers = {"X-Admin-Key": "admin-key-0123456789"}
    with TestClient(app) as c:
        r = c.post("/datasets?name=good", content=good, headers=headers)
        assert r.status_code == 201, r.text
        assert c.app.state.lanes._processes is not None  # the check ran in the child
        r = c.post("/datasets?name=bad", content=good + b'{"query": "q", "positive": 3}\n', headers=headers)
        assert r.status_code == 422 and "bad.jsonl:51" in r.json()["detail"], r.text
    assert (tmp_path / "data" / "good.jsonl").is_file() and not (tmp_path / "data" / "bad.jsonl").exists()
    # the child process ended with the app (one was left running after a server stopped)
    children = [d for d in Path("/proc").iterdir() if d.name.isdigit() and _parent(d) == os.getpid()
                and b"spawn_main" in _cmdline(d)]
    assert children == [], children


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_server_leaves_no_check_process():
    """The admin lane's child processes die with the server, even a SIGKILLed one (two were found
    still running after the benchmark's servers had gone)."""
    script = ("import os, time\nfrom dpr_service.api.lanes import Lanes\nfrom dpr_service.api.settings import Settings\n"
              "print(Lanes(Settings()).processes().submit(os.getpid).result(), flush=True)\ntime.sleep(600)\n")
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(server.stdout.readline())
    server.kill()
    server.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), f"the check process {child} outlived its server"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
