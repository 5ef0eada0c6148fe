"""The GPU check: every GPU figure this project lacks, in one command that fits 8 minutes on one H100.

    python3 benchmarks/gpu_check.py --bundle gpu_bundle --out OUT      # on the lent GPU machine (docs/gpu.md)
    python  benchmarks/gpu_check.py --rehearse --out runs/gpu_rehearsal  # the same steps on the CPU, tiny (CI runs it)

``make gpu-bundle`` prepares ``gpu_bundle/`` (benchmarks/gpu_bundle.py: the wheels such a machine lacks,
SciFact, the starting MiniLM) and prints the exact ``run`` command. The steps, in order, each timed,
each written to ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` as soon as it ends (a check stopped at its
time limit keeps what it measured):

1. ``bundle``: unpack the bundle (wheels into a private site directory put on ``sys.path``, the
   corpus decompressed, the fp16 MiniLM written back as fp32) into a temporary directory.
2. ``environment``: GPU name, memory, driver, torch / CUDA versions, the chip's bf16 peak from
   :data:`PEAK_BF16_TFLOPS` and a measured 8192^3 bf16 matrix product.
3. ``cuda_tests``: the project's CUDA tests (``pytest -k "gpu or cuda"`` over tests/test_train.py and
   tests/test_index.py).
4. ``train_throughput``: bf16 training at BERT-base size (a random ``BertConfig()``, no download),
   queries 64 and passages 256 tokens, one hard negative, batch 64 and 128, through the project's
   trainer (``trainer.train.train``); examples/s, tokens/s, peak memory and model FLOPs utilisation
   (:func:`train_flops_per_example`), and sentence-transformers' ``MultipleNegativesRankingLoss`` on
   the same model, data and batch for the ratio.
5. ``gradient_caching``: the trainer with ``chunk_size`` at batch 128, 512 and 1024 against uncached
   128: peak memory and time per example.
6. ``scifact_default``: ``dpr train --model MiniLM --train scifact`` (the default command), then
   ``dpr index build`` and ``dpr eval --split test``: wall time and nDCG@10. Without faiss (a machine
   without the bundle's wheels) the index and ``dpr eval`` are replaced by the trainer's exact search
   (``trainer.evaluate.retrieval_eval``, equal to ``dpr eval`` over a Flat index; tests/test_index.py
   checks that) and the step says ``degraded``.
7. ``gpu_encoding``: the SciFact corpus encoded by step 6's checkpoint in fp32 and in bf16
   (``dpr_service.core.inference.encode_texts``): passages/s and the largest cosine difference.

A step runs when the steps it builds on (:data:`NEEDS`) are ``ok`` or ``degraded``, and is recorded as
``skipped`` (with the reason) otherwise, or when the time budget (``--budget-s``) is spent; a step
that raises is ``failed`` with its error's first line (the traceback goes to ``gpu_check.log``); the
check goes on to the next step either way.

Model FLOPs utilisation (MFU; Chowdhery et al. 2022, PaLM, appendix B), per training example::

    FLOPs = sum over its sequences of  6 * N * S  +  12 * L * d * S^2

N the encoder's non-embedding parameters (embedding lookups are not matrix products; BERT's pooler
is unused by mean pooling), S the sequence's tokens (64 for the question, 256 for each of the two
passages), L layers, d the hidden width. 6 N S is the forward (2 N S) and backward (4 N S) of the
weight matrix products; 12 L d S^2 the attention scores Q K^T and their weighted sum of V (2 L d S^2
each forward), times 3 for training. MFU = examples/s * FLOPs / the chip's dense bf16 peak. The
gradient-cached step's extra forward is not counted (MFU counts the model's FLOPs, not the machine's).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import lzma
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STEPS = ["bundle", "environment", "cuda_tests", "train_throughput", "gradient_caching", "scifact_default", "gpu_encoding"]
# the steps each one builds on: it is skipped unless they ended ok or degraded
NEEDS = {
    "bundle": [],
    "environment": [],
    "cuda_tests": ["bundle", "environment"],
    "train_throughput": ["environment"],
    "gradient_caching": ["environment"],
    "scifact_default": ["bundle", "environment"],
    "gpu_encoding": ["scifact_default"],
}
# Dense bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets (the sparse figure is twice these), keyed by
# a substring of torch.cuda.get_device_name(); the first match wins, so the longer names come first.
# The lent machines report "NVIDIA H100 80GB HBM3" (SXM) and "NVIDIA H200" (docs/gpu.md).
PEAK_BF16_TFLOPS = [
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("H200 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0),
]
# The CPU figures these are compared with (BENCHMARKS.md, CPU-2): the default command's SciFact nDCG@10, two seeds
CPU_SCIFACT_NDCG10 = (0.7615, 0.7641)

log = logging.getLogger("gpu_check")


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU by ``torch.cuda.get_device_name()``, None if not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def train_flops_per_example(non_embedding_params: int, layers: int, hidden: int, seq_lens: list[int]) -> float:
    """Model FLOPs of one training example (forward and backward): sum over its sequences of
    ``6 N S + 12 L d S^2`` (see the module docstring). ``seq_lens``: tokens of each sequence, e.g.
    [64, 256, 256] for a question, its positive and one hard negative."""
    return float(sum(6 * non_embedding_params * s + 12 * layers * hidden * s * s for s in seq_lens))


def non_embedding_params(model) -> int:
    """Parameters of a transformers BERT-like model outside its embeddings and pooler."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.split(".")[0] in ("embeddings", "pooler"))


