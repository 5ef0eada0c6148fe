"""``dpr eval --mode {dense,bm25,hybrid}``: an index's dense ranking, its BM25 ranking, or both fused.

The BM25 side is the artifact's own BM25 index (``bm25/``, written by ``dpr index build``) or, for an
artifact built without one, a BM25 index built here over the artifact's passage store: both rank the
passages that were encoded, so the two sides always share their ids. Fusion is
:mod:`dpr_service.core.fusion` (RRF with k = 60, or a convex combination of min-max normalised
scores with weight ``alpha`` on the dense side). ``tune_split`` picks alpha on other judged queries
(a dev split, or a part of train held out from training) by nDCG@10, as :func:`tune_alpha` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from dpr_service.core.bm25 import BM25
from dpr_service.core.checkpoint import load_checkpoint
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import Passage, read_judged
from dpr_service.core.fusion import FUSIONS, MODES, fuse, tune_alpha
from dpr_service.core.inference import encode_texts
from dpr_service.core.metrics import Conventions, Hit, exact_scores, retrieval_metrics, score_run, search_run, trec_order
from dpr_service.core.search import Searcher

log = logging.getLogger("index")

BM25_DIR = "bm25"
FUSION_DEPTH = 100  # each side contributes its top 100 (or the run depth, when larger)


def artifact_bm25(searcher: Searcher) -> BM25:
    """The artifact's BM25 index, or one built over its passage store (same ids, same texts)."""
    path = searcher.directory / BM25_DIR
    if path.is_dir():
        return BM25.load(path)
    log.info("%s has no BM25 index (built without it): building one over its %d passages", searcher.directory, searcher.count)
    rows = searcher.store.by_rows(range(searcher.count))
    return BM25([Passage(text=text, title=title, id=pid) for _, (pid, title, text) in sorted(rows.items())])


@dataclass
class Retriever:
    """Dense, BM25 and hybrid rankings of one artifact for a checkpoint's query embeddings."""

    searcher: Searcher
    bm25: BM25 | None

    def dense(self, q_emb: np.ndarray, k: int) -> list[list[Hit]]:
        """(Q, D) -> per query, up to k (id, score) best first; scores recomputed exactly (float64)
        from the index's vectors where the index can give them back, so copies tie exactly."""
        out = []
        for q, hits in zip(q_emb, self.searcher.search(q_emb, k)):
            try:
                vectors = self.searcher.index.reconstruct_batch(np.array([h.row for h in hits], dtype=np.int64))
                out.append(trec_order([(h.id, float(s)) for h, s in zip(hits, exact_scores(q, vectors))]))
            except RuntimeError:  # IVF without a direct map
                out.append(trec_order([(h.id, h.score) for h in hits]))
        return out

    def sparse(self, texts: list[str], k: int) -> list[list[Hit]]:
        """Per query, up to k BM25 (id, score), ranked by the same rule as the dense side."""
        return [trec_order(hits) for hits in self.bm25.search(texts, k)]

    def rank(self, mode: str, q_emb: np.ndarray, texts: list[str], k: int, fusion: str = "rrf",
             alpha: float | None = None) -> list[list[Hit]]:
        """Per query, the top ``k`` of ``mode`` (dense, bm25 or hybrid with ``fusion``)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "dense":
            return self.dense(q_emb, k)
        if mode == "bm25":
            return self.sparse(texts, k)
        depth = max(k, FUSION_DEPTH)
        return [fuse(d, b, fusion, alpha, top_k=k) for d, b in zip(self.dense(q_emb, depth), self.sparse(texts, depth))]


def evaluate_modes(checkpoint: str, index_dir: str, queries_path: str, split: str = "test", modes=MODES,
                   fusion: str = "rrf", alpha: float | None = None, tune_split: str | None = None,
                   device: str = "auto", progress: bool = True, conventions: Conventions = Conventions()) -> dict:
    """The metrics of each of ``modes`` on ``split`` ({mode: metrics}). With ``tune_split``, alpha is
    first tuned on that split's queries (convex fusion; the choice and its table are returned under
    ``"tuned"``). Raises DataError, CheckpointError, ArtifactError, ValueError (bad options)."""
    if fusion not in FUSIONS:
        raise ValueError(f"--fusion must be one of {FUSIONS}, got {fusion!r}")
    if fusion == "convex" and alpha is None and tune_split is None:
        raise ValueError("--fusion convex needs --alpha, or --tune-split to choose it")
    runtime = pick_runtime(device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    searcher = Searcher(index_dir, loaded.fingerprint)
    retriever = Retriever(searcher, artifact_bm25(searcher) if set(modes) - {"dense"} else None)

    def encoded(split_name: str):
        queries, answers, qrels = read_judged(queries_path, None, split_name)
        qids = list(queries)
        texts = [queries[q] for q in qids]
        q_emb = encode_texts(loaded.encoder, loaded.tokenizer, texts, "query", runtime, 128, progress).numpy()  # (Q, D)
        return qids, texts, q_emb, answers, qrels

    out: dict = {}
    if tune_split is not None:
        qids, texts, q_emb, _, qrels = encoded(tune_split)
        dense = dict(zip(qids, retriever.dense(q_emb, FUSION_DEPTH)))
        sparse = dict(zip(qids, retriever.sparse(texts, FUSION_DEPTH)))
        alpha, table = tune_alpha(dense, sparse, lambda run: retrieval_metrics(run, qrels, Conventions(measures=("ndcg@10",)))["ndcg@10"])
        fusion = "convex"
        out["tuned"] = {"split": tune_split, "alpha": alpha, "ndcg@10_by_alpha": table}
        log.info("alpha %.2f chosen on %s (%d queries): nDCG@10 %.4f", alpha, tune_split, len(qids), table[alpha])
    qids, texts, q_emb, answers, qrels = encoded(split)
    texts_of = lambda ids: {pid: p.text for pid, p in searcher.passages(ids).items()}  # noqa: E731
    for mode in modes:
        # the cut at k by metrics.top_k (a tie across rank k is settled by id), as dpr eval's dense run
        run = search_run(qids, lambda rows, k: retriever.rank(mode, q_emb[rows], [texts[r] for r in rows], k, fusion, alpha),
                         searcher.count, conventions, bool(answers))
        out[mode] = score_run(run, qrels, answers, texts_of, conventions)
    out["fusion"] = {"fusion": fusion, "alpha": alpha}
    return out
