"""``dpr mine``: training data with hard negatives, in the trainer's plain JSONL format.

* BM25 (DPR's original negatives): the top BM25 passages of each question that are not its positives.
* A trained checkpoint and its index (model-mined): the top dense hits, skipping the first
  ``skip_top`` ranks and any passage scoring above ``positive score - margin``: passages the model
  ranks that close to (or above) the labelled positive are often unlabelled positives, and training
  against them teaches the wrong thing. The negatives are the index's stored passages (the texts
  that were encoded), so the index may hold passages that the corpus file lacks.

Either way, a known positive (by id) or a passage whose title and text equal a positive's (a copy
under another id, FlagEmbedding#688) is never a negative. These rules are
:func:`dpr_service.core.mining.select_negatives`, which the trainer's own mining applies too; the
counts of what they skipped are returned and printed. Candidates are ranked by
:func:`dpr_service.core.metrics.trec_order` (ties by id), so the corpus order changes nothing.

Queries and judgements are read by :func:`dpr_service.core.formats.read_judged`, as for ``dpr eval``.
"""

from __future__ import annotations

import json
import logging
import math

from dpr_service.core.artifact import prepare_output
from dpr_service.core.bm25 import BM25
from dpr_service.core.checkpoint import load_checkpoint
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import DataError, Passage, read_judged
from dpr_service.core.inference import encode_texts
from dpr_service.core.metrics import trec_order
from dpr_service.core.mining import MiningStats, select_negatives
from dpr_service.core.search import Searcher

log = logging.getLogger("index")


def mine(queries_path: str, corpus: list[Passage], output: str, qrels_path: str | None = None, split: str = "train",
         method: str = "bm25", checkpoint: str | None = None, index_dir: str | None = None, num_negatives: int = 8,
         depth: int = 100, skip_top: int = 0, margin: float = 0.0, device: str = "auto") -> dict:
    """Write one line per (question, positive) with up to ``num_negatives`` mined negatives.

    Positives come from ``corpus``; model-mined negatives come from the index's own passage store
    (the texts that were encoded), so the index may hold passages that ``corpus`` lacks. ``margin``
    (similarity units, model mining only) may be negative: negatives may then score up to
    ``-margin`` above the positive. Returns counts: ``examples``, ``queries``, ``method``,
    ``skipped_copy_of_positive``, ``skipped_within_margin``, ``examples_with_fewer_negatives``.
    Raises ValueError (bad arguments, before any work) and DataError (files)."""
    if num_negatives < 1 or depth < 1 or skip_top < 0:
        raise ValueError(f"need num_negatives >= 1, depth >= 1 and skip_top >= 0, got {num_negatives}, {depth} and {skip_top}")
    if not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin}")
    if method not in ("bm25", "model"):
        raise ValueError(f"--method must be bm25 or model, got {method!r}")
    if method == "model" and (not checkpoint or not index_dir):
        raise ValueError("--method model needs --checkpoint and --index")
    out = prepare_output(output, directory=False)  # a bad --output fails before the mining, not after
    queries, _, qrels = read_judged(queries_path, qrels_path, split, need_qrels=True)
    positives = {q: sorted(p for p, s in rel.items() if s > 0) for q, rel in qrels.items()}
    positives = {q: rel for q, rel in positives.items() if rel}
    by_id = {p.id: p for p in corpus}
    unknown = sorted({pid for rel in positives.values() for pid in rel if pid not in by_id})
    if unknown:
        raise DataError(qrels_path or queries_path, None, f"{len(unknown)} judged passages are not in the corpus (first: {unknown[0]!r})")
    qids = list(positives)
    texts = [queries[q] for q in qids]
    if method == "bm25":
        ranked, pos_scores = BM25(corpus).search(texts, depth + skip_top), None
        passages_of = lambda ids: {i: by_id[i] for i in ids}  # noqa: E731
    else:
        searcher, ranked, pos_scores = _model_candidates(checkpoint, index_dir, device, texts, qids, positives, by_id,
                                                         depth + skip_top)
        passages_of = searcher.passages  # the indexed texts, which may differ from (or be missing in) --corpus

    stats = MiningStats()
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for q, hits in zip(qids, ranked):
            hits = trec_order(hits)
            stored = passages_of([cand for cand, _ in hits])
            candidates = [(stored[cand], score) for cand, score in hits if cand in stored]
            known = [by_id[pid] for pid in positives[q]]
            for pid in positives[q]:
                # select_negatives takes margin >= 0: a negative margin shifts the positive's score instead
                shifted = None if pos_scores is None else pos_scores[(q, pid)] - min(margin, 0.0)
                negatives = select_negatives(candidates, known, num_negatives, positive_score=shifted,
                                             skip_top=skip_top, margin=max(margin, 0.0), stats=stats)
                record = {"query": queries[q], "positive": _passage(by_id[pid]), "negatives": [_passage(p) for p in negatives]}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out)
    result = {"examples": stats.questions, "queries": len(qids), "method": method,
              "skipped_copy_of_positive": stats.skipped["copy_of_positive"],
              "skipped_within_margin": stats.skipped["within_margin"], "examples_with_fewer_negatives": stats.short}
    log.info("mined %s", result)
    return result


def _model_candidates(checkpoint: str, index_dir: str, device: str, texts: list[str], qids: list[str],
                      positives: dict[str, list[str]], by_id: dict[str, Passage], depth: int):
    """(searcher, the top ``depth`` (id, score) hits of each question, {(question, positive id): score})."""
    runtime = pick_runtime(device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    searcher = Searcher(index_dir, loaded.identity)
    q_emb = encode_texts(loaded.encoder, loaded.tokenizer, texts, "query", runtime, 128, progress=True)  # (Q, D)
    hits = searcher.search(q_emb.numpy(), depth)
    ranked = [[(h.id, h.score) for h in hs] for hs in hits]
    pos_list = sorted({pid for rel in positives.values() for pid in rel})
    p_emb = encode_texts(loaded.encoder, loaded.tokenizer, [by_id[p] for p in pos_list], "passage", runtime, 64, progress=True)
    p_row = {pid: i for i, pid in enumerate(pos_list)}
    pos_scores = {(q, pid): float(q_emb[i] @ p_emb[p_row[pid]]) for i, q in enumerate(qids) for pid in positives[q]}
    return searcher, ranked, pos_scores


def _passage(p: Passage) -> dict:
    return {"id": p.id, "title": p.title, "text": p.text}
