"""The index stage: FAISS against brute-force numpy, the artifact's checks, resume, shards, add,
evaluation, BM25 and mining."""

import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import write_beir

import index.build as build_mod
from dpr_service.core.checkpoint import load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import DataError, read_corpus, read_eval_data
from dpr_service.core.inference import encode_texts, exact_search
from dpr_service.core.artifact import ArtifactError
import index.factory as factory_mod
import index.workdir as workdir_mod
from index.build import add, build
from index.factory import GpuPlan, choose_factory, gpu_faiss_available, gpu_plan, make_index, parse_size
from index.cli import _run, bm25_main, eval_main, index_main, mine_main
from dpr_service.core.bm25 import BM25
from dpr_service.core.formats import read_queries
from dpr_service.core.metrics import BEIR_MEASURES, Conventions
from index.evaluate import evaluate_bm25, evaluate_index
from index.mine import mine
from dpr_service.core.search import Searcher
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
    with pytest.raises(ArtifactError, match="needs at least 4096 vectors"):
        make_index("IVF4096,Flat", 32, vectors[0][:100], use_gpu=False, progress=False)
    with pytest.raises(ArtifactError, match="bad --factory"):
        make_index("NotAnIndex", 32, vectors[0], use_gpu=False, progress=False)


def test_artifact_search_equals_exact_search(tmp_path, checkpoint, beir):
    out = build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    loaded = load_checkpoint(checkpoint)
    assert manifest["checkpoint_fingerprint"] == loaded.fingerprint and manifest["count"] == 40
    assert manifest["dim"] == 32 and manifest["similarity"] == "cosine"
    assert {f for f in manifest["files"] if not f.startswith("bm25/")} == {"index.faiss", "passages.sqlite"}
    # the BM25 index of the same passages, every file of it checksummed like the rest
    assert {f for f in manifest["files"] if f.startswith("bm25/")} == {f"bm25/{p.name}" for p in (out / "bm25").iterdir()}
    assert "bm25/ids.json" in manifest["files"] and json.loads((out / "bm25" / "ids.json").read_text()) == [
        p.id for p in read_corpus(beir)]
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


@pytest.mark.parametrize("name", ["data.csc.index.npy", "vocab.index.json", "ids.json"])
def test_a_changed_or_missing_bm25_file_is_refused_like_any_other(tmp_path, checkpoint, beir, name):
    out = build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False)
    path = out / "bm25" / name
    original = path.read_bytes()
    data = bytearray(original)
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    for bm25 in (False, True):  # refused on every load, not only when BM25 is asked for
        with pytest.raises(ArtifactError, match=rf"bm25/{re.escape(name)}: checksum does not match"):
            Searcher(out, bm25=bm25)
    path.unlink()
    with pytest.raises(ArtifactError, match=rf"bm25/{re.escape(name)}: missing from the index"):
        Searcher(out)
    path.write_bytes(original)
    assert Searcher(out, bm25=True).bm25.ids == [p.id for p in read_corpus(beir)]


