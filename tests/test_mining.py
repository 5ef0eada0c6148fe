"""The false-negative rules of hard-negative mining (dpr_service/core/mining.py), by hand."""

import pytest

from dpr_service.core.formats import Passage
from dpr_service.core.mining import MiningStats, score_ceiling, select_negatives


def P(i, text, title=""):
    return Passage(text=text, title=title, id=i)


def test_copy_of_a_positive_under_another_id_is_never_a_negative():
    pos = P("a", "The  Ember light flashes red.", "Ember")
    cands = [(P("b", "the ember light flashes RED.", "ember"), 0.9), (P("c", "A green light."), 0.5), (P("d", "Fog."), 0.4)]
    stats = MiningStats()
    got = select_negatives(cands, [pos], k=2, stats=stats)
    assert [p.id for p in got] == ["c", "d"]
    assert stats.as_dict() == {"questions": 1, "short_of_negatives": 0, "skipped_copy_of_positive": 1}


def test_positives_top_ranks_and_short_lists():
    pos = [P("a", "x"), P("b", "y")]
    cands = [(P("a", "x"), 0.9), (P("c", "z1"), 0.8), (P("b", "y"), 0.7), (P("d", "z2"), 0.6), (P("e", "z3"), 0.5)]
    stats = MiningStats()
    assert [p.id for p in select_negatives(cands, pos, k=5, skip_top=2, stats=stats)] == ["d", "e"]
    assert stats.skipped == {"positive": 2, "top_rank": 1}
    assert stats.short == 1


def test_nv_retriever_ratio_and_absolute_margin():
    pos = [P("a", "x")]
    cands = [(P("b", "1"), 0.80), (P("c", "2"), 0.76), (P("d", "3"), 0.75), (P("e", "4"), 0.5)]
    # 95% of 0.8 = 0.76: scores above it are skipped, 0.76 itself is kept
    assert [p.id for p in select_negatives(cands, pos, k=3, positive_score=0.8, ratio=0.95)] == ["c", "d", "e"]
    assert [p.id for p in select_negatives(cands, pos, k=3, positive_score=0.8, margin=0.1)] == ["e"]
    assert score_ceiling(0.8, margin=0.01, ratio=0.95) == pytest.approx(0.76)
    # a negative dot product: the ceiling stays below the positive
    assert score_ceiling(-2.0, ratio=0.95) == pytest.approx(-2.1)


def test_bad_arguments():
    with pytest.raises(ValueError):
        select_negatives([], [], k=0)
    with pytest.raises(ValueError):
        select_negatives([], [], k=1, ratio=1.5)
