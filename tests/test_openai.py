"""The OpenAI-compatible routes (``/v1/embeddings``, ``/v1/models``) with the clients users have.

A real ``dpr serve`` (a child process, with an API key and small ``DPR_MAX_*`` limits) answers the
``openai`` package and LangChain's ``OpenAIEmbeddings``. The oracles: ``/encode`` of the same server
for the vectors (to 1e-6), the checkpoint's Hugging Face tokenizer called directly for the token
counts, numpy's cosine ranking for LangChain's retrieval, OpenAI's documented error object for the
errors, and schemathesis (every check) over the new routes' published schema.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import WORDS, AsgiForward, write_beir
from fastapi.testclient import TestClient

from dpr_service.api.app import create_app
from dpr_service.api.settings import Settings
from dpr_service.core.checkpoint import load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from index.build import build

openai = pytest.importorskip("openai", reason="the `test` extra installs the openai client")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import load  # noqa: E402  (benchmarks/load.py: starts `dpr serve` and waits until it is ready)
KEY = "openai-test-key-0123456789"
LIMITS = {"max_queries": 8, "max_text_chars": 300, "max_body_bytes": 20_000}
QUERY_LEN, PASSAGE_LEN = 16, 32
rng = random.Random(21)
QUERIES = ["which falcon is near the meadow", "the zebra and the guitar", "lantern in winter", "copper dragon castle"]
PASSAGES = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(6)]  # some past PASSAGE_LEN


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_model):
    """A checkpoint whose query and passage encodings differ (prompts, max lengths) and its index."""
    root = tmp_path_factory.mktemp("openai")
    cfg = EncoderConfig(pooling="mean", similarity="dot", query_max_length=QUERY_LEN, passage_max_length=PASSAGE_LEN,
                        query_prompt="query: ", passage_prompt="passage: ")
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(root / "ckpt", encoder, tokenizer)
    build(root / "ckpt", write_beir(root / "beir", n=20), root / "index", factory="Flat", progress=False)
    return root


@pytest.fixture(scope="module")
def server(art):
    """``dpr serve`` as users start it (benchmarks/load.py's run_server; the environment carries the
    key and the limits); its base URL."""
    env = {"DPR_API_KEY": KEY, "DPR_DEVICE": "cpu", "DPR_BATCH_MAX_WAIT_MS": "1",
           **{f"DPR_{k.upper()}": str(v) for k, v in LIMITS.items()}}
    port = load.free_port()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        proc = load.run_server(str(art / "index"), batching=True, port=port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def vectors(response) -> np.ndarray:
    """The embeddings of an openai response: floats as given, base64 strings (what the client hands
    back when asked for base64 explicitly) decoded as OpenAI documents them, little-endian float32."""
    return np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") if isinstance(d.embedding, str)
                     else np.array(d.embedding) for d in response.data])


def encode(server: str, texts: list[str], kind: str) -> np.ndarray:
    """The oracle: this server's own ``/encode`` (DPR_MAX_QUERIES texts a request)."""
    out = []
    for start in range(0, len(texts), LIMITS["max_queries"]):
        r = httpx.post(f"{server}/encode", json={"texts": texts[start:start + LIMITS["max_queries"]], "kind": kind},
                       headers={"X-API-Key": KEY}, timeout=60)
        assert r.status_code == 200, r.text
        out += r.json()["embeddings"]
    return np.array(out, dtype=np.float64)


# ----------------------------------------------------------------------------- the openai client


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])  # None: the client's default (base64)
@pytest.mark.parametrize("input_type, kind, texts", [("query", "query", QUERIES), ("document", "passage", PASSAGES),
                                                     (None, "passage", PASSAGES)])  # None: the default, document
def test_openai_client_gets_encodes_embeddings_and_our_token_counts(server, client, art, encoding_format, input_type, kind, texts):
    kwargs = {"encoding_format": encoding_format} if encoding_format else {}
    if input_type:
        kwargs["extra_body"] = {"input_type": input_type}
    got = client.embeddings.create(model="anything", input=texts, **kwargs)
    want = encode(server, texts, kind)
    assert [d.index for d in got.data] == list(range(len(texts)))
    assert all(isinstance(d.embedding, str) for d in got.data) == (encoding_format == "base64")
    np.testing.assert_allclose(vectors(got), want, rtol=0, atol=1e-6)
    assert got.model == client.models.list().data[0].id and got.model.startswith("ckpt-")
    hf = load_checkpoint(art / "ckpt").tokenizer.hf  # the checkpoint's tokenizer, called here directly
    prompt, max_length = ("query: ", QUERY_LEN) if kind == "query" else ("passage: ", PASSAGE_LEN)
    tokens = sum(len(hf(prompt + t, truncation=True, max_length=max_length)["input_ids"]) for t in texts)
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
    single = client.embeddings.create(model="anything", input=texts[-1], **kwargs)  # a string, not a list
    np.testing.assert_allclose(vectors(single)[0], want[-1], rtol=0, atol=1e-6)