def test_no_bm25_builds_a_dense_only_artifact_that_stays_so(tmp_path, checkpoint, beir):
    out = tmp_path / "idx"
    assert index_main(["build", "--checkpoint", str(checkpoint), "--corpus", str(beir), "--output", str(out),
                       "--factory", "Flat", "--no-bm25", "--no-progress"]) == 0
    assert not (out / "bm25").exists()
    assert not any(f.startswith("bm25") for f in json.loads((out / "manifest.json").read_text())["files"])
    assert Searcher(out, bm25=True).bm25 is None
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"_id": "x1", "title": "zebra", "text": "the zebra and the guitar"}) + "\n")
    add(out, new, checkpoint=checkpoint)
    assert not (out / "bm25").exists() and Searcher(out, bm25=True).bm25 is None
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json: not valid JSON"):
        Searcher(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        Searcher(out)


def test_killed_build_resumes_from_its_parts(tmp_path, checkpoint, beir, monkeypatch):
    monkeypatch.setattr(build_mod, "PART_SIZE", 8)  # 40 passages: 5 parts
    real, calls = build_mod.encode_texts, []

    def dying(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped while encoding the third part
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
    assert len(calls) == 3  # only the missing parts were encoded
    clean = build(checkpoint, beir, tmp_path / "clean", factory="Flat", progress=False)
    a, b = Searcher(out).index.reconstruct_n(0, 40), Searcher(clean).index.reconstruct_n(0, 40)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_shards_then_merge(tmp_path, checkpoint, beir, monkeypatch):
    monkeypatch.setattr(build_mod, "PART_SIZE", 8)
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
    # a new BM25 index over all 41 passages (BM25's statistics are corpus-wide): that of the whole corpus
    bm25 = Searcher(out, bm25=True).bm25
    whole = BM25(read_corpus(beir) + read_corpus(new))
    queries = ["zebra guitar", "apple river", "comet"]
    assert bm25.ids == whole.ids and bm25.search(queries, 10) == whole.search(queries, 10)
    assert bm25.search(["zebra guitar"], 1)[0][0][0] == "x1"
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
    """`dpr eval`, `dpr bm25` and both `dpr mine` forms, as docs/evaluation.md and docs/index.md show them."""
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


# ----------------------------------------------------------------------------- review fixes


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, checkpoint, beir):
    return build(checkpoint, beir, tmp_path_factory.mktemp("flat") / "idx", factory="Flat", progress=False, device="cpu")


def no_encoding(*args, **kw):
    raise AssertionError("nothing may be encoded")


@pytest.mark.parametrize("argv, complaint", [
    (["index", "build", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["index", "build", "--batch-size", "-8"], "argument --batch-size: must be at least 1, got -8"),
    (["index", "build", "--part-size", "0"], "argument --part-size/--chunk: must be at least 1"),
    (["index", "build", "--memory-budget", "0GB"], "argument --memory-budget: must be more than 0 bytes"),
    (["index", "add", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["mine", "--num-negatives", "0"], "argument --num-negatives: must be at least 1"),
    (["mine", "--num-negatives", "-1"], "argument --num-negatives: must be at least 1"),
    (["mine", "--depth", "0"], "argument --depth: must be at least 1"),
    (["mine", "--skip-top", "-1"], "argument --skip-top: must be at least 0"),
    (["mine", "--margin", "nan"], "argument --margin: must be a finite number"),
])
def test_cli_refuses_sizes_that_are_not_positive(argv, complaint, capsys):
    """range(0, n, -1) is empty: a batch size <= 0 encoded nothing and indexed np.empty garbage, exit 0;
    --num-negatives 0 wrote every candidate."""
    common = {"index": ["--checkpoint", "c", "--corpus", "c", "--output", "o", "--index", "i"],
              "mine": ["--queries", "q", "--corpus", "c", "--output", "o"]}[argv[0]]
    if argv[:2] == ["index", "add"]:
        common = ["--index", "i", "--corpus", "c"]
    main = index_main if argv[0] == "index" else mine_main
    with pytest.raises(SystemExit) as stop:
        main([*argv[1:], *common])
    assert stop.value.code == 2 and complaint in capsys.readouterr().err


def test_library_refuses_negative_sizes(tmp_path, checkpoint, beir):
    with pytest.raises(ValueError, match="batch_size must be positive"):
        build(checkpoint, beir, tmp_path / "idx", factory="Flat", batch_size=-1, progress=False)
    with pytest.raises(ValueError, match="num_negatives >= 1"):
        mine(str(beir), read_corpus(beir), str(tmp_path / "m.jsonl"), num_negatives=0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("factory, complaint", [
    ("IVF4,PQ8", "training PQ codebooks of 256 centroids needs at least 256 vectors, the corpus has 40"),
    ("IVF64,Flat", "training 64 IVF lists needs at least 64 vectors"),
    ("OPQ8,IVF4,Flat", "the 256-centroid codebooks of OPQ8 needs at least 256"),
    ("PCA64,Flat", "a PCA cannot make 64 dimensions out of 32"),
    ("IDMap,Flat", "IDMap indexes take explicit ids"),
    ("NotAnIndex", "bad --factory 'NotAnIndex'"),
])
def test_factory_is_checked_before_anything_is_encoded(tmp_path, checkpoint, beir, monkeypatch, factory, complaint):
    monkeypatch.setattr(build_mod, "encode_texts", no_encoding)
    with pytest.raises(ArtifactError, match=complaint.replace("(", r"\(")):
        build(checkpoint, beir, tmp_path / "idx", factory=factory, progress=False, device="cpu")
    assert not list(tmp_path.iterdir())  # no embeddings written, no work directory


@pytest.mark.parametrize("factory, params, inner", [
    ("IVF4_HNSW8,Flat", {"nprobe": 4, "efSearch": 128}, lambda ix: faiss.downcast_index(faiss.extract_index_ivf(ix).quantizer).hnsw.efSearch),
    ("PCA16,HNSW8", {"efSearch": 128}, lambda ix: faiss.downcast_index(faiss.downcast_index(ix).index).hnsw.efSearch),
    ("HNSW32", {"efSearch": 128}, lambda ix: ix.hnsw.efSearch),
    ("IVF16,SQ8", {"nprobe": 16}, lambda ix: 128),
])
def test_search_params_reach_inside_quantizers_and_pre_transforms(vectors, factory, params, inner):
    """An IVF with an HNSW quantizer (AttributeError on .hnsw) and a PCA in front of HNSW (no .hnsw on
    IndexPreTransform) built fine only through ParameterSpace; the values survive write/read."""
    xb, xq = vectors
    index = make_index(factory, 32, xb, use_gpu=False, progress=False)
    assert factory_mod.tune_search(index) == params
    again = faiss.deserialize_index(faiss.serialize_index(index))
    assert inner(again) == 128
    if "nprobe" in params:
        assert faiss.extract_index_ivf(again).nprobe == params["nprobe"]
    assert recall_at_10(again, xq, xb) > 0.15  # PCA16 of random 32-dim vectors keeps little


def test_factory_through_a_pre_transform_builds_an_artifact(tmp_path, checkpoint, beir):
    out = build(checkpoint, beir, tmp_path / "idx", factory="PCA16,HNSW8", progress=False, device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["factory"] == "PCA16,HNSW8" and manifest["search_params"] == {"efSearch": 128}
    loaded = load_checkpoint(checkpoint)
    q = encode_texts(loaded.encoder, loaded.tokenizer, read_corpus(beir)[:3], "passage", CPU).numpy()
    assert len(Searcher(out, loaded.fingerprint).search(q, 5)[0]) == 5


def test_faiss_errors_in_training_are_artifact_errors(vectors, monkeypatch):
    def broken(self, x):
        raise RuntimeError("Error in void faiss::Clustering::train at Clustering.cpp:10: Error: 'nx >= k' failed: too few")

    monkeypatch.setattr(faiss.IndexIVFFlat, "train", broken)
    with pytest.raises(ArtifactError, match=r"--factory IVF16,Flat: FAISS failed to build it from 3000 vectors: 'nx >= k' failed"):
        make_index("IVF16,Flat", 32, vectors[0], use_gpu=False, progress=False)


def test_gpu_plan_flat_and_ivf_only_fp16_lookup_tables_for_pq():
    """Which factories faiss-gpu builds, with which GpuClonerOptions, on which device (a CPU test)."""
    cuda1, plan = torch.device("cuda", 1), lambda f, dev=torch.device("cuda", 1), ok=True: gpu_plan(
        faiss.index_factory(128, f, faiss.METRIC_INNER_PRODUCT), dev, ok)
    assert plan("Flat") == GpuPlan(1, use_float16=False)  # fp16 here would store the vectors in fp16
    assert plan("IVF64,Flat") == GpuPlan(1, use_float16=False)
    assert plan("IVF64,SQ8") == GpuPlan(1, use_float16=False)
    assert plan("IVF64,PQ64") == GpuPlan(1, use_float16=True)  # fp32 lookup tables of PQ64 exceed shared memory
    assert plan("IVF64,PQ64", torch.device("cuda", 3)) == GpuPlan(3, use_float16=True)  # the runtime's device, not current_device()
    for cpu_only in ("HNSW32", "PQ16", "SQ8", "PCA64,IVF64,Flat", "OPQ16,IVF64,PQ16", "IVF64_HNSW32,Flat", "IVF64,PQ16x4fs",
                     "IVF64,PQ16x4", "IVF64,Flat,Refine(Flat)", "HNSW32_PQ16"):
        assert plan(cpu_only) is None, cpu_only
    assert plan("Flat", torch.device("cpu")) is None  # --device cpu keeps FAISS on the CPU
    assert plan("Flat", cuda1, False) is None  # faiss-cpu
    assert plan("Flat", torch.device("cuda")) == GpuPlan(0, use_float16=False)


def test_gpu_failure_falls_back_to_the_cpu(vectors, monkeypatch, caplog):
    xb, xq = vectors

    def refuse(res, device, index, options):
        assert device == 2 and options.useFloat16 is False
        raise RuntimeError("Error in GpuIndexIVFFlat at GpuIndexIVFFlat.cu:1: Error: out of memory")

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", lambda: type("Options", (), {})(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", refuse, raising=False)
    with caplog.at_level(logging.WARNING, "index"):
        index = make_index("IVF16,Flat", 32, xb, use_gpu=True, progress=False, device=torch.device("cuda", 2))
    assert "faiss-gpu cannot build IVF16,Flat (out of memory); building it on the CPU" in caplog.text
    cpu = make_index("IVF16,Flat", 32, xb, use_gpu=False, progress=False)
    np.testing.assert_array_equal(index.search(xq, 10)[1], cpu.search(xq, 10)[1])


@pytest.mark.skipif(not gpu_faiss_available(), reason="needs CUDA and faiss-gpu")
def test_builds_on_gpu_faiss(caplog):
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((20_000, 128)).astype(np.float32)
    xq = rng.standard_normal((100, 128)).astype(np.float32)
    with caplog.at_level(logging.INFO, "index"):
        flat = make_index("Flat", 128, xb, use_gpu=True, progress=False, device=torch.device("cuda", 0))
        ivfpq = make_index("IVF64,PQ64", 128, xb, use_gpu=True, progress=False, device=torch.device("cuda", 0))
    assert "building Flat on GPU 0" in caplog.text and "building IVF64,PQ64 on GPU 0" in caplog.text
    assert "cannot build" not in caplog.text
    assert isinstance(flat, faiss.IndexFlat) and isinstance(ivfpq, faiss.IndexIVFPQ)  # saved as CPU indexes
    D, I = flat.search(xq, 10)
    d_ref, i_ref = brute_force(xq, xb, 10)
    np.testing.assert_allclose(D, d_ref, rtol=1e-4, atol=1e-4)  # fp32 storage: exact search
    assert np.mean(I == i_ref) > 0.99
    assert recall_at_10(ivfpq, xq, xb) >= 0.3


def test_build_gives_faiss_the_runtime_device_and_memory_mapped_parts(tmp_path, checkpoint, beir, monkeypatch):
    """FAISS builds where the encoder ran (--device cpu: the CPU), from the part files memory-mapped,
    not from one n x D array in memory."""
    monkeypatch.setattr(build_mod, "PART_SIZE", 16)
    real, seen = build_mod.make_index, {}

    def spy(factory, dim, xb, use_gpu=False, progress=False, device=None):
        seen.update(xb=xb, device=device)
        return real(factory, dim, xb, use_gpu, progress, device)

    monkeypatch.setattr(build_mod, "make_index", spy)
    build(checkpoint, beir, tmp_path / "idx", factory="Flat", progress=False, device="cpu")
    assert seen["device"] == torch.device("cpu")
    assert [len(p) for p in seen["xb"]] == [16, 16, 8] and all(isinstance(p, np.memmap) for p in seen["xb"])


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8"])
def test_index_from_parts_equals_index_from_one_array(vectors, factory):
    xb, xq = vectors
    whole = make_index(factory, 32, xb, use_gpu=False, progress=False)
    parts = make_index(factory, 32, [xb[:1000], xb[1000:1001], xb[1001:]], use_gpu=False, progress=False)
    for a, b in zip(whole.search(xq, 10), parts.search(xq, 10)):
        np.testing.assert_array_equal(a, b)
    rows = np.sort(np.random.default_rng(1).choice(3000, 700, replace=False))  # a training sample, read across parts
    np.testing.assert_array_equal(factory_mod._take_rows([xb[:1000], xb[1000:1001], xb[1001:]], rows), xb[rows])


def test_manifest_names_the_checkpoint_by_absolute_path(tmp_path, checkpoint, beir, monkeypatch):
    """A relative --checkpoint was stored as typed: serving or adding from another directory failed."""
    monkeypatch.chdir(checkpoint.parent)
    out = build(Path(checkpoint.name), beir, tmp_path / "idx", factory="Flat", progress=False, device="cpu")
    assert json.loads((out / "manifest.json").read_text())["checkpoint"] == str(checkpoint.resolve())
    monkeypatch.chdir(tmp_path)
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"_id": "x1", "title": "zebra", "text": "the zebra and the guitar"}) + "\n")
    add(out, new, progress=False, device="cpu")  # the checkpoint named in the manifest
    assert Searcher(out).count == 41


def test_resumed_build_of_an_edited_corpus_starts_over(tmp_path, checkpoint, beir, monkeypatch, caplog):
    """Same path, count, first and last id, another text: the old parts were reused."""
    monkeypatch.setattr(build_mod, "PART_SIZE", 8)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text((beir / "corpus.jsonl").read_text())
    real, calls = build_mod.encode_texts, []

    def dying(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(build_mod, "encode_texts", dying)
    with pytest.raises(KeyboardInterrupt):
        build(checkpoint, corpus, tmp_path / "idx", factory="Flat", progress=False, device="cpu")
    lines = corpus.read_text().splitlines()
    first = json.loads(lines[1])
    lines[1] = json.dumps({**first, "text": "the comet near the harbor"})  # part 0, already encoded
    corpus.write_text("\n".join(lines) + "\n")
    calls.clear()
    monkeypatch.setattr(build_mod, "encode_texts", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    with caplog.at_level(logging.WARNING, "index"):
        out = build(checkpoint, corpus, tmp_path / "idx", factory="Flat", progress=False, device="cpu")
    assert "the corpus changed since this build was interrupted" in caplog.text
    assert len(calls) == 5  # every part encoded again
    clean = build(checkpoint, corpus, tmp_path / "clean", factory="Flat", progress=False, device="cpu")
    np.testing.assert_allclose(Searcher(out).index.reconstruct_n(0, 40), Searcher(clean).index.reconstruct_n(0, 40), atol=1e-6)


def test_work_directory_never_exists_without_its_build_json(tmp_path, checkpoint, beir, monkeypatch):
    """Under torchrun, a rank that saw .partial between another rank's mkdir and its build.json
    removed it as a leftover (with the other rank's parts). The directory now appears complete."""
    work, seen = tmp_path / ".idx.partial", []
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kw):
        real_mkdir(self, *args, **kw)
        seen.append(work.is_dir() and not (work / "build.json").exists())

    monkeypatch.setattr(Path, "mkdir", mkdir)
    build(checkpoint, beir, tmp_path / "idx", factory="Flat", shard=(0, 2), progress=False, device="cpu")
    assert seen and not any(seen)


def test_work_directory_of_a_build_interrupted_before_the_part_size_rename_is_reused(tmp_path):
    """build.json written when the part size was called ``chunk``: the same job, so its encoded parts
    are kept and the build resumes (not refused as another --part-size)."""
    job = {"checkpoint_fingerprint": "f", "corpus": "c", "corpus_sha256": "h", "count": 3, "part_size": 8, "dim": 4}
    work = tmp_path / ".idx.partial"
    work.mkdir()
    old = {**{k: v for k, v in job.items() if k != "part_size"}, "chunk": 8}
    (work / "build.json").write_text(json.dumps(old))
    (work / "emb-000000.npy").write_bytes(b"encoded")
    workdir_mod.prepare_work(work, job)
    assert (work / "emb-000000.npy").read_bytes() == b"encoded"
    (work / "build.json").write_text(json.dumps({**old, "chunk": 16}))
    with pytest.raises(ArtifactError, match="part_size differ"):
        workdir_mod.prepare_work(work, job)


def test_concurrent_starts_agree_on_one_work_directory(tmp_path):
    """Processes starting together (threads here) over a leftover without build.json: one removes it,
    all end up in the same directory, and none removes a directory another one has put in place."""
    job = {"checkpoint_fingerprint": "f", "corpus": "c", "corpus_sha256": "h", "count": 3, "part_size": 8, "dim": 4}
    for round_ in range(10):
        work = tmp_path / f".idx{round_}.partial"
        work.mkdir()
        (work / "emb-000000.npy").write_bytes(b"left over")
        barrier, errors = threading.Barrier(4), []

        def start(i):
            try:
                barrier.wait()
                workdir_mod.prepare_work(work, job)
                (work / f"mine-{i}").write_text("x")  # each one's part
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert json.loads((work / "build.json").read_text()) == job and not (work / "emb-000000.npy").exists()
        assert sorted(p.name for p in work.glob("mine-*")) == [f"mine-{i}" for i in range(4)]
    # nothing else left beside them: no .new-/.stale- directories; the lock file stays until the build completes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f".idx{r}.{s}" for r in range(10) for s in ("partial", "lock"))


def test_model_mining_takes_negatives_from_the_index(tmp_path, checkpoint, beir, flat_index):
    """An index holding a passage --corpus lacks made `dpr mine --method model` fail with KeyError;
    negatives must carry the indexed text."""
    out = tmp_path / "idx"
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"_id": "x1", "title": "zebra", "text": "the zebra and the guitar"}) + "\n")
    add(flat_index, new, output=out, progress=False, device="cpu")
    stats = mine(str(beir), read_corpus(beir), str(tmp_path / "m.jsonl"), split="train", method="model",
                 checkpoint=str(checkpoint), index_dir=str(out), num_negatives=50, margin=-10.0, device="cpu")
    searcher = Searcher(out)
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert stats["examples"] == len(lines) == 40
    negatives = [n for line in lines for n in line["negatives"]]
    assert any(n["id"] == "x1" for n in negatives)
    stored = searcher.passages([n["id"] for n in negatives])
    assert all((n["title"], n["text"]) == (stored[n["id"]].title, stored[n["id"]].text) for n in negatives)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("content, complaint", [
    ('{"question": "what", "answers": "the"}\n', r"q.jsonl:1: field 'answers' must be a list of strings"),
    ('{"question": "what", "answers": 5}\n', r"q.jsonl:1: field 'answers' must be a list of strings"),
    ('{"question": "ok", "answers": ["a"]}\n{"question": null, "answers": ["x"]}\n', r"q.jsonl:2: question: missing field 'question'"),
    ('{"id": 7, "question": "a"}\n{"id": "7", "question": "b"}\n', r"q.jsonl:2: query id '7' already used on line 1"),
    ('{"question": "a"}\n{"text": "b"}\n', r"q.jsonl:2: question: missing field 'question'"),
])
def test_dpr_questions_are_read_with_the_format_checks(tmp_path, content, complaint):
    with pytest.raises(DataError, match=complaint):
        read_queries(write(tmp_path / "q.jsonl", content))


