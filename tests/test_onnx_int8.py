"""``--runtime onnx`` / ``onnx-int8``: one text, one embedding, whatever it is batched with; what
serves is said; the export cache stays bounded.

Oracles: the text encoded alone (a batch of one, no padding) is the reference for the same text in
any batch; the cache's size and which exports it keeps follow from the order of use.
"""

from __future__ import annotations

import gc
import logging
import os
import random

import pytest
import torch

from dpr_service.core import EncoderConfig, Passage, load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.device import Runtime
from dpr_service.core.inference import encode_texts

pytest.importorskip("onnxruntime")

from dpr_service.core.onnx_export import onnx_runtime  # noqa: E402  (needs onnxruntime)

CPU = Runtime(torch.device("cpu"), "fp32")
CONFIG = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, shared=True,
                       query_max_length=24, passage_max_length=64, query_prompt="query: ")
SAME_VECTOR = 1e-6  # max abs difference between a text's embedding alone and in a batch (issue 31, item 4)


def checkpoint(tmp_path, tiny_model, seed: int = 0):
    """A checkpoint of the tiny BERT; ``seed`` perturbs the weights (another fingerprint)."""
    encoder, tokenizer = load_base_model(str(tiny_model), CONFIG)
    if seed:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path / f"ckpt-{seed}"
    save_checkpoint(path, encoder, tokenizer)
    return load_checkpoint(path)


def texts(n: int, seed: int, words: int = 40) -> list[str]:
    """``n`` texts of 1 to ``words`` words (lengths that make batch-mates pad each other)."""
    from conftest import FILLER, WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS + FILLER) for _ in range(rng.randint(1, words))) for _ in range(n)]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_model):
    return checkpoint(tmp_path_factory.mktemp("int8-ckpt"), tiny_model)


@pytest.mark.parametrize("runtime", ["onnx-int8", "onnx"])
@pytest.mark.parametrize("kind", ["query", "passage"])
def test_a_text_gets_one_embedding_whatever_its_batch(runtime, kind, loaded, tmp_path):
    """The same text alone and in batches of 2, 7 and 64, beside shorter and longer texts (so it is
    padded, or pads them), at any position: the same vector to 1e-6. Dynamic quantisation over the
    whole batch failed this by ~1e-2 (onnxruntime#10111)."""
    rt = onnx_runtime(loaded, runtime, cache_dir=tmp_path / "cache")
    wrap = (lambda xs: xs) if kind == "query" else (lambda xs: [Passage(x) for x in xs])
    targets = ["apple", "the castle and the dragon story of the forest near the ocean", " ".join(texts(1, 7, 40)[0].split() * 2)]
    alone = torch.cat([encode_texts(loaded.encoder, loaded.tokenizer, wrap([t]), kind, rt, batch_size=1) for t in targets])
    for size in (2, 7, 64):
        for seed in range(3):
            mates = texts(size - 1, seed * 100 + size)
            for i, t in enumerate(targets):
                batch = list(mates)
                batch.insert((seed * 5 + i) % size, t)
                got = encode_texts(loaded.encoder, loaded.tokenizer, wrap(batch), kind, rt, batch_size=size)
                diff = float((got[batch.index(t)] - alone[i]).abs().max())
                assert diff <= SAME_VECTOR, f"{runtime} {kind}: text {i} in a batch of {size} differs from alone by {diff:.3g}"
    if runtime == "onnx-int8":  # and it is int8: not fp32's numbers
        fp32 = encode_texts(loaded.encoder, loaded.tokenizer, wrap(targets), kind, CPU)
        assert float((alone - fp32).abs().max()) > 1e-5, "int8 gave fp32's numbers: was anything quantised?"


