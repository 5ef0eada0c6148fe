"""Adaptive query batching (dpr_service/api/batching.py) and the per-stage timings of /search.

The batcher's other guarantees have their tests where they were written: drain on reload and no
future left unresolved (test_api.py: test_a_reload_answers_every_search_in_flight,
test_a_stopped_batcher_answers_what_it_holds_and_refuses_more), per-text error isolation
(test_reliability.py: test_a_bad_text_in_a_batch_fails_only_its_own_request), 503 with Retry-After
(test_api.py: test_full_queue_gets_503_with_retry_after).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_api import artifact  # noqa: F401  (the module-scoped fixture: a tiny checkpoint and its index)

from dpr_service.api.app import create_app
from dpr_service.api.batching import Overloaded, QueryBatcher, stage_seconds
from dpr_service.api.metrics import STAGES
from dpr_service.api.settings import Settings

HOUR_MS = 3_600_000


def vector(text: str) -> np.ndarray:
    """A fixed (4,) float32 vector per text: the oracle each batched row must equal."""
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], dtype=np.float32).copy()


class GatedEncoder:
    """encode(texts) -> (N, 4): records each call's texts; while ``gate`` is clear, a call blocks
    (in its worker thread) until it is set, so that a test holds the encoder busy."""

    def __init__(self, hold_s: float = 0.0):
        self.calls: list[list[str]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.hold_s = hold_s

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        self.started.set()
        assert self.gate.wait(30), "the test never opened the gate"
        time.sleep(self.hold_s)
        return np.stack([vector(t) for t in texts])


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_a_lone_query_is_encoded_at_once_whatever_the_window():
    """Regression (issue 19): with a batching window of an hour, single queries one after another
    are each answered at once (the old batcher held each for the whole window)."""
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.stack([vector(t) for t in texts])

    async def main():
        b = QueryBatcher(encode, max_size=64, max_wait_ms=HOUR_MS, queue_max=64)
        b.start()
        out = [await asyncio.wait_for(b.submit([f"q{i}"]), 10) for i in range(3)]
        await b.stop()
        return out

    out = asyncio.run(main())
    assert calls == [["q0"], ["q1"], ["q2"]]
    for i, emb in enumerate(out):
        np.testing.assert_array_equal(emb, vector(f"q{i}")[None])


def test_a_busy_encoder_gathers_the_next_batch_up_to_max_size():
    """The first text is dispatched alone at once; the texts that arrive while it encodes are the
    next batches (at most max_size each, in arrival order), each row the encoding of its own text."""
    enc = GatedEncoder()

    async def main():
        b = QueryBatcher(enc, max_size=3, max_wait_ms=HOUR_MS, queue_max=64)
        b.start()
        first = asyncio.create_task(b.submit(["a"]))
        await wait_until(enc.started.is_set)
        later = [asyncio.create_task(b.submit(texts)) for texts in (["b"], ["c", "d"], ["e"], ["f"])]
        await wait_until(lambda: b.depth == 5)
        assert enc.calls == [["a"]]  # nothing else dispatched while the encoder is busy
        enc.gate.set()
        out = await asyncio.wait_for(asyncio.gather(first, *later), 10)
        await b.stop()
        return out

    out = asyncio.run(main())
    assert enc.calls == [["a"], ["b", "c", "d"], ["e", "f"]]
    for emb, texts in zip(out, (["a"], ["b"], ["c", "d"], ["e"], ["f"])):
        np.testing.assert_array_equal(emb, np.stack([vector(t) for t in texts]))


def test_the_queue_bound_holds_while_the_encoder_is_busy():
    """queue_max counts the texts waiting (not the batch being encoded): one more is Overloaded."""
    enc = GatedEncoder()

    async def main():
        b = QueryBatcher(enc, max_size=8, max_wait_ms=0, queue_max=2)
        b.start()
        first = asyncio.create_task(b.submit(["a"]))
        await wait_until(enc.started.is_set)
        queued = asyncio.create_task(b.submit(["b", "c"]))
        await wait_until(lambda: b.depth == 2)
        with pytest.raises(Overloaded):
            await b.submit(["d"])
        enc.gate.set()
        out = await asyncio.wait_for(asyncio.gather(first, queued), 10)
        await b.stop()
        return out

    a, bc = asyncio.run(main())
    assert a.shape == (1, 4) and bc.shape == (2, 4)


def test_submit_records_its_queue_wait_and_encoding_seconds():
    """stage_seconds, when set by the caller: "encode" is the encode call of the text's batch (here
    held >= 0.2 s), "queue_wait" the time until it started (a text queued behind a batch held open
    for >= 0.3 s waited at least that long; the first, dispatched at once, far less)."""
    enc = GatedEncoder(hold_s=0.2)
    b = QueryBatcher(enc, max_size=8, max_wait_ms=0, queue_max=8)

    async def timed_submit(text: str) -> dict:
        seconds = {}
        stage_seconds.set(seconds)  # this task's own context
        await b.submit([text])
        return seconds

    async def main():
        b.start()
        first = asyncio.create_task(timed_submit("a"))
        await wait_until(enc.started.is_set)
        second = asyncio.create_task(timed_submit("b"))
        await asyncio.sleep(0.3)
        enc.gate.set()
        out = await asyncio.wait_for(asyncio.gather(first, second), 10)
        await b.stop()
        assert stage_seconds.get() is None  # the tasks' records did not leak into this context
        return out

    first, second = asyncio.run(main())
    assert set(first) == set(second) == {"queue_wait", "encode"}
    assert first["encode"] >= 0.2 + 0.3 and second["encode"] >= 0.2  # the first one's call also waited at the gate
    assert second["queue_wait"] >= 0.3 + 0.2 and first["queue_wait"] < 0.3


def stage_counts(text: str) -> dict[str, tuple[int, float]]:
    """stage -> (count, sum of seconds) of dpr_search_stage_seconds in a /metrics exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "dpr_search_stage_seconds":
            for s in family.samples:
                if s.name.endswith("_count"):
                    out.setdefault(s.labels["stage"], [0, 0.0])[0] = int(s.value)
                elif s.name.endswith("_sum"):
                    out.setdefault(s.labels["stage"], [0, 0.0])[1] = s.value
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize("batching", [True, False])
def test_search_stages_are_in_metrics(artifact, batching):  # noqa: F811
    """Each answered /search adds one observation to each stage it went through (dense: queue
    wait, encoding, FAISS search, lookup; bm25 without texts: search only); their sum is at most
    the request's own latency; a lone search with an hour-long window answers at once."""
    app = create_app(Settings(index=artifact / "index", device="cpu", batching=batching, batch_max_wait_ms=HOUR_MS))

    async def main():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as h:
            r = await asyncio.wait_for(h.post("/search", json={"query": "apple river", "top_k": 3, "with_text": True}), 10)
            assert r.status_code == 200, r.text
            after_dense = stage_counts((await h.get("/metrics")).text)
            r = await h.post("/search", json={"query": "apple river", "mode": "bm25", "top_k": 3, "with_text": False})
            assert r.status_code == 200, r.text
            text = (await h.get("/metrics")).text
            latency = next(s.value for f in text_string_to_metric_families(text) if f.name == "dpr_request_seconds"
                           for s in f.samples if s.name.endswith("_sum") and s.labels["route"] == "/search")
            return after_dense, stage_counts(text), latency

    after_dense, after_bm25, latency = asyncio.run(main())
    assert set(after_dense) <= set(STAGES)
    assert {k: c for k, (c, _) in after_dense.items() if c} == dict.fromkeys(STAGES, 1)
    assert {k: c for k, (c, _) in after_bm25.items() if c} == {"queue_wait": 1, "encode": 1, "search": 2, "lookup": 1}
    assert 0 < sum(s for _, s in after_bm25.values()) <= latency


