"""Evaluation during training: the dev NLL (the same loss the server's /score returns) and
retrieval metrics from exact search over the dev corpus."""

from __future__ import annotations

import time

import torch

from dpr_service.core.batches import Batch
from dpr_service.core.device import Runtime
from dpr_service.core.encoder import BiEncoder
from dpr_service.core.formats import EvalData, TrainData
from dpr_service.core.inference import encode_texts, exact_search
from dpr_service.core.metrics import Conventions, Ranked, exact_scores, score_run, search_run
from dpr_service.core.scoring import batch_log_probs
from dpr_service.core.tokenize import TextTokenizer

from .batches import fixed_batches


def batch_losses(encoder: BiEncoder, batch: Batch, runtime: Runtime, encode_batch_size: int | None = None) -> torch.Tensor:
    """Per-question DPR losses (B,) for one batch: the computation of a training step's forward,
    through :func:`dpr_service.core.scoring.batch_log_probs`, the function ``POST /score`` calls.

    With ``encode_batch_size``, questions and passages are encoded that many rows at a time (the batch's loss is
    unchanged: without gradients the embeddings do not depend on how the rows are grouped), so a
    dev batch as large as a gradient-cached training batch fits in memory.
    """
    log_probs = batch_log_probs(encoder, batch, runtime, encode_batch_size)  # (B, N)
    return -log_probs.gather(1, batch.positive_idx.to(log_probs.device).unsqueeze(1)).squeeze(1)


@torch.no_grad()
def dev_nll(encoder: BiEncoder, tokenizer: TextTokenizer, data: TrainData, runtime: Runtime,
            batch_size: int, hard_negatives: int, encode_batch_size: int | None = None) -> float:
    """Mean per-question loss over the dev examples in batches of ``batch_size`` (the training
    batch: the loss depends on it), in file order, dropout off; encoded ``encode_batch_size`` rows at a time."""
    was_training = encoder.training
    encoder.eval()
    total, count = 0.0, 0
    for batch in fixed_batches(data.examples, data.corpus, tokenizer, batch_size, hard_negatives):
        losses = batch_losses(encoder, batch, runtime, encode_batch_size)
        total += float(losses.sum())
        count += losses.numel()
    encoder.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def retrieval_eval(encoder: BiEncoder, tokenizer: TextTokenizer, data: EvalData, runtime: Runtime,
                   batch_size: int = 128, progress: bool = False,
                   conventions: Conventions = Conventions(), passages: tuple[dict, torch.Tensor] | None = None) -> dict[str, float]:
    """Exact inner-product search over the whole dev corpus, scored as ``dpr eval`` scores an index:
    ``conventions.measures`` (default nDCG@10, MRR@10, Recall@1/5/20/100) and, when the data has
    answers, DPR's top-k answer accuracy. Ranking, the cut at k and ties are
    :mod:`dpr_service.core.metrics`' (trec_eval's rule), so the corpus order changes nothing.

    ``passages`` (id -> row, (N, D) vectors): stored passage vectors to search instead of encoding
    the dev corpus (query-side training: the passage encoder does not change), used when they hold
    every dev passage."""
    qids = list(data.queries)
    if passages is not None and all(p.id in passages[0] for p in data.corpus):
        p_emb = passages[1][torch.tensor([passages[0][p.id] for p in data.corpus])].float().cpu()  # (N, D)
    else:
        p_emb = encode_texts(encoder, tokenizer, data.corpus, "passage", runtime, batch_size, progress)  # (N, D)
    q_emb = encode_texts(encoder, tokenizer, [data.queries[q] for q in qids], "query", runtime, batch_size, progress)
    pids = [p.id for p in data.corpus]
    p_np, q_np = p_emb.numpy(), q_emb.numpy()

    def search(rows: list[int], depth: int) -> list[list[Ranked]]:
        _, top = exact_search(q_emb[rows], p_emb, depth, device=runtime.device)  # (len(rows), depth)
        # scores recomputed per candidate by one function (as dpr eval does): copies of a passage tie exactly
        return [list(zip([pids[j] for j in idx], exact_scores(q_np[r], p_np[idx]).tolist()))
                for r, idx in zip(rows, top.tolist())]

    run = search_run(qids, search, len(pids), conventions, bool(data.answers))
    text = {p.id: p.text for p in data.corpus}
    return score_run(run, data.qrels, data.answers, lambda ids: {i: text[i] for i in ids}, conventions)


def evaluate(encoder: BiEncoder, tokenizer: TextTokenizer, eval_data: EvalData, nll_data: TrainData,
             runtime: Runtime, batch_size: int, eval_batch_size: int, hard_negatives: int,
             progress: bool = False, passages: tuple[dict, torch.Tensor] | None = None) -> dict[str, float]:
    """One evaluation: ``dev_nll`` (:func:`dev_nll` over ``nll_data`` in training-sized batches),
    the retrieval measures of :func:`retrieval_eval` over ``eval_data`` (``ndcg@10``, ``mrr@10``,
    ``recall@{1,5,20,100}``, and ``top{1,5,20,100}_accuracy`` with answers; over ``passages``' stored
    vectors when given) and ``eval_seconds``."""
    t0 = time.perf_counter()
    metrics = {"dev_nll": dev_nll(encoder, tokenizer, nll_data, runtime, batch_size, hard_negatives, eval_batch_size)}
    metrics.update(retrieval_eval(encoder, tokenizer, eval_data, runtime, eval_batch_size, progress, passages=passages))
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics
