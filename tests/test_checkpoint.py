"""Checkpoints: a round trip through plain transformers, and clear errors for broken ones."""

import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from dpr_service.core.checkpoint import CheckpointError, atomic_directory, load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.formats import Passage

CFG = EncoderConfig(pooling="mean", similarity="dot", query_max_length=16, passage_max_length=32)
PASSAGES = [Passage("the apple is near the river", "apple"), Passage("a comet and a walnut")]


@pytest.fixture()
def saved(tmp_path, tiny_model):
    encoder, tokenizer = load_base_model(str(tiny_model), CFG)
    with torch.no_grad():  # make the passage encoder differ from the query encoder
        for p in encoder.passage_model.parameters():
            p.add_(0.01)
    save_checkpoint(tmp_path / "ckpt", encoder, tokenizer, base_model=str(tiny_model))
    return tmp_path / "ckpt", encoder, tokenizer


def test_round_trip_through_plain_transformers(saved):
    path, encoder, tokenizer = saved
    encoder.eval()
    enc = tokenizer.passages(PASSAGES)
    expected = encoder.encode_passages(**enc)
    # a user with nothing but transformers: AutoModel + AutoTokenizer + mean pooling
    model = AutoModel.from_pretrained(path / "passage_encoder").eval()
    tok = AutoTokenizer.from_pretrained(path / "tokenizer")
    batch = tok([p.title for p in PASSAGES[:1]], [PASSAGES[0].text], return_tensors="pt")
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    manual = hidden.mean(1)
    torch.testing.assert_close(manual, expected[:1], atol=1e-5, rtol=1e-5)
    # and through our loader, with the saved config
    loaded = load_checkpoint(path)
    assert loaded.config == CFG
    torch.testing.assert_close(loaded.encoder.encode_passages(**loaded.tokenizer.passages(PASSAGES)), expected)
    q = loaded.tokenizer.queries(["apple river"])
    assert not torch.allclose(loaded.encoder.encode_queries(**q), loaded.encoder.encode_passages(**q))


def test_shared_encoder_is_saved_once(tmp_path, tiny_model):
    cfg = EncoderConfig(shared=True, query_max_length=16, passage_max_length=32)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(tmp_path / "c", encoder, tokenizer)
    assert not (tmp_path / "c" / "passage_encoder").exists()
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.encoder.passage_model is loaded.encoder.query_model


def test_tampered_weights_are_refused(saved):
    path = saved[0]
    weights = path / "query_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="query_encoder/model.safetensors: checksum does not match checksums.json"):
        load_checkpoint(path)
    (path / "checksums.json").unlink()  # a checkpoint from before checksums.json: the fingerprint still catches it
    with pytest.raises(CheckpointError, match="do not match the fingerprint"):
        load_checkpoint(path)


def test_truncated_weights_are_refused_with_the_file_named(saved):
    path = saved[0]
    weights = path / "passage_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="passage_encoder/model.safetensors: checksum does not match"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="passage_encoder: cannot load a transformers model"):
        load_checkpoint(path, verify=False)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "dpr_config.json").unlink(), "dpr_config.json: missing"),
        (lambda d: (d / "dpr_config.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "dpr_config.json").write_text(json.dumps({"format": "other"})), "format is 'other'"),
        (lambda d: __import__("shutil").rmtree(d / "tokenizer"), "tokenizer: missing"),
    ],
)
def test_broken_checkpoints_say_what_is_wrong(saved, change, message):
    path = saved[0]
    change(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_max_length_beyond_positions_is_refused(tiny_model):
    with pytest.raises(CheckpointError, match="exceeds the query encoder's 128 positions"):
        load_base_model(str(tiny_model), EncoderConfig(passage_max_length=512))


def test_missing_base_model(tmp_path):
    with pytest.raises(CheckpointError, match="cannot load a tokenizer"):
        load_base_model(str(tmp_path / "nope"), CFG)


def test_atomic_directory_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "dir"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["dir"]  # no temporary left behind


def test_length_buckets_give_the_same_embeddings_and_gradients(tiny_model):
    encoder, tokenizer = load_base_model(str(tiny_model), CFG)
    encoder.eval()
    texts = [Passage(" ".join(["apple river"] * k), "t" if k % 2 else "") for k in range(1, 12)]
    enc = tokenizer.passages(texts)
    plain = encoder.encode_passages(**enc)
    plain.sum().backward()
    grads = {n: p.grad.clone() for n, p in encoder.passage_model.named_parameters() if p.grad is not None}
    encoder.zero_grad()
    encoder.length_buckets = 3
    bucketed = encoder.encode_passages(**enc)
    bucketed.sum().backward()
    torch.testing.assert_close(bucketed, plain, atol=1e-5, rtol=1e-5)
    got = {n: p.grad for n, p in encoder.passage_model.named_parameters() if p.grad is not None}
    assert got.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(got[name], grads[name], atol=1e-5, rtol=1e-4)


def test_tokenizer_is_thread_safe(tiny_model):
    """The server tokenizes queries and passages in several threads at once; each call must keep
    its own max length (a fast tokenizer stores truncation settings as shared state)."""
    from concurrent.futures import ThreadPoolExecutor

    _, tokenizer = load_base_model(str(tiny_model), CFG)
    long_text = " ".join(["apple river comet walnut"] * 20)
    queries, passages = [long_text] * 8, [Passage(long_text)] * 8

    def call(i: int) -> tuple[str, int]:
        if i % 2:
            return "query", tokenizer.queries(queries)["input_ids"].shape[1]
        return "passage", tokenizer.passages(passages)["input_ids"].shape[1]

    with ThreadPoolExecutor(4) as pool:
        widths = set(pool.map(call, range(2000)))
    assert widths == {("query", CFG.query_max_length), ("passage", CFG.passage_max_length)}