def test_the_load_benchmark_breakdown_reads_the_servers_histograms(artifact):  # noqa: F811
    """benchmarks/load.py's per-stage means between two scrapes equal what the app's own registry
    holds (prometheus_client's get_sample_value) for the requests in between."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import load

    app = create_app(Settings(index=artifact / "index", device="cpu"))

    async def main():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as h:
            await h.post("/search", json={"query": "warm"})
            reg = app.state.metrics.registry
            value = lambda name, **labels: reg.get_sample_value(name, labels) or 0.0  # noqa: E731
            first = {st: (value("dpr_search_stage_seconds_sum", stage=st), value("dpr_search_stage_seconds_count", stage=st))
                     for st in STAGES}
            before = load.histogram_totals((await h.get("/metrics")).text)
            await asyncio.gather(*(h.post("/search", json={"queries": [f"apple {i}", "river"]}) for i in range(4)))
            after = load.histogram_totals((await h.get("/metrics")).text)
            last = {st: (value("dpr_search_stage_seconds_sum", stage=st), value("dpr_search_stage_seconds_count", stage=st))
                    for st in STAGES}
            return load.breakdown(before, after), first, last

    got, first, last = asyncio.run(main())
    for st in STAGES:
        assert last[st][1] - first[st][1] == 4
        assert got[f"{st}_ms"] == pytest.approx((last[st][0] - first[st][0]) / 4 * 1000)
    assert 1 <= got["mean_batch"] <= 8  # 8 queries in 4 requests, 1 to 8 a batch
