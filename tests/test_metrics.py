"""Retrieval metrics against hand-computed cases."""

import math

import pytest

from dpr_service.core.metrics import answer_accuracy, has_answer, mrr_at_k, ndcg_at_k, recall_at_k, retrieval_metrics


def test_ndcg_by_hand():
    # relevant: a (2), c (1); ranking b, a, c
    rel = {"a": 2, "c": 1, "x": 0}
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(["b", "a", "c"], rel, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["b", "a", "c"], rel, 1) == 0.0
    assert ndcg_at_k(["a", "c"], rel, 10) == pytest.approx(1.0)


def test_mrr_and_recall_by_hand():
    rel = {"a": 1, "c": 1, "d": 1}
    ranked = ["b", "a", "e", "c"]
    assert mrr_at_k(ranked, rel, 10) == pytest.approx(0.5)
    assert mrr_at_k(ranked, rel, 1) == 0.0
    assert recall_at_k(ranked, rel, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, rel, 4) == pytest.approx(2 / 3)


def test_means_over_judged_queries_and_missing_runs_score_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}  # q3 has no relevant passage: not counted
    run = {"q1": ["a", "b"]}  # q2 missing from the run
    m = retrieval_metrics(run, qrels)
    assert m["mrr@10"] == pytest.approx(0.5)
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["ndcg@10"] == pytest.approx(0.5)


def test_has_answer_matches_whole_words_normalised():
    assert has_answer("The Eiffel Tower is in Paris.", ["paris"])
    assert has_answer("built by Gustave Eiffel", ["Gustave  Eiffel"])
    assert not has_answer("Parisian cafes", ["Paris"])
    # accents are decomposed (NFD) and the combining marks are not word characters
    assert has_answer("Café de Flore", ["cafe"])
    assert has_answer("Cafe de Flore", ["café"])


def test_answer_accuracy_by_hand():
    text = {"p1": "nothing here", "p2": "the answer is 42", "p3": "also 42"}
    run = {"q1": ["p1", "p2"], "q2": ["p3"], "q3": ["p1"]}
    answers = {"q1": ["42"], "q2": ["42"], "q3": ["42"]}
    acc = answer_accuracy(run, answers, text, ks=(1, 2))
    assert acc == {"top1_accuracy": pytest.approx(1 / 3), "top2_accuracy": pytest.approx(2 / 3)}
