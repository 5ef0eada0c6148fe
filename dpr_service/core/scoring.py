"""The DPR loss for question-passage sets, as ``POST /score`` returns it. Calls the trainer's loss
function (:func:`dpr_service.core.loss.candidate_log_probs`) with the checkpoint's own settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import Loaded
from .device import Runtime
from .formats import Passage, content_id
from .inference import encode_texts
from .loss import candidate_log_probs


@dataclass
class ScoreItem:
    question: str
    positive: Passage
    negatives: list[Passage]


@dataclass
class ItemScore:
    loss: float  # -log softmax of the positive among the item's candidates
    probabilities: list[float]  # positive first, then the item's negatives in order
    rank: int  # 1 = the positive scores highest among the candidates


@torch.no_grad()
def score_items(loaded: Loaded, runtime: Runtime, items: list[ScoreItem], in_batch: bool) -> list[ItemScore]:
    """Per item: each question against its own positive and negatives, or, with ``in_batch``,
    against every passage of the request exactly as a training batch (duplicates masked by id)."""
    passages: list[Passage] = []
    positive_idx, spans = [], []
    for item in items:
        positive_idx.append(len(passages))
        passages.append(item.positive)
        passages.extend(item.negatives)
        spans.append((positive_idx[-1], len(passages)))
    ids: dict[str, int] = {}
    keys = [p.id or content_id(p.title, p.text) for p in passages]
    p_ids = torch.tensor([ids.setdefault(k, len(ids)) for k in keys])
    mask = None
    if not in_batch:
        mask = torch.zeros(len(items), len(passages), dtype=torch.bool)
        for i, (start, end) in enumerate(spans):
            mask[i, start:end] = True
    q_emb = encode_texts(loaded.encoder, loaded.tokenizer, [it.question for it in items], "query", runtime)
    p_emb = encode_texts(loaded.encoder, loaded.tokenizer, passages, "passage", runtime)
    log_probs = candidate_log_probs(
        q_emb, p_emb, torch.tensor(positive_idx), similarity=loaded.config.similarity,
        temperature=loaded.config.temperature, p_ids=p_ids, candidate_mask=mask,
    )  # (B, N)
    out = []
    for i, (start, end) in enumerate(spans):
        row = log_probs[i]
        pos = row[start]
        own = row[start:end].exp().tolist()
        allowed = torch.isfinite(row)
        out.append(ItemScore(loss=float(-pos), probabilities=own, rank=int((row[allowed] > pos).sum()) + 1))
    return out
