"""Large batches and many processes: gradient caching and DDP give the gradients of one process on
the whole batch; torchrun training, resume and sharded index builds work end to end (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import faiss
import pytest
import torch
from conftest import make_tiny_model, write_beir, write_plain
from ddp_worker import CHUNKS, batch_for, step_grads
from safetensors.torch import load_file

import trainer.step as step_mod
from dpr_service.core.checkpoint import load_base_model
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import Runtime
from dpr_service.core.loss import in_batch_nll
from trainer.config import ConfigError, TrainConfig
from trainer.distributed import Dist
from trainer.step import Models, forward_backward
from trainer.train import _train, train

ROOT = Path(__file__).resolve().parents[1]
CPU = Runtime(torch.device("cpu"), "fp32")
SINGLE = Dist()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_plain(tmp_path_factory.mktemp("scale") / "train.jsonl", n=16, hard_negatives=2)


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


def assert_same_grads(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=atol, rtol=0), (name, (got[name] - want[name]).abs().max())


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# ---- gradient caching -------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True])
def test_gradcache_gives_the_full_batch_gradients(tiny_model, data, shared):
    """Chunks of 3 (not dividing the batch), a duplicate passage across questions, uneven negatives."""
    full = step_grads(str(tiny_model), str(data), SINGLE, None, shared)
    cached = step_grads(str(tiny_model), str(data), SINGLE, 3, shared)
    assert_same_grads(cached, full)
    assert full["loss"].item() > 0.1  # a real loss, not a degenerate one


def _train_mode_encoder(tiny_model, data):
    encoder, tokenizer = load_base_model(str(tiny_model), EncoderConfig(pooling="mean", query_max_length=16, passage_max_length=32))
    encoder.train()  # dropout on (p = 0.1)
    return encoder, batch_for(str(data), tokenizer)


def _grads(encoder) -> dict:
    return {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}


def test_gradcache_replays_dropout_exactly(tiny_model, data, monkeypatch):
    """With dropout on, the cached step equals one graph over the same chunks with the same RNG
    stream, which needs the second pass to replay each chunk's dropout masks; without the replay
    the gradients differ (so this test can fail)."""
    encoder, batch = _train_mode_encoder(tiny_model, data)
    torch.manual_seed(123)
    q = torch.cat([encoder.encode_queries(**{k: v[i:i + 3] for k, v in batch.queries.items()}) for i in range(0, batch.size, 3)])
    n = batch.passages["input_ids"].shape[0]
    p = torch.cat([encoder.encode_passages(**{k: v[i:i + 3] for k, v in batch.passages.items()}) for i in range(0, n, 3)])
    in_batch_nll(q, p, batch.positive_idx, p_ids=batch.p_hashes, candidate_mask=batch.candidate_mask()).backward()
    want = _grads(encoder)

    def cached() -> dict:
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        forward_backward(encoder, Models(encoder.query_model, encoder.passage_model), batch, CPU, SINGLE, CPU.grad_scaler(), 3)
        return _grads(encoder)

    assert_same_grads(cached(), want)
    monkeypatch.setattr(step_mod, "_replay_rng", lambda state, device: nullcontext())
    broken = cached()
    assert max((broken[k] - want[k]).abs().max().item() for k in want) > 1e-4


def test_gradcache_under_bf16_autocast(tiny_model, data):
    """bf16 autocast (CUDA's default precision; run here on the CPU) with and without caching."""
    bf16 = Runtime(torch.device("cpu"), "bf16")
    out = {}
    for chunk in (None, 3):
        encoder, tokenizer = load_base_model(str(tiny_model), EncoderConfig(pooling="mean", query_max_length=16, passage_max_length=32))
        encoder.eval()
        loss = forward_backward(encoder, Models(encoder.query_model, encoder.passage_model), batch_for(str(data), tokenizer),
                                bf16, SINGLE, bf16.grad_scaler(), chunk)
        assert torch.isfinite(loss)
        out[chunk] = torch.cat([g.flatten() for g in _grads(encoder).values()])
    rel = ((out[3] - out[None]).norm() / out[None].norm()).item()
    assert rel < 2e-2, rel


def test_chunk_size_flag_and_training(tmp_path, tiny_model, data):
    from trainer.cli import main

    out = tmp_path / "out"
    rc = main(["--model", str(tiny_model), "--train", str(data), "--output", str(out), "--batch-size", "8",
               "--chunk-size", "3", "--max-steps", "2", "--no-progress", "--query-max-length", "16",
               "--passage-max-length", "32"])
    assert rc == 0 and (out / "last" / "dpr_config.json").exists()
    assert "chunk_size: 3" in (out / "train_config.yaml").read_text()
    with pytest.raises(ConfigError, match="chunk-size"):
        TrainConfig.from_settings(model="m", train="t", output="o", chunk_size=0).validate()


# ---- torch.distributed ------------------------------------------------------------------------

def test_ddp_gradients_equal_one_process_on_the_global_batch(tmp_path, tiny_model, data):
    """2 processes (gloo) each with half the questions and their passages; embeddings all-gathered,
    loss scaled by the world size: DDP's averaged gradients are the single-process gradients."""
    torchrun(str(ROOT / "tests" / "ddp_worker.py"), str(tiny_model), str(data), str(tmp_path))
    for chunk in CHUNKS:
        for shared in (False, True):
            want = step_grads(str(tiny_model), str(data), SINGLE, chunk, shared)
            for rank in (0, 1):
                got = load_file(str(tmp_path / f"rank{rank}-chunk{chunk}-shared{int(shared)}.safetensors"))
                # DDP froze the pooler (it gets no gradient); the single process leaves it as None too
                assert_same_grads(got, want)


def _cfg(out: Path, model: Path, data: Path, **kw) -> list[str]:
    args = dict(model=model, train=data, output=out, batch_size=4, hard_negatives=1, pooling="mean",
                query_max_length=16, passage_max_length=32, lr=1e-3, max_steps=4, warmup_steps=0,
                log_every=1, seed=7, device="cpu")
    args.update(kw)
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    return flags + ["--no-progress"]


def _weights(path: Path) -> dict:
    return {f"{enc}.{k}": v for enc in ("query_encoder", "passage_encoder")
            for k, v in load_file(path / enc / "model.safetensors").items()}


def test_torchrun_training_matches_one_process_and_resumes(tmp_path, no_dropout_model, data):
    single = tmp_path / "single"
    from trainer.cli import main

    assert main(_cfg(single, no_dropout_model, data)) == 0
    two = tmp_path / "two"
    torchrun("-m", "trainer", *_cfg(two, no_dropout_model, data))
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]  # rank 0 alone logs
    # The same global batches and gradients: every step's loss and gradient norm agree with the single
    # process (the loss of step 4 is computed with the weights after 3 updates).
    one_lines = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    for mine, ref in zip(lines, one_lines, strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    # Weights: Adam divides by sqrt(v), so parameters whose gradients are ~0 move by up to lr on
    # float noise alone (measured: 5e-4 at lr 1e-3); within one learning rate of each other.
    w1, w2 = _weights(single / "last"), _weights(two / "last")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-3), (k, (w1[k] - w2[k]).abs().max())

    resumed = tmp_path / "resumed"
    torchrun("-m", "trainer", *_cfg(resumed, no_dropout_model, data, stop_after=2))
    assert json.loads((resumed / "last" / "training_state" / "state.json").read_text())["progress"]["step"] == 2
    torchrun("-m", "trainer", *_cfg(resumed, no_dropout_model, data, resume=True))
    w3 = _weights(resumed / "last")
    for k in w2:
        assert torch.equal(w2[k], w3[k]), k


