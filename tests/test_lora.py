"""LoRA adapters (``dpr train --lora-r``): only the adapters train, merged and unmerged encoders
agree (and agree with peft's own loader), resume is bit-identical, a changed base model is refused,
``/score`` of a LoRA checkpoint equals the trainer's loss, torchrun trains the same as one process.
Tiny random BERTs built in the test (conftest.py); skipped without peft (the ``lora`` extra)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft", reason="LoRA needs peft (the lora extra)")

from conftest import make_tiny_model, write_beir, write_plain  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_scale import CPU, SINGLE, assert_same_grads, torchrun  # noqa: E402
from ddp_worker import batch_for  # noqa: E402
from transformers import AutoModel  # noqa: E402

from dpr_service.core import lora  # noqa: E402
from dpr_service.core.checkpoint import (CheckpointError, base_fingerprint, load_base_model, load_checkpoint,  # noqa: E402
                                         save_checkpoint)
from dpr_service.core.config import EncoderConfig  # noqa: E402
from dpr_service.core.encoder import pool  # noqa: E402
from dpr_service.core.formats import Passage, read_train_data  # noqa: E402
from dpr_service.core.inference import encode_texts  # noqa: E402
from trainer.config import ConfigError, TrainConfig, build_config  # noqa: E402
from trainer.step import Models, forward_backward  # noqa: E402
from trainer.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENC = EncoderConfig(pooling="mean", query_max_length=16, passage_max_length=32)
TEXTS = ["what is the apple near the river", "the comet and the walnut story", "a lantern in winter"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base model of this module's own (a test below changes a copy of it, never this one)."""
    return make_tiny_model(tmp_path_factory.mktemp("lora-base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_plain(tmp_path_factory.mktemp("lora-data") / "train.jsonl", n=16, hard_negatives=2)


def adapted(model_dir: Path, config: EncoderConfig = ENC, r: int = 4, seed: int = 0):
    """Encoder with adapters whose B is random (not the zero start), so they change the embeddings."""
    encoder, tokenizer = load_base_model(str(model_dir), config)
    torch.manual_seed(seed)
    encoder = lora.add_adapters(encoder, lora.LoraSettings(r, 2.0 * r, 0.1, lora.default_targets(encoder.query_model)))
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return encoder, tokenizer


def lora_checkpoint(directory: Path, model_dir: Path, config: EncoderConfig = ENC) -> Path:
    encoder, tokenizer = adapted(model_dir, config)
    save_checkpoint(directory, encoder, tokenizer, str(model_dir), base_fingerprint(model_dir))
    return directory


def run_cfg(out: Path, model: Path, data: Path, **kw) -> TrainConfig:
    args = dict(model=str(model), train=str(data), output=str(out), batch_size=4, hard_negatives=1, pooling="mean",
                query_max_length=16, passage_max_length=32, lr=1e-2, log_every=1, progress=False, seed=7,
                pairs="all", max_steps=8, lora_r=4, chunk_size=3, device="cpu")
    args.update(kw)
    return TrainConfig.from_settings(**args)


def adapter_tensors(checkpoint: Path) -> dict:
    return {f"{sub}.{k}": v for sub in ("query_encoder", "passage_encoder") if (checkpoint / sub).is_dir()
            for k, v in load_file(checkpoint / sub / lora.ADAPTER_WEIGHTS).items()}


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ----------------------------------------------------------------------------- what trains


@pytest.mark.parametrize("shared", [False, True])
def test_only_adapter_parameters_receive_gradients(base, data, shared):
    """A step's gradients reach the lora_A / lora_B tensors and nothing else; gradient caching gives
    the same adapter gradients as the one-pass step (no dropout: eval mode)."""
    encoder, tokenizer = adapted(base, EncoderConfig(pooling="mean", query_max_length=16, passage_max_length=32, shared=shared))
    encoder.eval()
    batch = batch_for(str(data), tokenizer)
    grads = {}
    for chunk in (None, 3):
        encoder.zero_grad(set_to_none=True)
        forward_backward(encoder, Models(encoder.query_model, encoder.passage_model), batch, CPU, SINGLE,
                         CPU.grad_scaler(), chunk)
        grads[chunk] = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    names = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert set(grads[None]) == names  # every adapter, and nothing frozen
    assert all(grads[None][n].abs().sum() > 0 for n in names)
    assert_same_grads(grads[3], grads[None])


def test_training_moves_only_the_adapters_and_says_how_many_train(tmp_path, base, data, caplog):
    caplog.set_level("INFO", logger="trainer")
    out = train(run_cfg(tmp_path / "o", base, data, max_steps=4))
    unmerged = load_checkpoint(out, merge_adapters=False).encoder
    model = unmerged.query_model.get_base_model()
    start = load_file(base / "model.safetensors")
    frozen = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert frozen and all(torch.equal(frozen[n], start[n]) for n in frozen)  # the base is untouched
    assert any(t.abs().sum() > 0 for k, t in adapter_tensors(out).items() if "lora_B" in k)  # B left zero
    trainable = sum(p.numel() for n, p in unmerged.named_parameters() if "lora_" in n)
    total = sum(p.numel() for p in {id(p): p for p in unmerged.parameters()}.values())
    assert f"parameters: {trainable:,} of {total:,} train" in caplog.text
    assert "LoRA: rank 4, alpha 4, dropout 0.1, on query,key,value of both encoders" in caplog.text
    assert not list((out / "query_encoder").glob("model.safetensors"))  # adapters only, not a copy of the base


# ----------------------------------------------------------------------------- merged, unmerged, peft


def test_merged_embeddings_equal_unmerged_and_peft_s_own_loader(tmp_path, base):
    ckpt = lora_checkpoint(tmp_path / "ckpt", base)
    merged, unmerged = load_checkpoint(ckpt), load_checkpoint(ckpt, merge_adapters=False)
    assert not isinstance(merged.encoder.query_model, peft.PeftModel)
    assert isinstance(unmerged.encoder.query_model, peft.PeftModel)
    assert merged.base_fingerprint == unmerged.base_fingerprint == base_fingerprint(base)
    zero_shot = encode_texts(load_base_model(str(base), ENC)[0].eval(), merged.tokenizer, TEXTS, "query", CPU)
    for side, items in (("query", TEXTS), ("passage", [Passage(t, "title") for t in TEXTS])):
        a = encode_texts(merged.encoder, merged.tokenizer, items, side, CPU)
        b = encode_texts(unmerged.encoder, unmerged.tokenizer, items, side, CPU)
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(encode_texts(merged.encoder, merged.tokenizer, TEXTS, "query", CPU), zero_shot, atol=1e-3)
    # a LoRA checkpoint as --model starts a run from its merged weights (full fine-tuning, or new
    # adapters whose base is that checkpoint, named by its own fingerprint)
    start, _ = load_base_model(str(ckpt), ENC)
    assert not isinstance(start.query_model, peft.PeftModel) and base_fingerprint(ckpt) == merged.fingerprint
    assert torch.allclose(encode_texts(start.eval(), merged.tokenizer, TEXTS, "query", CPU),
                          encode_texts(merged.encoder, merged.tokenizer, TEXTS, "query", CPU), atol=1e-6)
    # the reference: peft's own from_pretrained on the saved query adapters, mean-pooled by hand
    reference = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(str(base)), str(ckpt / "query_encoder")).eval()
    tokens = merged.tokenizer.hf(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = pool(reference(**tokens).last_hidden_state, tokens["attention_mask"], "mean")
    got = encode_texts(merged.encoder, merged.tokenizer, TEXTS, "query", CPU)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_dpr_export_writes_the_merged_weights(tmp_path, base):
    """`dpr export` of a LoRA checkpoint: plain weights with the adapters merged in, which
    sentence-transformers loads without peft and whose embeddings are the checkpoint's."""
    st = pytest.importorskip("sentence_transformers")
    from dpr_service.core.export_cli import main as export_main

    ckpt = lora_checkpoint(tmp_path / "ckpt", base)
    assert export_main(["--checkpoint", str(ckpt), "--format", "sentence-transformers", "--output", str(tmp_path / "st")]) == 0
    assert not list((tmp_path / "st").rglob("adapter_config.json"))  # merged: no adapters left to load
    merged = load_checkpoint(ckpt)
    want = encode_texts(merged.encoder, merged.tokenizer, TEXTS, "query", CPU)
    got = torch.as_tensor(st.SentenceTransformer(str(tmp_path / "st"), device="cpu").encode_query(TEXTS))  # two encoders: a Router
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    zero_shot = encode_texts(load_base_model(str(base), ENC)[0].eval(), merged.tokenizer, TEXTS, "query", CPU)
    assert not torch.allclose(got, zero_shot, atol=1e-3)  # the adapters are in it


def test_a_changed_or_missing_base_model_is_refused(tmp_path, base):
    copy = shutil.copytree(base, tmp_path / "base")
    ckpt = lora_checkpoint(tmp_path / "ckpt", copy)
    recorded = base_fingerprint(copy)
    load_checkpoint(ckpt)
    make_tiny_model(copy, seed=1)  # other weights at the same path
    changed = base_fingerprint(copy)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    assert recorded in str(e.value) and changed in str(e.value) and str(copy) in str(e.value)
    shutil.rmtree(copy)
    with pytest.raises(CheckpointError, match="no such model directory"):
        load_checkpoint(ckpt)
    # the base named in lora.json is covered by the checksums (and the fingerprint) like the adapters
    (ckpt / "lora.json").write_text(json.dumps({"base_model": str(base), "base_fingerprint": "0" * 64}))
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_checkpoint(ckpt)


# ----------------------------------------------------------------------------- resume


def test_resume_is_bit_identical(tmp_path, base, data):
    """Two encoders, gradient caching, adapter dropout: 8 steps straight equal 5 + resume to 8, bit
    for bit (adapters and every logged loss); a resume with other LoRA settings is refused."""
    straight = train(run_cfg(tmp_path / "a", base, data))
    train(run_cfg(tmp_path / "b", base, data, stop_after=5))
    with pytest.raises(ConfigError, match="lora_r: 4 -> 8"):
        train(run_cfg(tmp_path / "b", base, data, lora_r=8, resume=True))
    resumed = train(run_cfg(tmp_path / "b", base, data, resume=True))
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 3 * 2  # 2 encoders x 2 layers x q,k,v x (A, B)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapters differ from the uninterrupted run"
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("given, message", [
    ({"lora_alpha": 8.0}, "--lora-alpha needs --lora-r"),
    ({"lora_targets": "query"}, "--lora-targets needs --lora-r"),
    ({"lora_r": 0}, "--lora-r must be in \\[1, 4096\\], got 0"),
    ({"lora_r": 4, "lora_dropout": 1.0}, r"--lora-dropout must be in \[0, 1\)"),
    ({"lora_r": 4, "lora_alpha": 0.0}, "--lora-alpha must be > 0"),
    ({"lora_r": 4, "lora_targets": "query,,value"}, "--lora-targets must be comma-separated"),
])
def test_bad_lora_settings_name_the_flag(given, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model": "m", "train": "t", "output": "o", **given})


def test_defaults_depend_on_lora():
    plain = build_config({"model": "m", "train": "t", "output": "o"}).resolve_defaults()
    assert (plain.lr, plain.lora_alpha, plain.lora_dropout) == (2e-5, None, None)
    adapters = build_config({"model": "m", "train": "t", "output": "o", "lora_r": 16}).resolve_defaults()
    assert (adapters.lr, adapters.lora_alpha, adapters.lora_dropout) == (5e-4, 16.0, 0.1)


def test_cli_lora_errors_are_one_line(tmp_path, base, data):
    cmd = [sys.executable, "-m", "trainer", "--model", str(base), "--train", str(data), "--output", str(tmp_path / "o"),
           "--batch-size", "4", "--pooling", "mean", "--query-max-length", "16", "--passage-max-length", "32", "--lora-r", "4"]
    r = subprocess.run(cmd + ["--lora-targets", "qq,kk"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--lora-targets:" in r.stderr and "qq" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- the documented commands, /score


@pytest.fixture(scope="module")
def lora_artifact(tmp_path_factory, base):
    """The commands of docs/training.md's LoRA section, on the tiny model: dpr train --lora-r, then
    dpr index build on its checkpoint (which needs nothing new)."""
    root = tmp_path_factory.mktemp("lora-cli")
    beir = write_beir(root / "beir", n=30)
    dpr = [sys.executable, "-m", "dpr_service.cli"]
    r = subprocess.run([*dpr, "train", "--model", str(base), "--train", str(beir), "--output", str(root / "run"),
                        "--lora-r", "4", "--batch-size", "4", "--query-max-length", "16", "--passage-max-length", "32",
                        "--max-steps", "3", "--lr", "1e-2", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert " train (" in r.stderr and "the LoRA adapters; the base model is frozen" in r.stderr
    r = subprocess.run([*dpr, "index", "build", "--checkpoint", str(root / "run" / "last"), "--corpus", str(beir),
                        "--output", str(root / "index"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def test_score_equals_the_trainers_loss_for_a_lora_checkpoint(lora_artifact, tmp_path):
    """/score (the server loads the checkpoint merged) equals the trainer's evaluation loss computed
    with the adapters kept apart, as during training, to 1e-5 in fp32."""
    from fastapi.testclient import TestClient

    from dpr_service.api.app import create_app
    from dpr_service.api.settings import Settings
    from trainer.evaluate import dev_nll

    items = [
        {"question": "what is the apple near the river", "positive": "the apple is near the river fact",
         "negatives": ["the comet and the walnut story", "a lantern in winter"]},
        {"question": "what is the zebra near the guitar", "positive": "the zebra is near the guitar fact",
         "negatives": ["the helmet and the island story", "the candle of the castle"]},
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps({"query": it["question"], "positive": it["positive"],
                                        "negatives": it["negatives"]}) + "\n" for it in items))
    unmerged = load_checkpoint(lora_artifact / "run" / "last", merge_adapters=False)
    expected = dev_nll(unmerged.encoder, unmerged.tokenizer, read_train_data(path), CPU, batch_size=2, hard_negatives=2)
    with TestClient(create_app(Settings(index=lora_artifact / "index", device="cpu", batch_max_wait_ms=1))) as c:
        r = c.post("/score", json={"items": items, "in_batch": True})
    assert r.status_code == 200, r.text
    assert r.json()["mean_loss"] == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.parametrize("shared", [True, False])
def test_torchrun_lora_matches_one_process_and_resumes(tmp_path, data, shared):
    """2 processes (gloo), one or two encoders, gradient caching, adapters without dropout: every
    step's loss and gradient norm equal one process's; stopped and resumed under torchrun, the
    adapters equal the uninterrupted torchrun run's bit for bit."""
    model = make_tiny_model(tmp_path / "nodrop", dropout=0.0)
    from test_scale import _cfg
    from trainer.cli import main

    flags = dict(lora_r=4, lora_dropout=0.0, chunk_size=2, **{"shared_encoder" if shared else "no_shared_encoder": True})
    assert main(_cfg(tmp_path / "single", model, data, **flags)) == 0
    torchrun("-m", "trainer", *_cfg(tmp_path / "two", model, data, **flags))
    one = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for mine, ref in zip(two, one, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    torchrun("-m", "trainer", *_cfg(tmp_path / "resumed", model, data, stop_after=2, **flags))
    torchrun("-m", "trainer", *_cfg(tmp_path / "resumed", model, data, resume=True, **flags))
    a, b = adapter_tensors(tmp_path / "two" / "last"), adapter_tensors(tmp_path / "resumed" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