# ---------------------------------------------------------------- sizes of each mode

class Sizes:
    """What each step runs: BERT-base on a GPU, a tiny BERT on the CPU (--rehearse)."""

    def __init__(self, rehearse: bool):
        self.rehearse = rehearse
        if rehearse:
            self.bert = dict(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=512)
            self.q_len, self.p_len = 16, 32
            self.throughput_batches, self.warmup, self.timed = [4], 1, 2
            self.cache_batches, self.chunk, self.cache_baseline, self.cache_warmup, self.cache_timed = [4, 8], 2, 4, 1, 2
            self.num_workers, self.encode_batch = 0, 64
        else:
            self.bert = {}  # BertConfig()'s defaults: BERT-base, 12 x 768, 110M parameters
            self.q_len, self.p_len = 64, 256
            self.throughput_batches, self.warmup, self.timed = [64, 128], 5, 15
            self.cache_batches, self.chunk, self.cache_baseline, self.cache_warmup, self.cache_timed = [128, 512, 1024], 128, 128, 1, 3
            # 8 DataLoader workers tokenise a batch of 128 x 3 texts (~100k tokens) well inside a ~0.1 s step (16 CPUs there)
            self.num_workers, self.encode_batch = 8, 512  # 512: dpr index build's GPU default


# ---------------------------------------------------------------- the bundle

def install_bundle(bundle: Path, dest: Path) -> dict:
    """Unpack ``bundle`` (made by benchmarks/gpu_bundle.py) into ``dest``: wheels (``wheels/*.whl`` or
    ``wheels/*.tar.xz`` of a wheel's files) into ``dest/site``, the data into ``dest/data`` (``*.xz``
    decompressed), and the model into ``dest/model`` with its fp16 safetensors written back as fp32.
    Returns {"site", "data", "model", "wheels", "manifest"}; raises FileNotFoundError without a MANIFEST.json."""
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    site, data, model = dest / "site", dest / "data", dest / "model"
    site.mkdir(parents=True, exist_ok=True)
    wheels = []
    for item in sorted((bundle / "wheels").glob("*")) if (bundle / "wheels").is_dir() else []:
        if item.name.endswith(".whl"):
            with zipfile.ZipFile(item) as zf:
                zf.extractall(site)
        elif item.name.endswith(".tar.xz"):
            with tarfile.open(item, "r:xz") as tf:
                tf.extractall(site, filter="data")
        else:
            continue
        wheels.append(item.name)
    if (bundle / "data").is_dir():
        for src in sorted((bundle / "data").rglob("*")):
            if src.is_dir():
                continue
            target = data / src.relative_to(bundle / "data")
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".xz":
                with lzma.open(src) as fin, open(target.with_suffix(""), "wb") as fout:
                    shutil.copyfileobj(fin, fout)
            else:
                shutil.copyfile(src, target)
    if (bundle / "model").is_dir():
        _model_to_fp32(bundle / "model", model)
    return {"site": site, "data": data, "model": model, "wheels": wheels, "manifest": manifest}


def _model_to_fp32(src: Path, dest: Path) -> None:
    """Copy a model directory, writing any floating-point safetensors weights back in fp32 (the bundle
    carries them in fp16 to fit the 64 MiB a call may carry; transformers would load fp16 as fp16)."""
    import torch
    from safetensors.torch import load_file, save_file

    for f in sorted(src.rglob("*")):
        if f.is_dir():
            continue
        target = dest / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".safetensors":
            tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(f)).items()}
            save_file(tensors, str(target), metadata={"format": "pt"})
        else:
            shutil.copyfile(f, target)


def use_site(site: Path) -> None:
    """Put an unpacked site directory first on this process's path and on its children's PYTHONPATH."""
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


# ---------------------------------------------------------------- tiny and synthetic inputs

def word_list(n: int) -> list[str]:
    """``n`` distinct lower-case words of letters only (each one token of a vocabulary that holds it)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = []
    i = 0
    while len(words) < n:
        j, w = i, ""
        while True:
            w = letters[j % 26] + w
            j //= 26
            if not j:
                break
        words.append("q" + w)  # "q" + base-26 digits: no collisions, never a special token
        i += 1
    return words


def make_bert(directory: Path, bert_settings: dict, n_words: int | None = None, seed: int = 0) -> Path:
    """A randomly initialised BERT (``BertConfig(**bert_settings)``; {} is BERT-base) and a word-level
    WordPiece vocabulary of its size, saved like a hub model: no download."""
    import torch
    import transformers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    config = BertConfig(**bert_settings)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + word_list((n_words or config.vocab_size) - 5)
    config.vocab_size = len(vocab)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    else:
        tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def synthetic_rows(n: int, words: list[str], q_len: int, p_len: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, positive, hard negative) texts: questions of exactly ``q_len`` tokens with [CLS] and
    [SEP], passages longer than ``p_len`` (cut there), so every sequence has a known length."""
    rng = random.Random(seed)
    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))
    return [(text(q_len - 2), text(p_len + 8), text(p_len + 8)) for _ in range(n)]


