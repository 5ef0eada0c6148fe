"""Hybrid retrieval: fusing a dense ranking with a BM25 ranking of the same passages.

Dense and sparse retrieval fail on different questions (exact terms, rare names and numbers favour
BM25; paraphrases favour the dense model), so a fused ranking often beats both. Two fusions, as
Pyserini documents them:

* **Reciprocal rank fusion** (Cormack, Clarke and Buettcher, SIGIR 2009):
  ``score(p) = sum over rankings of 1 / (k + rank(p))``, rank from 1, ``k = 60``. Needs no tuning and
  ignores score scales.
* **Convex combination** of normalised scores: ``score(p) = alpha * dense'(p) + (1 - alpha) * bm25'(p)``
  where each ranking's scores are min-max normalised to [0, 1] per question over its own top
  ``depth`` (a passage missing from one ranking gets 0 there). ``alpha = 1`` is dense alone, ``0``
  BM25 alone; :func:`tune_alpha` picks it on dev questions.

Rankings are lists of ``(passage id, score)``, best first. Results are sorted by fused score, ties
by passage id descending (trec_eval's rule, :func:`dpr_service.core.metrics.trec_order`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from .metrics import Ranked, trec_order

RRF_K = 60
MODES = ("dense", "bm25", "hybrid")
FUSIONS = ("rrf", "convex")


def rrf(rankings: Sequence[Sequence[Ranked]], k: int = RRF_K, top_k: int | None = None) -> list[Ranked]:
    """Reciprocal rank fusion of any number of rankings: [(id, fused score)], best first."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, (pid, _) in enumerate(ranking, start=1):
            fused[pid] = fused.get(pid, 0.0) + 1.0 / (k + rank)
    return trec_order(fused.items(), tolerance=0.0)[:top_k]


def min_max(ranking: Sequence[Ranked]) -> dict[str, float]:
    """Scores scaled to [0, 1] by the ranking's own minimum and maximum (all 1.0 when they are equal)."""
    if not ranking:
        return {}
    scores = [s for _, s in ranking]
    low, high = min(scores), max(scores)
    if high == low:
        return {pid: 1.0 for pid, _ in ranking}
    return {pid: (s - low) / (high - low) for pid, s in ranking}


def convex(dense: Sequence[Ranked], bm25: Sequence[Ranked], alpha: float, top_k: int | None = None) -> list[Ranked]:
    """``alpha * dense' + (1 - alpha) * bm25'`` over min-max normalised scores: [(id, score)], best first.
    Raises ValueError for alpha outside [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    d, b = min_max(dense), min_max(bm25)
    fused = {pid: alpha * d.get(pid, 0.0) + (1.0 - alpha) * b.get(pid, 0.0) for pid in d.keys() | b.keys()}
    return trec_order(fused.items(), tolerance=0.0)[:top_k]


def fuse(dense: Sequence[Ranked], bm25: Sequence[Ranked], fusion: str = "rrf", alpha: float | None = None,
         top_k: int | None = None) -> list[Ranked]:
    """One question's hybrid ranking: RRF (``fusion="rrf"``) or the convex combination with ``alpha``."""
    if fusion == "rrf":
        return rrf([dense, bm25], top_k=top_k)
    if fusion == "convex":
        if alpha is None:
            raise ValueError("the convex fusion needs alpha")
        return convex(dense, bm25, alpha, top_k)
    raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")


def tune_alpha(dense: Mapping[str, Sequence[Ranked]], bm25: Mapping[str, Sequence[Ranked]],
               score: Callable[[dict[str, dict[str, float]]], float],
               grid: Sequence[float] = tuple(i / 20 for i in range(21))) -> tuple[float, dict[float, float]]:
    """The alpha of ``grid`` whose convex fusion of the per-question rankings scores best by ``score``
    (a run -> metric function, e.g. nDCG@10 on dev qrels); ties go to the larger alpha (more dense).
    Returns (alpha, {alpha: metric})."""
    results = {}
    for alpha in grid:
        run = {q: dict(convex(dense[q], bm25.get(q, []), alpha)) for q in dense}
        results[alpha] = score(run)
    best = max(results, key=lambda a: (results[a], a))
    return best, results
