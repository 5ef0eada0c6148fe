"""``dpr eval --mode {dense,bm25,hybrid}``: an index's dense ranking, its BM25 ranking, or both fused.

The rankings are :class:`dpr_service.core.hybrid.Retriever`'s, the very code ``POST /search``
runs: the BM25 side is the artifact's own BM25 index (``bm25/``, written by ``dpr index build``) or,
for an artifact built with ``--no-bm25``, one built over the artifact's passage store
(:func:`~dpr_service.core.hybrid.artifact_bm25`). Fusion is :mod:`dpr_service.core.fusion` (RRF
with k = 60, or a convex combination of min-max normalised scores with weight ``alpha`` on the
dense side). ``tune_split`` picks alpha on other judged queries (a dev split, or a part of train
held out from training) by nDCG@10, as :func:`tune_alpha` does.
"""

from __future__ import annotations

import logging

from dpr_service.core.artifact import store_served_fusion
from dpr_service.core.checkpoint import load_checkpoint
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import read_judged
from dpr_service.core.fusion import FUSIONS, MODES, tune_alpha
from dpr_service.core.hybrid import FUSION_DEPTH, Retriever, artifact_bm25
from dpr_service.core.inference import encode_texts
from dpr_service.core.metrics import Conventions, retrieval_metrics, score_run, search_run
from dpr_service.core.search import Searcher

__all__ = ["Retriever", "evaluate_modes"]  # Retriever: the core's, for index/evaluate.py

log = logging.getLogger("index")


def evaluate_modes(checkpoint: str, index_dir: str, queries_path: str, split: str = "test", modes=MODES,
                   fusion: str = "rrf", alpha: float | None = None, tune_split: str | None = None,
                   device: str = "auto", progress: bool = True, conventions: Conventions = Conventions(),
                   store_alpha: bool = False) -> dict:
    """The metrics of each of ``modes`` on ``split`` ({mode: metrics}). With ``tune_split``, alpha is
    first tuned on that split's queries (convex fusion; the choice and its table are returned under
    ``"tuned"``) and, with ``store_alpha``, stored in the artifact as the fusion hybrid search serves
    by default (:func:`~dpr_service.core.artifact.store_served_fusion`: a new artifact swapped in
    atomically). Raises DataError, CheckpointError, ArtifactError, ValueError (bad options)."""
    if fusion not in FUSIONS:
        raise ValueError(f"--fusion must be one of {FUSIONS}, got {fusion!r}")
    if fusion == "convex" and alpha is None and tune_split is None:
        raise ValueError("--fusion convex needs --alpha, or --tune-split to choose it")
    if store_alpha and tune_split is None:
        raise ValueError("--store-alpha stores the alpha --tune-split chooses: give --tune-split")
    runtime = pick_runtime(device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    sparse_needed = bool(set(modes) - {"dense"}) or tune_split is not None
    searcher = Searcher(index_dir, loaded.identity, bm25=sparse_needed)
    retriever = Retriever(searcher, artifact_bm25(searcher) if sparse_needed else None)

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
    if store_alpha:  # last: the evaluation above ran on the artifact as it was
        store_served_fusion(index_dir, "convex", alpha)
        out["tuned"]["stored_in"] = str(index_dir)
    return out