def write_rows(rows, path: Path) -> Path:
    with open(path, "w") as fh:
        for q, p, n in rows:
            fh.write(json.dumps({"query": q, "positive": p, "negatives": [n]}) + "\n")
    return path


def make_tiny_beir(root: Path, words: list[str], n: int = 32, seed: int = 0) -> Path:
    """A small BEIR directory (corpus, queries, train and test qrels) a tiny model can learn: each
    question shares two key words with its document."""
    rng = random.Random(seed)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    keys = words[:60]
    docs, queries = [], []
    for i in range(n):
        a, b = rng.sample(keys, 2)
        filler = " ".join(rng.choice(words[60:]) for _ in range(10))
        docs.append({"_id": f"d{i}", "title": a, "text": f"{a} {b} {filler}"})
        queries.append({"_id": f"q{i}", "text": f"{a} {b}"})
    for j in range(n, n + 16):  # unjudged passages
        docs.append({"_id": f"d{j}", "title": "", "text": " ".join(rng.choice(words) for _ in range(12))})
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, rows in (("train", range(0, n, 1)), ("test", range(0, n, 4))):
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in rows))
    return root


# ---------------------------------------------------------------- the check

class StepTimeout(Exception):
    pass


class Skip(Exception):
    """Raised by a step that cannot run here (the reason is recorded, the step is ``skipped``)."""


class Check:
    """Runs the steps in order and writes ``gpu_check.json`` / ``gpu_check.md`` after each."""

    def __init__(self, args):
        self.args, self.rehearse = args, args.rehearse
        self.sizes = Sizes(args.rehearse)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.workdir))
        self.started = time.perf_counter()
        self.results: dict = {
            "check": "benchmarks/gpu_check.py", "mode": "rehearsal (CPU, tiny)" if self.rehearse else "GPU",
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "budget_s": args.budget_s,
            "steps": {name: {"status": "pending"} for name in STEPS},
        }
        self.logfile = open(self.out / "gpu_check.log", "a")
        self.paths: dict = {}  # what the steps hand each other: data, model, checkpoint

    # -- bookkeeping
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def note(self, text: str) -> None:
        self.logfile.write(text.rstrip() + "\n")
        self.logfile.flush()

    def run(self, name: str, fn) -> None:
        rec = self.results["steps"][name]
        only = self.args.only
        blocked = [n for n in NEEDS[name] if self.results["steps"][n]["status"] not in ("ok", "degraded")]
        if only and name not in only and name != "bundle" and name != "environment":
            rec.update(status="skipped", reason="not in --only")
        elif blocked:
            rec.update(status="skipped", reason="needs " + ", ".join(f"{n} ({self.results['steps'][n]['status']})" for n in blocked))
        elif self.left() < 5:
            rec.update(status="skipped", reason=f"the time budget ({self.args.budget_s:.0f} s, --budget-s) is spent")
        else:
            print(f"== {name} ({self.left():.0f} s of the budget left)", flush=True)
            self.note(f"== {name}")
            t0 = time.perf_counter()
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(max(1, int(self.left())))
            try:
                figures = fn() or {}
                degraded = figures.pop("degraded", None)
                rec.update(status="degraded" if degraded else "ok", **({"reason": degraded} if degraded else {}), figures=figures)
            except Skip as e:
                rec.update(status="skipped", reason=str(e))
            except StepTimeout:
                rec.update(status="failed", error=f"stopped: the time budget ({self.args.budget_s:.0f} s) ran out during the step")
            except BaseException as e:  # noqa: BLE001 - a failed step is a result; the check goes on
                if isinstance(e, KeyboardInterrupt):
                    raise
                first = (str(e).strip().splitlines() or [""])[0]
                rec.update(status="failed", error=f"{type(e).__name__}: {first}"[:500])
                self.note(traceback.format_exc())
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                _free_memory()
            print(f"   {rec['status']} in {rec['seconds']} s" + (f": {rec.get('reason') or rec.get('error')}" if rec["status"] != "ok" else ""), flush=True)
        self.write()

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.results))

    def close(self) -> None:
        self.write()
        self.logfile.close()
        if not self.args.keep_workdir:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- helpers the steps share
    @property
    def device(self):
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not self.rehearse else torch.device("cpu")

    def train(self, rows, model_dir: Path, batch: int, steps: int, chunk: int | None, tag: str) -> dict:
        """One run of the project's trainer (trainer.train.train) on ``rows``; per-step figures from its metrics.jsonl."""
        import torch
        from trainer.config import TrainConfig
        from trainer.train import train

        s = self.sizes
        run_dir = self.work / f"train-{tag}"
        data = write_rows(rows[: batch * steps], self.work / f"train-{tag}.jsonl")
        cfg = TrainConfig.from_settings(
            model=str(model_dir), train=str(data), output=str(run_dir / "out"), shared_encoder=True, pooling="mean",
            similarity="cosine", temperature=0.05, query_max_length=s.q_len, passage_max_length=s.p_len,
            batch_size=batch, hard_negatives=1, negatives="given", max_steps=steps, lr=2e-5, warmup_steps=0,
            log_every=1, save_every=10**8, progress=False, chunk_size=chunk, num_workers=s.num_workers,
            device="cpu" if self.rehearse else "auto",
        )
        _free_memory()  # the previous run's tensors out of the peak
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train(cfg)
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
        records = [json.loads(x) for x in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]
        shutil.rmtree(run_dir, ignore_errors=True)
        (self.work / f"train-{tag}.jsonl").unlink(missing_ok=True)
        return {"records": records, "peak_bytes": peak}


