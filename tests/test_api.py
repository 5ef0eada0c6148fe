"""The service: each endpoint against the core as oracle, /score against the trainer's evaluation
loss, every limit, auth on every route, overload, hot reload, and a real uvicorn process."""

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import write_beir
from fastapi.testclient import TestClient

import dpr_service.api.resources as resources_module
from dpr_service.api.app import OPEN_ROUTES, app_routes, create_app
from dpr_service.api.deps import current_resources
from dpr_service.api.batching import QueryBatcher, Stopped
from dpr_service.api.guard import Guard
from dpr_service.api.settings import Settings
from dpr_service.core.checkpoint import load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import Passage, read_corpus, read_train_data
from dpr_service.core.inference import encode_texts
from dpr_service.core.loss import candidate_log_probs
from index.build import add, build
from dpr_service.core.artifact import store_served_fusion
from dpr_service.core.bm25 import BM25
from dpr_service.core.hybrid import Retriever, artifact_bm25
from dpr_service.core.metrics import trec_order
from dpr_service.core.search import Searcher
from trainer.evaluate import dev_nll

CPU = pick_runtime("cpu", "fp32")
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("api")
    cfg = EncoderConfig(pooling="mean", similarity="dot", query_max_length=16, passage_max_length=32)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(root / "ckpt", encoder, tokenizer)
    beir = write_beir(root / "beir", n=30)
    build(root / "ckpt", beir, root / "index", factory="Flat", progress=False)
    return root


def client(artifact, **overrides) -> TestClient:
    settings = Settings(index=artifact / "index", device="cpu", batch_max_wait_ms=1, **overrides)
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def api(artifact):
    with client(artifact) as c:
        yield c


