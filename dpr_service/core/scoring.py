"""The DPR loss of question-passage sets as ``POST /score`` returns it, computed as the trainer does.

Usage::

    items = [ScoreItem("who wrote X?", Passage("... wrote X ...", id="p1"), [Passage("...", id="n1")])]
    score_items(loaded, runtime, items, in_batch=True)  # [ItemScore(loss=..., probabilities=[...], rank=1)]
    plan = plan_scores(loaded, items, in_batch=True)     # or in two steps: tokenise (plan.tokens: its cost),
    score_plan(loaded, runtime, plan, encode_batch_size=32)  # then encode 32 texts at a time

The request's items become :class:`~dpr_service.core.formats.TrainExample`\\ s by the readers' rule
(items with the same question share their known positives: :func:`~dpr_service.core.formats.share_known_positives`),
and one :func:`~dpr_service.core.batches.collate` call makes the batch, as the trainer's steps and
its dev loss make theirs. :func:`batch_log_probs` then gives both the candidates' log-probabilities
with the checkpoint's similarity and temperature, so every masking rule (the same passage twice,
a question's other known positives) holds in ``/score`` and in training by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .batches import Batch, collate
from .checkpoint import Loaded
from .device import Runtime
from .encoder import BiEncoder
from .formats import Passage, TrainExample, content_id, share_known_positives
from .loss import candidate_log_probs


@dataclass
class ScoreItem:
    """One question with its positive and negatives, as ``POST /score`` receives it."""
    question: str
    positive: Passage
    negatives: list[Passage]


@dataclass
class ItemScore:
    """The loss of one item: NLL (nats), the softmax probabilities over its candidates, the positive's rank (1 = best)."""
    loss: float  # -log softmax of the positive among the item's candidates
    probabilities: list[float]  # positive first, then the item's negatives in order
    rank: int  # 1 = the positive scores highest among the candidates


def batch_log_probs(encoder: BiEncoder, batch: Batch, runtime: Runtime, encode_batch_size: int | None = None,
                    candidate_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) log-probabilities of each question over its candidates in ``batch``: the forward of a
    training step, with the encoder's similarity and temperature, passages of equal id as one
    (``batch.p_hashes``) and each question's other known positives masked (``batch.candidate_mask()``);
    ``candidate_mask`` (B, N) restricts the candidates further. Dropout is as the caller left the
    encoder. With ``encode_batch_size``, rows are encoded that many at a time (the result is unchanged without
    gradients), so a batch as large as a gradient-cached one fits in memory."""
    batch = batch.to(runtime.device)
    with runtime.autocast():
        q_emb = _encode_rows(encoder.encode_queries, batch.queries, encode_batch_size)  # (B, D)
        p_emb = _encode_rows(encoder.encode_passages, batch.passages, encode_batch_size)  # (N, D)
    mask = batch.candidate_mask()
    if candidate_mask is not None:
        mask &= candidate_mask.to(mask.device)
    cfg = encoder.config
    return candidate_log_probs(q_emb, p_emb, batch.positive_idx, similarity=cfg.similarity, temperature=cfg.temperature,
                               p_ids=batch.p_hashes, candidate_mask=mask)


def _encode_rows(encode, inputs: dict, encode_batch_size: int | None) -> torch.Tensor:
    """``encode`` over the rows of ``inputs``, ``encode_batch_size`` at a time (all at once when None)."""
    n = inputs["input_ids"].shape[0]
    step = encode_batch_size or n
    return torch.cat([encode(**{k: v[i : i + step] for k, v in inputs.items()}) for i in range(0, n, step)])


def score_examples(items: list[ScoreItem]) -> tuple[list[TrainExample], list[list[Passage]]]:
    """The items as training examples and their negatives, ready for :func:`collate`. A passage
    without an id gets the hash of its title and text (so equal texts are one passage)."""
    def with_id(p: Passage) -> Passage:
        return p if p.id else replace(p, id=content_id(p.title, p.text))

    examples, negatives = [], []
    for it in items:
        positive, negs = with_id(it.positive), [with_id(n) for n in it.negatives]
        examples.append(TrainExample(query=it.question, positive=positive, hard_negatives=negs,
                                     known_positive_ids=frozenset([positive.id])))
        negatives.append(negs)
    share_known_positives(examples)
    return examples, negatives


@dataclass
class ScorePlan:
    """A ``/score`` request made into the trainer's batch, tokenised but not encoded yet: what its cost
    is known from before any model runs (``tokens``), so that a server can refuse or queue it first."""
    batch: Batch
    spans: list[tuple[int, int]]  # per item, its columns [start, end): the positive, then its negatives
    own: torch.Tensor | None  # (B, N) each item's own columns, when scored without in-batch negatives
    tokens: int  # tokens the encoder reads: every question and passage, after truncation (attention masks)


def plan_scores(loaded: Loaded, items: list[ScoreItem], in_batch: bool) -> ScorePlan:
    """Tokenise ``items`` into the batch :func:`collate` makes for training (cheap next to encoding)."""
    examples, negatives = score_examples(items)
    batch = collate(examples, negatives, loaded.tokenizer)
    spans = [(start, start + 1 + len(negs)) for start, negs in zip(batch.positive_idx.tolist(), negatives)]
    own = None
    if not in_batch:
        own = torch.zeros(len(items), batch.p_hashes.shape[0], dtype=torch.bool)
        for i, (start, end) in enumerate(spans):
            own[i, start:end] = True
    tokens = int(batch.queries["attention_mask"].sum()) + int(batch.passages["attention_mask"].sum())
    return ScorePlan(batch, spans, own, tokens)


@torch.no_grad()
def score_plan(loaded: Loaded, runtime: Runtime, plan: ScorePlan, encode_batch_size: int | None = 32) -> list[ItemScore]:
    """Encode and score a :func:`plan_scores` batch, ``encode_batch_size`` texts at a time: the
    activations in memory are those of one chunk, not of the request (None: all at once, as a
    training step). The result does not depend on the chunk size (no gradients, dropout off)."""
    loaded.encoder.eval()
    log_probs = batch_log_probs(loaded.encoder, plan.batch, runtime, encode_batch_size, candidate_mask=plan.own).cpu()  # (B, N)
    out = []
    for i, (start, end) in enumerate(plan.spans):
        row = log_probs[i]
        pos = row[start]
        allowed = torch.isfinite(row)
        out.append(ItemScore(loss=float(-pos), probabilities=row[start:end].exp().tolist(),
                             rank=int((row[allowed] > pos).sum()) + 1))
    return out


def score_items(loaded: Loaded, runtime: Runtime, items: list[ScoreItem], in_batch: bool,
                encode_batch_size: int | None = 32) -> list[ItemScore]:
    """Per item: its question against its own positive and negatives, or, with ``in_batch``, against
    every passage of the request, exactly as a training batch of these items. Dropout is off; texts
    are encoded ``encode_batch_size`` at a time (:func:`score_plan`)."""
    return score_plan(loaded, runtime, plan_scores(loaded, items, in_batch), encode_batch_size)