def test_global_batch_must_split_evenly(tmp_path, tiny_model, data):
    cfg = TrainConfig.from_settings(model=str(tiny_model), train=str(data), output=str(tmp_path / "o"), batch_size=4)
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        _train(cfg.validate(), Dist(rank=0, local_rank=0, world_size=3))
    assert not (tmp_path / "o").exists()


def test_torchrun_index_build_shards_by_rank(tmp_path, tiny_model):
    """torchrun -m index build: each rank encodes its parts, the index is built once, equal to a
    single-process build."""
    beir = write_beir(tmp_path / "beir", n=40)
    ckpt = train(TrainConfig.from_settings(model=str(tiny_model), train=str(beir), output=str(tmp_path / "t"), batch_size=4,
                             max_steps=1, progress=False, query_max_length=16, passage_max_length=32))
    from index.build import build

    one = build(ckpt, beir, tmp_path / "one", factory="Flat", progress=False)
    r = torchrun("-m", "index", "build", "--checkpoint", str(ckpt), "--corpus", str(beir), "--output",
                 str(tmp_path / "two"), "--factory", "Flat", "--part-size", "8", "--no-progress")
    assert r.stdout.count(f"index: {tmp_path / 'two'}") == 1, r.stdout  # built once, by one rank
    a, b = faiss.read_index(str(one / "index.faiss")), faiss.read_index(str(tmp_path / "two" / "index.faiss"))
    assert a.ntotal == b.ntotal == 40
    assert torch.allclose(torch.from_numpy(a.reconstruct_n(0, 40)), torch.from_numpy(b.reconstruct_n(0, 40)), atol=1e-5)
    assert not (tmp_path / ".two.partial").exists()


def test_sigterm_under_torchrun_saves_before_any_rank_exits(tmp_path, no_dropout_model, data):
    """A signal on one rank: all ranks finish the step, rank 0 writes last/, and only then does any
    rank exit (torchrun kills the other ranks as soon as one exits); one message, from rank 0."""
    out, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "torchrun_stop.py"), *_cfg(out, no_dropout_model, data, max_steps=400, save_every=1000)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "MARKS": str(marks)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode != 0, r.stderr[-3000:]
    assert r.stderr.count("stopped by signal 15") == 1, r.stderr[-3000:]
    saved = float((marks / "saved").read_text())
    for rank in (0, 1):
        assert float((marks / f"exit-rank{rank}").read_text()) >= saved, f"rank {rank} exited before last/ was written"
    step = json.loads((out / "last" / "training_state" / "state.json").read_text())["progress"]["step"]
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= step < 400 and logged[-1] == step
