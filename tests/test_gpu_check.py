"""The prepared GPU check (benchmarks/gpu_check.py) and its bundle (benchmarks/gpu_bundle.py, `make
gpu-bundle`), on the CPU: the rehearsal runs every step, a failed step skips only what builds on it, the
MFU formula against hand-computed BERT-base figures, and the bundle's round trip, size budget and
offline mode (no download here: wheels come from a folder or are skipped). docs/gpu.md."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
gpu_bundle = _load("gpu_bundle")


def test_the_rehearsal_runs_every_step_and_reports_each(tmp_path):
    """`--rehearse`: every step on the CPU with a tiny BERT and tiny data, each ok (or degraded, with
    its reason) in gpu_check.json and a row of gpu_check.md, with figures from real runs."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--rehearse", "--out", str(out), "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert list(result["steps"]) == gpu_check.STEPS
    for name, rec in result["steps"].items():
        assert rec["status"] in ("ok", "degraded"), (name, rec)
        assert rec["seconds"] >= 0 and (rec["status"] == "ok" or rec["reason"])
    md = (out / "gpu_check.md").read_text()
    for name, rec in result["steps"].items():
        assert f"| {name} | {rec['status']} |" in md
    steps = {n: r["figures"] for n, r in result["steps"].items()}
    (tp,) = steps["train_throughput"]["rows"]
    assert tp["examples_per_s"] > 0 and tp["st_examples_per_s"] > 0 and tp["ratio_to_st"] > 0
    assert tp["model_tflops"] == pytest.approx(tp["examples_per_s"] * steps["train_throughput"]["model"]["flops_per_example"] / 1e12, abs=0.01)
    caching = steps["gradient_caching"]["rows"]
    assert [(r["batch_size"], r["chunk_size"]) for r in caching] == [(4, None), (4, 2), (8, 2)]
    assert all(r["ms_per_example"] > 0 for r in caching)
    assert 0 <= steps["scifact_default"]["ndcg@10"] <= 1 and steps["scifact_default"]["index_s"] is not None
    assert steps["scifact_default"]["steps"] >= 1 and steps["scifact_default"]["epochs"] >= 1  # the run the defaults chose
    enc = steps["gpu_encoding"]
    assert enc["fp32_passages_per_s"] > 0 and enc["bf16_passages_per_s"] > 0
    assert 0 <= enc["largest_cosine_difference"] < 0.01  # bf16 autocast really ran: not NaN, close to fp32
    assert not list(tmp_path.glob("gpu_check_*")), "the working directory is removed"


def _check(tmp_path, budget=100.0):
    args = Namespace(out=str(tmp_path / "out"), rehearse=True, bundle=None, data=None, budget_s=budget, only=None,
                     workdir=str(tmp_path), keep_workdir=False)
    return gpu_check.Check(args)


def test_a_failed_step_skips_what_builds_on_it_and_the_rest_goes_on(tmp_path):
    check = _check(tmp_path)

    def boom():
        raise ValueError("the bundle is broken\nsecond line")

    check.run("bundle", boom)
    check.run("environment", lambda: {"device": "x"})
    check.run("cuda_tests", lambda: pytest.fail("must not run: it needs the bundle"))
    check.run("train_throughput", lambda: {"degraded": "no sentence-transformers", "rows": []})
    check.run("scifact_default", lambda: pytest.fail("must not run"))
    check.run("gpu_encoding", lambda: pytest.fail("must not run"))
    check.started -= 1000  # the budget is spent
    check.run("gradient_caching", lambda: pytest.fail("must not run: no time left"))
    check.close()
    steps = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]
    assert steps["bundle"]["status"] == "failed" and steps["bundle"]["error"] == "ValueError: the bundle is broken"
    assert steps["environment"] == {"status": "ok", "figures": {"device": "x"}, "seconds": steps["environment"]["seconds"]}
    assert steps["cuda_tests"] == {"status": "skipped", "reason": "needs bundle (failed)"}
    assert steps["train_throughput"]["status"] == "degraded" and steps["train_throughput"]["reason"] == "no sentence-transformers"
    assert steps["scifact_default"]["reason"] == "needs bundle (failed)"
    assert steps["gpu_encoding"]["reason"] == "needs scifact_default (skipped)"
    assert steps["gradient_caching"]["status"] == "skipped" and "budget" in steps["gradient_caching"]["reason"]
    assert "ValueError: the bundle is broken" in (tmp_path / "out" / "gpu_check.log").read_text()
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| bundle | failed |" in md and "| gpu_encoding | skipped |" in md


def test_mfu_formula_at_bert_base_by_hand():
    import torch
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig())
    # per layer: Q, K, V, O 4 x (768 x 768 + 768), FFN 768 x 3072 + 3072 and 3072 x 768 + 768, two LayerNorms 2 x 1536
    per_layer = 4 * (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768) + 2 * 1536
    assert gpu_check.non_embedding_params(model) == 12 * per_layer == 85_054_464
    flops = gpu_check.train_flops_per_example(85_054_464, 12, 768, [64, 256, 256])
    assert flops == 6 * 85_054_464 * 576 + 12 * 12 * 768 * (64 * 64 + 2 * 256 * 256) == 308_896_727_040
    # 1,000 examples/s of this on an H100 SXM: 308.9 TFLOP/s of 989.4, MFU 0.312
    assert 1000 * flops / (gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3") * 1e12) == pytest.approx(0.3122, abs=1e-4)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1),
    ("NVIDIA L4", 121.0), ("NVIDIA GeForce RTX 4090", None),
])
def test_the_bf16_peak_by_device_name(name, peak):
    assert gpu_check.peak_bf16_tflops(name) == peak


