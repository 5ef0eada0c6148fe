"""``dpr eval`` and ``dpr bm25``: retrieval quality of an index (or of BM25) on judged queries.

Queries and judgements are read by :func:`dpr_service.core.formats.read_judged`; ranking, the cut at
k and the measures are :mod:`dpr_service.core.metrics`, as in the trainer's evaluation
(``trainer/evaluate.py``), so both give the same numbers on the same inputs. The conventions on
which published figures differ (BEIR's, trec_eval's) are options: see ``docs/evaluation.md``.
"""

from __future__ import annotations

import json
import logging

from dpr_service.core.bm25 import BM25
from dpr_service.core.checkpoint import load_checkpoint
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import Passage, read_judged
from dpr_service.core.inference import encode_texts
from dpr_service.core.metrics import Conventions, score_run, search_run
from dpr_service.core.search import Searcher

from dpr_service.core.hybrid import Retriever

log = logging.getLogger("index")


def evaluate_index(checkpoint: str, index_dir: str, queries_path: str, qrels_path: str | None = None,
                   split: str = "test", device: str = "auto", progress: bool = True,
                   conventions: Conventions = Conventions()) -> dict:
    """Encode the judged queries with ``checkpoint``, search ``index_dir`` (built with that
    checkpoint) and score the run: ``conventions.measures`` when there are qrels, DPR's
    ``top{k}_accuracy`` when there are answers, plus ``queries`` and ``passages`` counts.

    Raises DataError (bad or unmatched files), CheckpointError, ArtifactError (an index of another
    checkpoint, damaged files)."""
    queries, answers, qrels = read_judged(queries_path, qrels_path, split)
    runtime = pick_runtime(device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    searcher = Searcher(index_dir, loaded.identity)
    qids = list(queries)
    q_emb = encode_texts(loaded.encoder, loaded.tokenizer, [queries[q] for q in qids], "query", runtime, 128, progress)
    q_emb = q_emb.numpy()  # (Q, D)
    dense = Retriever(searcher, None).dense  # scores recomputed from the index's vectors: copies tie exactly
    run = search_run(qids, lambda rows, depth: dense(q_emb[rows], depth), searcher.count, conventions, bool(answers))
    texts_of = lambda ids: {pid: p.text for pid, p in searcher.passages(ids).items()}  # noqa: E731
    return score_run(run, qrels, answers, texts_of, conventions) | {"queries": len(qids), "passages": searcher.count}


def evaluate_bm25(corpus: list[Passage], queries_path: str, qrels_path: str | None = None, split: str = "test",
                  conventions: Conventions = Conventions()) -> dict:
    """``dpr bm25``: :class:`dpr_service.core.bm25.BM25` over ``corpus``, scored as :func:`evaluate_index`."""
    queries, answers, qrels = read_judged(queries_path, qrels_path, split)
    bm25 = BM25(corpus)
    qids = list(queries)
    run = search_run(qids, lambda rows, depth: bm25.search([queries[qids[r]] for r in rows], depth),
                     len(corpus), conventions, bool(answers))
    text = {p.id: p.text for p in corpus}
    return score_run(run, qrels, answers, lambda ids: {i: text[i] for i in ids}, conventions) | {
        "queries": len(qids), "passages": len(corpus)}


def format_metrics(metrics: dict, as_json: bool) -> str:
    """The metrics as a two-column table (4 decimals), or as indented JSON."""
    if as_json:
        return json.dumps(metrics, indent=2)
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in metrics.items())
