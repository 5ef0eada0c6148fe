"""Query-side checkpoints and runs (``dpr train --index``, issue 32 item 4) with everything else:
DDP (gradients and whole runs equal one process's), LoRA on the query encoder (the passage encoder
stays the index's, bit for bit), every export (sentence-transformers' two routes, transformers' DPR
classes, ONNX), ONNX Runtime serving, and a Milvus collection served with a query-side checkpoint.

Oracles: one process on the whole batch (DDP); the index's own passage encoder and its
``passage_fingerprint`` (LoRA, exports); the server's ``/encode`` and ``/search`` with torch (exports,
ONNX, Milvus). Tiny random BERTs without dropout (conftest.py), so ranks and processes compute the
same function.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, write_beir
from safetensors.torch import load_file

from dpr_service.core.checkpoint import load_base_model, load_checkpoint, passage_fingerprint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.export_cli import main as export_main
from dpr_service.core.formats import Passage
from dpr_service.core.search import Searcher
from index.build import build
from trainer.config import TrainConfig
from trainer.train import train

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["what is the apple near the river", "comet", "which castle of the dragon is near the silver ocean in winter"]
TEXTS = ["the apple is near the river fact", "zebra", "the castle and the dragon story of the forest near the ocean " * 3]
TITLED = [Passage("the apple is near the river fact", "apple"), Passage("the comet story", "comet and the planet")]

COSINE = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, query_max_length=16, passage_max_length=32,
                       shared=True, query_prompt="query: ", passage_prompt="passage: ")
DOT = EncoderConfig(pooling="cls", similarity="dot", temperature=1.0, query_max_length=16, passage_max_length=32, shared=True)


def write_data(root: Path) -> Path:
    """BEIR data whose questions the index holds, with what crosses ranks: a passage that is a copy
    of another (d24 = d5), questions with two positives (one of them another question's), so the
    ranks' known-positive rows have different widths and mask each other's positives."""
    beir = write_beir(root, n=24, splits=("train", "dev"))
    d5 = json.loads((beir / "corpus.jsonl").read_text().splitlines()[5])
    with open(beir / "corpus.jsonl", "a") as fh:
        fh.write(json.dumps({**d5, "_id": "d24"}) + "\n")
    with open(beir / "qrels" / "train.tsv", "a") as fh:
        fh.write("q6\td3\t1\nq10\td11\t1\nq17\td24\t1\nq2\td9\t1\n")
    return beir


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qsc-tiny"), dropout=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("qsc-data") / "beir")


def start(root: Path, model: Path, data: Path, config: EncoderConfig) -> tuple[Path, Path]:
    """A starting checkpoint of ``model`` with ``config`` and its Flat index of ``data``."""
    encoder, tokenizer = load_base_model(str(model), config)
    save_checkpoint(root / "ckpt", encoder, tokenizer)
    return root / "ckpt", build(root / "ckpt", data, root / "index", factory="Flat", progress=False, bm25=False)


def qs_cfg(ckpt: Path, data: Path, index: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=str(ckpt), train=str(data), index=str(index), output=str(out), batch_size=4, lr=1e-3,
                log_every=1, progress=False, seed=7, max_steps=6, index_negatives=3, device="cpu")
    base.update(kw)
    return TrainConfig.from_settings(**base)


@pytest.fixture(scope="module")
def cosine(tmp_path_factory, model, data):
    """(start checkpoint, its index, a query-side checkpoint trained against it): mean pooling,
    cosine, both prompts."""
    root = tmp_path_factory.mktemp("qsc-cosine")
    ckpt, index = start(root, model, data, COSINE)
    return ckpt, index, train(qs_cfg(ckpt, data, index, root / "run"))


@pytest.fixture(scope="module")
def dot(tmp_path_factory, model, data):
    """The same with CLS pooling, dot product and no prompts (what transformers' DPR classes hold)."""
    root = tmp_path_factory.mktemp("qsc-dot")
    ckpt, index = start(root, model, data, DOT)
    return ckpt, index, train(qs_cfg(ckpt, data, index, root / "run", lr=1e-2))


def weights(path: Path, side: str) -> dict[str, torch.Tensor]:
    return load_file(path / side / "model.safetensors")


def assert_query_side(ckpt: Path, index: Path, out: Path) -> None:
    """``out`` is a query-side checkpoint of ``index``: two encoders, the passage one equal to the
    start's (by weights and passage fingerprint), the query one trained."""
    start_w, new = weights(ckpt, "query_encoder"), load_checkpoint(out)
    manifest = json.loads((index / "manifest.json").read_text())
    assert not new.config.shared
    assert new.passage_fingerprint == manifest["passage_fingerprint"] == passage_fingerprint(new.encoder, new.tokenizer)
    passage = new.encoder.passage_model.state_dict()
    assert all(torch.equal(passage[k], start_w[k]) for k in start_w)
    query = new.encoder.query_model.state_dict()
    assert any(not torch.equal(query[k], start_w[k]) for k in start_w)


def app(**settings):
    from fastapi.testclient import TestClient

    from dpr_service.api.app import create_app
    from dpr_service.api.settings import Settings

    return TestClient(create_app(Settings(device="cpu", batch_max_wait_ms=1, **settings)))


def served_vectors(client, texts, kind: str) -> torch.Tensor:
    r = client.post("/encode", json={"texts": texts, "kind": kind})
    assert r.status_code == 200, r.text
    return torch.tensor(r.json()["embeddings"])


# ----------------------------------------------------------------------------- DDP


def torchrun(*args: str):
    from test_scale import torchrun as run

    return run(*args)


def test_ddp_query_side_gradients_equal_one_process_on_the_global_batch(tmp_path, cosine, data):
    """2 processes (gloo), each with half the questions: the query embeddings are gathered, every rank
    retrieves the same global negatives (topk) or scores the whole corpus, and DDP's averaged
    gradients of the query encoder (all of it, or its LoRA adapters) are those of one process on the
    whole batch (to 1e-5), for both --index-loss values; the masked pairs (known positives across
    ranks, copies) are counted alike."""
    pytest.importorskip("peft")  # the LoRA half
    from ddp_worker import QUERY_SIDE_LORA, QUERY_SIDE_LOSSES, query_side_grads
    from trainer.distributed import Dist

    ckpt, index, _ = cosine
    torchrun(str(ROOT / "tests" / "ddp_worker.py"), "query-side", str(ckpt), str(index), str(data), str(tmp_path))
    for mode in QUERY_SIDE_LOSSES:
        for lora_r in QUERY_SIDE_LORA:
            want = query_side_grads(str(ckpt), str(index), str(data), Dist(), mode, lora_r=lora_r)
            assert want["loss"].item() > 0.1 and want["masked"].item() > 0
            if lora_r is not None:  # the adapters train, and nothing else
                assert {n for n in want if n not in ("loss", "masked")} and all("lora_" in n for n in want if n not in ("loss", "masked"))
            for rank in (0, 1):
                got = load_file(str(tmp_path / f"query-side-{mode}-lora{lora_r}-rank{rank}.safetensors"))
                # DDP froze the pooler (no gradient reaches it); one process leaves its grad None too
                assert got.keys() == want.keys(), (mode, lora_r, rank, sorted(got.keys() ^ want.keys())[:3])
                for name in want:
                    assert torch.allclose(got[name], want[name], atol=1e-5, rtol=0), \
                        (mode, lora_r, rank, name, (got[name] - want[name]).abs().max())


def _flags(out: Path, ckpt: Path, data: Path, index: Path, **kw) -> list[str]:
    args = dict(model=ckpt, train=data, index=index, output=out, batch_size=4, lr=1e-3, max_steps=4, warmup_steps=0,
                log_every=1, seed=7, device="cpu", index_negatives=3)
    args.update(kw)
    return [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in args.items()] + ["--no-progress"]


@pytest.mark.parametrize("loss", ["topk", "corpus"])
def test_torchrun_query_side_training_matches_one_process_and_resumes(tmp_path, cosine, data, loss):
    """dpr train --index under torchrun (2 processes): every step's loss and gradient norm are one
    process's; the final weights agree; the passage encoder is the index's; stopped and resumed
    under torchrun, the query encoder equals the uninterrupted run's bit for bit."""
    from trainer.cli import main

    ckpt, index, _ = cosine
    assert main(_flags(tmp_path / "single", ckpt, data, index, index_loss=loss)) == 0
    torchrun("-m", "trainer", *_flags(tmp_path / "two", ckpt, data, index, index_loss=loss))
    one = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for mine, ref in zip(two, one, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    w1, w2 = weights(tmp_path / "single" / "last", "query_encoder"), weights(tmp_path / "two" / "last", "query_encoder")
    for k in w1:  # measured: 6e-7 (topk) and 1.8e-6 (corpus) apart, after moves of 2.5e-3
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), (k, (w1[k] - w2[k]).abs().max())
    assert_query_side(ckpt, index, tmp_path / "two" / "last")
    torchrun("-m", "trainer", *_flags(tmp_path / "resumed", ckpt, data, index, index_loss=loss, stop_after=2))
    torchrun("-m", "trainer", *_flags(tmp_path / "resumed", ckpt, data, index, index_loss=loss, resume=True))
    w3 = weights(tmp_path / "resumed" / "last", "query_encoder")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


# ----------------------------------------------------------------------------- LoRA


def test_lora_trains_the_query_encoder_only_and_serves_the_index(tmp_path, cosine, data):
    """--index --lora-r: adapters on the query encoder alone; the checkpoint loads with the index's
    passage encoder bit for bit (its passage fingerprint is the index's), Searcher accepts it, and
    the server answers /search with it, its sentence-transformers export has both routes; --resume
    continues it exactly."""
    pytest.importorskip("peft")
    from dpr_service.core import lora

    ckpt, index, _ = cosine
    cfg = dict(lora_r=4, lora_dropout=0.0, lr=1e-2, max_steps=6)
    out = train(qs_cfg(ckpt, data, index, tmp_path / "run", **cfg))
    assert (out / "query_encoder" / lora.ADAPTER_WEIGHTS).is_file()
    assert not (out / "passage_encoder" / lora.ADAPTER_WEIGHTS).exists(), "the frozen passage encoder got adapters"
    adapters = load_file(out / "query_encoder" / lora.ADAPTER_WEIGHTS)
    assert any(t.abs().sum() > 0 for k, t in adapters.items() if "lora_B" in k)  # trained: B left zero
    assert_query_side(ckpt, index, out)
    new = load_checkpoint(out)
    Searcher(index, new.identity)
    with app(index=index, checkpoint=out) as client:
        assert client.get("/readyz").status_code == 200
        torch.testing.assert_close(served_vectors(client, TEXTS, "passage"),
                                   _encode(ckpt, "passage", [Passage(t) for t in TEXTS]), atol=1e-6, rtol=0)
        assert client.post("/search", json={"queries": QUERIES, "top_k": 3}).status_code == 200
    st = pytest.importorskip("sentence_transformers")
    assert export_main(["--checkpoint", str(out), "--format", "sentence-transformers", "--output", str(tmp_path / "st")]) == 0
    model = st.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    torch.testing.assert_close(torch.as_tensor(model.encode_query(QUERIES)), _encode(out, "query", QUERIES), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.as_tensor(model.encode_document(TEXTS)),
                               _encode(ckpt, "passage", [Passage(t) for t in TEXTS]), atol=1e-5, rtol=0)
    train(qs_cfg(ckpt, data, index, tmp_path / "resumed", stop_after=3, **cfg))
    resumed = train(qs_cfg(ckpt, data, index, tmp_path / "resumed", resume=True, **cfg))
    a, b = adapters, load_file(resumed / "query_encoder" / lora.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _encode(ckpt: Path, kind: str, items) -> torch.Tensor:
    from dpr_service.core.device import Runtime
    from dpr_service.core.inference import encode_texts

    loaded = load_checkpoint(ckpt)
    return encode_texts(loaded.encoder, loaded.tokenizer, items, kind, Runtime(torch.device("cpu"), "fp32"))


# ----------------------------------------------------------------------------- exports


def test_sentence_transformers_export_has_the_query_and_the_index_routes(tmp_path, cosine):
    """The export of a query-side checkpoint is an asymmetric model: encode_query gives the trained
    query encoder's vectors, encode_document and plain encode() the index's passage encoder's: the
    server's /encode with that checkpoint and index, to 1e-5."""
    st = pytest.importorskip("sentence_transformers")
    ckpt, index, out = cosine
    assert export_main(["--checkpoint", str(out), "--format", "sentence-transformers", "--output", str(tmp_path / "st")]) == 0
    model = st.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    texts = QUERIES + ["river " * 40]
    with app(index=index, checkpoint=out) as client:
        assert client.get("/readyz").status_code == 200
        want_q, want_p = served_vectors(client, texts, "query"), served_vectors(client, texts, "passage")
    assert not torch.allclose(want_q, want_p, atol=1e-3)  # the two routes differ: a swap would show
    torch.testing.assert_close(want_p, _encode(ckpt, "passage", [Passage(t) for t in texts]), atol=1e-6, rtol=0)
    for name, got, want in (("encode_query", model.encode_query(texts), want_q),
                            ("encode_document", model.encode_document(texts), want_p),
                            ("encode", model.encode(texts), want_p)):
        got = torch.as_tensor(got)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), f"{name}: max diff {(got - want).abs().max():.2e} from /encode"
    card = (tmp_path / "st" / "README.md").read_text()
    source = load_checkpoint(out).passage_source
    assert source and source[:16] in card and "query-side" in card  # the card says whose passage encoder it keeps


def test_hf_dpr_export_is_the_trained_question_encoder_and_the_index_context_encoder(tmp_path, dot):
    from transformers import AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder

    ckpt, index, out = dot
    assert_query_side(ckpt, index, out)
    assert export_main(["--checkpoint", str(out), "--format", "hf-dpr", "--output", str(tmp_path / "dpr")]) == 0
    q_tok = AutoTokenizer.from_pretrained(tmp_path / "dpr" / "question_encoder")
    c_tok = AutoTokenizer.from_pretrained(tmp_path / "dpr" / "context_encoder")
    q_enc = DPRQuestionEncoder.from_pretrained(tmp_path / "dpr" / "question_encoder").eval()
    c_enc = DPRContextEncoder.from_pretrained(tmp_path / "dpr" / "context_encoder").eval()
    with torch.no_grad():
        q = q_enc(**q_tok(QUERIES, truncation=True, padding=True, return_tensors="pt")).pooler_output
        p = c_enc(**c_tok(TEXTS, truncation=True, padding=True, return_tensors="pt")).pooler_output
    torch.testing.assert_close(q, _encode(out, "query", QUERIES), atol=1e-5, rtol=0)
    torch.testing.assert_close(p, _encode(ckpt, "passage", [Passage(t) for t in TEXTS]), atol=1e-5, rtol=0)
    assert not torch.allclose(q, _encode(ckpt, "query", QUERIES), atol=1e-3)  # the trained one, not the start's


def test_onnx_export_has_the_trained_query_graph_and_the_index_passage_graph(tmp_path, cosine):
    pytest.importorskip("onnxruntime")
    from dpr_service.core.inference import encode_texts
    from dpr_service.core.onnx_export import OnnxEncoder, OnnxRuntime

    ckpt, index, out = cosine
    assert export_main(["--checkpoint", str(out), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx")) == ["passage.onnx", "query.onnx"]
    loaded = load_checkpoint(out)
    rt = OnnxRuntime(torch.device("cpu"), "fp32", onnx=OnnxEncoder(tmp_path / "onnx", loaded.fingerprint))
    passages = TITLED + [Passage(t) for t in TEXTS]
    torch.testing.assert_close(encode_texts(loaded.encoder, loaded.tokenizer, QUERIES, "query", rt, batch_size=2),
                               _encode(out, "query", QUERIES), atol=1e-4, rtol=0)
    torch.testing.assert_close(encode_texts(loaded.encoder, loaded.tokenizer, passages, "passage", rt, batch_size=2),
                               _encode(ckpt, "passage", passages), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- serving: ONNX Runtime, Milvus


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_onnx_runtime_serves_a_query_side_checkpoint_against_its_index(tmp_path, cosine, runtime):
    """DPR_RUNTIME=onnx / onnx-int8 with a query-side checkpoint and the index it was trained against:
    ready, /info says what serves, /search ranks as torch does (fp32: scores to 1e-4; int8: the same
    top passage, cosine of the query vectors >= 0.999)."""
    pytest.importorskip("onnxruntime")
    _, index, out = cosine
    body = {"queries": QUERIES, "top_k": 5}
    with app(index=index, checkpoint=out) as torch_app, \
            app(index=index, checkpoint=out, runtime=runtime, onnx_cache=tmp_path / "cache") as onnx_app:
        ready = onnx_app.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert onnx_app.get("/info").json()["runtime"]["runtime"] == runtime
        want, got = torch_app.post("/search", json=body).json(), onnx_app.post("/search", json=body).json()
        q_torch, q_onnx = served_vectors(torch_app, QUERIES, "query"), served_vectors(onnx_app, QUERIES, "query")
    if runtime == "onnx":
        torch.testing.assert_close(q_onnx, q_torch, atol=1e-4, rtol=0)
        from test_export import assert_same_ranking

        for g, w in zip(got["results"], want["results"]):
            assert_same_ranking(g, w)
    else:
        assert float(torch.nn.functional.cosine_similarity(q_onnx, q_torch, dim=1).min()) >= 0.999
        assert not torch.allclose(q_onnx, q_torch, atol=1e-6), "int8 gave fp32's numbers"
        assert [r[0]["id"] for r in got["results"]] == [r[0]["id"] for r in want["results"]]


def test_milvus_collection_is_served_with_a_query_side_checkpoint(tmp_path, cosine):
    """A Flat artifact exported to Milvus Lite carries dpr.passage_fingerprint; the server with the
    query-side checkpoint trained against that artifact serves the collection and answers /search
    as it does from the artifact itself."""
    pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
    pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    import numpy as np

    import index.milvus as export_mod
    from dpr_service.core.milvus import MilvusSearcher, connect, read_properties

    ckpt, index, out = cosine
    uri = str(tmp_path / "m.db")
    assert export_mod.export(index, uri, "dpr_v1", index_type="FLAT", alias="dpr", progress=False) == 25
    client = connect(uri)
    try:
        props = read_properties(client, "dpr_v1")
    finally:
        client.close()
    assert props["dpr.passage_fingerprint"] == json.loads((index / "manifest.json").read_text())["passage_fingerprint"]
    MilvusSearcher(uri, "dpr_v1", load_checkpoint(out).identity).close()
    body = {"queries": QUERIES, "top_k": 5, "with_text": True}
    with app(index=index, checkpoint=out) as faiss_app, app(milvus_uri=uri, milvus_collection="dpr", checkpoint=out) as milvus_app:
        ready = milvus_app.get("/readyz")
        assert ready.status_code == 200, ready.text
        want, got = faiss_app.post("/search", json=body).json(), milvus_app.post("/search", json=body).json()
    for w, g in zip(want["results"], got["results"], strict=True):
        assert [h["id"] for h in g] == [h["id"] for h in w]
        np.testing.assert_allclose([h["score"] for h in g], [h["score"] for h in w], atol=1e-5)