def test_question_ids_do_not_collide_with_line_numbers(tmp_path):
    queries, answers, _ = read_queries(write(tmp_path / "q.jsonl", '{"question": "a", "answers": ["x"]}\n'
                                                                    '{"id": "1", "question": "b", "answers": ["y"]}\n'))
    assert sorted(queries.values()) == ["a", "b"] and sorted(map(tuple, answers.values())) == [("x",), ("y",)]


@pytest.mark.parametrize("content, complaint", [
    (b"what\t['a']\n\xff\xfe\t['b']\n", r"qa.tsv:2: not UTF-8 text"),
    (b"what\t['a']\nwho\t'b'\n", r"qa.tsv:2: answers must be a list of strings"),
    (b"what\t['a']\nwho\t[1]\n", r"qa.tsv:2: answers must be a list of strings"),
    (b"what\t['a']\nwho\n", r"qa.tsv:2: expected 'question<TAB>answers', got 1 columns"),
])
def test_dpr_qas_errors_name_the_line(tmp_path, content, complaint):
    with pytest.raises(DataError, match=complaint):
        read_queries(write(tmp_path / "qa.tsv", content))


def test_eval_bm25_and_mine_share_the_judgement_checks(tmp_path, beir, capsys):
    corpus = read_corpus(beir)
    unjudged = write(tmp_path / "q.jsonl", '{"question": "apple river"}\n')
    with pytest.raises(DataError, match="q.jsonl: no relevance judgements"):
        evaluate_bm25(corpus, str(unjudged))
    with pytest.raises(DataError, match="q.jsonl: no relevance judgements"):  # before the checkpoint is opened
        evaluate_index("no-such-checkpoint", "no-such-index", str(unjudged))
    assert bm25_main(["--corpus", str(beir), "--queries", str(unjudged)]) == 2
    assert "no relevance judgements" in capsys.readouterr().err
    strangers = write(tmp_path / "qrels.tsv", "zz\td1\t1\n")
    with pytest.raises(DataError, match=r"qrels.tsv: none of its 1 judged query ids is in .*queries.jsonl \(first: 'zz'\)"):
        evaluate_bm25(corpus, str(beir / "queries.jsonl"), str(strangers))
    with pytest.raises(DataError, match="qrels.tsv: none of its 1 judged query ids"):
        mine(str(beir / "queries.jsonl"), corpus, str(tmp_path / "m.jsonl"), str(strangers))
    zero = write(tmp_path / "zero.tsv", "q1\td1\t0\n")
    with pytest.raises(DataError, match="zero.tsv: no judgement with a score > 0"):
        evaluate_bm25(corpus, str(beir / "queries.jsonl"), str(zero))
    answered = write(tmp_path / "a.jsonl", '{"question": "apple", "answers": ["apple"]}\n')
    with pytest.raises(DataError, match="mining needs relevance judgements"):
        mine(str(answered), corpus, str(tmp_path / "m.jsonl"))
    assert evaluate_bm25(corpus, str(answered))["queries"] == 1


