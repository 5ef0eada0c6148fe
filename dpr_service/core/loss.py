"""The DPR in-batch negative log-likelihood, as a pure function of embeddings.

The trainer's step, the trainer's dev evaluation and the server's ``POST /score`` all call
:func:`in_batch_nll` (or :func:`candidate_log_probs`, its first half); nothing else computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scores(q_emb: torch.Tensor, p_emb: torch.Tensor, similarity: str = "dot", temperature: float = 1.0) -> torch.Tensor:
    """Similarity of every question with every passage, in float32.

    Args:
        q_emb: (B, D) question embeddings.
        p_emb: (N, D) passage embeddings.
        similarity: ``"dot"`` for the inner product (DPR), ``"cosine"`` to L2-normalise both first.
        temperature: the scores are divided by it.

    Returns:
        scores: (B, N), ``scores[i, j] = s(q_i, p_j) / temperature``.
    """
    if similarity not in ("dot", "cosine"):
        raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
    with torch.autocast(q_emb.device.type, enabled=False):  # float32 even inside an autocast region
        q_emb, p_emb = q_emb.float(), p_emb.float()
        if similarity == "cosine":
            q_emb, p_emb = F.normalize(q_emb, dim=-1), F.normalize(p_emb, dim=-1)
        return q_emb @ p_emb.T / temperature


def candidate_log_probs(
    q_emb: torch.Tensor,
    p_emb: torch.Tensor,
    positive_idx: torch.Tensor,
    *,
    similarity: str = "dot",
    temperature: float = 1.0,
    p_ids: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-softmax of each question's scores over its candidates; masked candidates get -inf.

    Arguments as for :func:`in_batch_nll`. Returns (B, N) log-probabilities; row ``i`` sums
    (in probability) to one over the candidates question ``i`` is allowed to see.
    """
    logits = scores(q_emb, p_emb, similarity, temperature)  # (B, N)
    b, n = logits.shape
    if positive_idx.shape != (b,):
        raise ValueError(f"positive_idx must have shape ({b},), got {tuple(positive_idx.shape)}")
    positive_idx = positive_idx.to(logits.device)
    rows = torch.arange(b, device=logits.device)
    keep = torch.ones(b, n, dtype=torch.bool, device=logits.device)
    if candidate_mask is not None:
        if candidate_mask.shape != (b, n):
            raise ValueError(f"candidate_mask must have shape ({b}, {n}), got {tuple(candidate_mask.shape)}")
        keep &= candidate_mask.to(device=logits.device, dtype=torch.bool)
    if p_ids is not None:
        if p_ids.shape != (n,):
            raise ValueError(f"p_ids must have shape ({n},), got {tuple(p_ids.shape)}")
        p_ids = p_ids.to(logits.device)
        same_as_positive = p_ids.unsqueeze(0) == p_ids[positive_idx].unsqueeze(1)  # (B, N)
        keep &= ~same_as_positive
    keep[rows, positive_idx] = True  # a question always sees its own positive
    logits = logits.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def in_batch_nll(
    q_emb: torch.Tensor,
    p_emb: torch.Tensor,
    positive_idx: torch.Tensor,
    *,
    similarity: str = "dot",
    temperature: float = 1.0,
    p_ids: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""DPR's in-batch negative log-likelihood (Karpukhin et al., 2020, "Dense Passage Retrieval
    for Open-Domain Question Answering", EMNLP, section 3.2, eq. 2).

    A batch holds B questions and N passages: typically each question's positive and its H hard
    negatives, so ``N = B * (1 + H)``, and every passage is a candidate for every question (the
    "in-batch negatives" trick: the other questions' positives and hard negatives are negatives).
    With :math:`s(q, p) = \mathrm{sim}(q, p) / \tau` and :math:`C_i` the candidates of question i,

    .. math::

        L = \frac{1}{B} \sum_i -\log \frac{e^{s(q_i, p_{pos(i)})}}{\sum_{j \in C_i} e^{s(q_i, p_j)}}

    which is ``cross_entropy(scores, positive_idx)`` over the allowed candidates. Candidates are
    removed (their score set to -inf) in two ways:

    * ``p_ids``: a candidate carrying the same passage id as question i's own positive is the
      same passage seen twice in the batch, a false negative, and is masked (the positive itself
      stays). The trainer passes ids so that duplicates cost no data.
    * ``candidate_mask``: any other per-question restriction, e.g. a question's other known
      positives, or, for ``POST /score`` without in-batch negatives, each question seeing only its
      own item's passages.

    Args:
        q_emb: (B, D) question embeddings, any float dtype (computed in float32).
        p_emb: (N, D) passage embeddings.
        positive_idx: (B,) int64, the column of each question's positive in ``p_emb``.
        similarity: ``"dot"`` (DPR) or ``"cosine"``.
        temperature: scores are divided by it (1.0 for DPR's dot product).
        p_ids: optional (N,) int64 passage ids; equal ids mean the same passage.
        candidate_mask: optional (B, N) bool, True where passage j is a candidate for question i.
        reduction: ``"mean"`` for a scalar, ``"none"`` for the (B,) per-question losses.

    Returns:
        The loss: a scalar, or (B,) with ``reduction="none"``. Differentiable in both embeddings.

    Relations: with ``similarity="cosine"`` and ``temperature=0.05`` and one positive per question,
    it is sentence-transformers' ``MultipleNegativesRankingLoss`` (scale 20); GradCache and
    Tevatron compute the same cross-entropy.
    """
    log_probs = candidate_log_probs(
        q_emb,
        p_emb,
        positive_idx,
        similarity=similarity,
        temperature=temperature,
        p_ids=p_ids,
        candidate_mask=candidate_mask,
    )
    per_question = -log_probs.gather(1, positive_idx.to(log_probs.device).unsqueeze(1)).squeeze(1)  # (B,)
    if reduction == "mean":
        return per_question.mean()
    if reduction == "none":
        return per_question
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
