"""Checks on the training data before the first step: what the max lengths will cut.

Questions longer than ``--query-max-length`` lose their end silently; some data sets' queries are
whole paragraphs. The report counts, in tokens (with special tokens and prompt), the share of
questions and passages longer than their max length, and warns, naming the flag, when more than
``WARN_SHARE`` of the questions are cut. Passages are counted on a seeded sample of the pool.
"""

from __future__ import annotations

import logging
import random

from dpr_service.core.formats import TrainData
from dpr_service.core.tokenize import TextTokenizer

log = logging.getLogger("trainer")

WARN_SHARE = 0.05  # warn when more than 5% of the questions are truncated
PASSAGE_SAMPLE = 2000


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


def length_report(data: TrainData, tokenizer: TextTokenizer, sample: int = PASSAGE_SAMPLE, seed: int = 0) -> dict:
    """Token-length statistics: for ``queries`` (every distinct question) and ``passages`` (a seeded
    sample of up to ``sample`` passages of the pool and the positives): count, median, 95th percentile,
    max length, and the share longer than the max length (``truncated``, 0-1)."""
    queries = list(dict.fromkeys(ex.query for ex in data.examples))
    pool = list({p.id: p for p in [ex.positive for ex in data.examples] + list(data.corpus)}.values())
    passages = random.Random(seed).sample(pool, min(sample, len(pool)))
    report = {}
    for kind, items, limit in (("queries", queries, tokenizer.query_max_length),
                               ("passages", passages, tokenizer.passage_max_length)):
        lengths = tokenizer.lengths(items, "query" if kind == "queries" else "passage")
        report[kind] = {"count": len(lengths), "median": _percentile(lengths, 0.5), "p95": _percentile(lengths, 0.95),
                        "max_length": limit, "truncated": sum(n > limit for n in lengths) / max(1, len(lengths))}
    return report


def log_length_report(data: TrainData, tokenizer: TextTokenizer) -> dict:
    """Log :func:`length_report`, with a warning when many questions are truncated; returns it."""
    report = length_report(data, tokenizer)
    for kind, flag in (("queries", "--query-max-length"), ("passages", "--passage-max-length")):
        r = report[kind]
        log.info("%s: %d, tokens median %d, 95th percentile %d; %.1f%% longer than %s %d", kind, r["count"],
                 r["median"], r["p95"], 100 * r["truncated"], flag, r["max_length"])
    q = report["queries"]
    if q["truncated"] > WARN_SHARE:
        log.warning("%.0f%% of the questions are longer than %d tokens and will be cut: raise --query-max-length "
                    "(95%% of them fit in %d)", 100 * q["truncated"], q["max_length"], q["p95"])
    return report
