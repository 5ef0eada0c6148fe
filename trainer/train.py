"""The training loop, top to bottom: settings, data, model, negatives, loop, evaluate, checkpoint.

Output directory::

    train_config.yaml    the effective configuration (encoder settings resolved from the model)
    metrics.jsonl        one strict-JSON line per logged step and per evaluation
    negatives/           mined hard negatives, one file per mining round (read back by --resume)
    last/                the latest checkpoint, with training_state/ for --resume
    best/                the best checkpoint by --best-metric (when --dev is given)

Under torchrun every rank runs this same loop on its slice of each global batch (see step.py);
rank 0 alone mines, evaluates and writes files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dpr_service.core.checkpoint import (CheckpointError, atomic_directory, base_fingerprint, load_base_model,
                                         load_checkpoint, write_checkpoint)
from dpr_service.core.encoder import BiEncoder
from dpr_service.core.fsio import recover_directory
from dpr_service.core.device import Runtime, pick_runtime
from dpr_service.core.formats import EvalData, TrainData, read_eval_data, read_train_data

from . import distributed, negatives, query_side
from .batches import EpochBatches, group_by_question
from .checks import log_length_report
from .config import ConfigError, TrainConfig, check_resume_config, resolve_encoder
from .evaluate import evaluate
from .state import load_training_state, save_training_state
from .step import forward_backward, prepare_models

log = logging.getLogger("trainer")

LOWER_IS_BETTER = {"dev_nll"}
EXAMPLES_TARGET = 8000  # default run length: about this many examples, 1 to 10 epochs (see default_epochs)


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint; ``signum`` says which."""

    def __init__(self, signum: int, step: int, is_main: bool = True):
        self.signum, self.step, self.is_main = signum, step, is_main  # is_main: this process wrote the checkpoint
        super().__init__(f"stopped by signal {signum} at step {step}")


class NonFiniteLoss(Exception):
    """The loss or the gradient norm of a step was NaN or infinite (``--on-nonfinite stop``)."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        self.step = step
        super().__init__(
            f"step {step}: the loss is {loss} and the gradient norm {grad_norm}; training stopped before the "
            "optimiser applied them (last/ holds the latest finite checkpoint, if any). Lower --lr, raise "
            "--temperature, or pass --on-nonfinite skip to skip such steps")


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training job; returns the path of the final checkpoint.

    Raises ConfigError (bad settings, or --resume with changed ones), DataError (bad data, naming
    file and line), CheckpointError, NonFiniteLoss, or Interrupted (SIGTERM/SIGINT, after saving)."""
    cfg.validate()
    dist = distributed.from_env()
    try:
        return _train(cfg, dist)
    finally:
        distributed.teardown()


# ----------------------------------------------------------------------------- named steps


def setup_runtime(cfg: TrainConfig, dist: distributed.Dist) -> Runtime:
    """Device and precision, chosen once; the process group under torchrun."""
    device = cfg.device
    if dist.enabled and device.startswith("cuda:"):
        raise ConfigError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                          "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if dist.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{dist.local_rank}"
    try:
        runtime = pick_runtime(device, cfg.precision)
    except ValueError as e:
        raise ConfigError(f"--device {cfg.device} --precision {cfg.precision}: {e}") from None
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    distributed.setup(dist, runtime.device)
    return runtime


