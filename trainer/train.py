"""The training loop, top to bottom: read data, build the model, loop, evaluate, checkpoint.

Output directory::

    train_config.yaml    the effective configuration
    metrics.jsonl        one JSON line per logged step and per evaluation
    last/                the latest checkpoint, with training_state/ for --resume
    best/                the best checkpoint by --best-metric (when --dev is given)

Under torchrun every rank runs this same loop on its slice of each global batch (see step.py);
rank 0 alone evaluates and writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dpr_service.core.checkpoint import (
    CheckpointError, atomic_directory, load_base_model, load_checkpoint, recover_directory, write_checkpoint,
)
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import read_eval_data, read_train_data

from . import distributed
from .batches import EpochBatches, count_short
from .config import RESUME_MAY_CHANGE, ConfigError, TrainConfig
from .evaluate import evaluate
from .state import load_training_state, save_training_state
from .step import forward_backward, prepare_models

log = logging.getLogger("trainer")

LOWER_IS_BETTER = {"dev_nll"}


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint; ``signum`` says which."""

    def __init__(self, signum: int, step: int, main: bool = True):
        self.signum, self.step, self.main = signum, step, main  # main: this process wrote the checkpoint
        super().__init__(f"stopped by signal {signum} at step {step}")


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training job; returns the path of the final checkpoint."""
    cfg.validate()
    d = distributed.from_env()
    try:
        return _train(cfg, d)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, d: distributed.Dist) -> Path:
    if cfg.batch_size % d.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {d.world} processes")
    if not d.main:
        log.setLevel(logging.WARNING)

    # ---- device, precision and process group: chosen once, here
    device = cfg.device
    if d.enabled and device.startswith("cuda:"):
        raise ConfigError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                          "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if d.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{d.local_rank}"
    try:
        runtime = pick_runtime(device, cfg.precision)
    except ValueError as e:
        raise ConfigError(f"--device {cfg.device} --precision {cfg.precision}: {e}") from None
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    distributed.setup(d, runtime.device)

    out = Path(cfg.output)
    last_dir = out / "last"
    if d.main:
        recover_directory(last_dir)
    distributed.barrier(d)
    if cfg.auto_resume and not cfg.resume and (last_dir / "training_state").is_dir():
        log.info("--auto-resume: continuing the run in %s", out)
        cfg = dataclasses.replace(cfg, resume=True)
    if cfg.resume:
        if not (last_dir / "training_state").is_dir():
            raise ConfigError(f"--resume: no resumable checkpoint in {last_dir}")
        _check_resume_config(cfg, last_dir / "train_config.yaml")
    elif last_dir.exists():
        raise ConfigError(f"{last_dir} exists: pass --resume to continue that run, or choose another --output")
    distributed.barrier(d)  # every rank has checked last/ before rank 0 writes anything
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(cfg.to_yaml())
        if not cfg.resume:  # a run killed before its first checkpoint left lines nobody resumes
            (out / "metrics.jsonl").unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)

    # ---- data
    data = read_train_data(cfg.train, cfg.train_split)
    log.info("training data: %d examples, %d passages in the pool, from %s", len(data.examples), len(data.corpus), data.source)
    if len(data.examples) < cfg.batch_size:
        raise ConfigError(f"{data.source}: {len(data.examples)} examples, fewer than --batch-size {cfg.batch_size}")
    short = count_short(data.examples, cfg.hard_negatives)
    if short:
        log.warning("%d of %d questions have fewer than %d hard negatives: filled as DPR does, from their "
                    "negative_ctxs and then random corpus passages", short, len(data.examples), cfg.hard_negatives)
    eval_data = nll_data = None
    if cfg.dev:
        eval_data = read_eval_data(cfg.dev, cfg.dev_split)
        nll_data = read_train_data(cfg.dev, cfg.dev_split)
        if cfg.best_metric.endswith("_accuracy") and not eval_data.answers:
            raise ConfigError(f"--best-metric {cfg.best_metric} needs answers in the dev data (DPR's "
                              f"\"answers\" field); {eval_data.source} has none: use ndcg@10, mrr@10, recall@K or dev_nll")
        log.info("dev data: %d queries over %d passages, from %s", len(eval_data.queries), len(eval_data.corpus), eval_data.source)

    # ---- model
    if cfg.resume:
        loaded = load_checkpoint(last_dir, runtime.device)
        encoder, tokenizer, base_model = loaded.encoder, loaded.tokenizer, loaded.base_model
    else:
        encoder, tokenizer = load_base_model(cfg.model, cfg.encoder_config())
        base_model = cfg.model
    encoder.to(runtime.device).train()
    encoder.length_buckets = cfg.length_buckets
    models = prepare_models(encoder, d, runtime.device)  # DDP wrappers under torchrun

    # ---- optimiser and schedule
    steps_per_epoch = len(data.examples) // cfg.batch_size
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    decay, no_decay = [], []
    for name, p in encoder.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)  # no decay for biases and LayerNorm weights
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, eps=cfg.adam_eps, fused=runtime.device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    )
    scaler = runtime.grad_scaler()

    step, best = 0, None
    if cfg.resume:
        progress = load_training_state(last_dir, optimizer, scheduler, scaler)
        step, best = progress["step"], progress.get("best")
        if progress.get("world_size", 1) != d.world:
            log.warning("resuming a run of %d processes with %d: the same global batches, but dropout "
                        "masks differ from the interrupted run's", progress.get("world_size", 1), d.world)
        if d.main:
            _truncate_metrics(out / "metrics.jsonl", step)
        log.info("resumed from %s at step %d of %d", last_dir, step, total_steps)

    def save_last() -> None:
        if not d.main:
            return
        with atomic_directory(out / "last") as tmp:
            write_checkpoint(tmp, encoder, tokenizer, base_model)
            (tmp / "train_config.yaml").write_text(cfg.to_yaml())
            save_training_state(tmp, optimizer, scheduler, scaler,
                                {"step": step, "best": best, "total_steps": total_steps, "world_size": d.world})

    def run_eval() -> None:
        nonlocal best
        if not d.main:
            return  # the other ranks wait for rank 0 in the next step's gather
        metrics = evaluate(encoder, tokenizer, eval_data, nll_data, runtime, cfg.batch_size,
                           cfg.eval_batch_size, cfg.hard_negatives, progress=cfg.progress)
        value = metrics[cfg.best_metric]  # checked against the dev data before training started
        improved = best is None or (value < best if cfg.best_metric in LOWER_IS_BETTER else value > best)
        _append(out / "metrics.jsonl", {"step": step, "eval": metrics, "best": improved})
        log.info("step %d eval: %s%s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                 " (best so far)" if improved else "")
        if improved:
            best = value
            with atomic_directory(out / "best") as tmp:
                write_checkpoint(tmp, encoder, tokenizer, base_model)
                (tmp / "train_config.yaml").write_text(cfg.to_yaml())
                (tmp / "eval.json").write_text(json.dumps({"step": step, **metrics}, indent=2) + "\n")

    # ---- stop cleanly on SIGTERM / SIGINT: finish the step, save, exit
    stop_signal: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: stop_signal.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}

    if eval_data is not None and cfg.eval_before and step == 0:
        run_eval()

    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not (cfg.progress and d.main), dynamic_ncols=True)
    started_at, window_examples, window_start = step, 0, time.perf_counter()
    try:
        while step < total_steps:
            epoch, first = divmod(step, steps_per_epoch)
            batches = EpochBatches(data.examples, data.corpus, tokenizer, cfg.batch_size, cfg.hard_negatives,
                                   cfg.seed, epoch, d.rank, d.world)
            loader = DataLoader(
                batches, batch_size=None, sampler=range(first, len(batches)), num_workers=cfg.num_workers,
                pin_memory=runtime.device.type == "cuda", generator=torch.Generator(),  # leaves the global RNG alone
                persistent_workers=False,
            )
            for batch in loader:
                # dropout's RNG from (seed, step, rank): a resumed run replays the same masks
                torch.manual_seed((cfg.seed * 1_000_003 + step) * 4099 + d.rank)
                # forward and backward: B questions and B * (1 + H) passages (over all ranks), DPR
                # loss over all pairs (the function the dev evaluation and the server's /score use)
                loss = forward_backward(encoder, models, batch, runtime, d, scaler, cfg.chunk_size)  # scalar
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                window_examples += batch.size * d.world
                bar.update(1)

                if d.main and (step % cfg.log_every == 0 or step == total_steps):
                    elapsed = time.perf_counter() - window_start
                    record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                              "grad_norm": float(grad_norm), "examples_per_s": window_examples / elapsed}
                    _append(out / "metrics.jsonl", record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    ex_s=f"{record['examples_per_s']:.1f}")
                    window_examples, window_start = 0, time.perf_counter()
                if eval_data is not None and (step % cfg.eval_every == 0 or step == total_steps):
                    run_eval()
                signalled = distributed.any_rank(bool(stop_signal), d, runtime.device)  # all ranks stop together
                stopping = signalled or (cfg.stop_after is not None and step - started_at >= cfg.stop_after)
                if step % cfg.save_every == 0 or step == total_steps or stopping:
                    save_last()
                if signalled:
                    # every rank waits for rank 0's last/: torchrun kills the others as soon as one exits
                    distributed.barrier(d)
                    raise Interrupted(stop_signal[0] if stop_signal else signal.SIGTERM, step, d.main)
                if stopping:
                    log.info("stopped after %d steps (--stop-after) at step %d; continue with --resume", cfg.stop_after, step)
                    distributed.barrier(d)  # rank 0 has written last/
                    return out / "last"
                if step >= total_steps:
                    break
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    distributed.barrier(d)  # rank 0 has evaluated and written last/
    log.info("done: %d steps; checkpoint %s%s", step, out / "last", f", best {out / 'best'}" if eval_data else "")
    return out / "last"


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


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


def _check_resume_config(cfg: TrainConfig, saved_path: Path) -> None:
    import yaml

    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{saved_path}: cannot read the interrupted run's config ({e})") from None
    now = yaml.safe_load(cfg.to_yaml())
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]
    if changed:
        diffs = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"--resume with settings that differ from the interrupted run ({diffs})")