def test_search_equals_the_searcher(api, artifact):
    queries = ["what is the apple near the river", "comet walnut"]
    r = api.post("/search", json={"queries": queries, "top_k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    loaded = load_checkpoint(artifact / "ckpt")
    expected = Searcher(artifact / "index").search(encode_texts(loaded.encoder, loaded.tokenizer, queries, "query", CPU).numpy(), 5)
    assert [[h["id"] for h in hs] for hs in body["results"]] == [[h.id for h in hs] for hs in expected]
    for got, exp in zip(body["results"], expected):
        assert [h["score"] for h in got] == pytest.approx([h.score for h in exp], abs=1e-4)
    corpus = {p.id: p for p in read_corpus(artifact / "beir")}
    first = body["results"][0][0]
    assert first["text"] == corpus[first["id"]].text and first["title"] == corpus[first["id"]].title
    single = api.post("/search", json={"query": queries[1], "top_k": 5, "with_text": False}).json()
    assert single["results"][0] == [{"id": h["id"], "score": pytest.approx(h["score"], abs=1e-4), "title": None, "text": None}
                                    for h in body["results"][1]]


# ----------------------------------------------------------------------------- modes: dense, bm25, hybrid

QUERIES = ["what is the apple near the river", "comet walnut", "zebra guitar story"]


def core_ranking(artifact, index: Path, mode: str, k: int, fusion: str = "rrf", alpha: float | None = None) -> list:
    """The core's Retriever on ``index`` (what dpr eval --mode runs): per query [(id, score)]."""
    loaded = load_checkpoint(artifact / "ckpt")
    searcher = Searcher(index, loaded.fingerprint, bm25=True)
    q_emb = encode_texts(loaded.encoder, loaded.tokenizer, QUERIES, "query", CPU).numpy()  # (Q, D)
    return Retriever(searcher, artifact_bm25(searcher)).rank(mode, q_emb, QUERIES, k, fusion, alpha)


def assert_same_ranking(results: list, expected: list) -> None:
    assert [[h["id"] for h in hs] for hs in results] == [[pid for pid, _ in hs] for hs in expected]
    for got, exp in zip(results, expected):
        assert [h["score"] for h in got] == pytest.approx([score for _, score in exp], abs=1e-6)


@pytest.mark.parametrize("request_fusion, fusion, alpha", [
    ({}, "rrf", None),  # nothing stored in the index: RRF
    ({"fusion": "rrf"}, "rrf", None),
    ({"fusion": "convex", "alpha": 0.3}, "convex", 0.3),
    ({"alpha": 0.8}, "convex", 0.8),  # alpha alone: the convex fusion
    ({"alpha": 0}, "convex", 0.0),
    ({"alpha": 1}, "convex", 1.0),
])
def test_hybrid_search_equals_the_retriever_of_dpr_eval(api, artifact, request_fusion, fusion, alpha):
    r = api.post("/search", json={"queries": QUERIES, "top_k": 7, "mode": "hybrid", **request_fusion})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert_same_ranking(results, core_ranking(artifact, artifact / "index", "hybrid", 7, fusion, alpha))
    corpus = {p.id: p for p in read_corpus(artifact / "beir")}
    assert all(h["text"] == corpus[h["id"]].text and h["title"] == corpus[h["id"]].title for hs in results for h in hs)


def test_bm25_search_equals_bm25_of_the_corpus(api, artifact):
    r = api.post("/search", json={"queries": QUERIES, "top_k": 10, "mode": "bm25", "with_text": False})
    assert r.status_code == 200, r.text
    expected = BM25(read_corpus(artifact / "beir")).search(QUERIES, 10)
    for got, exp in zip(r.json()["results"], expected):
        assert [h["id"] for h in got] == [pid for pid, _ in trec_order(exp)]  # equal scores: by id, as every mode
        assert [h["score"] for h in got] == pytest.approx([score for _, score in exp], rel=1e-6)
        assert all(h["text"] is None and h["title"] is None for h in got)
    assert r.json()["results"][2][0]["id"] == core_ranking(artifact, artifact / "index", "bm25", 1)[2][0][0]


@pytest.fixture(scope="module")
def dense_only(artifact):
    """The same checkpoint and corpus, built with --no-bm25."""
    return build(artifact / "ckpt", artifact / "beir", artifact / "index-dense-only", factory="Flat", progress=False, bm25=False)


def test_an_index_built_without_bm25_serves_dense_and_answers_409_for_bm25_and_hybrid(artifact, dense_only):
    settings = Settings(index=dense_only, device="cpu", batch_max_wait_ms=1)
    with TestClient(create_app(settings)) as c:
        assert c.get("/info").json()["search"] == {"modes": ["dense"], "hybrid": {"fusion": "rrf", "alpha": None}}
        assert len(c.post("/search", json={"query": "apple river", "top_k": 3}).json()["results"][0]) == 3
        for mode in ("bm25", "hybrid"):
            r = c.post("/search", json={"query": "apple river", "mode": mode})
            assert r.status_code == 409, r.text
            assert r.json()["errors"][0]["field"] == "mode"
            assert r.json()["detail"].startswith(f"mode: '{mode}' needs a BM25 index") and "--no-bm25" in r.json()["detail"]
        r = c.post("/search", json={"query": "apple river", "mode": "hybrid", "fusion": "convex"})  # invalid first: 422
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "alpha"
        assert "409" in c.get("/openapi.json").json()["paths"]["/search"]["post"]["responses"]


def test_a_stored_fusion_is_served_by_default_and_a_request_overrides_it(artifact, tmp_path):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(artifact / "index", index)
    with TestClient(create_app(Settings(index=index, device="cpu", batch_max_wait_ms=1))) as c:
        hybrid = {"queries": QUERIES, "top_k": 6, "mode": "hybrid"}
        assert c.get("/info").json()["search"] == {"modes": ["dense", "bm25", "hybrid"], "hybrid": {"fusion": "rrf", "alpha": None}}
        store_served_fusion(index, "convex", 0.25)  # as dpr eval --tune-split S --store-alpha does
        assert c.post("/admin/reload").status_code == 200  # (every worker also notices it by itself)
        assert c.get("/info").json()["search"]["hybrid"] == {"fusion": "convex", "alpha": 0.25}
        assert c.get("/info").json()["index"]["hybrid"] == {"fusion": "convex", "alpha": 0.25}
        assert_same_ranking(c.post("/search", json=hybrid).json()["results"],
                            core_ranking(artifact, index, "hybrid", 6, "convex", 0.25))
        for override, fusion, alpha in (({"fusion": "rrf"}, "rrf", None), ({"alpha": 0.9}, "convex", 0.9),
                                        ({"fusion": "convex", "alpha": 0.0}, "convex", 0.0)):
            assert_same_ranking(c.post("/search", json={**hybrid, **override}).json()["results"],
                                core_ranking(artifact, index, "hybrid", 6, fusion, alpha))


def test_a_changed_bm25_file_is_refused_at_load_and_on_reload(artifact, tmp_path):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(artifact / "index", index)
    vocab = index / "bm25" / "vocab.index.json"
    original = vocab.read_bytes()
    vocab.write_bytes(original.replace(b'"', b"'", 1) if b'"' in original else original + b" ")
    with TestClient(create_app(Settings(index=index, device="cpu"))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "bm25/vocab.index.json: checksum does not match" in r.json()["reason"]
        vocab.write_bytes(original)
        assert c.post("/admin/reload").status_code == 200
        assert c.post("/search", json={"query": "apple", "mode": "bm25"}).status_code == 200
        (index / "bm25" / "ids.json").write_text("[]")
        r = c.post("/admin/reload")
        assert r.status_code == 409 and "bm25/ids.json: checksum does not match" in r.json()["detail"]
        assert c.post("/search", json={"query": "apple", "mode": "hybrid"}).status_code == 200  # the old one still serves


def test_score_equals_the_trainers_evaluation_loss(api, artifact, tmp_path):
    """/score with in_batch=true is the trainer's dev loss on the same batch, to 1e-5 in fp32."""
    items = [
        {"question": "what is the apple near the river", "positive": {"title": "apple", "text": "the apple is near the river fact"},
         "negatives": [{"title": "comet", "text": "the comet and the walnut story"}, "a lantern in winter"]},
        {"question": "what is the zebra near the guitar", "positive": "the zebra is near the guitar fact",
         "negatives": ["the comet and the walnut story", "the helmet and the island story"]},
        # the same passage as item 2's positive: a duplicate the loss must mask, in both paths
        {"question": "which falcon is near the meadow", "positive": "the falcon is near the meadow",
         "negatives": ["the zebra is near the guitar fact", "the candle of the castle"]},
    ]
    path = tmp_path / "batch.jsonl"
    with open(path, "w") as fh:
        for it in items:
            fh.write(json.dumps({"query": it["question"], "positive": it["positive"], "negatives": it["negatives"]}) + "\n")
    loaded = load_checkpoint(artifact / "ckpt")
    data = read_train_data(path)
    # the trainer's evaluation batch: file order, the first H = 2 hard negatives (every item has exactly 2)
    expected = dev_nll(loaded.encoder, loaded.tokenizer, data, CPU, batch_size=3, hard_negatives=2)
    r = api.post("/score", json={"items": items, "in_batch": True})
    assert r.status_code == 200, r.text
    assert r.json()["mean_loss"] == pytest.approx(expected, abs=1e-5)


def test_score_per_item_by_hand(api, artifact):
    q = "what is the apple near the river"
    pos, negs = Passage("the apple is near the river fact", "apple"), [Passage("the comet story"), Passage("a walnut")]
    r = api.post("/score", json={"items": [{"question": q, "positive": {"title": pos.title, "text": pos.text},
                                            "negatives": [n.text for n in negs]}]}).json()
    loaded = load_checkpoint(artifact / "ckpt")
    q_emb = encode_texts(loaded.encoder, loaded.tokenizer, [q], "query", CPU)
    p_emb = encode_texts(loaded.encoder, loaded.tokenizer, [pos, *negs], "passage", CPU)
    s = (q_emb @ p_emb.T)[0]
    probs = torch.softmax(s, 0)
    res = r["results"][0]
    assert res["probabilities"] == pytest.approx(probs.tolist(), abs=1e-5)
    assert res["loss"] == pytest.approx(float(-torch.log(probs[0])), abs=1e-5)
    assert res["rank"] == 1 + int((s[1:] > s[0]).sum())
    # and the loss function says the same
    lp = candidate_log_probs(q_emb, p_emb, torch.tensor([0]))
    assert res["loss"] == pytest.approx(float(-lp[0, 0]), abs=1e-5)


def test_encode_equals_the_core(api, artifact):
    loaded = load_checkpoint(artifact / "ckpt")
    r = api.post("/encode", json={"texts": ["apple river"], "kind": "query"}).json()
    expected = encode_texts(loaded.encoder, loaded.tokenizer, ["apple river"], "query", CPU)
    assert r["dim"] == 32 and r["similarity"] == "dot"
    assert r["embeddings"][0] == pytest.approx(expected[0].tolist(), abs=1e-5)
    r = api.post("/encode", json={"texts": [{"title": "apple", "text": "the river"}], "kind": "passage"}).json()
    expected = encode_texts(loaded.encoder, loaded.tokenizer, [Passage("the river", "apple")], "passage", CPU)
    assert r["embeddings"][0] == pytest.approx(expected[0].tolist(), abs=1e-5)


def test_health_ready_info_metrics(api, artifact):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}
    info = api.get("/info").json()
    assert info["index"]["count"] == 30 and info["checkpoint"]["fingerprint"] == load_checkpoint(artifact / "ckpt").fingerprint
    api.post("/search", json={"query": "apple"})
    text = api.get("/metrics").text
    assert 'dpr_requests_total{route="/search",status="200"}' in text
    assert "dpr_batch_size_count" in text and "dpr_index_passages 30.0" in text and "dpr_queue_depth" in text


def test_not_ready_without_a_valid_index(tmp_path):
    with TestClient(create_app(Settings(index=tmp_path / "missing", device="cpu"))) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "no such index directory" in r.json()["reason"]
        r = c.post("/search", json={"query": "x"})
        assert r.status_code == 503 and "Retry-After" in r.headers


LIMITED = dict(max_queries=2, max_top_k=5, max_text_chars=50, max_items=2, max_passages_per_item=2, max_body_bytes=2000)


@pytest.mark.parametrize(
    "path, body, status, field",
    [
        ("/search", {"queries": ["a", "b", "c"]}, 422, "queries: at most 2"),
        ("/search", {"query": "a", "top_k": 6}, 422, "top_k: at most 5"),
        ("/search", {"query": "a", "top_k": 6, "mode": "hybrid"}, 422, "top_k: at most 5"),
        ("/search", {"queries": ["a", "b", "c"], "mode": "bm25"}, 422, "queries: at most 2"),
        ("/search", {"query": "x" * 51, "top_k": 5, "mode": "bm25"}, 422, "query: longer than 50"),
        ("/search", {"query": "a", "top_k": 1, "mode": "sparse"}, 422, "mode: Input should be 'dense', 'bm25' or 'hybrid'"),
        ("/search", {"query": "a", "top_k": 1, "alpha": 0.5}, 422, "alpha: only for mode 'hybrid' (mode is 'dense')"),
        ("/search", {"query": "a", "top_k": 1, "mode": "bm25", "fusion": "rrf"}, 422, "fusion: only for mode 'hybrid' (mode is 'bm25')"),
        ("/search", {"query": "a", "top_k": 1, "mode": "hybrid", "fusion": "rrf", "alpha": 0.5}, 422, "alpha: goes with fusion 'convex'"),
        ("/search", {"query": "a", "top_k": 1, "mode": "hybrid", "fusion": "convex"}, 422, "alpha: fusion 'convex' needs alpha"),
        ("/search", {"query": "a", "top_k": 1, "mode": "hybrid", "fusion": "max"}, 422, "fusion: Input should be 'rrf' or 'convex'"),
        ("/search", {"query": "a", "top_k": 1, "mode": "hybrid", "alpha": 1.5}, 422, "alpha: Input should be less than or equal to 1"),
        ("/search", {"query": "a", "top_k": 1, "mode": "hybrid", "alpha": -0.1}, 422, "alpha: Input should be greater than or equal to 0"),
        ("/search", {"query": "a", "top_k": 1, "mode": "hybrid", "alpha": "0.5"}, 422, "alpha: Input should be a valid number"),
        ("/search", {"query": "a", "top_k": 1, "mode": "hybrid", "alpha": True}, 422, "alpha: Input should be a valid number"),
        ("/search", {"query": "a", "top_k": 1, "mode": "hybrid", "alpha": None}, 422, "alpha: must not be null"),
        ("/search", {"query": "a", "top_k": 1, "mode": None}, 422, "mode"),
        ("/search", {"query": "a", "top_k": 0}, 422, "top_k"),
        ("/search", {"query": "x" * 51, "top_k": 5}, 422, "query: longer than 50"),
        ("/search", {"queries": ["a", "x" * 51], "top_k": 5}, 422, "queries[1]: longer than 50"),
        ("/search", {"query": "   "}, 422, "query: must not be empty"),
        ("/search", {"queries": []}, 422, "queries"),
        ("/search", {"query": "a", "queries": ["b"]}, 422, "exactly one of"),
        ("/search", {}, 422, "exactly one of"),
        ("/search", {"query": 5}, 422, "query: Input should be a valid string"),
        ("/search", {"queries": "a"}, 422, "queries: Input should be a valid list"),
        ("/search", {"queries": ["a", 5]}, 422, "queries[1]: Input should be a valid string"),
        ("/search", {"query": "a", "unknown": 1}, 422, "unknown"),
        ("/search", {"queries": ["x" * 40] * 60}, 413, "over 2000 bytes"),
        ("/score", {"items": []}, 422, "items"),
        ("/score", {"items": [{"question": "q", "positive": "p"}] * 3}, 422, "items: at most 2"),
        ("/score", {"items": [{"question": "q", "positive": "p", "negatives": ["a", "b", "c"]}]}, 422, "items[0].negatives: at most 2"),
        ("/score", {"items": [{"question": "q", "positive": {"title": "t"}}]}, 422, "positive"),
        ("/score", {"items": [{"question": "q", "positive": ""}]}, 422, "positive"),
        ("/score", {"items": [{"question": "q", "positive": "p", "negatives": ["y" * 51]}]}, 422, "items[0].negatives[0]: longer than 50"),
        ("/score", {"items": [{"question": "q", "positive": "p", "negatives": ["  "]}]}, 422, "negatives: must not be empty"),
        ("/score", {"items": [{"question": "q", "positive": {"title": "t" * 51, "text": "p"}}]}, 422, "items[0].positive.title: longer than 50"),
        ("/score", {"items": [{"question": "q", "positive": "p", "negatives": [{"title": "t" * 51, "text": "n"}]}]}, 422,
         "items[0].negatives[0].title: longer than 50"),
        ("/encode", {"texts": ["ok", ""]}, 422, "texts: must not be empty"),
        ("/encode", {"texts": ["a"], "kind": "image"}, 422, "kind"),
        ("/encode", {"texts": [{"text": "a"}], "kind": "query"}, 422, "queries are strings"),
        ("/encode", {"texts": ["a", {"title": "t" * 51, "text": "a"}], "kind": "passage"}, 422, "texts[1].title: longer than 50"),
        ("/encode", {"texts": ["a", {"text": 5}], "kind": "passage"}, 422, "texts[1]: Input should be a valid string"),
        ("/encode", {"texts": ["a", {"title": "t"}], "kind": "passage"}, 422, "texts[1]: Input should be a valid string"),
    ],
)
def test_limits_and_bad_input_get_4xx_naming_the_field(artifact, path, body, status, field):
    with client(artifact, **LIMITED) as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert field in r.json()["detail"]
    # every field named is one the client wrote (issue 31.10: `query` was named `queries[0]` and
    # `query.str`): its first part is a key of the body, each part a key or an index, never a type
    for error in r.json().get("errors") or []:
        assert error["field"] == "body" or written(body, error["field"]), (error, body)


UNION_TAG = re.compile(r"str|none|int|float|bool|[a-z-]+\[.*\]|[A-Z]\w*")  # what pydantic adds for a union's branch


def written(body, field: str) -> bool:
    """Whether ``field`` (``items[0].positive.title``) is a path of keys and indexes in ``body``;
    its last key may be one the client left out (a required field), but never a union's tag."""
    value, parts = body, re.findall(r"\[(\d+)\]|\.?([^.\[]+)", field)
    for i, (index, key) in enumerate(parts):
        if index:
            if not isinstance(value, list) or int(index) >= len(value):
                return False
            value = value[int(index)]
        elif isinstance(value, dict) and (key in value or (i == len(parts) - 1 and not UNION_TAG.fullmatch(key))):
            value = value.get(key)
        else:
            return False
    return True


@pytest.mark.parametrize("content, status, detail", [
    (b"{not json", 400, "body: not valid JSON (Expecting property name enclosed in double quotes at character 1)"),
    (b'{"query": "apple"', 400, "body: not valid JSON (Expecting \',\' delimiter at character 17)"),
    (b"\xff\xfe\x00garbage", 400, "body: not valid JSON (Expecting value at character 0)"),
    (b"[" * 500 + b"]" * 500, 422, "body: must be a JSON object, got an array"),
    (b"null", 422, "body: must be a JSON object, got null"),
    (b'"apple"', 422, "body: must be a JSON object, got a string"),
])
def test_malformed_bodies_get_their_status_and_name_the_body(api, content, status, detail):
    """Not JSON: 400 saying where it stops being JSON (was 422 "1: JSON decode error"); JSON of the
    wrong shape: 422 naming the body."""
    r = api.post("/search", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["detail"] == detail
    assert r.json()["errors"][0]["field"] == "body"


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded", "application/xml"])
@pytest.mark.parametrize("path", ["/search", "/score", "/encode"])
def test_a_body_not_sent_as_json_is_415(api, path, content_type):
    """JSON sent as text/plain (or with no Content-Type) got 422 "Input should be a valid dictionary"."""
    headers = {"content-type": content_type} if content_type else {}
    r = api.post(path, content=json.dumps({"query": "apple"}).encode(), headers=headers)
    assert r.status_code == 415, r.text
    shown = repr(content_type) if content_type else "none"
    assert r.json()["detail"] == f"content-type: the body must be JSON sent with Content-Type: application/json (got {shown})"


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "application/vnd.api+json"])
def test_every_json_content_type_is_accepted(api, content_type):
    r = api.post("/search", content=b'{"query": "apple", "top_k": 1}', headers={"content-type": content_type})
    assert r.status_code == 200, r.text


def test_the_schema_documents_400_and_415_for_every_body(api):
    for path, operations in api.get("/openapi.json").json()["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                assert {"400", "415", "422"} <= set(operation["responses"]), (method, path)
                assert "not valid JSON" in operation["responses"]["400"]["description"]
                assert "application/json" in operation["responses"]["415"]["description"]


def test_oversized_body_is_refused_from_its_header(artifact):
    with client(artifact, max_body_bytes=100) as c:
        r = c.post("/search", content=b"x" * 10, headers={"content-length": "10000000", "content-type": "application/json"})
    assert r.status_code == 413


def test_titles_are_limited_like_texts_and_the_schema_says_so(artifact):
    with client(artifact, **LIMITED) as c:
        title = c.get("/openapi.json").json()["components"]["schemas"]["PassageIn"]["properties"]["title"]
        assert title["maxLength"] == 50
        ok = {"items": [{"question": "q", "positive": {"title": "t" * 50, "text": "p"}}]}
        assert c.post("/score", json=ok).status_code == 200
        assert c.post("/encode", json={"texts": [{"title": "t" * 50, "text": "a"}], "kind": "passage"}).status_code == 200
        r = c.post("/encode", json={"texts": [{"title": "t" * 1500, "text": "a"}], "kind": "passage"})
        assert r.status_code == 422 and r.json()["detail"] == "texts[0].title: longer than 50 characters"


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1e3", b"", b" 12", "\u00b2".encode("latin-1")])  # "\u00b2": str.isdigit() says yes
def test_a_content_length_that_is_not_a_number_is_400(length):
    sent = []

    async def app(scope, receive, send):
        raise AssertionError("the request reached the app")

    async def send(message):
        sent.append(message)

    guard = Guard(app, Settings(index=None), open_routes=set())
    asyncio.run(guard({"type": "http", "path": "/search", "method": "POST", "headers": [(b"content-length", length)]}, None, send))
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["detail"].startswith("invalid Content-Length header")


def test_a_content_length_that_is_not_a_number_is_400_from_the_app(api):
    r = api.post("/search", content=b'{"query": "apple"}', headers={"content-length": "abc", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"] == 'invalid Content-Length header "abc": not a number of bytes'



def test_full_queue_gets_503_with_retry_after(artifact):
    with client(artifact, queue_max=1) as c:
        r = c.post("/search", json={"queries": ["apple", "river"]})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"


@pytest.mark.parametrize("value", ["", None])
def test_an_empty_api_key_is_no_key(artifact, monkeypatch, value):
    """Compose passes `DPR_API_KEY: ${DPR_API_KEY:-}`: an empty key must leave auth off, not require ''."""
    monkeypatch.setenv("DPR_API_KEY", "")
    settings = Settings(index=artifact / "index", device="cpu") if value is None else \
        Settings(index=artifact / "index", device="cpu", api_key=value)
    assert settings.api_key is None
    with TestClient(create_app(settings)) as c:
        assert c.get("/info").status_code == 200
        assert c.get("/info", headers={"X-API-Key": "anything"}).status_code == 200
        assert "securitySchemes" not in c.get("/openapi.json").json()["components"]
    monkeypatch.setenv("DPR_API_KEY", KEY)  # and a key that is set still switches auth on
    assert Settings(index=artifact / "index").api_key.get_secret_value() == KEY


def test_auth_on_every_route(artifact):
    with client(artifact, api_key=KEY) as c:
        routes = [(path, sorted(methods)[0]) for path, methods in app_routes(c.app).items()
                  if methods and not path.startswith(("/docs", "/redoc", "/openapi"))]
        assert len(routes) >= 8
        bodies = {"/search": {"query": "apple"}, "/score": {"items": [{"question": "q", "positive": "p"}]},
                  "/encode": {"texts": ["a"]}, "/v1/embeddings": {"model": "m", "input": "a"}}
        for path, method in routes:
            kw = {"json": bodies.get(path, {})} if method == "POST" else {}
            if path in OPEN_ROUTES:
                assert c.request(method, path, **kw).status_code == 200, path
                continue
            assert c.request(method, path, **kw).status_code == 401, path
            assert c.request(method, path, headers={"X-API-Key": "wrong"}, **kw).status_code == 401, path
            assert c.request(method, path, headers={"X-API-Key": KEY}, **kw).status_code == 200, path
            assert c.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, **kw).status_code == 200, path


def test_reload_swaps_in_a_new_artifact_and_a_failed_one_keeps_serving(artifact, tmp_path):
    import shutil

    shutil.copytree(artifact / "index", tmp_path / "index")
    with TestClient(create_app(Settings(index=tmp_path / "index", checkpoint=artifact / "ckpt", device="cpu"))) as c:
        assert c.get("/info").json()["index"]["count"] == 30
        new = tmp_path / "new.jsonl"
        new.write_text(json.dumps({"_id": "x1", "title": "zebra", "text": "the zebra and the guitar"}) + "\n")
        add(tmp_path / "index", new, checkpoint=artifact / "ckpt")
        r = c.post("/admin/reload")
        assert r.status_code == 200 and r.json()["passages"] == 31
        assert c.get("/info").json()["index"]["count"] == 31
        # the BM25 index reloads with the rest (dpr index add rebuilt it over all 31 passages)
        assert c.post("/search", json={"query": "zebra guitar", "top_k": 1, "mode": "bm25"}).json()["results"][0][0]["id"] == "x1"
        broken = tmp_path / "broken.sqlite"
        broken.write_bytes(b"broken")
        os.replace(broken, tmp_path / "index" / "passages.sqlite")  # a new file in place, as a deploy would
        r = c.post("/admin/reload")
        assert r.status_code == 409 and "checksum does not match" in r.json()["detail"]
        assert c.post("/search", json={"query": "zebra guitar", "top_k": 31}).status_code == 200


def _guard(app) -> Guard:
    layer = app.middleware_stack
    while not isinstance(layer, Guard):
        layer = layer.app
    return layer


def test_a_reload_answers_every_search_in_flight(artifact, tmp_path, monkeypatch):
    """Query encoding slowed beyond the retire window: every search in flight during /admin/reload
    (one batch encoding, one queued behind it) gets its 200, a request that still holds the retired
    resources is re-routed to the new ones, and no admission slot is left taken."""
    import shutil

    shutil.copytree(artifact / "index", tmp_path / "index")
    gate, encode = threading.Event(), resources_module.Resources.encode_queries

    def slow(self, texts):
        if texts != ["warm-up query"]:
            gate.wait(10)  # the first batch waits until the reload is over and then some
            time.sleep(0.8)  # and every batch takes longer than the old 0.5 s retire grace
        return encode(self, texts)

    monkeypatch.setattr(resources_module.Resources, "encode_queries", slow)
    app = create_app(Settings(index=tmp_path / "index", checkpoint=artifact / "ckpt", device="cpu",
                              batch_max_size=4, batch_max_wait_ms=20))

    async def main():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as h:
            post = lambda i: asyncio.create_task(h.post("/search", json={"query": f"apple river {i}", "top_k": 3}))
            first = [post(i) for i in range(3)]
            await asyncio.sleep(0.3)  # the first batch is encoding (held by the gate)
            second = [post(i) for i in range(3, 6)]  # queued behind it
            await asyncio.sleep(0.1)
            old = app.state.resources
            assert 3 <= old.batcher.depth <= 5  # the first batch (1 to 3 texts: an idle encoder takes what is queued) encodes
            r = await h.post("/admin/reload")
            assert r.status_code == 200, r.text
            assert app.state.resources is not old
            await asyncio.sleep(0.7)  # past the old retire window, with the queue empty
            gate.set()
            answers = await asyncio.wait_for(asyncio.gather(*first, *second), 20)
            assert old.batcher.stopped and old.batcher.depth == 0
            # a request that got the retired resources before the swap is encoded by the new ones
            app.dependency_overrides[current_resources] = lambda: old
            late = await asyncio.wait_for(h.post("/search", json={"query": "apple river", "top_k": 3}), 20)
            app.dependency_overrides.clear()
            fresh = await h.post("/search", json={"query": "apple river", "top_k": 3})
            return answers, late, fresh, _guard(app).in_flight

    answers, late, fresh, in_flight = asyncio.run(main())
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert late.status_code == 200 and [h["id"] for h in late.json()["results"][0]] == [h["id"] for h in fresh.json()["results"][0]]
    assert in_flight == 0


def test_a_stopped_batcher_answers_what_it_holds_and_refuses_more():
    def slow_encode(texts):
        time.sleep(0.6)  # longer than the old retire grace
        return np.ones((len(texts), 2), dtype=np.float32)

    def stuck_encode(texts):
        time.sleep(0.8)
        return np.ones((len(texts), 2), dtype=np.float32)

    async def main():
        b = QueryBatcher(slow_encode, max_size=1, max_wait_ms=1, queue_max=8)
        b.start()
        held = [asyncio.create_task(b.submit([f"q{i}"])) for i in range(2)]  # one encoding, one queued
        await asyncio.sleep(0.1)
        await asyncio.wait_for(b.stop(), 10)
        answered = [t.result().shape for t in held]  # all resolved by the time stop() returns
        with pytest.raises(Stopped):
            await asyncio.wait_for(b.submit(["late"]), 1)
        # an encoder stuck past the timeout: its futures fail with Stopped, none is left waiting
        b = QueryBatcher(stuck_encode, max_size=8, max_wait_ms=1, queue_max=8)
        b.start()
        stuck = asyncio.create_task(b.submit(["q"]))
        await asyncio.sleep(0.1)
        await b.stop(timeout=0.2)
        with pytest.raises(Stopped):
            await asyncio.wait_for(stuck, 1)
        return answered

    assert asyncio.run(main()) == [(1, 2)] * 2


def test_every_worker_notices_a_new_artifact_by_itself(artifact, tmp_path):
    """`dpr serve --workers N`: /admin/reload reaches one worker; the others (here a second app on
    the same DPR_INDEX) find the new artifact at their next requests, with no reload call."""
    import shutil

    shutil.copytree(artifact / "index", tmp_path / "index")
    settings = Settings(index=tmp_path / "index", checkpoint=artifact / "ckpt", device="cpu")
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        assert a.get("/info").json()["index"]["count"] == b.get("/info").json()["index"]["count"] == 30
        new = tmp_path / "new.jsonl"
        new.write_text(json.dumps({"_id": "x1", "title": "zebra", "text": "the zebra and the guitar"}) + "\n")
        add(tmp_path / "index", new, checkpoint=artifact / "ckpt")
        assert a.post("/admin/reload").json()["passages"] == 31
        deadline = time.monotonic() + 30
        while b.get("/info").json()["index"]["count"] != 31:
            assert time.monotonic() < deadline, "the other worker still serves the old artifact"
            time.sleep(0.2)
        assert b.post("/search", json={"query": "zebra guitar", "top_k": 1}).json()["results"][0][0]["id"] == "x1"
        # a new artifact that fails its checks: logged, and the old one keeps serving
        (tmp_path / "index" / "manifest.json").write_text("{}")
        time.sleep(1.2)
        assert b.get("/info").json()["index"]["count"] == 31
        time.sleep(1.5)  # the failed load is done (it is not retried until the artifact changes again)
        assert b.get("/info").json()["index"]["count"] == 31 and b.get("/readyz").status_code == 200


@contextlib.contextmanager
def recorded_store_reads(api):
    """Yield a list that receives (sql, on_the_event_loop) for every passage-store query meanwhile."""
    store = api.app.state.resources.searcher.store
    calls, db = [], store._db

    class Recording:
        def execute(self, sql, *args):
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            calls.append((sql, on_loop))
            return db.execute(sql, *args)

    store._db = Recording()
    try:
        yield calls
    finally:
        store._db = db


def test_search_reads_the_passage_store_once_off_the_event_loop(api):
    """One store query per search, from a worker thread, and titles and texts only when asked for."""
    with recorded_store_reads(api) as calls:
        with_text = api.post("/search", json={"queries": ["apple river", "comet walnut"], "top_k": 5}).json()
        text_calls, calls[:] = list(calls), []
        without = api.post("/search", json={"queries": ["apple river", "comet walnut"], "top_k": 5, "with_text": False}).json()
    assert len(text_calls) == 1 and not text_calls[0][1] and "text" in text_calls[0][0]
    assert len(calls) == 1 and not calls[0][1] and "text" not in calls[0][0] and "title" not in calls[0][0]
    assert [[h["id"] for h in hs] for hs in without["results"]] == [[h["id"] for h in hs] for hs in with_text["results"]]
    assert all(h["text"] and h["title"] is not None for hs in with_text["results"] for h in hs)
    assert all(h["text"] is None and h["title"] is None for hs in without["results"] for h in hs)


@pytest.mark.parametrize("mode, with_text, reads", [("bm25", True, 1), ("bm25", False, 0), ("hybrid", True, 2),
                                                    ("hybrid", False, 1)])
def test_bm25_and_hybrid_read_the_passage_store_off_the_event_loop(api, mode, with_text, reads):
    """bm25: titles and texts once (with text); hybrid: the dense side's ids, then titles and texts."""
    with recorded_store_reads(api) as calls:
        r = api.post("/search", json={"queries": QUERIES, "top_k": 5, "mode": mode, "with_text": with_text})
    assert r.status_code == 200 and len(calls) == reads and all(not on_loop for _, on_loop in calls), calls
    if reads:
        assert ("text" in calls[-1][0]) == with_text  # the last read: titles and texts only when asked for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_process_with_reload_under_load(artifact, tmp_path):
    """`dpr serve` on loopback: search works, and a reload during concurrent requests fails none."""
    import shutil

    shutil.copytree(artifact / "index", tmp_path / "index")
    port = _free_port()
    env = {**os.environ, "DPR_API_KEY": KEY, "DPR_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dpr"), "serve", "--index", str(tmp_path / "index"),
                             "--checkpoint", str(artifact / "ckpt"), "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    headers = {"X-API-Key": KEY}
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("server never became ready: " + proc.stdout.read1().decode(errors="replace"))
        statuses, stop = [], threading.Event()

        def hammer():  # every outcome is recorded: a status, or the exception (a timeout, a reset) as a failure
            with httpx.Client(base_url=base, headers=headers, timeout=30) as h:
                while not stop.is_set() and len(statuses) < 2000:
                    try:
                        statuses.append(h.post("/search", json={"query": "apple river", "top_k": 3}).status_code)
                    except Exception as e:
                        statuses.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        for _ in range(3):
            assert httpx.post(f"{base}/admin/reload", headers=headers, timeout=60).status_code == 200
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------- one table of limits


def test_every_row_of_the_limits_table_is_published_with_its_setting(artifact):
    """The schema's maxItems / maximum / maxLength come from the same rows that check requests."""
    from dpr_service.api.limits import LIMITS

    settings = Settings(index=None, **LIMITED)
    with client(artifact, **LIMITED) as c:
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
    key = {"items": "maxItems", "maximum": "maximum", "characters": "maxLength"}
    for limit in LIMITS:
        text = json.dumps(schemas[limit.model.__name__]["properties"][limit.field])
        assert f'"{key[limit.bound]}": {getattr(settings, limit.setting)}' in text, (limit, text)
    # every string a passage, question or query can be has a maxLength (none left out of the table)
    def strings(node):
        if isinstance(node, dict):
            if node.get("type") == "string" and "enum" not in node and "const" not in node:
                yield node
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
    for name in ("SearchRequest", "ScoreRequest", "ScoreItemIn", "PassageIn", "EncodeRequest"):
        props = {k: v for k, v in schemas[name]["properties"].items() if k != "kind"}
        assert all(s.get("maxLength") == 50 for s in strings(props)), name


@pytest.mark.parametrize("body, field", [
    ({"items": [{"question": "q", "positive": {"title": "t", "text": "p" * 51}}]}, "items[0].positive.text"),
    ({"items": [{"question": "q" * 51, "positive": "p"}]}, "items[0].question"),
    ({"items": [{"question": "q", "positive": "p"}, {"question": "q", "positive": "p", "negatives": ["n", {"text": "n" * 51}]}]},
     "items[1].negatives[1].text"),
])
def test_a_limit_names_the_field_as_the_client_wrote_it(artifact, body, field):
    with client(artifact, **LIMITED) as c:
        r = c.post("/score", json=body)
    assert r.status_code == 422 and r.json()["detail"] == f"{field}: longer than 50 characters"
    assert r.json()["errors"] == [{"field": field, "message": "longer than 50 characters"}]


def test_validation_errors_name_list_items_like_limits_do(api):
    r = api.post("/score", json={"items": [{"question": "q", "positive": "p"}, {"question": " ", "positive": "p"}]})
    assert r.status_code == 422 and r.json()["detail"] == "items[1].question: must not be empty"


# ----------------------------------------------------------------------------- dpr serve and a missing index


def _serve(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "dpr"), "serve", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("which", ["missing", "checkpoint", "not an index"])
def test_serve_refuses_an_index_it_cannot_serve_with_exit_2(artifact, tmp_path, which):
    """`dpr serve --index <typo>` logged one line and served 503 forever."""
    path = {"missing": tmp_path / "typo", "checkpoint": artifact / "ckpt", "not an index": tmp_path}[which]
    proc = _serve("--index", str(path), "--port", str(_free_port()))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpr serve: error: --index ") and "--wait-for-index" in lines[0]
    assert {"missing": "no such index directory", "checkpoint": "is a checkpoint, not an index",
            "not an index": "is not a dpr-service index"}[which] in lines[0]


def test_serve_with_wait_for_index_starts_and_loads_the_index_once_it_appears(artifact, tmp_path):
    """--wait-for-index (DPR_WAIT_FOR_INDEX=1): the server starts on a missing index, is not ready,
    and serves the index once it appears, with nobody calling /admin/reload."""
    import shutil

    port = _free_port()
    proc = _serve("--index", str(tmp_path / "later"), "--checkpoint", str(artifact / "ckpt"), "--wait-for-index",
                  "--port", str(port), "--log-level", "warning", env={"DPR_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                r = httpx.get(f"{base}/readyz", timeout=1)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "the server never answered"
                time.sleep(0.2)
        assert r.status_code == 503 and "no such index directory" in r.json()["reason"]
        shutil.copytree(artifact / "index", tmp_path / "later")
        deadline = time.time() + 60
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            assert time.time() < deadline and proc.poll() is None, "the index was never loaded"
            time.sleep(0.5)
        assert httpx.post(f"{base}/search", json={"query": "apple", "top_k": 1}, timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_wait_for_index_loads_without_requests(artifact, tmp_path):
    """In-process: the watcher alone (no request to trigger the reload check) loads a late index."""
    import shutil

    with TestClient(create_app(Settings(index=tmp_path / "later", checkpoint=artifact / "ckpt", device="cpu",
                                        wait_for_index=True))) as c:
        assert c.app.state.resources is None
        shutil.copytree(artifact / "index", tmp_path / "later")
        deadline = time.monotonic() + 30
        while c.app.state.resources is None:
            assert time.monotonic() < deadline, "the late index was never loaded"
            time.sleep(0.2)
        assert c.get("/readyz").status_code == 200


@pytest.mark.parametrize("argv, extra", [(["--milvus-uri", "m.db", "--collection", "c"], "milvus"),
                                         (["--index", "ix", "--runtime", "onnx-int8", "--wait-for-index"], "onnx")])
def test_dpr_serve_names_the_extra_a_setting_needs(monkeypatch, capsys, argv, extra):
    """Without pymilvus or onnxruntime installed, `dpr serve` says which extra to install (exit 2),
    rather than failing later in every worker."""
    import importlib.util

    from dpr_service.api.serve import main
    from dpr_service.api.settings import get_settings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("pymilvus", "onnxruntime") else real(name, *a))
    get_settings.cache_clear()
    try:
        assert main(argv) == 2
    finally:
        get_settings.cache_clear()
    assert f"pip install 'dpr-service[{extra}]'" in capsys.readouterr().err


def test_a_reload_if_changed_loads_an_artifact_once(artifact):
    """Promotion's reload (``if_changed``) does not load the artifact serving now a second time;
    a plain reload (``POST /admin/reload``) always loads."""
    with client(artifact) as c:
        reloader = c.app.state.reloader
        serving = c.app.state.resources
        assert c.portal.call(lambda: reloader.load(if_changed=True)) is serving
        again = c.portal.call(reloader.load)
        assert again is not serving and c.portal.call(lambda: reloader.load(if_changed=True)) is again