def _alarm(signum, frame):
    raise StepTimeout()


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _timed_examples_per_s(records: list[dict], batch: int, warmup: int) -> float:
    """Examples/s over the steps after ``warmup``: each record covers one step (log_every 1), so this
    is total examples / total time."""
    timed = [r for r in records if r["step"] > warmup]
    return len(timed) * batch / sum(batch / r["examples_per_s"] for r in timed)


def _gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 3)


# ---------------------------------------------------------------- the steps

def step_bundle(c: Check) -> dict:
    if c.rehearse and not c.args.bundle:
        words = word_list(c.sizes.bert["vocab_size"] - 5)
        data = make_tiny_beir(c.work / "data" / "scifact", words)
        model = make_bert(c.work / "model" / "minilm", c.sizes.bert, seed=1)
        c.paths.update(data=data, model=model)
        return {"source": "rehearsal: a tiny BEIR set and a tiny random BERT made on the spot", "data": str(data)}
    bundle = Path(c.args.bundle or ROOT / "gpu_bundle")
    if not (bundle / "MANIFEST.json").is_file():
        raise FileNotFoundError(f"{bundle}/MANIFEST.json: no bundle there; run `make gpu-bundle` first (docs/gpu.md)")
    got = install_bundle(bundle, c.work)
    use_site(got["site"])
    c.paths.update(data=got["data"] / "scifact", model=got["model"] / "minilm")
    missing = []
    for module in ("faiss", "bm25s", "Stemmer"):
        try:
            __import__(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    figures = {"wheels": got["wheels"], "bundle_made": got["manifest"].get("made_utc"), "data": str(c.paths["data"]),
               "model": str(c.paths["model"]), "model_note": got["manifest"].get("model_note")}
    if missing:
        figures["degraded"] = "not importable: " + "; ".join(missing)
    return figures


def step_environment(c: Check) -> dict:
    import torch
    import transformers

    figures = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "transformers": transformers.__version__, "cpus": os.cpu_count()}
    try:
        import sentence_transformers

        figures["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        figures["sentence_transformers"] = None
    if c.rehearse:
        figures.update(device="cpu (rehearsal)", peak_bf16_tflops=None)
        a = torch.randn(256, 256)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        figures["matmul_fp32_256_gflops"] = round(10 * 2 * 256**3 / (time.perf_counter() - t0) / 1e9, 2)
        return figures
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False: no GPU here (use --rehearse for the CPU rehearsal)")
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name()
    figures.update(device=name, memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                   bf16_supported=torch.cuda.is_bf16_supported(), peak_bf16_tflops=peak_bf16_tflops(name))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        figures["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:200]
    except (OSError, subprocess.TimeoutExpired) as e:
        figures["nvidia_smi"] = f"not run: {e}"
    # the bf16 rate a large matrix product reaches here, random data (zeros run faster), 3 warm-ups
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    figures["matmul_bf16_8192_tflops"] = round(20 * 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12, 1)
    del a, b
    if figures["peak_bf16_tflops"] is None:
        figures["degraded"] = f"{name!r} is not in PEAK_BF16_TFLOPS: MFU is given against the measured matrix product only"
    return figures


def step_cuda_tests(c: Check) -> dict:
    import torch

    files = ["tests/test_train.py", "tests/test_index.py"]
    try:
        import faiss  # noqa: F401
    except ImportError:
        files = ["tests/test_train.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu or cuda", *files]
    if c.rehearse:  # no CUDA here: collect the same selection, in this process (its imports are paid already)
        import pytest

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), _cwd(ROOT):
            rc = pytest.main([*cmd[4:], "--collect-only"])
        stdout = buf.getvalue()
    else:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, min(240, c.left() - 5)))
        rc, stdout = done.returncode, done.stdout + "\n" + done.stderr[-3000:]
    c.note(f"$ {' '.join(cmd)}{' --collect-only' if c.rehearse else ''}\n{stdout[-6000:]}")
    summary = next((line for line in reversed(stdout.strip().splitlines()) if " in " in line and ("passed" in line or "collected" in line
                    or "failed" in line or "skipped" in line or "error" in line)), "(no summary line)").strip("= ")
    if rc != 0:
        raise RuntimeError(f"pytest exit {int(rc)}: {summary}")
    figures = {"command": " ".join(cmd[2:]), "summary": summary}
    if c.rehearse:
        figures["note"] = "rehearsal: the selection collected (--collect-only), not run"
    if len(files) == 1:
        figures["degraded"] = "faiss is not importable: tests/test_index.py (the faiss-gpu test) not collected"
    return figures


@contextlib.contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _bert_base(c: Check) -> tuple[Path, dict]:
    """The random BERT of the throughput and caching steps, made once; its FLOPs per example."""
    from transformers import AutoConfig, AutoModel

    directory = c.work / "bert"
    if "bert_shape" in c.paths:
        return directory, c.paths["bert_shape"]
    make_bert(directory, c.sizes.bert)
    config = AutoConfig.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory)
    n = non_embedding_params(model)
    total = sum(p.numel() for p in model.parameters())
    del model
    seqs = [c.sizes.q_len, c.sizes.p_len, c.sizes.p_len]
    shape = {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "parameters": total, "non_embedding_parameters": n,
             "seq_lens": seqs, "flops_per_example": train_flops_per_example(n, config.num_hidden_layers, config.hidden_size, seqs)}
    c.paths["bert_shape"] = shape
    return directory, shape


