"""The training loop on a tiny model: the loss falls, resume is exact, config and outputs are right."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_beir, write_dpr, write_plain
from safetensors.torch import load_file

from dpr_service.core.checkpoint import load_checkpoint
from trainer.config import ConfigError, TrainConfig, build_config
from trainer.train import train

ROOT = Path(__file__).resolve().parents[1]


def cfg(tmp_path, tiny_model, train_file, **kw) -> TrainConfig:
    base = dict(
        model=str(tiny_model), train=str(train_file), output=str(tmp_path / "out"), batch_size=4,
        hard_negatives=1, pooling="mean", query_max_length=16, passage_max_length=32, lr=1e-3,
        log_every=1, progress=False, seed=7, pairs="all", epochs=1.0,  # the defaults before model-aware ones
    )
    base.update(kw)
    return TrainConfig.from_settings(**base)


def weights(path: Path) -> dict:
    return {**{f"q.{k}": v for k, v in load_file(path / "query_encoder" / "model.safetensors").items()},
            **{f"p.{k}": v for k, v in load_file(path / "passage_encoder" / "model.safetensors").items()}}


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_training_loss_falls(tmp_path, tiny_model):
    data = write_plain(tmp_path / "train.jsonl", n=32)
    out = train(cfg(tmp_path, tiny_model, data, epochs=6, warmup_ratio=0.0))
    seen = losses(tmp_path / "out")
    assert len(seen) == 48
    first, last = sum(seen[:8]) / 8, sum(seen[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    loaded = load_checkpoint(out)
    assert loaded.config.pooling == "mean" and loaded.base_model == str(tiny_model)
    saved = (out / "train_config.yaml").read_text()
    assert "batch_size: 4" in saved and "lr: 0.001" in saved


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model):
    data = write_plain(tmp_path / "train.jsonl", n=20)  # 5 steps per epoch; 12 steps cross 2 epochs
    straight = train(cfg(tmp_path / "a", tiny_model, data, max_steps=12, output=str(tmp_path / "a")))
    first = train(cfg(tmp_path / "b", tiny_model, data, max_steps=12, output=str(tmp_path / "b"), stop_after=7))
    state = json.loads((first / "training_state" / "state.json").read_text())
    assert state["progress"]["step"] == 7
    resumed = train(cfg(tmp_path / "b", tiny_model, data, max_steps=12, output=str(tmp_path / "b"), resume=True))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # same batches, same dropout, same log


def test_sigterm_saves_a_checkpoint_and_resume_matches(tmp_path, tiny_model):
    """A real process stopped by SIGTERM mid-run saves last/, and --resume ends where an
    uninterrupted run ends."""
    data = write_plain(tmp_path / "train.jsonl", n=40)
    args = ["--model", str(tiny_model), "--train", str(data), "--batch-size", "4", "--pooling", "mean",
            "--query-max-length", "16", "--passage-max-length", "32", "--lr", "1e-3", "--max-steps", "60",
            "--log-every", "1", "--no-progress", "--seed", "3", "--pairs", "all"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda out, *extra: [sys.executable, "-m", "trainer", *args, "--output", str(out), *extra]  # noqa: E731
    subprocess.run(run(tmp_path / "straight"), check=True, capture_output=True, env=env)

    proc = subprocess.Popen(run(tmp_path / "cut"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.005)
    # frozen first, so the run cannot end between the check and the signal: SIGTERM waits, pending,
    # until SIGCONT, and is then handled mid-run (never a skip: the test is deterministic)
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "the run ended before it was stopped: raise --max-steps"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert b"continue with --resume" in err and b"Traceback" not in err
    stopped_at = json.loads((tmp_path / "cut" / "last" / "training_state" / "state.json").read_text())["progress"]["step"]
    assert 5 <= stopped_at < 60
    subprocess.run(run(tmp_path / "cut", "--resume"), check=True, capture_output=True, env=env)
    a, b = weights(tmp_path / "straight" / "last"), weights(tmp_path / "cut" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dev_evaluation_keeps_the_best(tmp_path, tiny_model):
    data = write_plain(tmp_path / "train.jsonl", n=32)
    dev = write_dpr(tmp_path / "dev.json", n=12, seed=1)
    train(cfg(tmp_path, tiny_model, data, dev=str(dev), epochs=2, eval_every=4, best_metric="mrr@10", eval_before=True))
    out = tmp_path / "out"
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12, 16]
    for key in ("dev_nll", "ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@20", "recall@100", "top1_accuracy", "top20_accuracy"):
        assert key in evals[0]["eval"]
    best = max(evals, key=lambda r: r["eval"]["mrr@10"])  # the first of equals is kept
    saved = json.loads((out / "best" / "eval.json").read_text())
    assert saved["step"] == best["step"] and saved["mrr@10"] == best["eval"]["mrr@10"]
    assert not (out / "best" / "training_state").exists()
    load_checkpoint(out / "best")


def test_beir_training_with_random_negative_fallback(tmp_path, tiny_model, caplog):
    root = write_beir(tmp_path / "beir", n=16)
    with caplog.at_level("WARNING"):
        train(cfg(tmp_path, tiny_model, root, max_steps=2, hard_negatives=2, dev=str(root), negatives="given"))
    fallback = [r for r in caplog.records if "fewer than 2 hard negatives" in r.getMessage()]
    assert len(fallback) == 1 and "16 of 16" in fallback[0].getMessage()


def test_existing_output_needs_resume_and_resume_checks_settings(tmp_path, tiny_model):
    data = write_plain(tmp_path / "train.jsonl", n=8)
    train(cfg(tmp_path, tiny_model, data, max_steps=2))
    with pytest.raises(ConfigError, match="pass --resume"):
        train(cfg(tmp_path, tiny_model, data, max_steps=2))
    with pytest.raises(ConfigError, match=r"differ from the interrupted run \(lr: 0.001 -> 0.002"):
        train(cfg(tmp_path, tiny_model, data, max_steps=2, lr=2e-3, resume=True))


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ntrain: t\noutput: o\nbatch-size: 16\nlr: 1e-4\n")
    c = build_config({"lr": 3e-5}, str(path))
    assert (c.batch_size, c.lr, c.model) == (16, 3e-5, "m")


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: m\nbatchsize: 3\n", r"train.yaml:2: unknown setting 'batchsize'"),
        ("model: m\nbatch_size: many\n", r"train.yaml:2: 'batch_size' must be int"),
        ("model: [unclosed\n", r"train.yaml:2: bad YAML"),
        ("- a\n- b\n", r"train.yaml:1: expected a mapping"),
    ],
)
def test_config_file_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_config({}, str(path))


def test_encoder_settings_are_nested_but_flat_in_yaml_and_flags(tmp_path):
    """TrainConfig nests the encoder's settings (EncoderConfig's names, ``shared`` included); the YAML
    file and the flags keep them flat, and train_config.yaml reads back to the same config."""
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ntrain: t\noutput: o\npooling: mean\nshared_encoder: false\n")
    cfg = build_config({"temperature": 0.05}, str(path))
    assert cfg.encoder == {"pooling": "mean", "shared": False, "temperature": 0.05}
    assert not hasattr(cfg, "pooling")
    flat = cfg.settings()
    assert (flat["pooling"], flat["shared_encoder"], flat["similarity"]) == ("mean", False, None)
    assert TrainConfig.from_settings(**flat) == cfg
    saved = tmp_path / "saved.yaml"
    saved.write_text(cfg.to_yaml())
    assert build_config({}, str(saved)).encoder == cfg.encoder
    with pytest.raises(ConfigError, match="encoder settings not resolved yet: similarity"):
        cfg.encoder_config()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--pooling", "max"], "--pooling must be one of cls, mean"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--query-max-length", "1"], "--query-max-length must be in [2, 32768], got 1"),
        (["--precision", "int8"], "--precision must be one of"),
        (["--best-metric", "ndcg@11"], "--best-metric must be one of"),
        (["--train", "missing.jsonl"], "missing.jsonl: no such file or directory"),
        (["--device", "gpu"], "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["--device", "cpu", "--precision", "bf16"], "precision bf16 is for CUDA"),
        pytest.param(["--device", "cuda"], "CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
        # checked before any training step, not at the first evaluation
        (["--dev", "train.jsonl", "--best-metric", "top1_accuracy", "--batch-size", "4", "--query-max-length", "16",
          "--passage-max-length", "32"], "needs answers in the dev data"),
    ],
)
def test_cli_flag_errors_exit_2_without_traceback(tmp_path, tiny_model, flags, message):
    data = write_plain(tmp_path / "train.jsonl", n=8)
    base = ["--model", str(tiny_model), "--train", str(data), "--output", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, "-m", "trainer", *base, *flags], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_dpr_console_command_trains(tmp_path, tiny_model):
    data = write_plain(tmp_path / "train.jsonl", n=8)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dpr"), "train", "--model", str(tiny_model), "--train", str(data), "--output", str(tmp_path / "o"),
         "--batch-size", "4", "--max-steps", "2", "--query-max-length", "16", "--passage-max-length", "32"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint: {tmp_path / 'o' / 'last'}" in proc.stdout


def test_gpu_out_of_memory_is_a_message_with_a_remedy(tmp_path, tiny_model, monkeypatch, capsys):
    import trainer.train
    from trainer.cli import main

    def oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer.train, "train", oom)
    data = write_plain(tmp_path / "train.jsonl", n=8)
    assert main(["--model", str(tiny_model), "--train", str(data), "--output", str(tmp_path / "o")]) == 1
    assert "ran out of memory; lower --batch-size, or keep it and add --chunk-size" in capsys.readouterr().err


def test_auto_resume_starts_continues_and_keeps_a_finished_run(tmp_path, tiny_model):
    """--auto-resume (what docker compose's train service runs on every `up`): a new run on an
    empty output, the interrupted run continued exactly, a finished run left as it is."""
    data = write_plain(tmp_path / "train.jsonl", n=20)
    straight = train(cfg(tmp_path / "a", tiny_model, data, max_steps=6, output=str(tmp_path / "a")))
    run = dict(max_steps=6, output=str(tmp_path / "b"), auto_resume=True)
    train(cfg(tmp_path, tiny_model, data, stop_after=4, **run))
    assert json.loads((tmp_path / "b" / "last" / "training_state" / "state.json").read_text())["progress"]["step"] == 4
    resumed = train(cfg(tmp_path, tiny_model, data, **run))
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = (resumed / "dpr_config.json").stat().st_mtime_ns
    train(cfg(tmp_path, tiny_model, data, **run))  # finished: nothing to do, nothing rewritten
    assert (resumed / "dpr_config.json").stat().st_mtime_ns == before
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_survives_a_torn_metrics_line(tmp_path, tiny_model):
    """A kill in the middle of appending to metrics.jsonl leaves half a line; --resume drops it."""
    data = write_plain(tmp_path / "train.jsonl", n=20)
    train(cfg(tmp_path, tiny_model, data, max_steps=6, stop_after=3))
    with open(tmp_path / "out" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss": 0.5, "l')
    train(cfg(tmp_path, tiny_model, data, max_steps=6, resume=True))
    assert [json.loads(x)["step"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_dev_nll_in_encode_batches_equals_one_pass(tiny_model, tmp_path):
    """The dev loss of a large batch is computed --eval-batch-size rows at a time: the same value."""
    from dpr_service.core.checkpoint import load_base_model
    from dpr_service.core.config import EncoderConfig
    from dpr_service.core.device import pick_runtime
    from dpr_service.core.formats import read_train_data
    from trainer.evaluate import dev_nll

    encoder, tokenizer = load_base_model(str(tiny_model), EncoderConfig(pooling="mean", query_max_length=16, passage_max_length=32))
    data = read_train_data(str(write_plain(tmp_path / "dev.jsonl", n=12, hard_negatives=2)))
    cpu = pick_runtime("cpu", "fp32")
    whole = dev_nll(encoder, tokenizer, data, cpu, batch_size=12, hard_negatives=2)
    assert dev_nll(encoder, tokenizer, data, cpu, batch_size=12, hard_negatives=2, encode_batch_size=5) == pytest.approx(whole, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_has_an_index_and_batches_are_pinned(tiny_model, tmp_path):
    """`--device auto/cuda` resolves to cuda:N (torch.cuda.set_device needs the index) and the
    DataLoader pins batches (Batch.pin_memory), so host-to-device copies are asynchronous."""
    from torch.utils.data import DataLoader

    from dpr_service.core.checkpoint import load_base_model
    from dpr_service.core.config import EncoderConfig
    from dpr_service.core.device import pick_runtime
    from dpr_service.core.formats import read_train_data
    from trainer.batches import EpochBatches

    runtime = pick_runtime("cuda", "auto")
    assert runtime.device.index is not None
    torch.cuda.set_device(runtime.device)
    _, tokenizer = load_base_model(str(tiny_model), EncoderConfig(pooling="mean", query_max_length=16, passage_max_length=32))
    data = read_train_data(str(write_plain(tmp_path / "train.jsonl", n=8)))
    batches = EpochBatches(data.examples, data.corpus, tokenizer, 4, 1, 0, 0, 0, 1)
    batch = next(iter(DataLoader(batches, batch_size=None, pin_memory=True)))
    assert batch.queries["input_ids"].is_pinned() and batch.p_hashes.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_training_on_gpu(tmp_path, tiny_model):
    data = write_plain(tmp_path / "train.jsonl", n=32)
    train(cfg(tmp_path, tiny_model, data, epochs=6, warmup_ratio=0.0, device="cuda", precision="bf16"))
    seen = losses(tmp_path / "out")
    assert sum(seen[-8:]) < 0.7 * sum(seen[:8])
