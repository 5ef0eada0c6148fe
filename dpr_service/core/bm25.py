"""BM25, the sparse baseline of ``dpr bm25`` and the negatives of ``dpr mine --method bm25``.

Usage::

    bm25 = BM25(corpus)                       # corpus: list[Passage]
    hits = bm25.search(["what is X?"], k=100)  # one [(passage id, score), ...] per query, best first

Scoring is bm25s's default (Lucene's BM25, k1=1.5, b=0.75) over ``title + " " + text`` with English
stop words and Snowball stemming (PyStemmer), the setting of BEIR's and Pyserini's BM25 baselines.
:meth:`BM25.save` / :meth:`BM25.load` keep an index in a directory (bm25s's numpy arrays and JSON
vocabulary, ``allow_pickle=False`` both ways, plus ``ids.json``): the index artifact holds one beside
the dense index, for hybrid search.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Sequence

from .formats import Passage


_STEMMER_LOCK = threading.Lock()


def _import_bm25s():
    """bm25s, with its logger back at WARNING: importing it sets ``logging.getLogger("bm25s")`` to
    DEBUG, which prints ``DEBUG bm25s: Building index from IDs objects`` under any handler that
    passes DEBUG records, and an INFO line per query without a searchable word."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class BM25:
    """An in-memory BM25 index over ``corpus`` (N passages), built when constructed."""

    IDS_FILE = "ids.json"

    def __init__(self, corpus: Sequence[Passage] | None, progress: bool = False):
        import Stemmer

        self._bm25s = _import_bm25s()
        self.stemmer = Stemmer.Stemmer("english")
        if corpus is None:  # filled in by load()
            return
        self.ids = [p.id for p in corpus]
        tokens = self._bm25s.tokenize([f"{p.title} {p.text}".strip() for p in corpus], stopwords="en",
                                      stemmer=self.stemmer, show_progress=progress)
        self.retriever = self._bm25s.BM25()
        self.retriever.index(tokens, show_progress=progress)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Per query, up to ``k`` (passage id, score) pairs, best first; passages scoring 0 (no query
        word in common) are left out, so a list may be shorter than ``k`` or empty."""
        with _STEMMER_LOCK:  # one PyStemmer object serves the server's threads; it promises no thread safety
            tokens = self._bm25s.tokenize(list(queries), stopwords="en", stemmer=self.stemmer, show_progress=False)
        k = min(k, len(self.ids))
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return [[(self.ids[d], float(s)) for d, s in zip(row_d, row_s) if s > 0] for row_d, row_s in zip(docs, scores)]

    def save(self, directory: Path | str) -> list[str]:
        """Write the index into ``directory`` (created); returns the file names written. No pickle."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        before = set(directory.iterdir())
        self.retriever.save(str(directory), allow_pickle=False)
        (directory / self.IDS_FILE).write_text(json.dumps(self.ids, ensure_ascii=False))
        return sorted(p.name for p in set(directory.iterdir()) - before | {directory / self.IDS_FILE})

    @classmethod
    def load(cls, directory: Path | str, mmap: bool = True) -> "BM25":
        """Read an index written by :meth:`save` (memory-mapped by default). Raises OSError or
        ValueError for missing or damaged files."""
        directory = Path(directory)
        self = cls(None)
        self.ids = json.loads((directory / cls.IDS_FILE).read_text())
        self.retriever = self._bm25s.BM25.load(str(directory), mmap=mmap, allow_pickle=False, load_corpus=False)
        return self