def test_input_type_picks_the_encoder(server, client):
    """Query and document embeddings of one text differ (prompts, max lengths), each as /encode's."""
    text = [PASSAGES[0]]
    as_query = client.embeddings.create(model="m", input=text, encoding_format="float", extra_body={"input_type": "query"})
    as_doc = client.embeddings.create(model="m", input=text, encoding_format="float", extra_body={"input_type": "document"})
    assert not np.allclose(as_query.data[0].embedding, as_doc.data[0].embedding, atol=1e-3)
    np.testing.assert_allclose(as_query.data[0].embedding, encode(server, text, "query")[0], rtol=0, atol=1e-6)


def test_base64_is_little_endian_float32(server):
    r = httpx.post(f"{server}/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "m", "input": QUERIES[:2], "encoding_format": "base64", "input_type": "query"})
    assert r.status_code == 200, r.text
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
    np.testing.assert_array_equal(got, encode(server, QUERIES[:2], "query").astype(np.float32))


def test_models_lists_the_served_checkpoint(server, client):
    models = client.models.list().data
    assert len(models) == 1
    info = httpx.get(f"{server}/info", headers={"X-API-Key": KEY}).json()
    m = models[0].model_dump()
    assert m["id"] == f'{Path(info["checkpoint"]["path"]).name}-{info["checkpoint"]["fingerprint"][:12]}'
    assert m["object"] == "model" and m["owned_by"] == "dpr-service"
    assert m["fingerprint"] == info["checkpoint"]["fingerprint"]
    assert m["dimensions"] == encode(server, ["apple"], "query").shape[1]
    assert abs(m["created"] - time.time()) < 24 * 3600


def test_model_id_names_the_run_and_the_weights(tmp_path, art):
    """A trainer's ``best``/``last`` is named with its run (a job's with the job id) and the weights'
    short fingerprint; /v1/embeddings answers with that id and accepts it, or any name, as ``model``."""
    fp = json.loads((art / "ckpt" / "dpr_config.json").read_text())["fingerprint"]
    cases = {tmp_path / "runs" / "tour" / "best": "tour-best", tmp_path / "jobs" / "j7f3a" / "run" / "last": "j7f3a-last",
             art / "ckpt": "ckpt"}
    for ckpt, label in cases.items():
        if ckpt != art / "ckpt":
            shutil.copytree(art / "ckpt", ckpt)  # the same weights (the index's fingerprint), elsewhere
        with TestClient(create_app(Settings(index=art / "index", checkpoint=ckpt, device="cpu"))) as c:
            listed = c.get("/v1/models").json()["data"]
            assert [m["id"] for m in listed] == [f"{label}-{fp[:12]}"]
            for name in (listed[0]["id"], ckpt.name, "anything"):  # the id, the id of old (best, last), any name
                r = c.post("/v1/embeddings", json={"model": name, "input": "apple"})
                assert r.status_code == 200, r.text
                assert r.json()["model"] == listed[0]["id"]


def test_models_of_a_base_model_directory(tmp_path, tiny_model):
    """A server of a base model (a Hugging Face directory, no dpr_config.json) lists it too."""
    index = build(tiny_model, write_beir(tmp_path / "beir", n=4), tmp_path / "index", factory="Flat", progress=False)
    with TestClient(create_app(Settings(index=index, checkpoint=tiny_model, device="cpu"))) as c:
        r = c.get("/v1/models")
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["id"] == f'{tiny_model.name}-{c.get("/info").json()["checkpoint"]["fingerprint"][:12]}'
        assert r.json()["data"][0]["created"] == int(tiny_model.stat().st_mtime)


# ----------------------------------------------------------------------------- errors: /encode's, in OpenAI's shape


def assert_openai_error(exc: Exception, status: int, param: str | None, code: str, message: str) -> dict:
    """``exc`` is the client's error for ``status`` with OpenAI's error object (all four fields)."""
    assert isinstance(exc, openai.APIStatusError) and exc.status_code == status, exc
    body = exc.body
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["param"] == param and body["code"] == code, body
    assert body["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert re.search(message, body["message"]), body["message"]
    return body


def test_the_key_as_a_bearer_token(server):
    for key in ["", "wrong", KEY[:-1]]:
        bad = openai.OpenAI(base_url=f"{server}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.embeddings.create(model="m", input="apple")
        assert_openai_error(e.value, 401, None, "invalid_api_key", "missing or wrong API key")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.get(f"{server}/v1/models", headers={"X-API-Key": KEY})  # X-API-Key works too, as everywhere
    assert r.status_code == 200


@pytest.mark.parametrize("kwargs, encode_body, status, param, code", [
    (dict(input=[[5, 6, 7]]), None, 422, "input", "invalid_value"),  # token-id lists: refused, said why
    (dict(input=[5, 6, 7]), None, 422, "input", "invalid_value"),
    (dict(input=["apple"] * 9), {"texts": ["apple"] * 9}, 422, "input", "invalid_value"),  # over DPR_MAX_QUERIES
    (dict(input=["apple", "x" * 301]), {"texts": ["apple", "x" * 301]}, 422, "input[1]", "invalid_value"),
    (dict(input="x" * 301), None, 422, "input", "invalid_value"),  # one text, sent as a string: named as sent
    (dict(input=["apple", " "]), {"texts": ["apple", " "]}, 422, "input", "invalid_value"),  # as /encode names it
    (dict(input=[]), None, 422, "input", "invalid_value"),
    (dict(input="apple", dimensions=7), None, 409, "dimensions", "unsupported_value"),
    (dict(input="apple", encoding_format="int8"), None, 422, "encoding_format", "invalid_value"),
    (dict(input="apple", extra_body={"input_type": "passage"}), None, 422, "input_type", "invalid_value"),
    (dict(input="apple", extra_body={"truncate": True}), None, 422, "truncate", "invalid_value"),
])
def test_bad_requests_are_encodes_errors_in_openais_shape(server, client, kwargs, encode_body, status, param, code):
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(model="m", **kwargs)
    message = {"input[1]": "longer than 300 characters", "dimensions": "in 32 dimensions, not 7"}.get(param, ".")
    if kwargs.get("input") == "x" * 301:
        message = "^input: longer than 300 characters"
    body = assert_openai_error(e.value, status, param, code, message)
    if "input" in kwargs and kwargs["input"] and isinstance(kwargs["input"][0], list | int):
        assert "token-id lists are not accepted" in body["message"] and "check_embedding_ctx_length=False" in body["message"]
    if encode_body is not None:  # the same error as /encode gives, the field named as the client wrote it
        r = httpx.post(f"{server}/encode", json=encode_body, headers={"X-API-Key": KEY})
        assert r.status_code == status and body["message"] == r.json()["detail"].replace("texts", "input"), r.text


def test_dimensions_equal_to_the_checkpoints_are_accepted(client):
    dim = client.models.list().data[0].model_dump()["dimensions"]
    got = client.embeddings.create(model="m", input="apple", dimensions=dim, encoding_format="float")
    assert len(got.data[0].embedding) == dim


def test_transport_errors_in_openais_shape_on_v1_only(server):
    """The Guard's and the body checks' answers (413, 400, 415, 404) are OpenAI's shape under /v1 and
    unchanged elsewhere."""
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [  # (path, request kwargs, status, code)
        ("/v1/embeddings", dict(content=json.dumps({"model": "m", "input": "a" * 30_000}), headers={**auth, "content-type": "application/json"}), 413, "request_too_large"),
        ("/v1/embeddings", dict(content=b"{not json", headers={**auth, "content-type": "application/json"}), 400, "invalid_request"),
        ("/v1/embeddings", dict(content=b'{"model": "m", "input": "apple"}', headers={**auth, "content-type": "text/plain"}), 415, "unsupported_media_type"),
        ("/v1/nothing", dict(headers=auth), 404, "not_found"),
    ]
    for path, kwargs, status, code in cases:
        r = httpx.post(f"{server}{path}", **kwargs)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"], r.text
        assert "detail" not in r.json()
    r = httpx.post(f"{server}/encode", content=b"{not json", headers={**auth, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"].startswith("body: not valid JSON")  # other routes: unchanged


def test_not_ready_and_internal_errors_in_openais_shape(art, monkeypatch):
    """503 with Retry-After before the index loads, and a bare 500 for a bug, in OpenAI's shape."""
    with TestClient(create_app(Settings(index=art / "missing", device="cpu")), raise_server_exceptions=False) as c:
        r = c.post("/v1/embeddings", json={"model": "m", "input": "apple"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["message"].startswith("not ready")
    import dpr_service.api.routes.openai as routes

    monkeypatch.setattr(routes, "served_model", lambda *a: 1 / 0)
    with TestClient(create_app(Settings(index=art / "index", device="cpu")), raise_server_exceptions=False) as c:
        r = c.post("/v1/embeddings", json={"model": "m", "input": "apple"})
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "internal error", "type": "server_error", "param": None, "code": "internal_error"}}
        assert c.post("/encode", json={"texts": ["apple"]}).status_code == 200  # /encode does not name the model


# ----------------------------------------------------------------------------- a framework: LangChain


def test_langchain_openai_embeds_and_retrieves(server):
    """LangChain's OpenAIEmbeddings (raw text: check_embedding_ctx_length=False) fills its in-memory
    vector store with documents and searches it with query embeddings; the hits are numpy's cosine
    ranking of /encode's embeddings."""
    lc = pytest.importorskip("langchain_openai", reason="the `test` extra installs langchain-openai")
    from langchain_core.vectorstores import InMemoryVectorStore

    common = dict(model="dpr", base_url=f"{server}/v1", api_key=KEY, check_embedding_ctx_length=False,
                  chunk_size=LIMITS["max_queries"], max_retries=0)
    documents = lc.OpenAIEmbeddings(**common)  # input_type: the default, document
    queries = lc.OpenAIEmbeddings(**common, model_kwargs={"extra_body": {"input_type": "query"}})
    corpus = PASSAGES + [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(14)]  # 20: three requests
    store = InMemoryVectorStore(embedding=documents)
    store.add_texts(corpus, ids=[str(i) for i in range(len(corpus))])
    p = encode(server, corpus, "passage")
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    for q_text in QUERIES:
        hits = store.similarity_search_by_vector(queries.embed_query(q_text), k=5)
        q = encode(server, [q_text], "query")[0]
        want = np.argsort(-(p @ (q / np.linalg.norm(q))), kind="stable")[:5]
        assert [int(h.id) for h in hits] == want.tolist()


# ----------------------------------------------------------------------------- docs/openai.md


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_docs_python_runs_against_a_live_server(server, monkeypatch, capsys):
    """Every Python block of docs/openai.md, in order, against the live server (its address put in
    for the docs' localhost:8000, the key from the environment as the docs say)."""
    pytest.importorskip("langchain_openai", reason="the `test` extra installs langchain-openai")
    blocks = python_blocks((ROOT / "docs" / "openai.md").read_text())
    assert len(blocks) >= 2
    monkeypatch.setenv("DPR_API_KEY", KEY)
    scope: dict = {}
    for block in blocks:
        assert "http://localhost:8000" in block or "import" in block
        exec(compile(block.replace("http://localhost:8000", server), "docs/openai.md", "exec"), scope)
    assert len(scope["documents"]) == 2 and len(scope["query"]) == len(scope["documents"][0])
    assert capsys.readouterr().out.strip() in {"The Ember Light flashes red every ten seconds.", "Greywatch Light was lit in 1712."}


# ----------------------------------------------------------------------------- schemathesis


try:
    import schemathesis
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings
except ImportError:  # the `test` extra installs it
    schemathesis = None

FUZZ_SETTINGS = dict(device="cpu", batch_max_wait_ms=1, api_key=KEY, **LIMITS)
FUZZ_TARGET = AsgiForward()


@pytest.fixture(scope="module")
def fuzz_app(art):
    FUZZ_TARGET.target = create_app(Settings(index=art / "index", **FUZZ_SETTINGS))
    return FUZZ_TARGET


if schemathesis is not None:
    fuzz_schema = schemathesis.openapi.from_dict(create_app(Settings(index=None, **FUZZ_SETTINGS)).openapi())
    fuzz_schema = fuzz_schema.include(path_regex=r"^/v1/")
    fuzz_schema.app = FUZZ_TARGET

    @fuzz_schema.parametrize()
    @hypothesis_settings(max_examples=int(os.environ.get("DPR_FUZZ_EXAMPLES", 40)), deadline=None, derandomize=True,
                         database=None, suppress_health_check=list(HealthCheck))
    def test_schemathesis_every_check_on_the_v1_routes(case, fuzz_app):
        """/v1/embeddings and /v1/models: positive and negative data, every check (no 5xx, statuses,
        headers and bodies as published, OpenAI's error shape included, valid data accepted)."""
        case.call_and_validate(headers={"X-API-Key": KEY})  # as tests/test_reliability.py (Bearer: the client tests)
else:
    def test_schemathesis_every_check_on_the_v1_routes():
        pytest.skip("schemathesis is not installed: pip install -e '.[test]'")