def test_os_errors_at_the_cli_edge_name_the_path(tmp_path, beir, capsys):
    afile = write(tmp_path / "afile", "")
    assert mine_main(["--queries", str(beir), "--corpus", str(beir), "--output", str(afile / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{afile / 'm.jsonl'}: cannot be created, {afile} is a file" in err and "Traceback" not in err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")  # a model directory as far as the path checks go
    assert index_main(["build", "--checkpoint", str(tmp_path / "c"), "--corpus", str(beir), "--output", str(afile / "idx")]) == 2
    assert f"{afile} is a file" in capsys.readouterr().err

    def unreadable():
        open(tmp_path / "missing" / "x")

    assert _run("dpr x", unreadable) == 2
    assert capsys.readouterr().err.strip() == f"dpr x: error: {tmp_path / 'missing' / 'x'}: No such file or directory"


def test_searcher_sets_search_params_inside_pre_transforms_and_quantizers():
    """Searcher.set_search_params (the manifest's values, or an override) reaches an HNSW behind a
    PCA and the HNSW quantizer of an IVF, and ignores what an index does not have."""
    from dpr_service.core.search import Searcher

    class Bare(Searcher):
        def __init__(self, index):
            self.index = index

    xb = np.random.default_rng(0).standard_normal((500, 32)).astype(np.float32)
    pca = faiss.index_factory(32, "PCA16,HNSW8", faiss.METRIC_INNER_PRODUCT)
    pca.train(xb)
    Bare(pca).set_search_params(nprobe=3, efSearch=77)
    assert faiss.downcast_index(faiss.downcast_index(pca).index).hnsw.efSearch == 77
    ivf = faiss.index_factory(32, "IVF4_HNSW8,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(xb)
    Bare(ivf).set_search_params(nprobe=3, efSearch=77)
    assert ivf.nprobe == 3 and faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 77
    Bare(faiss.IndexFlatIP(32)).set_search_params(nprobe=3, efSearch=77)  # nothing to set: no error


# ----------------------------------------------------------------------------- evaluation conventions


def _beir_dir(root: Path, corpus: list[dict], queries: dict[str, str], qrels: list[tuple[str, str, int]]) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(p) + "\n" for p in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t{s}\n" for q, p, s in qrels))
    return root


def _both_evaluations(tmp_path: Path, checkpoint: Path, data: Path, conventions: Conventions = Conventions()):
    """dpr eval (a Flat index) and the trainer's evaluation of the same BEIR directory."""
    out = build(checkpoint, data, tmp_path / f"idx-{data.name}", factory="Flat", progress=False)
    by_index = evaluate_index(str(checkpoint), str(out), str(data), split="test", progress=False, conventions=conventions)
    loaded = load_checkpoint(checkpoint)
    by_trainer = retrieval_eval(loaded.encoder, loaded.tokenizer, read_eval_data(data, "test"), CPU, conventions=conventions)
    return by_index, by_trainer


def test_two_identical_passages_tie_by_id_in_dpr_eval_and_the_trainer(tmp_path, checkpoint):
    """Issue 14.1: two identical passages, one relevant. trec_eval ranks the tie by id, descending
    ("b" first), so nDCG@10 is 1/log2(3) = 0.631 whichever comes first in corpus.jsonl."""
    same = {"title": "", "text": "apple river mountain"}
    results = []
    for order in (["a", "b"], ["b", "a"]):
        data = _beir_dir(tmp_path / "".join(order), [{"_id": i, **same} for i in order],
                         {"q": "apple river"}, [("q", "a", 1)])
        results.extend(_both_evaluations(tmp_path, checkpoint, data))
    for got in results:
        assert got["ndcg@10"] == pytest.approx(1 / np.log2(3)) and got["mrr@10"] == pytest.approx(0.5)


def _tricky_beir(root: Path, beir: Path, reverse: bool) -> Path:
    """The test split of ``beir`` with copies of passages under other ids, graded judgements, a
    query judged only 0, judged ids absent from the corpus, and a query whose id is a passage id."""
    corpus = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    corpus += [{**p, "_id": f"copy-{p['_id']}"} for p in corpus[:12]] + [{"_id": "q3", "title": "", "text": "apple"}]
    queries = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (beir / "queries.jsonl").read_text().splitlines()}
    qrels = [(f"q{i}", f"d{i}", 1 + i % 3) for i in range(1, 40, 2)]
    qrels += [("q1", "copy-d3", 2), ("q3", "gone", 2), ("q5", "d6", -1), ("q0", "d0", 0), ("q3", "q3", 1)]
    return _beir_dir(root, corpus[::-1] if reverse else corpus, queries, qrels)


@pytest.mark.parametrize("conventions", [
    Conventions(),
    Conventions(BEIR_MEASURES + ("mrr@10",), judged_queries="all", ignore_identical_ids=True),
    Conventions(("ndcg@3", "recall@5", "p@5", "map@20"), relevance_level=2),
], ids=["default", "beir", "level2"])
def test_dpr_eval_equals_the_trainer_in_edge_cases_whatever_the_corpus_order(tmp_path, checkpoint, beir, conventions):
    results = [r for reverse in (False, True)
               for r in _both_evaluations(tmp_path, checkpoint, _tricky_beir(tmp_path / f"t{reverse}", beir, reverse), conventions)]
    reference = results[0]
    assert set(conventions.measures) <= set(reference)
    for got in results[1:]:
        for key in conventions.measures:
            assert got[key] == pytest.approx(reference[key], abs=1e-9), key


def test_bm25_metrics_do_not_depend_on_corpus_order(tmp_path, beir):
    forward = _tricky_beir(tmp_path / "f", beir, False)
    backward = _tricky_beir(tmp_path / "b", beir, True)
    c = Conventions(("ndcg@10", "mrr@10", "recall@5", "p@3"))
    got = [evaluate_bm25(read_corpus(d), str(d), split="test", conventions=c) for d in (forward, backward)]
    assert got[0] == got[1]


def test_eval_cli_takes_the_conventions(tmp_path, checkpoint, beir, capsys):
    data = _tricky_beir(tmp_path / "t", beir, False)
    out = build(checkpoint, data, tmp_path / "idx", factory="Flat", progress=False)
    args = ["--checkpoint", str(checkpoint), "--index", str(out), "--queries", str(data), "--json"]
    assert eval_main(args + ["--measures", "beir", "--judged-queries", "all", "--ignore-identical-ids"]) == 0
    assert set(BEIR_MEASURES) <= set(json.loads(capsys.readouterr().out))
    with pytest.raises(SystemExit):
        eval_main(args + ["--measures", "ndcg@ten"])
    assert "unknown measure 'ndcg@ten'" in capsys.readouterr().err
    assert eval_main(args + ["--tie-tolerance", "0"]) == 0
    capsys.readouterr()
    assert bm25_main(["--corpus", str(data), "--queries", str(data), "--measures", "map@5,p@2", "--json"]) == 0
    assert {"map@5", "p@2"} <= set(json.loads(capsys.readouterr().out))


def test_mining_never_takes_a_copy_of_a_positive(tmp_path, checkpoint):
    """Issue 14.5: two passages of identical text under different ids; the copy was the top BM25
    (and dense) negative of the positive's question. It is skipped, and the skip is counted."""
    same = {"title": "walnut", "text": "the walnut and the comet story"}
    corpus = [{"_id": "pos", **same}, {"_id": "copy", **same}, {"_id": "Copy2", "title": "Walnut ", "text": "the  walnut and the comet story"}]
    corpus += [{"_id": f"n{i}", "title": w, "text": f"the {w} and the comet story"} for i, w in enumerate(["apple", "river", "engine"])]
    data = _beir_dir(tmp_path / "data", corpus, {"q": "walnut comet"}, [("q", "pos", 1)])
    (data / "qrels" / "train.tsv").write_text((data / "qrels" / "test.tsv").read_text())
    out = build(checkpoint, data, tmp_path / "idx", factory="Flat", progress=False)
    for method, extra in (("bm25", {}), ("model", {"checkpoint": str(checkpoint), "index_dir": str(out), "margin": -10.0})):
        path = tmp_path / f"{method}.jsonl"
        stats = mine(str(data), read_corpus(data), str(path), split="train", method=method, num_negatives=5, device="cpu", **extra)
        negatives = [n["id"] for n in json.loads(path.read_text())["negatives"]]
        assert "copy" not in negatives and "Copy2" not in negatives and "pos" not in negatives, method
        assert stats["skipped_copy_of_positive"] == 2, method
    r = subprocess.run([sys.executable, "-m", "dpr_service.cli", "mine", "--queries", str(data), "--corpus", str(data),
                        "--output", str(tmp_path / "cli.jsonl")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "2 copies of a positive" in r.stdout, r.stderr


def test_build_progress_moves_per_encoder_batch_and_reports_the_whole_time(tmp_path, checkpoint, beir, monkeypatch, caplog):
    """Issue 14.7: the bar showed 0/5183 for six minutes and jumped once per 8,192-passage part, and
    the closing line's time was the FAISS part's only."""
    import re
    import time

    updates = []

    class Bar:
        def __init__(self, *a, total=None, initial=0, desc="", **k):
            self.desc = desc

        def update(self, n):
            if self.desc == "encoding passages":
                updates.append(n)

        def set_postfix(self, **k):
            pass

        def close(self):
            pass

    monkeypatch.setattr(build_mod, "tqdm", Bar)
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, "index"):
        build(checkpoint, beir, tmp_path / "idx", factory="Flat", batch_size=8, progress=True, device="cpu")
    wall = time.perf_counter() - t0
    assert updates == [8] * 5  # 40 passages in one part, five encoder batches
    reported = float(re.search(r"built .* in ([0-9.]+)s", caplog.text).group(1))
    assert reported >= 0.5 * wall - 0.05, (reported, wall)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF64,PQ8", "PCA16,IVF64,Flat"])
def test_bytes_per_vector_comes_from_faiss_and_matches_a_filled_index(vectors, factory):
    """--factory auto's memory estimate against what filling an index adds to its serialized size
    (fixed costs, such as centroids and codebooks, measured before the vectors are added)."""
    from index.factory import bytes_per_vector

    xb, _ = vectors
    index = faiss.index_factory(32, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    empty = len(faiss.serialize_index(index))
    index.add(xb)
    measured = (len(faiss.serialize_index(index)) - empty) / len(xb)
    estimate = bytes_per_vector(factory, 32)
    assert estimate * 0.97 <= measured <= estimate * 1.03, (estimate, measured)


def test_bm25_prints_no_debug_lines(beir, caplog):
    """Issue 14.14: importing bm25s set its logger to DEBUG, so every `dpr bm25`/`dpr mine` printed
    'DEBUG bm25s: Building index from IDs objects' under the CLI's INFO handler."""
    with caplog.at_level(logging.DEBUG):
        BM25(read_corpus(beir)).search(["the the the", "apple river"], 3)  # a query without a searchable word too
    assert [r for r in caplog.records if r.name.startswith("bm25s")] == []


# ----------------------------------------------------------------------------- BM25 on text it cannot tokenise (issue 31.5)

UNINDEXABLE = ["the of and", "!!! ... ???", "a", "is it, or was it?", "—"]


def _corpus_file(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_a_corpus_bm25_cannot_index_builds_its_dense_index_with_a_warning(tmp_path, checkpoint, caplog):
    """bm25s raised `max() arg is an empty sequence` and not even the dense index was built."""
    corpus, out = _corpus_file(tmp_path / "corpus.jsonl", UNINDEXABLE), tmp_path / "idx"
    with caplog.at_level(logging.WARNING):
        assert index_main(["build", "--checkpoint", str(checkpoint), "--corpus", str(corpus), "--output", str(out),
                           "--factory", "Flat", "--no-progress"]) == 0
    assert not (out / "bm25").exists()
    assert any("no BM25 index" in r.getMessage() and "stop words" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)
    searcher = Searcher(out, bm25=True)
    assert searcher.count == len(UNINDEXABLE) and searcher.bm25 is None


def test_dpr_bm25_on_a_corpus_it_cannot_index_is_a_clear_error(tmp_path, beir, capsys):
    corpus = _corpus_file(tmp_path / "corpus.jsonl", UNINDEXABLE)
    with pytest.raises(ValueError, match="no passage has a word BM25 can index"):
        BM25(read_corpus(corpus))
    assert bm25_main(["--corpus", str(corpus), "--queries", str(beir), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no passage has a word BM25 can index" in err and "max()" not in err, err
    assert err.startswith(f"dpr bm25: error: {corpus}: "), err  # the file at fault named (issue 31.5)
    # dpr mine --method bm25 shares the kind (its questions judge the corpus's passages)
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"question {i}"}) + "\n"
                                                    for i in range(len(UNINDEXABLE))))
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(UNINDEXABLE))))
    assert mine_main(["--queries", str(tmp_path / "queries.jsonl"), "--qrels", str(tmp_path / "qrels.tsv"), "--corpus",
                      str(corpus), "--output", str(tmp_path / "mined.jsonl"), "--method", "bm25"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dpr mine: error: {corpus}: no passage has a word"), err


CJK = [("zh-tokyo", "日本的首都是东京。"), ("zh-paris", "法国的首都是巴黎，巴黎很美。"),
       ("ja-tokyo", "東京は日本の首都です。"), ("ja-cat", "私は猫が好きです"), ("en", "The capital of France is Paris.")]


def test_chinese_and_japanese_match_by_overlapping_bigrams():
    """`首都` found nothing: a whole sentence was one token. Lucene's CJK rule: overlapping bigrams."""
    from dpr_service.core.formats import Passage

    bm25 = BM25([Passage(text, id=pid) for pid, text in CJK])
    assert bm25.analyzer == "en-cjk-bigram"
    assert {pid for pid, _ in bm25.search(["首都"], 10)[0]} == {"zh-tokyo", "zh-paris", "ja-tokyo"}
    assert bm25.search(["巴黎在哪里"], 10)[0][0][0] == "zh-paris"
    assert bm25.search(["日本の首都は"], 10)[0][0][0] == "ja-tokyo"
    assert [pid for pid, _ in bm25.search(["猫が好き"], 10)[0]] == ["ja-cat"]
    assert [pid for pid, _ in bm25.search(["capital of france"], 10)[0]] == ["en"]
    assert bm25.tokens(["東京は日本"])[0] == ["東京", "京は", "は日", "日本"]
    assert bm25.tokens(["iPhone手机 and 3个"])[0] == ["iphon", "手机", "个"]  # a lone CJK character is a token of its own


def test_english_tokenisation_is_unchanged():
    """What BM25 sees of text without CJK characters is bm25s's default, as before the CJK rule: on
    SciFact's corpus when it is here, and on a few English, accented and Greek lines."""
    import bm25s
    import Stemmer

    from dpr_service.core.formats import Passage

    lines = ["The p53 protein's role in β-cell apoptosis (IL-6, TNF-α) — 12.5% of cases.",
             "Café naïve résumé coöperate", "Αλφα βήτα γάμμα", "don't won't it's", "x y z 1 22 333", ""]
    texts = [f"{p.title} {p.text}".strip() for p in (read_corpus(SCIFACT) if SCIFACT.exists() else [])] + lines
    stemmer = Stemmer.Stemmer("english")
    before = bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    bm25 = BM25([Passage("river")])
    assert bm25.tokens(texts) == before


SCIFACT = Path("/work/shared/data/scifact")


def test_an_artifact_without_an_analyser_record_keeps_todays_tokenisation(tmp_path):
    """Old artifacts (no bm25/analyzer.json) load with the analyser they were built with: bm25s's
    default split, English stop words and stemming, so a CJK sentence stays one token."""
    from dpr_service.core.formats import Passage

    corpus = [Passage(text, id=pid) for pid, text in CJK]
    legacy = BM25(corpus, analyzer="en")
    legacy.save(tmp_path / "bm25")
    (tmp_path / "bm25" / "analyzer.json").unlink()
    loaded = BM25.load(tmp_path / "bm25")
    assert loaded.analyzer == "en"
    assert loaded.search(["首都"], 10) == [[]] and loaded.search(["capital paris"], 10) == legacy.search(["capital paris"], 10)
    BM25(corpus).save(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "analyzer.json").read_text())["analyzer"] == "en-cjk-bigram"
    assert BM25.load(tmp_path / "new").search(["首都"], 10)[0]
    with pytest.raises(ValueError, match="analyzer"):
        BM25(corpus, analyzer="klingon")