def _check_lengths(model_dir: Path, rows, q_len: int, p_len: int) -> None:
    """The synthetic texts are exactly q_len tokens (questions) and at least p_len (passages)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    q, p, _ = rows[0]
    got_q, got_p = len(tok(q)["input_ids"]), len(tok(p)["input_ids"])
    if got_q != q_len or got_p < p_len:
        raise RuntimeError(f"synthetic texts tokenize to {got_q} / {got_p} tokens, not {q_len} / >= {p_len}")


class _Collate:
    def __init__(self, model):
        self.model = model

    def __call__(self, rows):
        # preprocess (sentence-transformers >= 6.1; tokenize before, deprecated since)
        prep = getattr(self.model, "preprocess", None) or self.model.tokenize
        return [prep(list(col)) for col in zip(*rows)]


def sentence_transformers_run(c: Check, model_dir: Path, rows, batch: int, steps: int, warmup: int, num_workers: int) -> dict:
    """sentence-transformers' MultipleNegativesRankingLoss (scale 20 = our temperature 0.05, cosine) on
    the same model, texts and batch as our trainer: SentenceTransformer(model_dir) (mean pooling),
    fused AdamW at 2e-5, gradient clipping at our trainer's 2.0, bf16 autocast on CUDA, a DataLoader
    with the same workers tokenising with the model's own tokenizer, a sync per step (``loss.item()``,
    as our trainer's log). A plain loop, not SentenceTransformerTrainer (it needs ``datasets``, which
    the lent machines lack): no Trainer overhead, so the harder baseline to beat."""
    import torch
    from sentence_transformers import SentenceTransformer
    from torch.utils.data import DataLoader

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    cuda = c.device.type == "cuda"
    torch.manual_seed(0)
    model = SentenceTransformer(str(model_dir), device=str(c.device))
    model.max_seq_length = c.sizes.p_len  # questions are q_len tokens by construction
    loss_fn = MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=cuda)
    loader = DataLoader(rows[: batch * steps], batch_size=batch, collate_fn=_Collate(model), num_workers=num_workers,
                        pin_memory=cuda, drop_last=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    _free_memory()  # the previous run's tensors out of the peak
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    marks = [time.perf_counter()]
    for features in loader:
        features = [{k: v.to(c.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in f.items()} for f in features]
        with autocast:
            loss = loss_fn(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        marks.append(time.perf_counter())
    peak = torch.cuda.max_memory_allocated() if cuda else None
    del model, optimizer, loss_fn
    timed = marks[warmup:]  # marks[i] is the end of step i (marks[0] the start)
    return {"examples_per_s": batch * (len(timed) - 1) / (timed[-1] - timed[0]), "peak_bytes": peak}


def step_train_throughput(c: Check) -> dict:
    s = c.sizes
    model_dir, shape = _bert_base(c)
    words = word_list(shape_vocab(model_dir) - 5)
    rows = synthetic_rows(max(s.throughput_batches) * (s.warmup + s.timed), words, s.q_len, s.p_len)
    _check_lengths(model_dir, rows, s.q_len, s.p_len)
    peak = c.results["steps"]["environment"].get("figures", {}).get("peak_bf16_tflops")
    measured = c.results["steps"]["environment"].get("figures", {}).get("matmul_bf16_8192_tflops")
    fpe = shape["flops_per_example"]
    tokens_per_example = sum(shape["seq_lens"])
    table = []
    for batch in s.throughput_batches:
        ours = c.train(rows, model_dir, batch, s.warmup + s.timed, None, f"tp{batch}")
        ours_eps = _timed_examples_per_s(ours["records"], batch, s.warmup)
        st_workers, st_note = s.num_workers, None
        try:
            theirs = sentence_transformers_run(c, model_dir, rows, batch, s.warmup + s.timed, s.warmup, st_workers)
        except Exception as e:  # noqa: BLE001 - its tokenising workers are the one part our trainer does not share
            if not st_workers:
                raise
            c.note(traceback.format_exc())
            st_workers, st_note = 0, f"with {s.num_workers} DataLoader workers it failed ({type(e).__name__}: {str(e)[:200]}); ran with 0"
            _free_memory()
            theirs = sentence_transformers_run(c, model_dir, rows, batch, s.warmup + s.timed, s.warmup, 0)
        _free_memory()
        row = {"batch_size": batch, "examples_per_s": round(ours_eps, 2), "tokens_per_s": round(ours_eps * tokens_per_example),
               "peak_memory_gib": _gib(ours["peak_bytes"]), "model_tflops": round(ours_eps * fpe / 1e12, 2),
               "mfu": round(ours_eps * fpe / (peak * 1e12), 4) if peak else None,
               "mfu_of_measured_matmul": round(ours_eps * fpe / (measured * 1e12), 4) if measured else None,
               "st_examples_per_s": round(theirs["examples_per_s"], 2), "st_peak_memory_gib": _gib(theirs["peak_bytes"]),
               "st_mfu": round(theirs["examples_per_s"] * fpe / (peak * 1e12), 4) if peak else None,
               "ratio_to_st": round(ours_eps / theirs["examples_per_s"], 3), "st_num_workers": st_workers, "st_note": st_note, "loss_first_last": [ours["records"][0]["loss"], ours["records"][-1]["loss"]]}
        table.append(row)
        print(f"   batch {batch}: {row['examples_per_s']} ex/s, MFU {row['mfu']}, sentence-transformers {row['st_examples_per_s']} ex/s "
              f"(x{row['ratio_to_st']})", flush=True)
    return {"model": shape, "precision": "bf16 autocast" if c.device.type == "cuda" else "fp32 (CPU)", "warmup_steps": s.warmup,
            "timed_steps": s.timed, "num_workers": s.num_workers, "peak_bf16_tflops": peak,
            "formula": "FLOPs/example = sum over sequences of 6*N*S + 12*L*d*S^2; MFU = examples/s * FLOPs/example / peak",
            "rows": table, "goals": {"mfu >= 0.40": bool(peak) and max(r["mfu"] or 0 for r in table) >= 0.40,
                                     "ratio_to_st >= 1.5": max(r["ratio_to_st"] for r in table) >= 1.5}}


def shape_vocab(model_dir: Path) -> int:
    return len((model_dir / "vocab.txt").read_text().split())


def step_gradient_caching(c: Check) -> dict:
    import torch

    s = c.sizes
    model_dir, shape = _bert_base(c)
    steps = s.cache_warmup + s.cache_timed
    rows = synthetic_rows(max(s.cache_batches) * steps, word_list(shape_vocab(model_dir) - 5), s.q_len, s.p_len, seed=1)
    table = []
    for batch, chunk in [(s.cache_baseline, None)] + [(b, s.chunk) for b in s.cache_batches]:
        try:
            got = c.train(rows, model_dir, batch, steps, chunk, f"gc{batch}-{chunk}")
            eps = _timed_examples_per_s(got["records"], batch, s.cache_warmup)
            row = {"batch_size": batch, "chunk_size": chunk, "ms_per_example": round(1000 / eps, 4), "examples_per_s": round(eps, 2),
                   "peak_memory_gib": _gib(got["peak_bytes"])}
        except torch.OutOfMemoryError:  # a result too: this configuration does not fit
            row = {"batch_size": batch, "chunk_size": chunk, "out_of_memory": True}
        _free_memory()
        table.append(row)
        print(f"   batch {batch} chunk {chunk}: {row}", flush=True)
    base = table[0]
    for row in table[1:]:
        if "ms_per_example" in row and "ms_per_example" in base:
            row["time_vs_uncached"] = round(row["ms_per_example"] / base["ms_per_example"], 3)
            if row["peak_memory_gib"] is not None and base["peak_memory_gib"]:
                row["memory_vs_uncached"] = round(row["peak_memory_gib"] / base["peak_memory_gib"], 3)
    big = table[-1]
    return {"model": {k: shape[k] for k in ("layers", "hidden", "parameters", "seq_lens")}, "chunk_size": s.chunk,
            "warmup_steps": s.cache_warmup, "timed_steps": s.cache_timed, "rows": table,
            "goal": f"batch {big['batch_size']} in the memory of uncached {base['batch_size']} at <= 1.3x its time per example",
            "goal_met": (big.get("memory_vs_uncached") is not None and big["memory_vs_uncached"] <= 1.0
                         and big.get("time_vs_uncached", 99) <= 1.3)}


def dpr(c: Check, argv: list[str]) -> tuple[int, str, float]:
    """A ``dpr`` command in this process (the check pays the imports once): exit code, stdout, seconds."""
    from dpr_service.cli import main

    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    seconds = time.perf_counter() - t0
    c.note(f"$ dpr {' '.join(argv)}  -> exit {rc} in {seconds:.1f} s\n{buf.getvalue()[-3000:]}")
    if rc:
        raise RuntimeError(f"dpr {argv[0]} exited {rc} (gpu_check.log has its output)")
    return rc, buf.getvalue(), seconds


def step_scifact_default(c: Check) -> dict:
    data, model = c.paths.get("data"), c.paths.get("model")
    data = Path(c.args.data) if c.args.data else data
    if not data or not (Path(data) / "corpus.jsonl").is_file():
        raise FileNotFoundError(f"no SciFact at {data} (the bundle's data/scifact, or --data)")
    work = c.work / "scifact"
    device = ["--device", "cpu"] if c.rehearse else []
    _, _, train_s = dpr(c, ["train", "--model", str(model), "--train", str(data), "--output", str(work / "run"), "--no-progress", *device])
    checkpoint = work / "run" / "last"
    c.paths["checkpoint"] = checkpoint
    c.paths["data"] = data
    figures = {"command": "dpr train --model MiniLM --train scifact --output run (the default command)", "train_s": round(train_s, 1)}
    records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if '"examples_per_s"' in x]
    if records:  # the run the defaults chose: steps, epochs, and its speed (median over the logged windows)
        speeds = sorted(r["examples_per_s"] for r in records)
        figures.update(steps=records[-1]["step"], epochs=records[-1]["epoch"] + 1, train_examples_per_s_median=round(speeds[len(speeds) // 2], 1))
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        from dpr_service.core.checkpoint import load_checkpoint
        from dpr_service.core.device import pick_runtime
        from dpr_service.core.formats import read_eval_data
        from trainer.evaluate import retrieval_eval

        t0 = time.perf_counter()
        runtime = pick_runtime("cpu" if c.rehearse else "auto")
        loaded = load_checkpoint(checkpoint, runtime.device)
        metrics = retrieval_eval(loaded.encoder.to(runtime.device), loaded.tokenizer, read_eval_data(data, "test"), runtime)
        eval_s = time.perf_counter() - t0
        figures.update(index_s=None, eval_s=round(eval_s, 1), metrics={k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
                       degraded=f"faiss not importable ({e}): no `dpr index build` / `dpr eval`; exact search by trainer.evaluate.retrieval_eval instead")
    else:
        bm25 = []
        try:
            import bm25s  # noqa: F401
            import Stemmer  # noqa: F401
        except ImportError:
            bm25 = ["--no-bm25"]
        _, _, index_s = dpr(c, ["index", "build", "--checkpoint", str(checkpoint), "--corpus", str(data), "--output",
                                str(work / "index"), "--no-progress", *bm25, *device])
        _, out, eval_s = dpr(c, ["eval", "--checkpoint", str(checkpoint), "--index", str(work / "index"), "--queries", str(data),
                                 "--split", "test", "--json", "--no-progress", *device])
        metrics = json.loads(out)
        figures.update(index_s=round(index_s, 1), eval_s=round(eval_s, 1),
                       metrics={k: round(v, 4) for k, v in metrics.items() if isinstance(v, (int, float))})
        if bm25:
            figures["degraded"] = "bm25s / PyStemmer not importable: index built with --no-bm25"
    figures["total_s"] = round(train_s + (figures["index_s"] or 0) + figures["eval_s"], 1)
    figures["ndcg@10"] = figures["metrics"].get("ndcg@10")
    figures["goal"] = f"<= 180 s wall, nDCG@10 within seed noise of the CPU's {CPU_SCIFACT_NDCG10}"
    print(f"   train {figures['train_s']} s, index {figures['index_s']} s, eval {figures['eval_s']} s; nDCG@10 {figures['ndcg@10']}", flush=True)
    return figures


def step_gpu_encoding(c: Check) -> dict:
    import torch

    from dpr_service.core.checkpoint import load_checkpoint
    from dpr_service.core.device import Runtime
    from dpr_service.core.formats import read_corpus
    from dpr_service.core.inference import encode_texts

    device = c.device
    loaded = load_checkpoint(c.paths["checkpoint"], device)
    encoder = loaded.encoder.to(device)
    corpus = read_corpus(c.paths["data"])
    batch = c.sizes.encode_batch
    out, figures = {}, {"passages": len(corpus), "batch_size": batch, "device": str(device)}
    # Runtime directly: on the CPU (rehearsal) pick_runtime refuses bf16, the path under test is the same
    for precision in ("fp32", "bf16"):
        runtime = Runtime(device, precision)
        encode_texts(encoder, loaded.tokenizer, corpus[: 2 * batch], "passage", runtime, batch)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out[precision] = encode_texts(encoder, loaded.tokenizer, corpus, "passage", runtime, batch)  # (N, D) fp32 on the CPU
        seconds = time.perf_counter() - t0
        figures[f"{precision}_passages_per_s"] = round(len(corpus) / seconds, 1)
        figures[f"{precision}_seconds"] = round(seconds, 2)
    cos = torch.nn.functional.cosine_similarity(out["fp32"], out["bf16"], dim=1)  # (N,)
    figures["largest_cosine_difference"] = float((1 - cos).max())
    figures["mean_cosine_difference"] = float((1 - cos).mean())
    figures["bf16_speedup"] = round(figures["bf16_passages_per_s"] / figures["fp32_passages_per_s"], 2)
    print(f"   fp32 {figures['fp32_passages_per_s']} p/s, bf16 {figures['bf16_passages_per_s']} p/s, "
          f"largest 1 - cos {figures['largest_cosine_difference']:.2e}", flush=True)
    return figures


STEP_FUNCTIONS = {
    "bundle": step_bundle, "environment": step_environment, "cuda_tests": step_cuda_tests,
    "train_throughput": step_train_throughput, "gradient_caching": step_gradient_caching,
    "scifact_default": step_scifact_default, "gpu_encoding": step_gpu_encoding,
}


# ---------------------------------------------------------------- the report

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def step_summary(name: str, rec: dict) -> str:
    """One line of figures for the main table."""
    f = rec.get("figures") or {}
    if rec["status"] in ("skipped", "failed", "pending"):
        return rec.get("reason") or rec.get("error") or ""
    if name == "bundle":
        text = f"wheels: {', '.join(f.get('wheels') or []) or 'none'}"
    elif name == "environment":
        text = f"{f.get('device')}, torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), bf16 peak {_fmt(f.get('peak_bf16_tflops'))} TFLOP/s, " \
               f"measured matmul {_fmt(f.get('matmul_bf16_8192_tflops'))} TFLOP/s"
    elif name == "cuda_tests":
        text = f.get("summary", "")
    elif name == "train_throughput":
        text = "; ".join(f"batch {r['batch_size']}: {r['examples_per_s']} ex/s, MFU {_fmt(r['mfu'])}, x{r['ratio_to_st']} sentence-transformers"
                         for r in f.get("rows", []))
    elif name == "gradient_caching":
        text = "; ".join(f"{r['batch_size']}/{r['chunk_size'] or 'uncached'}: " + ("OOM" if r.get("out_of_memory") else
                         f"{r['ms_per_example']} ms/ex, {_fmt(r['peak_memory_gib'])} GiB") for r in f.get("rows", []))
    elif name == "scifact_default":
        text = f"{f.get('total_s')} s wall (train {f.get('train_s')}, index {_fmt(f.get('index_s'))}, eval {f.get('eval_s')}), nDCG@10 {_fmt(f.get('ndcg@10'))}"
    elif name == "gpu_encoding":
        text = f"fp32 {f.get('fp32_passages_per_s')} / bf16 {f.get('bf16_passages_per_s')} passages/s, largest 1 - cos {_fmt(f.get('largest_cosine_difference'))}"
    else:
        text = ""
    return text + (f" (degraded: {rec['reason']})" if rec["status"] == "degraded" else "")


def markdown(results: dict) -> str:
    """The report as markdown: a row per step, then the throughput and caching tables."""
    env = results["steps"]["environment"].get("figures") or {}
    lines = [f"# GPU check ({results['mode']}), {results['started_utc']} UTC", "",
             f"Device: {env.get('device', '-')}; torch {env.get('torch', '-')}, CUDA {env.get('torch_cuda', '-')}; "
             f"elapsed {results.get('elapsed_s', '-')} s of a {results['budget_s']} s budget.", "",
             "| step | status | seconds | figures |", "|---|---|---|---|"]
    for name in STEPS:
        rec = results["steps"][name]
        lines.append(f"| {name} | {rec['status']} | {_fmt(rec.get('seconds'))} | {step_summary(name, rec).replace('|', '/')} |")
    tp = results["steps"]["train_throughput"].get("figures") or {}
    if tp.get("rows"):
        m = tp["model"]
        lines += ["", f"Training throughput: {m['parameters']:,} parameters ({m['non_embedding_parameters']:,} non-embedding), "
                  f"{m['layers']} x {m['hidden']}, sequences {m['seq_lens']} tokens, {tp['precision']}; "
                  f"{m['flops_per_example']:.4g} model FLOPs per example ({tp['formula']}); peak {_fmt(tp['peak_bf16_tflops'])} TFLOP/s.", "",
                  "| batch | examples/s | tokens/s | peak GiB | model TFLOP/s | MFU | MFU of measured matmul | sentence-transformers ex/s | ST peak GiB | ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in tp["rows"]:
            lines.append(f"| {r['batch_size']} | {r['examples_per_s']} | {r['tokens_per_s']} | {_fmt(r['peak_memory_gib'])} | {r['model_tflops']} | "
                         f"{_fmt(r['mfu'])} | {_fmt(r['mfu_of_measured_matmul'])} | {r['st_examples_per_s']} | {_fmt(r['st_peak_memory_gib'])} | {r['ratio_to_st']} |")
    gc_ = results["steps"]["gradient_caching"].get("figures") or {}
    if gc_.get("rows"):
        lines += ["", f"Gradient caching (chunk {gc_['chunk_size']}): {gc_['goal']}: {'met' if gc_['goal_met'] else 'not met'}.", "",
                  "| batch | chunk | ms/example | peak GiB | time vs uncached | memory vs uncached |", "|---|---|---|---|---|---|"]
        for r in gc_["rows"]:
            if r.get("out_of_memory"):
                lines.append(f"| {r['batch_size']} | {r['chunk_size'] or 'none'} | out of memory | - | - | - |")
            else:
                lines.append(f"| {r['batch_size']} | {r['chunk_size'] or 'none'} | {r['ms_per_example']} | {_fmt(r['peak_memory_gib'])} | "
                             f"{_fmt(r.get('time_vs_uncached'))} | {_fmt(r.get('memory_vs_uncached'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="docs/gpu.md says how to run it on a lent GPU.")
    ap.add_argument("--out", required=True, help="directory for gpu_check.json, gpu_check.md and gpu_check.log")
    ap.add_argument("--bundle", help="the folder `make gpu-bundle` made (default gpu_bundle/; the rehearsal makes tiny inputs instead)")
    ap.add_argument("--data", help="a SciFact directory to use instead of the bundle's")
    ap.add_argument("--rehearse", action="store_true", help="every step on the CPU with a tiny model and tiny data (CI)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting steps after this many seconds (default 450)")
    ap.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps (bundle and environment always run)")
    ap.add_argument("--workdir", help="where the temporary working directory goes (default the system's)")
    ap.add_argument("--keep-workdir", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.rehearse:  # tiny tensors: a second thread only adds synchronisation (and contention on a shared CI machine)
        import torch

        torch.set_num_threads(1)
    check = Check(args)
    try:
        for name in STEPS:
            check.run(name, lambda name=name: STEP_FUNCTIONS[name](check))
    finally:
        check.close()
    print(markdown(check.results), flush=True)
    print(f"wrote {check.out / 'gpu_check.json'} and {check.out / 'gpu_check.md'}", flush=True)
    statuses = [check.results["steps"][n]["status"] for n in STEPS]
    return 1 if "failed" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())
