"""Dense, BM25 and hybrid rankings of one index artifact: the one copy ``POST /search`` and
``dpr eval --mode`` both use.

Usage::

    searcher = Searcher(index_dir, fingerprint, bm25=True)    # the artifact, its BM25 index verified with it
    retriever = Retriever(searcher, artifact_bm25(searcher))
    hits = retriever.rank("hybrid", q_emb, texts, k=10)       # per query [(passage id, score)], best first

The BM25 side is the artifact's own BM25 index (``bm25/``, written by ``dpr index build``) or, for an
artifact built with ``--no-bm25``, one built over the artifact's passage store (:func:`store_bm25`):
both rank exactly the passages that were encoded, so the two sides share their ids. The dense side
is FAISS's top k rescored exactly (float64) from the index's own vectors where the index can give
them back, so copies of a passage tie exactly and ties are settled by id (trec_eval's rule).
Hybrid fuses each side's top ``max(k, FUSION_DEPTH)`` by :mod:`dpr_service.core.fusion`: reciprocal
rank fusion (k = 60), or a convex combination of min-max normalised scores with weight ``alpha`` on
the dense side. Which fusion an artifact serves by default is its manifest's ``hybrid`` field
(:func:`dpr_service.core.artifact.served_fusion`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .bm25 import BM25
from .formats import Passage
from .fusion import MODES, fuse
from .metrics import Ranked, exact_scores, trec_order
from .search import Searcher

log = logging.getLogger(__name__)

FUSION_DEPTH = 100  # each side contributes its top 100 (or the k asked for, when larger)


def stored_passages(searcher: Searcher) -> list[Passage]:
    """Every passage of the artifact's store, in row order (row r is the index's vector r)."""
    rows = searcher.store.by_rows(range(searcher.count))
    return [Passage(text=text, title=title, id=pid) for _, (pid, title, text) in sorted(rows.items())]


def store_bm25(searcher: Searcher) -> BM25:
    """A BM25 index built here over every passage of the artifact's store (same ids, titles and
    texts as the vectors); takes time and memory in proportion to the corpus."""
    log.info("%s has no BM25 index (built with --no-bm25): building one over its %d passages", searcher.directory,
             searcher.count)
    return BM25(stored_passages(searcher))


def artifact_bm25(searcher: Searcher) -> BM25:
    """The artifact's BM25 index (loaded and verified by ``Searcher(..., bm25=True)``), or, for an
    artifact without one, :func:`store_bm25`. Raises ValueError for a searcher of an artifact with a
    BM25 index that was loaded without ``bm25=True`` (it would be rebuilt needlessly)."""
    if searcher.bm25 is not None:
        return searcher.bm25
    if searcher.manifest.has_bm25:
        raise ValueError(f"{searcher.directory} has a BM25 index: load it with Searcher(..., bm25=True)")
    return store_bm25(searcher)


@dataclass
class Retriever:
    """Dense, BM25 and hybrid rankings of one artifact (``bm25`` may be None for dense only)."""

    searcher: Searcher
    bm25: BM25 | None

    def dense(self, q_emb: np.ndarray, k: int) -> list[list[Ranked]]:
        """q_emb (Q, D) -> per query, up to k (id, score) best first; scores recomputed exactly (float64)
        from the index's vectors where the index can give them back, so copies tie exactly."""
        out = []
        for q, hits in zip(q_emb, self.searcher.search(q_emb, k)):
            try:
                vectors = self.searcher.index.reconstruct_batch(np.array([h.row for h in hits], dtype=np.int64))  # (k, D)
                out.append(trec_order([(h.id, float(s)) for h, s in zip(hits, exact_scores(q, vectors))]))
            except RuntimeError:  # IVF without a direct map
                out.append(trec_order([(h.id, h.score) for h in hits]))
        return out

    def sparse(self, texts: list[str], k: int) -> list[list[Ranked]]:
        """Per query text, up to k BM25 (id, score), ranked by the same rule as the dense side;
        passages sharing no word with the query are left out. Raises ValueError without a BM25 index."""
        if self.bm25 is None:
            raise ValueError("this retriever has no BM25 index")
        return [trec_order(hits) for hits in self.bm25.search(texts, k)]

    def rank(self, mode: str, q_emb: np.ndarray | None, texts: list[str], k: int, fusion: str = "rrf",
             alpha: float | None = None) -> list[list[Ranked]]:
        """Per query, the top ``k`` (id, score) of ``mode``: ``dense`` (needs ``q_emb``, (Q, D)),
        ``bm25`` (needs ``texts``) or ``hybrid`` (both, fused by ``fusion`` with ``alpha`` for the
        convex one; each side's top ``max(k, FUSION_DEPTH)`` takes part). Raises ValueError for an
        unknown mode or fusion, or a convex fusion without alpha."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "dense":
            return self.dense(q_emb, k)
        if mode == "bm25":
            return self.sparse(texts, k)
        depth = max(k, FUSION_DEPTH)
        return [fuse(d, b, fusion, alpha, top_k=k) for d, b in zip(self.dense(q_emb, depth), self.sparse(texts, depth))]
