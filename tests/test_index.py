"""The index stage: FAISS against brute-force numpy, the artifact's checks, resume, shards, add,
evaluation, BM25 and mining."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_beir

import index.build as build_mod
from dpr_service.core.checkpoint import load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import read_corpus, read_eval_data
from dpr_service.core.inference import encode_texts, exact_search
from index.artifact import ArtifactError
from index.build import add, build, choose_factory, make_index, parse_size
from index.evaluate import BM25, evaluate_bm25, evaluate_index
from index.mine import mine
from index.search import Searcher
from trainer.evaluate import retrieval_eval

CPU = pick_runtime("cpu", "fp32")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    cfg = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, query_max_length=16, passage_max_length=32)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_checkpoint(path, encoder, tokenizer)
    return path


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    return write_beir(tmp_path_factory.mktemp("beir") / "beir", n=40, splits=("train", "test"))


def brute_force(xq, xb, k):
    scores = xq @ xb.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def recall_at_10(index, xq, xb):
    _, exact = brute_force(xq, xb, 10)
    _, got = index.search(xq, 10)
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got)])


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((3000, 32)).astype(np.float32)
    xq = rng.standard_normal((50, 32)).astype(np.float32)
    return xb, xq


def test_flat_equals_brute_force(vectors):
    xb, xq = vectors
    index = make_index("Flat", 32, xb, use_gpu=False, progress=False)
    D, I = index.search(xq, 10)
    d_ref, i_ref = brute_force(xq, xb, 10)
    np.testing.assert_array_equal(I, i_ref)
    np.testing.assert_allclose(D, d_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory, bound", [("HNSW32", 0.95), ("IVF64,Flat", 0.90), ("IVF64,PQ8", 0.35)])
def test_approximate_indexes_recall_bound(vectors, factory, bound):
    xb, xq = vectors
    index = make_index(factory, 32, xb, use_gpu=False, progress=False)
    assert recall_at_10(index, xq, xb) >= bound


def test_auto_factory_by_size_and_budget():
    gib = 2**30
    assert choose_factory(10_000, 384, 8 * gib)[0] == "Flat"
    assert choose_factory(3_000_000, 384, 8 * gib)[0] == "HNSW32"
    factory, why = choose_factory(21_000_000, 768, 8 * gib)
    assert factory.startswith("IVF") and ",PQ" in factory and "exceed" in why
    assert parse_size("8GB") == 8 * gib and parse_size("512MB") == 512 * 2**20 and parse_size("100") == 100
    with pytest.raises(ValueError):
        parse_size("lots")


def test_too_few_vectors_for_ivf(vectors):
    with pytest.raises(ArtifactError, match="need at least 4096 vectors"):
        make_index("IVF4096,Flat", 32, vectors[0][:100], use_gpu=False, progress=False)
    with pytest.raises(ArtifactError, match="bad --factory"):
        make_index("NotAnIndex", 32, vectors[0], use_gpu=False, progress=False)


def test_artifact_search_equals_exact_search(tmp_path, checkpoint, beir):
    out = build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    loaded = load_checkpoint(checkpoint)
    assert manifest["checkpoint_fingerprint"] == loaded.fingerprint and manifest["count"] == 40
    assert manifest["dim"] == 32 and manifest["similarity"] == "cosine" and set(manifest["files"]) == {"index.faiss", "passages.sqlite"}
    corpus = read_corpus(beir)
    p_emb = encode_texts(loaded.encoder, loaded.tokenizer, corpus, "passage", CPU)
    q_emb = encode_texts(loaded.encoder, loaded.tokenizer, ["what is the apple near the river", "comet"], "query", CPU)
    scores, rows = exact_search(q_emb, p_emb, 5)
    searcher = Searcher(out, loaded.fingerprint)
    hits = searcher.search(q_emb.numpy(), 5)
    assert [[h.id for h in hs] for hs in hits] == [[corpus[r].id for r in row] for row in rows.tolist()]
    np.testing.assert_allclose([[h.score for h in hs] for hs in hits], scores.numpy(), rtol=1e-5, atol=1e-5)
    got = searcher.passages([hits[0][0].id])[hits[0][0].id]
    assert got == corpus[rows[0, 0]]
    assert not list(tmp_path.glob(".idx*"))  # the staging directory is gone


def test_wrong_checkpoint_and_tampering_are_refused(tmp_path, checkpoint, beir):
    out = build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False)
    with pytest.raises(ArtifactError, match="not with the checkpoint in use"):
        Searcher(out, "0" * 64)
    store = out / "passages.sqlite"
    data = bytearray(store.read_bytes())
    data[len(data) // 2] ^= 0x01
    store.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"passages.sqlite: checksum does not match"):
        Searcher(out)
    (out / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=r"index.faiss: checksum does not match"):
        Searcher(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json: not valid JSON"):
        Searcher(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        Searcher(out)


def test_killed_build_resumes_from_its_chunks(tmp_path, checkpoint, beir, monkeypatch):
    monkeypatch.setattr(build_mod, "CHUNK", 8)  # 40 passages: 5 chunks
    real, calls = build_mod.encode_texts, []

    def dying(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped while encoding the third chunk
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(build_mod, "encode_texts", dying)
    with pytest.raises(KeyboardInterrupt):
        build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False)
    partial = tmp_path / ".idx.partial"
    assert sorted(p.name for p in partial.glob("emb-*.npy")) == ["emb-000000.npy", "emb-000001.npy"]
    assert not (tmp_path / "idx").exists()

    calls.clear()
    monkeypatch.setattr(build_mod, "encode_texts", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    out = build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False)
    assert len(calls) == 3  # only the missing chunks were encoded
    clean = build(checkpoint, beir, tmp_path / "clean", factory="Flat", progress=False)
    a, b = Searcher(out).index.reconstruct_n(0, 40), Searcher(clean).index.reconstruct_n(0, 40)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_shards_then_merge(tmp_path, checkpoint, beir, monkeypatch):
    monkeypatch.setattr(build_mod, "CHUNK", 8)
    assert build(checkpoint, beir, tmp_path / "idx", factory="Flat", shard=(0, 2), progress=False) is None
    assert sorted(p.name for p in (tmp_path / ".idx.partial").glob("emb-*")) == ["emb-000000.npy", "emb-000002.npy", "emb-000004.npy"]
    out = build(checkpoint, beir, tmp_path / "idx", factory="Flat", shard=(1, 2), progress=False)
    assert out == tmp_path / "idx" and Searcher(out).count == 40


def test_add_passages_and_refuse_duplicates(tmp_path, checkpoint, beir):
    out = build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False)
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"_id": "x1", "title": "zebra", "text": "the zebra and the guitar"}) + "\n")
    add(out, new, checkpoint=checkpoint)
    searcher = Searcher(out, load_checkpoint(checkpoint).fingerprint)
    assert searcher.count == 41 and searcher.passages(["x1"])["x1"].title == "zebra"
    loaded = load_checkpoint(checkpoint)
    q = encode_texts(loaded.encoder, loaded.tokenizer, [read_corpus(new)[0]], "passage", CPU).numpy()
    assert searcher.search(q, 1)[0][0].id == "x1"  # its own vector is its nearest neighbour
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"_id": "d3", "title": "", "text": "again"}) + "\n")
    with pytest.raises(ArtifactError, match="1 passage ids are already in the index \\(first: 'd3'\\)"):
        add(out, dup, checkpoint=checkpoint)
    assert Searcher(out).count == 41


def test_dpr_eval_equals_trainer_exact_evaluation(tmp_path, checkpoint, beir):
    out = build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False)
    got = evaluate_index(str(checkpoint), str(out), str(beir), split="test", progress=False)
    loaded = load_checkpoint(checkpoint)
    expected = retrieval_eval(loaded.encoder, loaded.tokenizer, read_eval_data(beir, "test"), CPU)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_bm25_ranks_exact_word_match_first(beir):
    corpus = read_corpus(beir)
    bm25 = BM25(corpus)
    target = corpus[7]
    hits = bm25.search([target.text], 3)[0]
    assert hits[0][0] == target.id
    metrics = evaluate_bm25(corpus, str(beir), split="test")
    assert 0 < metrics["ndcg@10"] <= 1 and metrics["queries"] == 20


def test_mine_bm25_and_model(tmp_path, checkpoint, beir):
    corpus = read_corpus(beir)
    stats = mine(str(beir), corpus, str(tmp_path / "bm25.jsonl"), split="train", num_negatives=3)
    lines = [json.loads(x) for x in (tmp_path / "bm25.jsonl").read_text().splitlines()]
    assert stats["examples"] == len(lines) == 40
    for line in lines:
        assert line["positive"]["id"] not in {n["id"] for n in line["negatives"]}
        assert len(line["negatives"]) <= 3
    out = build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False)
    mine(str(beir), corpus, str(tmp_path / "model.jsonl"), split="train", method="model", checkpoint=str(checkpoint),
         index_dir=str(out), num_negatives=4, skip_top=1, margin=0.01, device="cpu")
    loaded = load_checkpoint(checkpoint)
    by_id = {p.id: p for p in corpus}
    for line in map(json.loads, (tmp_path / "model.jsonl").read_text().splitlines()):
        q = encode_texts(loaded.encoder, loaded.tokenizer, [line["query"]], "query", CPU)
        pos = encode_texts(loaded.encoder, loaded.tokenizer, [by_id[line["positive"]["id"]]], "passage", CPU)
        negs = encode_texts(loaded.encoder, loaded.tokenizer, [by_id[n["id"]] for n in line["negatives"]], "passage", CPU)
        assert torch.all(q @ negs.T <= (q @ pos.T) - 0.01 + 1e-5)  # nothing within the margin of the positive


def test_cli_errors_exit_2(tmp_path, checkpoint):
    proc = subprocess.run([sys.executable, "-m", "dpr_service.cli", "index", "build", "--checkpoint", str(checkpoint),
                           "--corpus", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "none.jsonl: no such file or directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dpr_service.cli", "eval", "--checkpoint", str(checkpoint),
                           "--index", str(tmp_path / "nope"), "--queries", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_stale_merge_lock_of_a_dead_process_is_taken_over(tmp_path, checkpoint, beir):
    partial = tmp_path / ".idx.partial"
    partial.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    (partial / "merge.lock").write_text(dead.strip())
    assert build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False) == tmp_path / "idx"


def test_readme_cli_commands_for_eval_bm25_and_mine(tmp_path, checkpoint, beir):
    """`dpr eval`, `dpr bm25` and both `dpr mine` forms, as the README shows them."""
    dpr = [sys.executable, "-m", "dpr_service.cli"]
    run = lambda *a: subprocess.run([*dpr, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    r = run("index", "build", "--checkpoint", str(checkpoint), "--corpus", str(beir), "--output", str(tmp_path / "idx"), "--no-progress")
    assert r.returncode == 0 and f"index: {tmp_path / 'idx'}" in r.stdout, r.stderr
    r = run("eval", "--checkpoint", str(checkpoint), "--index", str(tmp_path / "idx"), "--queries", str(beir), "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["queries"] == 20
    r = run("bm25", "--corpus", str(beir), "--queries", str(beir), "--split", "test")
    assert r.returncode == 0 and "ndcg@10" in r.stdout, r.stderr
    r = run("mine", "--queries", str(beir), "--split", "train", "--corpus", str(beir), "--output", str(tmp_path / "bm25.jsonl"))
    assert r.returncode == 0 and "wrote 40 examples" in r.stdout, r.stderr
    r = run("mine", "--method", "model", "--checkpoint", str(checkpoint), "--index", str(tmp_path / "idx"), "--skip-top", "3",
            "--margin", "0.05", "--queries", str(beir), "--split", "train", "--corpus", str(beir), "--output", str(tmp_path / "m.jsonl"))
    assert r.returncode == 0 and "wrote 40 examples" in r.stdout, r.stderr
