"""Retrieval metrics, the TREC/BEIR way (pytrec_eval's definitions), in plain Python.

``run`` maps a query id to its ranked list of passage ids (best first); ``qrels`` maps a query id to
``{passage id: graded relevance}``, where relevance > 0 means relevant. Each metric is averaged over
the queries of ``qrels`` that have at least one relevant passage; a query missing from ``run``
scores 0.

* nDCG@k: gain ``rel`` (linear, as pytrec_eval/BEIR), discount ``1 / log2(rank + 1)``, divided by
  the DCG of the ideal ranking of the judged passages.
* MRR@k: ``1 / rank`` of the first relevant passage within the top k, else 0.
* Recall@k: relevant passages in the top k / all relevant passages of the query.
* Top-k answer accuracy (DPR): the share of questions with a passage containing an answer string
  in the top k; matching is on normalised word sequences, as DPR's ``has_answer``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Mapping, Sequence

DEFAULT_KS = (1, 5, 10, 20, 100)


def _relevant(rel: Mapping[str, int]) -> dict[str, int]:
    return {pid: s for pid, s in rel.items() if s > 0}


def ndcg_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    dcg = sum(rel.get(pid, 0) / math.log2(i + 2) for i, pid in enumerate(ranked[:k]) if rel.get(pid, 0) > 0)
    ideal = sorted((s for s in rel.values() if s > 0), reverse=True)[:k]
    idcg = sum(s / math.log2(i + 2) for i, s in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    for i, pid in enumerate(ranked[:k]):
        if rel.get(pid, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    relevant = _relevant(rel)
    if not relevant:
        return 0.0
    return sum(1 for pid in ranked[:k] if pid in relevant) / len(relevant)


def retrieval_metrics(
    run: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    recall_ks: Sequence[int] = (1, 5, 20, 100),
) -> dict[str, float]:
    """Mean nDCG@10, MRR@10 and Recall@k over the judged queries."""
    judged = [q for q, rel in qrels.items() if _relevant(rel)]
    if not judged:
        raise ValueError("no query has a relevant passage")
    totals = {"ndcg@10": 0.0, "mrr@10": 0.0, **{f"recall@{k}": 0.0 for k in recall_ks}}
    for q in judged:
        ranked, rel = run.get(q, []), qrels[q]
        totals["ndcg@10"] += ndcg_at_k(ranked, rel, 10)
        totals["mrr@10"] += mrr_at_k(ranked, rel, 10)
        for k in recall_ks:
            totals[f"recall@{k}"] += recall_at_k(ranked, rel, k)
    return {name: value / len(judged) for name, value in totals.items()}


# ----------------------------------------------------------------------------- DPR answer accuracy

_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFD", text).lower())


def has_answer(text: str, answers: Sequence[str]) -> bool:
    """True when some answer's word sequence occurs in the passage's word sequence (DPR's rule)."""
    words = _words(text)
    for answer in answers:
        target = _words(answer)
        if not target:
            continue
        n = len(target)
        if any(words[i : i + n] == target for i in range(len(words) - n + 1)):
            return True
    return False


def answer_accuracy(
    run: Mapping[str, Sequence[str]],
    answers: Mapping[str, Sequence[str]],
    passage_text: Mapping[str, str],
    ks: Sequence[int] = (1, 5, 20, 100),
) -> dict[str, float]:
    """DPR's top-k accuracy: the share of questions with an answer-bearing passage in the top k."""
    if not answers:
        raise ValueError("no answers given")
    hits = {k: 0 for k in ks}
    for q, ans in answers.items():
        ranked = run.get(q, [])
        first = next((i for i, pid in enumerate(ranked) if has_answer(passage_text[pid], ans)), None)
        for k in ks:
            hits[k] += first is not None and first < k
    return {f"top{k}_accuracy": hits[k] / len(answers) for k in ks}