def prepare_run(cfg: TrainConfig, dist: distributed.Dist) -> tuple[TrainConfig, str]:
    """Decide fresh run or resume, resolve the encoder settings, and check a resume changes nothing
    that matters. Returns the config to run with (local paths made absolute, so that
    ``dpr train --output RUN --resume`` works from any directory) and the kind of starting model.
    Writes nothing but the recovery of ``last/`` and, for a fresh run, the removal of negatives
    mined by an earlier run that never reached a checkpoint."""
    last_dir = Path(cfg.output) / "last"
    if dist.is_main:
        recover_directory(last_dir)
    distributed.barrier(dist)
    if cfg.auto_resume and not cfg.resume and (last_dir / "training_state").is_dir():
        log.info("--auto-resume: continuing the run in %s", cfg.output)
        cfg = dataclasses.replace(cfg, resume=True)
    if cfg.resume and not (last_dir / "training_state").is_dir():
        raise ConfigError(f"--resume: no resumable checkpoint in {last_dir}")
    if not cfg.resume and last_dir.exists():
        raise ConfigError(f"{last_dir} exists: pass --resume to continue that run, or choose another --output")
    cfg, sources = resolve_encoder(cfg, last_dir if cfg.resume else None)
    cfg = cfg.resolve_defaults()
    if cfg.index:  # query-side: the query encoder trains apart from the index's passage encoder
        cfg = dataclasses.replace(cfg, encoder={**cfg.encoder, "shared": False})
    if cfg.lora_r is not None and importlib.util.find_spec("peft") is None:
        raise ConfigError("--lora-r needs the peft package: pip install 'dpr-service[lora]'")
    kind = sources.pop("kind")
    values = cfg.settings()
    log.info("encoder settings (%s): %s", kind, ", ".join(f"{k} {values[k]!r} ({sources[k]})" for k in sources))
    cfg = dataclasses.replace(cfg, **{k: str(Path(v).expanduser().resolve()) for k in ("model", "train", "dev", "output", "index")
                                      if (v := getattr(cfg, k)) and Path(v).expanduser().exists()})
    if cfg.resume:
        check_resume_config(cfg, last_dir / "train_config.yaml")
        kind = ""  # the interrupted run's, from its training state (see _train)
    elif dist.is_main:
        shutil.rmtree(Path(cfg.output) / "negatives", ignore_errors=True)  # never another run's negatives
    distributed.barrier(dist)  # every rank has checked last/ before rank 0 writes anything
    return cfg, kind


def load_data(cfg: TrainConfig) -> tuple[TrainData, EvalData | None, TrainData | None]:
    """The training data, and the dev data as queries (for retrieval metrics) and as pairs (dev NLL)."""
    data = read_train_data(cfg.train, cfg.train_split)
    questions = len({ex.query for ex in data.examples})
    log.info("training data: %d questions, %d (question, positive) pairs, %d passages in the pool, from %s",
             questions, len(data.examples), len(data.corpus), data.source)
    if not cfg.dev:
        return data, None, None
    eval_data = read_eval_data(cfg.dev, cfg.dev_split)
    nll_data = read_train_data(cfg.dev, cfg.dev_split)
    if cfg.best_metric.endswith("_accuracy") and not eval_data.answers:
        raise ConfigError(f"--best-metric {cfg.best_metric} needs answers in the dev data (DPR's "
                          f"\"answers\" field); {eval_data.source} has none: use ndcg@10, mrr@10, recall@K or dev_nll")
    log.info("dev data: %d queries over %d passages, from %s", len(eval_data.queries), len(eval_data.corpus), eval_data.source)
    return data, eval_data, nll_data


def default_epochs(units: int) -> int:
    """Epochs when neither --epochs nor --max-steps is given: about EXAMPLES_TARGET (8,000) examples
    (250 steps of 32), at least 1 and at most 10 epochs. Small data sets need several passes
    (sentence-transformers advises 3-10 epochs for small sets; Tevatron trains SciFact for 80); a
    large one is seen once. SciFact's 807 distinct questions: 10 (test nDCG@10 0.7615, against
    0.6938 for the 3 epochs of the former 2,500-example rule; BENCHMARKS.md)."""
    return min(10, max(1, round(EXAMPLES_TARGET / max(1, units))))


@dataclass
class Plan:
    """How long the run is: ``units`` examples per epoch (questions, or pairs with --pairs all)."""

    units: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    why: str