# ---------------------------------------------------------------- the bundle

@pytest.fixture
def inputs(tmp_path):
    """A fake wheel (one module), a tiny BEIR set and a tiny model: the bundle's three parts, offline."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "gpu_bundle_probe-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("gpu_bundle_probe/__init__.py", "VALUE = 42\n")
        zf.writestr("gpu_bundle_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gpu-bundle-probe\nVersion: 1.0\n")
    words = gpu_check.word_list(200)
    data = gpu_check.make_tiny_beir(tmp_path / "scifact", words)
    model = gpu_check.make_bert(tmp_path / "model", dict(vocab_size=205, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=64, max_position_embeddings=64))
    out = ROOT / "runs" / f"test-gpu-bundle-{uuid.uuid4().hex[:8]}"  # runs/ is ignored, as gpu_bundle/ is
    yield Namespace(wheels=wheels, data=data, model=model, out=out)
    shutil.rmtree(out, ignore_errors=True)


def _bundle(inputs, *flags):
    return gpu_bundle.main(["--out", str(inputs.out), "--data", str(inputs.data), "--model", str(inputs.model), *flags])


def test_the_bundle_round_trip_and_the_run_arguments(inputs, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    assert _bundle(inputs, "--wheels-from", str(inputs.wheels), "--xz-over-mib", "0") == 0
    printed = capsys.readouterr().out
    rel = os.path.relpath(inputs.out, ROOT)
    run = json.loads(printed.strip().splitlines()[-1])
    assert run == {"command": f"python3 benchmarks/gpu_check.py --bundle {rel} --out $OUT", "carry": [rel], "timeout_s": 540}
    assert "MiB would travel of the 64 MiB" in printed
    manifest = json.loads((inputs.out / "MANIFEST.json").read_text())
    assert manifest["wheel_files"] == ["gpu_bundle_probe-1.0-py3-none-any.whl.tar.xz"]  # over --xz-over-mib 0: repacked
    assert "data/scifact/corpus.jsonl.xz" in manifest["files"]
    # what the check does with it on the GPU machine
    got = gpu_check.install_bundle(inputs.out, tmp_path / "unpacked")
    assert (got["site"] / "gpu_bundle_probe" / "__init__.py").read_text() == "VALUE = 42\n"
    for rel_file in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
        assert (got["data"] / "scifact" / rel_file).read_bytes() == (inputs.data / rel_file).read_bytes()
    carried = load_file(str(inputs.out / "model" / "minilm" / "model.safetensors"))
    back, original = (load_file(str(d / "model.safetensors")) for d in (got["model"] / "minilm", inputs.model))
    assert {v.dtype for v in carried.values() if v.is_floating_point()} == {torch.float16}
    assert back.keys() == original.keys()
    for k, v in original.items():
        assert back[k].dtype == v.dtype
        torch.testing.assert_close(back[k], v, rtol=1e-3, atol=1e-4)
    assert (got["model"] / "minilm" / "vocab.txt").read_text() == (inputs.model / "vocab.txt").read_text()


def test_the_bundle_is_refused_over_the_size_budget(inputs, capsys):
    assert _bundle(inputs, "--skip-download", "--budget-mib", "0.5") == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-bundle: error: ") and "over the 0.5 MiB a call carries" in err and "checkout" in err
    assert len(err.strip().splitlines()) == 1
    assert not inputs.out.exists(), "nothing is written when over budget"


def test_the_download_is_skippable_with_a_clear_message(inputs, capsys):
    assert _bundle(inputs, "--skip-download") == 0
    printed = capsys.readouterr().out
    assert "skipping the wheel download (--skip-download)" in printed and "degraded" in printed
    assert json.loads((inputs.out / "MANIFEST.json").read_text())["wheels"] == []
    assert _bundle(inputs, "--skip-download") == 0, "a second run replaces the bundle"


def test_the_bundle_must_be_an_ignored_folder_of_the_checkout(inputs, capsys):
    assert gpu_bundle.main(["--out", str(ROOT / "benchmarks" / "not_ignored_bundle"), "--skip-download", "--data", str(inputs.data),
                            "--model", str(inputs.model)]) == 2
    assert "git does not ignore it" in capsys.readouterr().err
    assert not (ROOT / "benchmarks" / "not_ignored_bundle").exists()


def test_make_gpu_bundle_runs_the_bundle_script():
    done = subprocess.run(["make", "-n", "-o", "setup", "gpu-bundle", "GPU_BUNDLE_FLAGS=--skip-download"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "benchmarks/gpu_bundle.py --out gpu_bundle --skip-download" in done.stdout