def test_the_runtime_says_what_serves(loaded, tmp_path, caplog):
    """The load is logged with the ONNX Runtime version and the quantisation, and ``description``
    (what ``/info`` shows) says the same, without absolute paths."""
    import onnxruntime

    with caplog.at_level(logging.INFO, logger="dpr_service.core.onnx_export"):
        int8 = onnx_runtime(loaded, "onnx-int8", cache_dir=tmp_path / "cache")
    line = next(r.getMessage() for r in caplog.records if "encoding with ONNX Runtime" in r.getMessage())
    assert "onnx-int8" in line and onnxruntime.__version__ in line and "int8" in line
    d = int8.description
    assert d["runtime"] == "onnx-int8" and d["engine"] == f"onnxruntime {onnxruntime.__version__}"
    assert d["quantization"].startswith("int8") and "per text" in d["quantization"]
    assert str(tmp_path) not in repr(d)
    fp32 = onnx_runtime(loaded, "onnx", cache_dir=tmp_path / "cache").description
    assert fp32["runtime"] == "onnx" and fp32["quantization"] == "none (fp32)"


# ----------------------------------------------------------------------------- the export cache


def entries(cache) -> set[str]:
    return {p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")}


def size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def three(tmp_path_factory, tiny_model):
    """Three checkpoints of one architecture (fp32 exports of about the same size)."""
    root = tmp_path_factory.mktemp("cache-ckpts")
    return [checkpoint(root, tiny_model, seed) for seed in (11, 12, 13)]


def test_cache_evicts_the_least_recently_used_export(three, tmp_path, monkeypatch):
    a, b, c = three
    cache = tmp_path / "cache"
    for x in (a, b):
        onnx_runtime(x, "onnx", cache_dir=cache)
    one = max(size(cache / f"{x.fingerprint}-fp32") for x in (a, b))
    monkeypatch.setenv("DPR_ONNX_CACHE_MAX_BYTES", str(int(2.5 * one)))  # room for two
    onnx_runtime(a, "onnx", cache_dir=cache)  # a, the oldest made, is now the most recently used
    gc.collect()
    onnx_runtime(c, "onnx", cache_dir=cache)
    gc.collect()
    assert entries(cache) == {f"{a.fingerprint}-fp32", f"{c.fingerprint}-fp32"}
    assert sum(size(cache / n) for n in entries(cache)) <= int(2.5 * one)
    # b comes back when asked for (exported anew), and the least recently used (a) goes
    onnx_runtime(b, "onnx", cache_dir=cache)
    gc.collect()
    assert entries(cache) == {f"{c.fingerprint}-fp32", f"{b.fingerprint}-fp32"}


def test_cache_never_evicts_an_export_in_use(three, tmp_path, monkeypatch):
    a, b, c = three
    cache = tmp_path / "cache"
    monkeypatch.setenv("DPR_ONNX_CACHE_MAX_BYTES", "1")  # smaller than any export: only what is in use stays
    held_a = onnx_runtime(a, "onnx", cache_dir=cache)
    held_b = onnx_runtime(b, "onnx", cache_dir=cache)
    assert entries(cache) == {f"{a.fingerprint}-fp32", f"{b.fingerprint}-fp32"}  # a is older, but serving
    q = encode_texts(a.encoder, a.tokenizer, ["apple river"], "query", held_a)
    del held_a
    gc.collect()
    onnx_runtime(c, "onnx", cache_dir=cache)  # a is no longer in use: it goes; b (in use) and c (just loaded) stay
    gc.collect()
    assert entries(cache) == {f"{b.fingerprint}-fp32", f"{c.fingerprint}-fp32"}
    assert bool(torch.isfinite(encode_texts(b.encoder, b.tokenizer, ["apple river"], "query", held_b)).all())
    assert q.shape == (1, a.encoder.dim)


def test_cache_bound_setting_is_checked(loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("DPR_ONNX_CACHE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="DPR_ONNX_CACHE_MAX_BYTES"):
        onnx_runtime(loaded, "onnx", cache_dir=tmp_path / "cache")
    assert not os.path.exists(tmp_path / "cache" / f"{loaded.fingerprint}-fp32")