def plan_run(cfg: TrainConfig, units: int) -> Plan:
    """Steps per epoch and in all, from --max-steps, --epochs or :func:`default_epochs`."""
    if units < cfg.batch_size:
        raise ConfigError(f"{cfg.train}: {units} training {'questions' if cfg.pairs == 'sample' else 'examples'}, "
                          f"fewer than --batch-size {cfg.batch_size}")
    steps_per_epoch = units // cfg.batch_size
    if cfg.max_steps:
        return Plan(units, steps_per_epoch, cfg.max_steps, cfg.max_steps / steps_per_epoch, "--max-steps")
    epochs, why = (cfg.epochs, "--epochs") if cfg.epochs is not None else (default_epochs(units), f"about {EXAMPLES_TARGET} examples, 1-10 epochs")
    return Plan(units, steps_per_epoch, max(1, math.ceil(epochs * steps_per_epoch)), epochs, why)


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total`` (DPR's schedule)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def add_lora(cfg: TrainConfig, encoder: BiEncoder) -> tuple[BiEncoder, str]:
    """New LoRA adapters (--lora-r, --lora-alpha, --lora-dropout, --lora-targets) on the starting
    model's encoder(s); returns the encoder and the starting model's fingerprint, which the
    checkpoints record. Raises ConfigError for a --model that is not a local directory or
    --lora-targets that name no module."""
    from dpr_service.core import lora

    try:
        fingerprint = base_fingerprint(cfg.model)
    except CheckpointError as e:
        raise ConfigError(f"--lora-r: {e}") from None
    try:
        targets = tuple(cfg.lora_targets.split(",")) if cfg.lora_targets else lora.default_targets(encoder.query_model)
        settings = lora.LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets)
        encoder = lora.add_adapters(encoder, settings)
    except lora.LoraError as e:
        raise ConfigError(f"--lora-targets: {e}") from None
    log.info("LoRA: rank %d, alpha %g, dropout %g, on %s of %s", settings.r, settings.alpha, settings.dropout,
             ",".join(targets), "the shared encoder" if encoder.config.shared else "both encoders")
    return encoder, fingerprint


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``module``, a shared tensor counted once."""
    params = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def make_optimizer(cfg: TrainConfig, encoder: torch.nn.Module, total_steps: int, runtime: Runtime):
    """AdamW over the parameters that train (all, or the LoRA adapters only; no weight decay on
    biases and LayerNorm weights) and its LambdaLR schedule."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    decay, no_decay = [], []
    for p in encoder.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, eps=cfg.adam_eps, fused=runtime.device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, warmup, total_steps))
    return optimizer, scheduler


