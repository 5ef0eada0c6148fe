"""BM25, the sparse baseline of ``dpr bm25`` and the negatives of ``dpr mine --method bm25``.

Usage::

    bm25 = BM25(corpus)                       # corpus: list[Passage]
    hits = bm25.search(["what is X?"], k=100)  # one [(passage id, score), ...] per query, best first

Scoring is bm25s's default (Lucene's BM25, k1=1.5, b=0.75) over ``title + " " + text`` with English
stop words and Snowball stemming (PyStemmer), the setting of BEIR's and Pyserini's BM25 baselines.
:meth:`BM25.save` / :meth:`BM25.load` keep an index in a directory (bm25s's numpy arrays and JSON
vocabulary, ``allow_pickle=False`` both ways, plus ``ids.json`` and ``analyzer.json``): the index
artifact holds one beside the dense index, for hybrid search.

What BM25 sees (the analyser, :data:`ANALYZERS`; docs/index.md has the table):

* ``en-cjk-bigram`` (the default): text in scripts written with spaces is split as bm25s splits it
  (runs of two or more word characters, lower-cased, English stop words dropped, Snowball-stemmed),
  exactly as ``en`` does; runs of Chinese, Japanese and Korean characters (Han, Hiragana, Katakana,
  Hangul) become overlapping character bigrams, Lucene's ``CJKAnalyzer`` rule (``東京は日本`` ->
  ``東京 京は は日 日本``; a lone character is a token of its own). Text without such characters is
  tokenised exactly as by ``en``.
* ``en``: bm25s's default alone, the only analyser before it was recorded. A sentence in a script
  without spaces is one token, so it matches only itself. An artifact whose ``bm25/`` has no
  ``analyzer.json`` was built with it, and its queries are analysed with it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Sequence

from .formats import Passage


_STEMMER_LOCK = threading.Lock()

TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # bm25s's (and scikit-learn's) default: runs of two or more word characters
# Han (with its extensions and compatibility ideographs), the iteration marks, Hiragana, Katakana (and
# its phonetic extensions and half-width forms) and Hangul (syllables and jamo): Lucene's CJK scripts
CJK_CHARS = ("\u1100-\u11ff\u3005-\u3007\u3040-\u309f\u30a0-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf"
             "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0002fa1f")
_CJK_RUN = re.compile(f"[{CJK_CHARS}]+")
ANALYZERS = ("en-cjk-bigram", "en")
DEFAULT_ANALYZER = "en-cjk-bigram"
LEGACY_ANALYZER = "en"  # what an index saved without analyzer.json was built with


class BM25Error(ValueError):
    """A corpus BM25 cannot index: no passage has a single token (all stop words, punctuation or empty)."""


def cjk_bigrams(text: str) -> str:
    """``text`` with every run of CJK characters replaced by its overlapping bigrams, space-separated
    (a run of one character stays as it is); text without CJK characters is returned unchanged."""
    def bigrams(m: re.Match) -> str:
        run = m.group()
        return " " + " ".join(run[i : i + 2] for i in range(max(1, len(run) - 1))) + " "

    return _CJK_RUN.sub(bigrams, text)


def _import_bm25s():
    """bm25s, with its logger back at WARNING: importing it sets ``logging.getLogger("bm25s")`` to
    DEBUG, which prints ``DEBUG bm25s: Building index from IDs objects`` under any handler that
    passes DEBUG records, and an INFO line per query without a searchable word."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class BM25:
    """An in-memory BM25 index over ``corpus`` (N passages), built when constructed, with the
    ``analyzer`` (one of :data:`ANALYZERS`) applied to passages and queries alike.

    Raises :class:`BM25Error` (a ValueError) when no passage has a token to index, ValueError for
    an unknown analyser."""

    IDS_FILE = "ids.json"
    ANALYZER_FILE = "analyzer.json"

    def __init__(self, corpus: Sequence[Passage] | None, progress: bool = False, analyzer: str = DEFAULT_ANALYZER):
        import Stemmer

        if analyzer not in ANALYZERS:
            raise ValueError(f"unknown BM25 analyzer {analyzer!r} (known: {', '.join(ANALYZERS)})")
        self._bm25s = _import_bm25s()
        self.stemmer = Stemmer.Stemmer("english")
        self.analyzer = analyzer
        if corpus is None:  # filled in by load()
            return
        self.ids = [p.id for p in corpus]
        tokens = self._tokenize([f"{p.title} {p.text}".strip() for p in corpus], progress=progress)
        if not any(tokens.ids):
            raise BM25Error(f"no passage has a word BM25 can index: all {len(corpus)} are stop words, punctuation or "
                            f"single characters to the {analyzer!r} analyser (docs/index.md)")
        self.retriever = self._bm25s.BM25()
        self.retriever.index(tokens, show_progress=progress)

    def _tokenize(self, texts: list[str], progress: bool = False, return_ids: bool = True):
        """bm25s's tokenisation under this index's analyser."""
        pattern = TOKEN_PATTERN
        if self.analyzer == "en-cjk-bigram":
            texts = [cjk_bigrams(t) for t in texts]
            pattern = f"{TOKEN_PATTERN}|[{CJK_CHARS}]"  # bigrams match the first part; a lone character the second
        with _STEMMER_LOCK:  # one PyStemmer object serves the server's threads; it promises no thread safety
            return self._bm25s.tokenize(texts, token_pattern=pattern, stopwords="en", stemmer=self.stemmer,
                                        return_ids=return_ids, show_progress=progress)

    def tokens(self, texts: Sequence[str]) -> list[list[str]]:
        """What BM25 sees of each text: its tokens, in order (stop words dropped, stemmed)."""
        return self._tokenize(list(texts), return_ids=False)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Per query, up to ``k`` (passage id, score) pairs, best first; passages scoring 0 (no query
        word in common) are left out, so a list may be shorter than ``k`` or empty."""
        tokens = self._tokenize(list(queries))
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
        (directory / self.ANALYZER_FILE).write_text(json.dumps({"analyzer": self.analyzer}) + "\n")
        return sorted(p.name for p in set(directory.iterdir()) - before | {directory / self.IDS_FILE, directory / self.ANALYZER_FILE})

    @classmethod
    def load(cls, directory: Path | str, mmap: bool = True) -> "BM25":
        """Read an index written by :meth:`save` (memory-mapped by default), with the analyser it
        records (:data:`LEGACY_ANALYZER` when it records none: saved before analysers were). Raises
        OSError or ValueError for missing or damaged files and unknown analysers."""
        directory = Path(directory)
        analyzer = LEGACY_ANALYZER
        if (directory / cls.ANALYZER_FILE).exists():
            record = json.loads((directory / cls.ANALYZER_FILE).read_text())
            if not isinstance(record, dict) or not isinstance(record.get("analyzer"), str):
                raise ValueError(f"{directory / cls.ANALYZER_FILE}: expected {{\"analyzer\": name}}")
            analyzer = record["analyzer"]
        self = cls(None, analyzer=analyzer)
        self.ids = json.loads((directory / cls.IDS_FILE).read_text())
        self.retriever = self._bm25s.BM25.load(str(directory), mmap=mmap, allow_pickle=False, load_corpus=False)
        return self
