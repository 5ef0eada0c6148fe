"""BM25, the sparse baseline of ``dpr bm25`` and the negatives of ``dpr mine --method bm25``.

Usage::

    bm25 = BM25(corpus)                       # corpus: list[Passage]
    hits = bm25.search(["what is X?"], k=100)  # one [(passage id, score), ...] per query, best first

Scoring is bm25s's default (Lucene's BM25, k1=1.5, b=0.75) over ``title + " " + text`` with English
stop words and Snowball stemming (PyStemmer), the setting of BEIR's and Pyserini's BM25 baselines.
Nothing is written to disk (bm25s can save an index, never pickled here: it is rebuilt each run).
"""

from __future__ import annotations

import logging
from typing import Sequence

from .formats import Passage


def _import_bm25s():
    """bm25s, with its logger back at WARNING: importing it sets ``logging.getLogger("bm25s")`` to
    DEBUG, which prints ``DEBUG bm25s: Building index from IDs objects`` under any handler that
    passes DEBUG records, and an INFO line per query without a searchable word."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class BM25:
    """An in-memory BM25 index over ``corpus`` (N passages), built when constructed."""

    def __init__(self, corpus: Sequence[Passage], progress: bool = False):
        import Stemmer

        self._bm25s = _import_bm25s()
        self.stemmer = Stemmer.Stemmer("english")
        self.ids = [p.id for p in corpus]
        tokens = self._bm25s.tokenize([f"{p.title} {p.text}".strip() for p in corpus], stopwords="en",
                                      stemmer=self.stemmer, show_progress=progress)
        self.retriever = self._bm25s.BM25()
        self.retriever.index(tokens, show_progress=progress)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Per query, up to ``k`` (passage id, score) pairs, best first; passages scoring 0 (no query
        word in common) are left out, so a list may be shorter than ``k`` or empty."""
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", stemmer=self.stemmer, show_progress=False)
        k = min(k, len(self.ids))
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return [[(self.ids[d], float(s)) for d, s in zip(row_d, row_s) if s > 0] for row_d, row_s in zip(docs, scores)]