class Checkpointer:
    """Owns ``last/`` (model + training state, for --resume) and ``best/`` (model + eval.json).

    Writes are atomic (a killed write leaves the previous checkpoint), rank 0 only, and refused for
    non-finite weights (CheckpointError from write_checkpoint): a diverged model is never saved."""

    def __init__(self, cfg: TrainConfig, encoder, tokenizer, base_model: str, is_main: bool, base_fingerprint: str = "",
                 passage_source: str = ""):
        self.cfg, self.encoder, self.tokenizer, self.base_model, self.is_main = cfg, encoder, tokenizer, base_model, is_main
        self.base_fingerprint = base_fingerprint  # a LoRA run's: its checkpoints name the base model they need
        self.passage_source = passage_source  # a query-side run's: the checkpoint that built its index
        self.out = Path(cfg.output)

    def _write(self, name: str, extra) -> None:
        with atomic_directory(self.out / name) as tmp:
            write_checkpoint(tmp, self.encoder, self.tokenizer, self.base_model, self.base_fingerprint, self.passage_source)
            (tmp / "train_config.yaml").write_text(self.cfg.to_yaml())
            extra(tmp)

    def save_last(self, optimizer, scheduler, scaler, progress: dict) -> None:
        """Write ``last/`` (model and training state); rank 0 only."""
        if self.is_main:
            self._write("last", lambda tmp: save_training_state(tmp, optimizer, scheduler, scaler, progress))

    def save_best(self, step: int, metrics: dict) -> None:
        """Write ``best/`` (model and ``eval.json`` with the step's metrics); rank 0 only."""
        if self.is_main:
            self._write("best", lambda tmp: (tmp / "eval.json").write_text(json.dumps({"step": step, **metrics}, indent=2) + "\n"))


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the loop reads and updates: set up by :func:`_train`, advanced by :func:`train_loop`."""

    cfg: TrainConfig
    dist: distributed.Dist
    runtime: Runtime
    data: TrainData
    eval_data: EvalData | None
    nll_data: TrainData | None
    encoder: torch.nn.Module
    tokenizer: object
    models: object  # step.Models: the (DDP-wrapped) encoders
    groups: list | None  # examples per question (--pairs sample), or None (every pair)
    plan: Plan
    method: str  # the negatives: given, random, bm25, model, or index (query-side training)
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    checkpointer: Checkpointer
    step: int = 0
    best: float | None = None
    skipped: int = 0  # non-finite steps skipped (--on-nonfinite skip)
    model_kind: str = ""  # what the run started from (pretrained.Inferred.kind): --negatives auto depends on it
    corpus: query_side.IndexedCorpus | None = None  # --index: the fixed passage side (query-side training)
    stored_passages: tuple | None = None  # (id -> row, vectors) the dev evaluation searches instead of encoding

    def __post_init__(self) -> None:
        # --index with --dev over the same texts: evaluate on the stored vectors (the passage side is fixed)
        if self.corpus is not None and self.eval_data is not None and self.corpus.same_text(self.eval_data.corpus) is None:
            self.stored_passages = (self.corpus.row_of, self.corpus.vectors)

    @property
    def out(self) -> Path:
        """The run's output directory."""
        return Path(self.cfg.output)

    def mining_round(self, epoch: int) -> int:
        """Which negatives an epoch trains on: round 0 (the starting model's) unless --remine-every."""
        return epoch // self.cfg.remine_every if self.cfg.remine_every else 0

    def prepare_negatives(self, round_: int) -> None:
        """Make round ``round_``'s negatives the examples' hard negatives (read back or mined; see trainer/negatives.py).
        Query-side training has none to prepare: each step retrieves its own from the index."""
        cfg = self.cfg
        if self.corpus is not None:
            return
        negatives.prepare_round(self.method, round_, self.data, self.out, self.encoder, self.tokenizer, self.runtime,
                                cfg.mine_depth, cfg.mine_ratio, cfg.eval_batch_size, cfg.progress, self.dist.is_main,
                                lambda: distributed.barrier(self.dist), cfg.hard_negatives)

    def evaluate(self) -> None:
        """Evaluate on --dev (rank 0), log the metrics and keep best/."""
        if not self.dist.is_main:
            return  # the other ranks wait for rank 0 in the next step's gather
        cfg = self.cfg
        metrics = evaluate(self.encoder, self.tokenizer, self.eval_data, self.nll_data, self.runtime, cfg.batch_size,
                           cfg.eval_batch_size, cfg.hard_negatives, progress=cfg.progress,
                           passages=self.stored_passages)
        value = metrics[cfg.best_metric]  # checked against the dev data before training started
        if self.best is None:
            better = True
        else:
            better = value < self.best if cfg.best_metric in LOWER_IS_BETTER else value > self.best
        improved = math.isfinite(value) and better
        _append(self.out / "metrics.jsonl", {"step": self.step, "eval": metrics, "best": improved})
        log.info("step %d eval: %s%s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                 " (best so far)" if improved else "")
        if improved:
            self.best = value
            self.checkpointer.save_best(self.step, metrics)

    def save_last(self) -> None:
        """Write ``last/`` (model and training state); rank 0 only."""
        self.checkpointer.save_last(self.optimizer, self.scheduler, self.scaler, {
            "step": self.step, "best": self.best, "total_steps": self.plan.total_steps,
            "world_size": self.dist.world_size, "skipped_nonfinite": self.skipped, "model_kind": self.model_kind,
            **({"index_sha256": self.corpus.manifest.files.get("index.faiss")} if self.corpus is not None else {})})

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """Clip, then step the optimiser unless the loss or gradient is not finite; returns the
        gradient norm. A NaN/inf never reaches the weights (fp16's scaler skips inf gradients itself):
        NonFiniteLoss (--on-nonfinite stop), or the step is skipped and counted (skip)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), self.cfg.max_grad_norm)
        finite = bool(torch.isfinite(loss)) and (self.scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
        if finite:
            self.scaler.step(self.optimizer)
        elif self.cfg.on_nonfinite == "stop":
            raise NonFiniteLoss(self.step + 1, loss.item(), float(grad_norm))
        else:
            self.skipped += 1
            log.warning("step %d: non-finite loss or gradient (%s, %s); step skipped (%d so far)",
                        self.step + 1, loss.item(), float(grad_norm), self.skipped)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(grad_norm)


def _train(cfg: TrainConfig, dist: distributed.Dist) -> Path:
    """Set up (settings, data, model, plan, optimiser, position) and hand over to :func:`train_loop`."""
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {dist.world_size} processes")
    if not dist.is_main:
        log.setLevel(logging.WARNING)
    runtime = setup_runtime(cfg, dist)
    cfg, model_kind = prepare_run(cfg, dist)
    out, last_dir = Path(cfg.output), Path(cfg.output) / "last"
    torch.manual_seed(cfg.seed)

    # ---- data, model, run length
    data, eval_data, nll_data = load_data(cfg)
    corpus = query_side.load_indexed_corpus(cfg.index, cfg.progress and dist.is_main) if cfg.index else None
    if corpus is not None:
        query_side.check_positives(corpus, data.examples, data.source)
    if cfg.resume:  # a LoRA run's adapters stay apart from the base, trainable
        loaded = load_checkpoint(last_dir, runtime.device, merge_adapters=False)
        encoder, tokenizer, base_model, base_fp = loaded.encoder, loaded.tokenizer, loaded.base_model, loaded.base_fingerprint
    elif corpus is not None:  # query-side: the starting model must be the one whose passage encoder built the index
        encoder, tokenizer = query_side.start_encoder(cfg.model, cfg.encoder_config(), corpus)
        base_model, base_fp = cfg.model, ""
        if cfg.lora_r is not None:
            encoder, base_fp = add_lora(cfg, encoder)
    else:
        encoder, tokenizer = load_base_model(cfg.model, cfg.encoder_config())
        base_model, base_fp = cfg.model, ""
        if cfg.lora_r is not None:
            encoder, base_fp = add_lora(cfg, encoder)
    if corpus is not None and cfg.resume:  # the run's index must still be the one it trained against
        query_side.check_starting_model(corpus, loaded.identity, str(last_dir))
    trainable, total = count_parameters(encoder)
    log.info("parameters: %s of %s train (%.2f%%)%s", f"{trainable:,}", f"{total:,}", 100 * trainable / max(1, total),
             ", the LoRA adapters; the base model is frozen" if cfg.lora_r is not None else "")
    encoder.to(runtime.device).train()
    if corpus is not None:
        query_side.freeze_passage_encoder(encoder)  # and back to eval mode: it never runs in training
        corpus = corpus.to(runtime.device)
    encoder.length_buckets = cfg.length_buckets
    groups = group_by_question(data.examples) if cfg.pairs == "sample" else None
    plan = plan_run(cfg, len(groups) if groups is not None else len(data.examples))
    if dist.is_main and not cfg.resume:
        log_length_report(data, tokenizer)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(cfg.to_yaml())  # only once data and model have loaded
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a run killed before its first checkpoint

    # ---- optimiser, schedule, position; the negatives
    optimizer, scheduler = make_optimizer(cfg, encoder, plan.total_steps, runtime)
    scaler = runtime.grad_scaler()
    progress = load_training_state(last_dir, optimizer, scheduler, scaler) if cfg.resume else {}
    model_kind = progress.get("model_kind", "sentence-transformers") if cfg.resume else model_kind
    if corpus is not None and cfg.resume and progress.get("index_sha256") != corpus.manifest.files.get("index.faiss"):
        raise ConfigError(f"--resume --index {cfg.index}: the index changed since the run started (rebuilt or "
                          "added to); its vectors are not the ones this run trained against: start a new run")
    method = "index" if corpus is not None else negatives.choose_method(cfg.negatives, data, model_kind)
    if cfg.remine_every and method in ("given", "random", "bm25"):
        raise ConfigError(f"--remine-every mines with the model being trained, but the negatives are {method!r}"
                          f"{' (auto chose it)' if cfg.negatives == 'auto' else ''}: pass --negatives model")
    log.info("plan: %d %s per epoch (%s), %s %s (%s) = %d steps of %d; negatives: %s%s", plan.units,
             "questions, one positive each" if groups is not None else "(question, positive) pairs", f"--pairs {cfg.pairs}",
             f"{plan.epochs:g}", "epoch" if plan.epochs == 1 else "epochs", plan.why, plan.total_steps, cfg.batch_size, method,
             f", re-mined every {cfg.remine_every} epoch(s)" if cfg.remine_every else "")
    run = Run(cfg, dist, runtime, data, eval_data, nll_data, encoder, tokenizer,
              prepare_models(encoder, dist, runtime.device), groups, plan, method, optimizer, scheduler,
              scaler, Checkpointer(cfg, encoder, tokenizer, base_model, dist.is_main, base_fp,
                                   corpus.manifest.checkpoint_fingerprint if corpus is not None else ""),
              model_kind=model_kind, corpus=corpus)
    if cfg.resume:
        run.step, run.best, run.skipped = progress["step"], progress.get("best"), progress.get("skipped_nonfinite", 0)
        if progress.get("world_size", 1) != dist.world_size:
            log.warning("resuming a run of %d processes with %d: the same global batches, but dropout "
                        "masks differ from the interrupted run's", progress.get("world_size", 1), dist.world_size)
        if dist.is_main:
            _truncate_metrics(out / "metrics.jsonl", run.step)
        log.info("resumed from %s at step %d of %d", last_dir, run.step, plan.total_steps)
    return train_loop(run)


def train_loop(run: Run) -> Path:
    """The loop: batches of each epoch (new negatives at each mining round), forward and backward,
    optimiser step, logs, evaluations, checkpoints; stops cleanly on SIGTERM/SIGINT (finish the step,
    save last/, raise Interrupted) and after --stop-after steps. Returns the final checkpoint's path."""
    cfg, dist, plan, out = run.cfg, run.dist, run.plan, run.out
    stop_signal: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: stop_signal.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    current_round = run.mining_round(min(run.step, plan.total_steps - 1) // plan.steps_per_epoch)
    run.prepare_negatives(current_round)
    if run.eval_data is not None and cfg.eval_before and run.step == 0:
        run.evaluate()
    bar = tqdm(total=plan.total_steps, initial=run.step, desc="training", unit="step", disable=not (cfg.progress and dist.is_main), dynamic_ncols=True)
    started_at, window_examples, window_start, window_masked, masked = run.step, 0, time.perf_counter(), 0, 0
    try:
        while run.step < plan.total_steps:
            epoch, first = divmod(run.step, plan.steps_per_epoch)
            if run.mining_round(epoch) != current_round:  # ANCE: new negatives from the model being trained
                if run.eval_data is not None and run.step % cfg.eval_every:
                    run.evaluate()  # the model that mines this round (unless this step was just evaluated)
                current_round = run.mining_round(epoch)
                run.prepare_negatives(current_round)
            if run.corpus is None:
                batches = EpochBatches(run.data.examples, run.data.corpus, run.tokenizer, cfg.batch_size, cfg.hard_negatives,
                                       cfg.seed, epoch, dist.rank, dist.world_size, groups=run.groups)
            else:  # query-side: the questions only; their passages come from the index
                batches = query_side.QueryBatches(run.data.examples, run.corpus.row_of, run.tokenizer, cfg.batch_size,
                                                  cfg.seed, epoch, dist.rank, dist.world_size, groups=run.groups)
            loader = DataLoader(
                batches, batch_size=None, sampler=range(first, len(batches)), num_workers=cfg.num_workers,
                pin_memory=run.runtime.device.type == "cuda", generator=torch.Generator(),  # leaves the global RNG alone
                persistent_workers=False,
            )
            for batch in loader:
                # dropout's RNG from (seed, step, rank): a resumed run replays the same masks
                torch.manual_seed((cfg.seed * 1_000_003 + run.step) * 4099 + dist.rank)
                # forward and backward: B questions and B * (1 + H) passages (over all ranks), DPR
                # loss over all pairs (the function the dev evaluation and the server's /score use);
                # query-side: B questions against their negatives from the index (or all of it)
                if run.corpus is None:
                    loss = forward_backward(run.encoder, run.models, batch, run.runtime, dist, run.scaler, cfg.chunk_size)  # scalar
                    batch_masked = batch.masked
                else:
                    loss, batch_masked = query_side.forward_backward(run.encoder, run.models, batch, run.corpus, run.runtime, dist,
                                                                     run.scaler, cfg.index_loss, cfg.index_negatives, cfg.mine_ratio)
                grad_norm = run.optimizer_step(loss)
                run.step += 1
                window_examples += batch.size * dist.world_size
                window_masked, masked = window_masked + batch_masked, masked + batch_masked  # known positives, copies
                bar.update(1)

                if dist.is_main and (run.step % cfg.log_every == 0 or run.step == plan.total_steps):
                    elapsed = time.perf_counter() - window_start
                    record = {"step": run.step, "epoch": epoch, "loss": loss.item(), "lr": run.scheduler.get_last_lr()[0],
                              "grad_norm": grad_norm, "examples_per_s": window_examples / elapsed, "masked_pairs": window_masked}
                    if run.skipped:
                        record["skipped_nonfinite"] = run.skipped
                    _append(out / "metrics.jsonl", record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", ex_s=f"{record['examples_per_s']:.1f}")
                    window_examples, window_start, window_masked = 0, time.perf_counter(), 0
                if run.eval_data is not None and (run.step % cfg.eval_every == 0 or run.step == plan.total_steps):
                    run.evaluate()
                signalled = distributed.any_rank(bool(stop_signal), dist, run.runtime.device)  # all ranks stop together
                stopping = signalled or (cfg.stop_after is not None and run.step - started_at >= cfg.stop_after)
                if run.step % cfg.save_every == 0 or run.step == plan.total_steps or stopping:
                    run.save_last()
                if signalled:
                    # every rank waits for rank 0's last/: torchrun kills the others as soon as one exits
                    distributed.barrier(dist)
                    raise Interrupted(stop_signal[0] if stop_signal else signal.SIGTERM, run.step, dist.is_main)
                if stopping:
                    log.info("stopped after %d steps (--stop-after) at step %d; continue with --resume", cfg.stop_after, run.step)
                    distributed.barrier(dist)  # rank 0 has written last/
                    return out / "last"
                if run.step >= plan.total_steps:
                    break
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    distributed.barrier(dist)  # rank 0 has evaluated and written last/
    log.info("done: %d steps%s, %d (question, passage) pairs masked as known positives or their copies; checkpoint %s%s", run.step,
             f" ({run.skipped} skipped as non-finite)" if run.skipped else "", masked, out / "last", f", best {out / 'best'}" if run.eval_data else "")
    return out / "last"


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def _append(path: Path, record: dict) -> None:
    """One strict-JSON line (NaN and infinities written as null)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(_finite_or_none(record), allow_nan=False) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the killed run's tail)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the kill (or blank); it belongs to the killed run's tail
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
