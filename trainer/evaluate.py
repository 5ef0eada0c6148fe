"""Evaluation during training: the dev NLL (the same loss the server's /score returns) and
retrieval metrics from exact search over the dev corpus."""

from __future__ import annotations

import time

import torch

from dpr_service.core.device import Runtime
from dpr_service.core.encoder import BiEncoder
from dpr_service.core.formats import EvalData, TrainData
from dpr_service.core.inference import encode_texts, exact_search
from dpr_service.core.loss import in_batch_nll
from dpr_service.core.metrics import answer_accuracy, retrieval_metrics
from dpr_service.core.tokenize import TextTokenizer

from .batches import Batch, fixed_batches


def batch_losses(encoder: BiEncoder, batch: Batch, runtime: Runtime) -> torch.Tensor:
    """Per-question DPR losses (B,) for one batch: the computation of a training step's forward."""
    batch = batch.to(runtime.device)
    with runtime.autocast():
        q_emb = encoder.encode_queries(**batch.queries)  # (B, D)
        p_emb = encoder.encode_passages(**batch.passages)  # (N, D)
    cfg = encoder.config
    return in_batch_nll(
        q_emb, p_emb, batch.positive_idx,
        similarity=cfg.similarity, temperature=cfg.temperature,
        p_ids=batch.p_ids, candidate_mask=batch.candidate_mask(), reduction="none",
    )


@torch.no_grad()
def dev_nll(encoder: BiEncoder, tokenizer: TextTokenizer, data: TrainData, runtime: Runtime,
            batch_size: int, hard_negatives: int) -> float:
    """Mean per-question loss over the dev examples, in file order, dropout off."""
    was_training = encoder.training
    encoder.eval()
    total, count = 0.0, 0
    for batch in fixed_batches(data.examples, data.corpus, tokenizer, batch_size, hard_negatives):
        losses = batch_losses(encoder, batch, runtime)
        total += float(losses.sum())
        count += losses.numel()
    encoder.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def retrieval_eval(encoder: BiEncoder, tokenizer: TextTokenizer, data: EvalData, runtime: Runtime,
                   batch_size: int = 128, progress: bool = False, k: int = 100) -> dict[str, float]:
    """nDCG@10, MRR@10, Recall@1/5/20/100 (and DPR's top-k answer accuracy when answers are given)
    with exact inner-product search over the whole corpus."""
    qids = list(data.queries)
    p_emb = encode_texts(encoder, tokenizer, data.corpus, "passage", runtime, batch_size, progress)  # (N, D)
    q_emb = encode_texts(encoder, tokenizer, [data.queries[q] for q in qids], "query", runtime, batch_size, progress)
    _, top = exact_search(q_emb, p_emb, k, device=runtime.device)  # (Q, k)
    pids = [p.id for p in data.corpus]
    run = {q: [pids[j] for j in row] for q, row in zip(qids, top.tolist())}
    metrics = retrieval_metrics(run, data.qrels)
    if data.answers:
        text = {p.id: p.text for p in data.corpus}
        metrics.update(answer_accuracy(run, data.answers, text))
    return metrics


def evaluate(encoder: BiEncoder, tokenizer: TextTokenizer, eval_data: EvalData, nll_data: TrainData,
             runtime: Runtime, batch_size: int, eval_batch_size: int, hard_negatives: int,
             progress: bool = False) -> dict[str, float]:
    t0 = time.perf_counter()
    metrics = {"dev_nll": dev_nll(encoder, tokenizer, nll_data, runtime, batch_size, hard_negatives)}
    metrics.update(retrieval_eval(encoder, tokenizer, eval_data, runtime, eval_batch_size, progress))
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics
