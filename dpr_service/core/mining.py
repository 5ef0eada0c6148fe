"""Hard-negative selection: which retrieved passages may train a question as negatives.

Shared by ``dpr mine`` (index stage) and the trainer's own mining (``dpr train --negatives bm25|model``
and re-mining rounds), so that both apply the same false-negative rules. Passages a retriever ranks
high for a question but that nobody judged are often unlabelled positives (Qu et al. 2021, RocketQA;
Moreira et al. 2024, NV-Retriever); training against them teaches the wrong thing. A candidate is
skipped when

* it is a known positive of the question (by id);
* its text equals a positive's text (by content: the same passage under another id, FlagEmbedding#688);
* it sits in the first ``skip_top`` ranks (DPR took BM25 ranks after the top ones);
* it scores too close to the positive: above ``positive score - margin`` (absolute, in similarity
  units), or above ``ratio`` of the positive's score (NV-Retriever's "TopK-PercPos", 0.95).

The functions are pure (no model, no index): callers rank candidates however they like.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .formats import Passage

NV_RETRIEVER_RATIO = 0.95  # NV-Retriever's TopK-PercPos: negatives score below 95% of the positive


def content_key(p: Passage) -> str:
    """A passage's text for equality tests: title and text, case-folded, whitespace collapsed."""
    return re.sub(r"\s+", " ", f"{p.title}\n{p.text}").strip().casefold()


def score_ceiling(positive_score: float, margin: float = 0.0, ratio: float | None = None) -> float:
    """The highest score a negative may have, given the positive's score.

    ``margin`` (>= 0, similarity units) gives ``positive - margin``. ``ratio`` in (0, 1] gives
    ``positive - (1 - ratio) * |positive|``: NV-Retriever's ``ratio * positive`` for the positive
    scores of cosine similarity, and still a ceiling below the positive when a dot product is
    negative. With both, the lower ceiling wins.
    """
    ceiling = positive_score - margin
    if ratio is not None:
        ceiling = min(ceiling, positive_score - (1.0 - ratio) * abs(positive_score))
    return ceiling


@dataclass
class MiningStats:
    """Counts of what the rules skipped, summed over the questions mined."""

    questions: int = 0
    skipped: Counter = field(default_factory=Counter)  # positive, copy_of_positive, top_rank, within_margin
    short: int = 0  # questions that got fewer negatives than asked for

    def as_dict(self) -> dict:
        """The counts as a flat dictionary for logs (``skipped_<rule>`` per rule)."""
        return {"questions": self.questions, "short_of_negatives": self.short,
                **{f"skipped_{k}": v for k, v in sorted(self.skipped.items())}}


def select_negatives(
    candidates: Iterable[tuple[Passage, float]],
    positives: Sequence[Passage],
    k: int,
    positive_score: float | None = None,
    skip_top: int = 0,
    margin: float = 0.0,
    ratio: float | None = None,
    stats: MiningStats | None = None,
) -> list[Passage]:
    """Up to ``k`` negatives from ``candidates`` (passage, score), best first, by the rules above.

    ``positives`` are all the question's known positives (their ids and texts are excluded).
    ``positive_score`` enables the margin rules (leave it None for BM25, whose scores are not
    comparable with a positive's). ``stats``, when given, is updated in place.
    Raises ValueError for k < 1, skip_top < 0, margin < 0 or ratio outside (0, 1].
    """
    if k < 1 or skip_top < 0 or margin < 0:
        raise ValueError(f"need k >= 1, skip_top >= 0 and margin >= 0, got {k}, {skip_top} and {margin}")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    ids = {p.id for p in positives}
    texts = {content_key(p) for p in positives}
    ceiling = None if positive_score is None else score_ceiling(positive_score, margin, ratio)
    stats = stats if stats is not None else MiningStats()
    chosen: list[Passage] = []
    for rank, (p, score) in enumerate(candidates):
        if p.id in ids:
            stats.skipped["positive"] += 1
        elif content_key(p) in texts:
            stats.skipped["copy_of_positive"] += 1
        elif rank < skip_top:
            stats.skipped["top_rank"] += 1
        elif ceiling is not None and score > ceiling:
            stats.skipped["within_margin"] += 1
        else:
            chosen.append(p)
            if len(chosen) == k:
                break
    stats.questions += 1
    stats.short += len(chosen) < k
    return chosen
