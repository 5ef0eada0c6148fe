"""Retrieval metrics and the ranking rule, the TREC way: one place for ``dpr eval``, ``dpr bm25`` and
the trainer's evaluation, so that they agree on every input.

Usage::

    run = {"q1": {"d3": 12.5, "d7": 12.5, "d1": 9.0}}     # query id -> {passage id: score}
    qrels = {"q1": {"d7": 2, "d1": 1, "d9": 1}}           # query id -> {passage id: graded relevance}
    retrieval_metrics(run, qrels)                          # {"ndcg@10": ..., "mrr@10": ..., "recall@1": ...}

**Ranking** (:func:`trec_order`): by score, highest first; equal scores by passage id, *descending*
(code-point order), as trec_eval sorts a run (and so pytrec_eval and BEIR, which call it). Scores
within ``tie_tolerance`` (1e-5 relative, :func:`tie_groups`) count as equal, so that copies of a
passage tie although float32 arithmetic gives them scores a few bits apart; 0 is trec_eval's exact
rule. The order of the corpus file therefore never changes a metric. A search must also cut at k
by this rule (:func:`top_k`): a tie that straddles rank k is settled by id, not by row order.

**Measures** (pytrec_eval's definitions; ``relevance_level`` L, default 1):

* ``ndcg@k``: gain = the judged grade (linear, as trec_eval's ``ndcg_cut``, not ``2^rel - 1``),
  discount ``1 / log2(rank + 1)``, divided by the DCG of the ideal ranking of *all* judged passages
  (also those absent from the corpus). Grades <= 0 give no gain; L does not apply (as trec_eval).
* ``mrr@k``: ``1 / rank`` of the first passage with grade >= L within the top k, else 0
  (trec_eval's ``recip_rank`` of the run cut at k; BEIR's ``MRR@k``).
* ``recall@k``: passages with grade >= L in the top k / all judged passages with grade >= L.
* ``p@k``: passages with grade >= L in the top k / k (trec_eval's ``P.k``: a short run is not padded).
* ``map@k``: the sum of precision at the ranks (<= k) of the passages with grade >= L, divided by all
  judged passages with grade >= L (trec_eval's ``map_cut.k``).

**Which queries are averaged** (``judged_queries``): ``"relevant"`` (default) averages over the
queries of qrels that have at least one passage with grade >= L (a query that nothing answers
measures nothing); ``"all"`` averages over every query of qrels, those without such a passage
scoring 0: BEIR's figures (pytrec_eval scores them 0 and BEIR averages over every query it
retrieved for). Queries that are not in qrels are ignored; a judged query missing from the run
scores 0 (trec_eval's ``-c``).

**Identical ids** (``ignore_identical_ids``): BEIR drops a retrieved passage whose id equals the
query id before scoring (its default; it matters for ArguAna, Quora and CQADupStack, where queries
are also corpus documents). Off by default here.

**Top-k answer accuracy** (DPR): the share of questions with a passage that contains an answer in
the top k, matched as DPR's ``has_answer`` (:func:`has_answer`).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

Ranked = tuple[str, float]  # (passage id, score): one entry of a ranking; a search result with its row and text is core.search.Hit

DEFAULT_MEASURES = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@20", "recall@100")
BEIR_KS = (1, 3, 5, 10, 100, 1000)  # BEIR's EvaluateRetrieval default k values
BEIR_MEASURES = tuple(f"{m}@{k}" for m in ("ndcg", "map", "recall", "p") for k in BEIR_KS)
JUDGED_QUERIES = ("relevant", "all")
ACCURACY_KS = (1, 5, 20, 100)  # DPR's top-k answer accuracy columns
DEFAULT_TIE_TOLERANCE = 1e-5  # relative; see tie_groups


# ----------------------------------------------------------------------------- ranking


def tie_groups(hits: Iterable[Ranked], tolerance: float = DEFAULT_TIE_TOLERANCE) -> list[list[Ranked]]:
    """``hits`` in groups of tied scores, best group first, each group ordered by passage id,
    descending (trec_eval's rule for equal scores).

    Walking down the scores, a hit joins the current group while its score is at least the group's
    top score ``t`` minus ``tolerance * max(1, |t|)``. With ``tolerance`` 0 only equal scores tie,
    as in trec_eval. The default (1e-5) also ties copies of a passage: float32 encoders give
    identical inputs embeddings that differ in the last bits by batch row, and BLAS rounds by
    position, so their scores differ by about 1e-7 relative. Groups depend only on the set of
    (id, score) pairs, never on their order."""
    groups: list[list[Ranked]] = []
    top = 0.0
    for hit in sorted(hits, key=lambda h: (h[1], h[0]), reverse=True):
        if not groups or hit[1] < top - tolerance * max(1.0, abs(top)):
            groups.append([])
            top = hit[1]
        groups[-1].append(hit)
    return [sorted(g, key=lambda h: h[0], reverse=True) for g in groups]


def trec_order(hits: Iterable[Ranked], tolerance: float = DEFAULT_TIE_TOLERANCE) -> list[Ranked]:
    """``hits`` ranked: score descending, tied scores (:func:`tie_groups`) by passage id descending."""
    return [h for group in tie_groups(hits, tolerance) for h in group]


def top_k(search: Callable[[list[int], int], list[list[Ranked]]], n_queries: int, k: int, n_passages: int,
          tolerance: float = DEFAULT_TIE_TOLERANCE) -> list[list[Ranked]]:
    """The top ``k`` hits of each of ``n_queries`` queries under :func:`trec_order`, whatever the row
    order of the ``n_passages`` searched.

    ``search(rows, depth)`` returns, for the queries ``rows``, up to ``depth`` hits each (any order,
    best scores included). A query is searched again, deeper (twice as deep each time, at most
    ``n_passages``), while the last hit returned ties with the hit at rank k: the tie may go on past
    what was returned, and which of the tied passages make the cut is decided by id. A search that
    returns fewer than ``depth`` hits (BM25 leaves out passages scoring 0) has returned them all.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out: list[list[Ranked]] = [[] for _ in range(n_queries)]
    rows, depth = list(range(n_queries)), min(k + 1, n_passages)  # one more than k shows a tie across the cut
    while rows:
        again = []
        for row, hits in zip(rows, search(rows, depth)):
            groups = tie_groups(hits, tolerance)
            ranked = [h for g in groups for h in g]
            if len(ranked) > k and len(ranked) >= depth and depth < n_passages and _tied_with_last(groups, k):
                again.append(row)
            else:
                out[row] = ranked[:k]
        rows, depth = again, min(2 * depth, n_passages)
    return out


def _tied_with_last(groups: list[list[Ranked]], k: int) -> bool:
    """Whether the group holding rank k is the last group (a passage not yet returned could join it)."""
    seen = 0
    for i, group in enumerate(groups):
        seen += len(group)
        if seen >= k:
            return i == len(groups) - 1
    return False


def exact_scores(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Inner products of one query (D,) with passages (M, D) as float64 (M,), each row reduced by the
    same code: equal passage vectors get bit-identical scores wherever they sit. (BLAS, and so
    FAISS's flat search for 20 queries or more, can round equal vectors differently by position;
    a tie between copies of a passage would then be settled by row order.)"""
    return (np.asarray(p, dtype=np.float64) * np.asarray(q, dtype=np.float64)[None, :]).sum(axis=1)


# ----------------------------------------------------------------------------- per-query measures


def ndcg_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int) -> float:
    """nDCG@k of one ranked list of ids (already in final order) against graded judgements."""
    dcg = sum(rel.get(pid, 0) / math.log2(i + 2) for i, pid in enumerate(ranked[:k]) if rel.get(pid, 0) > 0)
    ideal = sorted((s for s in rel.values() if s > 0), reverse=True)[:k]
    idcg = sum(s / math.log2(i + 2) for i, s in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int, level: int = 1) -> float:
    """Reciprocal rank of the first passage with grade >= ``level`` within the top k, else 0 (trec_eval's recip_rank on the run cut at k)."""
    for i, pid in enumerate(ranked[:k]):
        if rel.get(pid, 0) >= level:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int, level: int = 1) -> float:
    """Passages with grade >= ``level`` in the top k over all judged ones with grade >= ``level`` (0 when there are none)."""
    relevant = sum(1 for s in rel.values() if s >= level)
    return sum(1 for pid in ranked[:k] if rel.get(pid, 0) >= level) / relevant if relevant else 0.0


def precision_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int, level: int = 1) -> float:
    """Passages with grade >= ``level`` in the top k, divided by k (trec_eval's P.k: a short run is not padded)."""
    return sum(1 for pid in ranked[:k] if rel.get(pid, 0) >= level) / k


def ap_at_k(ranked: Sequence[str], rel: Mapping[str, int], k: int, level: int = 1) -> float:
    """Average precision cut at k (trec_eval's map_cut.k): precision at each relevant rank <= k, over all relevant judged passages."""
    relevant = sum(1 for s in rel.values() if s >= level)
    found, total = 0, 0.0
    for i, pid in enumerate(ranked[:k]):
        if rel.get(pid, 0) >= level:
            found += 1
            total += found / (i + 1)
    return total / relevant if relevant else 0.0


_MEASURES = {"ndcg": ndcg_at_k, "mrr": mrr_at_k, "recall": recall_at_k, "p": precision_at_k, "map": ap_at_k}


def parse_measures(text: str) -> tuple[str, ...]:
    """``"beir"``, ``"default"`` or a comma-separated list such as ``"ndcg@10,map@100,p@5"``
    (measures: ndcg, mrr, recall, p, map; k >= 1). Raises ValueError naming the bad entry."""
    text = text.strip().lower()
    if text in ("default", ""):
        return DEFAULT_MEASURES
    if text == "beir":
        return BEIR_MEASURES
    out = []
    for name in (t.strip() for t in text.split(",")):
        measure, _, k = name.partition("@")
        if measure not in _MEASURES or not k.isdigit() or int(k) < 1:
            raise ValueError(f"unknown measure {name!r}: use name@k with name one of {', '.join(_MEASURES)} "
                             f"(e.g. ndcg@10), or 'beir' or 'default'")
        out.append(f"{measure}@{int(k)}")
    return tuple(dict.fromkeys(out))


# ----------------------------------------------------------------------------- the evaluation


@dataclass(frozen=True)
class Conventions:
    """The choices on which published figures differ; the defaults are ``dpr eval``'s and the
    trainer's. BEIR's figures: ``Conventions(BEIR_MEASURES, judged_queries="all", ignore_identical_ids=True)``
    with a run of depth 1000."""

    measures: tuple[str, ...] = DEFAULT_MEASURES
    relevance_level: int = 1  # binary measures count grades >= this (trec_eval -l; TREC DL passage uses 2)
    judged_queries: str = "relevant"  # or "all" (see the module docstring)
    ignore_identical_ids: bool = False
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE  # 0: only equal scores tie (trec_eval on the scores given)

    def __post_init__(self):
        if not 0 <= self.tie_tolerance < 1:
            raise ValueError(f"tie_tolerance must be in [0, 1), got {self.tie_tolerance}")
        if self.judged_queries not in JUDGED_QUERIES:
            raise ValueError(f"judged_queries must be one of {JUDGED_QUERIES}, got {self.judged_queries!r}")
        if self.relevance_level < 1:
            raise ValueError(f"relevance_level must be >= 1, got {self.relevance_level}")
        parse_measures(",".join(self.measures))

    @property
    def depth(self) -> int:
        """How many hits per query the measures read (the largest k)."""
        return max(int(m.partition("@")[2]) for m in self.measures)


def ranked_ids(run: Mapping[str, Mapping[str, float]], conventions: Conventions = Conventions()) -> dict[str, list[str]]:
    """Each query's passage ids in :func:`trec_order`, less its own id under ``ignore_identical_ids``."""
    drop = conventions.ignore_identical_ids
    tol = conventions.tie_tolerance
    return {q: [pid for pid, _ in trec_order(scores.items(), tol) if not (drop and pid == q)] for q, scores in run.items()}


def retrieval_metrics(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
                      conventions: Conventions = Conventions()) -> dict[str, float]:
    """Mean of each measure of ``conventions.measures`` over the judged queries.

    ``run``: query id -> {passage id: score} (as pytrec_eval and BEIR take it; ranked here by
    :func:`trec_order`). ``qrels``: query id -> {passage id: graded relevance}. Raises ValueError
    when no query is left to average over."""
    level = conventions.relevance_level
    if conventions.judged_queries == "all":
        judged = list(qrels)
    else:
        judged = [q for q, rel in qrels.items() if any(s >= level for s in rel.values())]
    if not judged:
        raise ValueError(f"no query has a passage judged relevant (grade >= {level})")
    ranked = ranked_ids({q: run[q] for q in judged if q in run}, conventions)
    out = {}
    for name in conventions.measures:
        measure, _, k = name.partition("@")
        fn, k = _MEASURES[measure], int(k)
        args = () if measure == "ndcg" else (level,)
        out[name] = sum(fn(ranked.get(q, []), qrels[q], k, *args) for q in judged) / len(judged)
    return out


# ----------------------------------------------------------------------------- DPR answer accuracy


def dpr_tokens(text: str) -> list[str]:
    """DPR's ``SimpleTokenizer`` (from DrQA) after its ``_normalize``, lowercased as ``words(uncased=True)``:
    the text in Unicode NFD; a token is a run of letters, digits and combining marks (categories L*,
    N*, M*) or any other single character that is neither a separator (Z*) nor a control/format
    character (C*). So "3.5" is ["3", ".", "5"], "C++" is ["c", "+", "+"], and "Pelé" keeps its
    accent as a combining mark inside the token ("pele\\u0301" is not "pele")."""
    tokens, word = [], []
    for ch in unicodedata.normalize("NFD", text):
        cat = unicodedata.category(ch)[0]
        if cat in "LNM":
            word.append(ch)
            continue
        if word:
            tokens.append("".join(word).lower())
            word = []
        if cat not in "ZC":
            tokens.append(ch.lower())
    if word:
        tokens.append("".join(word).lower())
    return tokens


def has_answer(text: str, answers: Sequence[str]) -> bool:
    """True when some answer's token sequence (:func:`dpr_tokens`) occurs in the passage text's, as
    DPR's ``has_answer(match_type="string")``. An answer without any token is skipped (DPR counts it
    as found in every passage)."""
    words = dpr_tokens(text)
    for answer in answers:
        target = dpr_tokens(answer)
        n = len(target)
        if n and any(words[i : i + n] == target for i in range(len(words) - n + 1)):
            return True
    return False


def answer_accuracy(run: Mapping[str, Mapping[str, float]], answers: Mapping[str, Sequence[str]],
                    passage_text: Mapping[str, str], ks: Sequence[int] = ACCURACY_KS,
                    conventions: Conventions = Conventions()) -> dict[str, float]:
    """DPR's top-k accuracy: the share of the questions of ``answers`` with a passage whose text
    (not title, as DPR) contains an answer among their top k hits of ``run`` (ranked by
    :func:`trec_order`). ``passage_text`` maps every id of the run to its text."""
    if not answers:
        raise ValueError("no answers given")
    ranked = ranked_ids({q: run.get(q, {}) for q in answers}, conventions)
    hits = {k: 0 for k in ks}
    for q, ans in answers.items():
        first = next((i for i, pid in enumerate(ranked[q]) if has_answer(passage_text[pid], ans)), None)
        for k in ks:
            hits[k] += first is not None and first < k
    return {f"top{k}_accuracy": hits[k] / len(answers) for k in ks}


# ----------------------------------------------------------------------------- both at once


def run_depth(conventions: Conventions, with_answers: bool) -> int:
    """Hits to retrieve per query for :func:`score_run`: the largest k of the measures, and at least
    the largest answer-accuracy k when questions have answers."""
    return max(conventions.depth, max(ACCURACY_KS) if with_answers else 1)


def search_run(qids: Sequence[str], search: Callable[[list[int], int], list[list[Ranked]]], n_passages: int,
               conventions: Conventions = Conventions(), with_answers: bool = False) -> dict[str, dict[str, float]]:
    """The run to score: query id -> {passage id: score} of each query's top :func:`run_depth`
    hits under :func:`top_k` (``search`` as there; row i of it is ``qids[i]``)."""
    hits = top_k(search, len(qids), run_depth(conventions, with_answers), n_passages, conventions.tie_tolerance)
    return {q: dict(h) for q, h in zip(qids, hits)}


def score_run(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]] | None,
              answers: Mapping[str, Sequence[str]] | None, texts_of: Callable[[list[str]], Mapping[str, str]],
              conventions: Conventions = Conventions()) -> dict[str, float]:
    """What ``dpr eval``, ``dpr bm25`` and the trainer report for a run (query id -> {passage id:
    score}): the measures of ``conventions`` when there are qrels, and ``top{k}_accuracy`` for k in
    :data:`ACCURACY_KS` when questions have answers. ``texts_of(ids)`` gives the texts of the
    retrieved passages (read only for answer matching)."""
    metrics: dict[str, float] = {}
    if qrels:
        metrics.update(retrieval_metrics(run, qrels, conventions))
    if answers:
        ids = sorted({pid for hits in run.values() for pid in hits})
        metrics.update(answer_accuracy(run, answers, texts_of(ids), ACCURACY_KS, conventions))
    return metrics
