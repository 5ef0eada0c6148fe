"""Retrieval metrics: hand-computed cases, pytrec_eval (trec_eval) as the oracle on random runs
with ties and odd judgements, the ranking rule, and DPR's answer matching."""

import math
import random

import numpy as np
import pytest

from dpr_service.core.metrics import (
    BEIR_MEASURES, Conventions, answer_accuracy, dpr_tokens, exact_scores, has_answer, mrr_at_k, ndcg_at_k,
    parse_measures, recall_at_k, retrieval_metrics, top_k, trec_order,
)


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
    run = {"q1": {"a": 2.0, "b": 1.0}}  # q2 missing from the run
    m = retrieval_metrics(run, qrels)
    assert m["mrr@10"] == pytest.approx(0.5)
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["ndcg@10"] == pytest.approx(0.5)
    every = retrieval_metrics(run, qrels, Conventions(judged_queries="all"))  # BEIR: q3 counts, as 0
    assert every["ndcg@10"] == pytest.approx(1 / 3)


def test_ties_go_by_id_descending_whatever_the_order_given():
    """The issue's case: two identical passages, one relevant. trec_eval ranks the tie by id,
    descending, so 'b' comes first and nDCG@10 is 1/log2(3) = 0.631 in either order."""
    qrels = {"q": {"a": 1}}
    for run in ({"q": {"a": 0.5, "b": 0.5}}, {"q": {"b": 0.5, "a": 0.5}}):
        assert retrieval_metrics(run, qrels)["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert trec_order([("d9", 1.0), ("d10", 1.0), ("x", 2.0)]) == [("x", 2.0), ("d9", 1.0), ("d10", 1.0)]


def test_ignore_identical_ids_drops_the_query_itself():
    qrels = {"q1": {"d1": 1}}
    run = {"q1": {"q1": 9.0, "d1": 1.0}}
    assert retrieval_metrics(run, qrels)["mrr@10"] == pytest.approx(0.5)
    assert retrieval_metrics(run, qrels, Conventions(ignore_identical_ids=True))["mrr@10"] == pytest.approx(1.0)


def test_parse_measures():
    assert parse_measures("beir") == BEIR_MEASURES
    assert parse_measures("NDCG@10, map@100,p@5") == ("ndcg@10", "map@100", "p@5")
    for bad in ("ndcg", "ndcg@0", "bpref@10", "ndcg@x"):
        with pytest.raises(ValueError, match="unknown measure"):
            parse_measures(bad)
    assert Conventions(parse_measures("recall@7,ndcg@3")).depth == 7


# ----------------------------------------------------------------------------- pytrec_eval as the oracle


def _random_case(rng: random.Random, n_queries: int = 40):
    """Judgements with grades -1..3, queries without a relevant passage, judged ids that no run
    contains (absent from the corpus), queries missing from the run, and scores on a coarse grid
    (many ties) with ids whose string order differs from their number order."""
    corpus = [f"d{i}" for i in range(60)]
    qrels, run = {}, {}
    for qi in range(n_queries):
        q = f"q{qi}"
        judged = rng.sample(corpus, rng.randint(1, 8)) + [f"gone{qi}-{j}" for j in range(rng.randint(0, 2))]
        qrels[q] = {pid: rng.choice([-1, 0, 0, 1, 1, 2, 3]) for pid in judged}
        if qi % 7 == 3:
            qrels[q] = {pid: 0 for pid in judged}  # nothing relevant
        if qi % 11 == 5:
            continue  # judged but never retrieved
        depth = rng.choice([0, 3, 15, 60])
        run[q] = {pid: rng.choice([0.25 * rng.randint(0, 8), round(rng.random(), 3)]) for pid in rng.sample(corpus, depth)}
    run["unjudged"] = {"d1": 1.0}
    return qrels, run


def _oracle(qrels, run, conventions: Conventions) -> dict[str, float]:
    """pytrec_eval's numbers averaged as :class:`Conventions` says (BEIR's loop, generalised)."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    if conventions.ignore_identical_ids:  # as BEIR's EvaluateRetrieval.evaluate
        run = {q: {p: s for p, s in hits.items() if p != q} for q, hits in run.items()}
    level = conventions.relevance_level
    queries = list(qrels) if conventions.judged_queries == "all" else [
        q for q, rel in qrels.items() if any(s >= level for s in rel.values())]
    out = {}
    for name in conventions.measures:
        measure, _, k = name.partition("@")
        k = int(k)
        if measure == "mrr":  # trec_eval's recip_rank has no cut-off: give it the run cut at k
            cut = {q: dict(sorted(hits.items(), key=lambda h: (h[1], h[0]), reverse=True)[:k]) for q, hits in run.items()}
            scores = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}, relevance_level=level).evaluate(cut)
            key = "recip_rank"
        else:
            trec = {"ndcg": "ndcg_cut", "map": "map_cut", "recall": "recall", "p": "P"}[measure]
            scores = pytrec_eval.RelevanceEvaluator(qrels, {f"{trec}.{k}"}, relevance_level=level).evaluate(run)
            key = f"{trec}_{k}"
        out[name] = sum(scores[q][key] if q in scores else 0.0 for q in queries) / len(queries)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("conventions", [
    Conventions(),
    Conventions(BEIR_MEASURES + ("mrr@10",), judged_queries="all", ignore_identical_ids=True),
    Conventions(("ndcg@5", "map@10", "recall@3", "p@10", "mrr@3"), relevance_level=2),
], ids=["default", "beir", "level2"])
def test_equals_pytrec_eval_on_random_runs(seed, conventions):
    qrels, run = _random_case(random.Random(seed))
    if conventions.ignore_identical_ids:
        run["q1"] = {**run.get("q1", {}), "q1": 99.0}
    ours = retrieval_metrics(run, qrels, conventions)
    assert ours == pytest.approx(_oracle(qrels, run, conventions), abs=1e-12)


def test_equals_pytrec_eval_on_any_scores_with_exact_ties():
    rng = random.Random(7)
    qrels, run = _random_case(rng)
    run = {q: {p: rng.random() if rng.random() < 0.7 else 0.5 for p in hits} for q, hits in run.items()}
    c = Conventions(("ndcg@10", "map@20", "recall@5", "p@5", "mrr@10"), tie_tolerance=0.0)
    assert retrieval_metrics(run, qrels, c) == pytest.approx(_oracle(qrels, run, c), abs=1e-12)


def test_near_equal_scores_tie_within_the_tolerance():
    """Copies of a passage get scores a few float32 bits apart: they still tie (by id), unless the
    tolerance is 0 (trec_eval's exact rule on the scores given)."""
    hits = [("a", 0.9703001), ("b", 0.9703), ("c", 0.5)]
    assert [h[0] for h in trec_order(hits)] == ["b", "a", "c"]
    assert [h[0] for h in trec_order(hits, 0.0)] == ["a", "b", "c"]
    qrels = {"q": {"a": 1}}
    assert retrieval_metrics({"q": dict(hits)}, qrels)["ndcg@10"] == pytest.approx(1 / math.log2(3))


@pytest.mark.parametrize("seed", range(4))
def test_ranking_does_not_depend_on_the_order_of_the_run(seed):
    rng = random.Random(seed)
    qrels, run = _random_case(rng)
    shuffled = {q: dict(rng.sample(list(h.items()), len(h))) for q, h in reversed(list(run.items()))}
    c = Conventions(("ndcg@10", "mrr@10", "recall@5", "map@20", "p@3"))
    assert retrieval_metrics(shuffled, qrels, c) == retrieval_metrics(run, qrels, c)


# ----------------------------------------------------------------------------- cutting at k


def _searcher(scores: np.ndarray, ids: list[str], calls: list):
    """A search over rows of ``scores`` that, like FAISS or torch.topk, breaks ties by row order."""
    def search(rows, depth):
        calls.append((list(rows), depth))
        out = []
        for r in rows:
            order = np.argsort(-scores[r], kind="stable")[:depth]
            out.append([(ids[j], float(scores[r, j])) for j in order])
        return out
    return search


def test_top_k_settles_a_tie_across_the_cut_by_id_not_row_order():
    ids = ["p0", "p1", "p2", "p3", "p4", "p5"]
    scores = np.array([[5.0, 1.0, 1.0, 1.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.5, 0.2, 0.1]])
    calls = []
    got = top_k(_searcher(scores, ids, calls), 2, 2, len(ids))
    assert got[0] == [("p0", 5.0), ("p4", 1.0)]  # p4 is the highest id among the four tied at 1.0
    assert got[1] == [("p0", 3.0), ("p1", 2.0)]
    assert calls[0] == ([0, 1], 3) and calls[1][0] == [0]  # only the tied query is searched again
    for perm in ([5, 4, 3, 2, 1, 0], [2, 0, 4, 1, 5, 3]):
        again = top_k(_searcher(scores[:, perm], [ids[j] for j in perm], []), 2, 2, len(ids))
        assert again == got


def test_top_k_stops_when_a_search_returns_fewer_hits_than_asked():
    calls = []

    def search(rows, depth):  # BM25 leaves out passages scoring 0: here only two hits exist
        calls.append(depth)
        return [[("a", 1.0), ("b", 1.0)] for _ in rows]

    assert top_k(search, 1, 2, 50) == [[("b", 1.0), ("a", 1.0)]]
    assert calls == [3]


def test_exact_scores_are_equal_for_equal_vectors_anywhere():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((3000, 768)).astype(np.float32)
    for j in (15, 999, 2999):
        p[j] = p[0]
    q = rng.standard_normal(768).astype(np.float32)
    s = exact_scores(q, p)
    assert s.dtype == np.float64 and s.shape == (3000,)
    assert s[15] == s[0] and s[999] == s[0] and s[2999] == s[0]
    assert s[1] == pytest.approx(float(p[1].astype(np.float64) @ q.astype(np.float64)))


# ----------------------------------------------------------------------------- DPR answer matching


def test_has_answer_on_dpr_tokens():
    assert has_answer("The Eiffel Tower is in Paris.", ["paris"])
    assert has_answer("built by Gustave Eiffel", ["Gustave  Eiffel"])
    assert not has_answer("Parisian cafes", ["Paris"])
    # punctuation is a token of its own: a different mark is a different answer
    assert not has_answer("the ratio is 3,5 here", ["3.5"])
    assert has_answer("the ratio is 3.5 here", ["3.5"])
    assert has_answer("the ratio is 3 . 5 here", ["3.5"])  # DPR matches token sequences, spaces apart
    assert not has_answer("written in C", ["C++"])
    assert has_answer("written in C++.", ["c++"])
    assert has_answer("written in C++.", ["C"])  # "c" is a token of "c + +"
    # accents stay (NFD keeps the combining mark inside the token): Pelé is not Pele, in either direction
    assert not has_answer("Pele scored", ["Pelé"])
    assert not has_answer("Pelé scored", ["Pele"])
    assert has_answer("Pele\u0301 scored", ["Pelé"])  # composed and decomposed forms are the same text
    assert has_answer("PELÉ scored", ["pelé"])
    assert not has_answer("anything", ["", "  "])  # no tokens: skipped (DPR would count it found)


def _dpr_simple_tokenizer_words(text: str) -> list[str]:
    """DPR's SimpleTokenizer regex (dpr/utils/tokenizers.py), after its NFD normalisation, uncased."""
    regex = pytest.importorskip("regex")
    import unicodedata

    pattern = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE)
    return [m.group().lower() for m in pattern.finditer(unicodedata.normalize("NFD", text))]


def test_dpr_tokens_equal_dprs_regex_tokenizer():
    samples = ["3.5 vs 3,5", "C++ and C#", "Pelé, Café au lait!", "naïve co-operation — “quotes”", "東京タワー 2024年",
               "tab\there\nnewline", "emoji 👍🏽 ok", "zero\u200bwidth", "Straße İstanbul ǅ", "x²+y³=z", "ﬁne ligature"]
    rng = random.Random(0)
    alphabet = "aZé5.,-_+\u0301\u00a0 \t\n€$%'\"()[]ßİ٣\u200d👍"
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    for s in samples:
        assert dpr_tokens(s) == _dpr_simple_tokenizer_words(s), s


def test_answer_accuracy_by_hand():
    text = {"p1": "nothing here", "p2": "the answer is 42", "p3": "also 42"}
    run = {"q1": {"p1": 2.0, "p2": 1.0}, "q2": {"p3": 1.0}, "q3": {"p1": 1.0}}
    answers = {"q1": ["42"], "q2": ["42"], "q3": ["42"]}
    acc = answer_accuracy(run, answers, text, ks=(1, 2))
    assert acc == {"top1_accuracy": pytest.approx(1 / 3), "top2_accuracy": pytest.approx(2 / 3)}
    tied = {"q1": {"p1": 1.0, "p2": 1.0}}  # a tie: p2 ranks first (id descending), whatever the order
    assert answer_accuracy(tied, {"q1": ["42"]}, text, ks=(1,)) == {"top1_accuracy": 1.0}
