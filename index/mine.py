"""``dpr mine``: training data with hard negatives, in the trainer's plain JSONL format.

* BM25 (DPR's original negatives): the top BM25 passages of each question that are not its positives.
* A trained checkpoint and its index (model-mined): the top dense hits, skipping the first
  ``skip_top`` ranks and any passage scoring above ``positive score - margin``: passages the model
  ranks that close to (or above) the labelled positive are often unlabelled positives, and training
  against them teaches the wrong thing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path


from dpr_service.core.checkpoint import load_checkpoint
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import DataError, Passage, read_qrels
from dpr_service.core.inference import encode_texts

from .evaluate import BM25, read_queries
from .search import Searcher

log = logging.getLogger("index")


def _pairs(queries_path: str, qrels_path: str | None, split: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    queries, _, qrels = read_queries(queries_path, split)
    if qrels_path:
        qrels = read_qrels(Path(qrels_path))
    if not qrels:
        raise DataError(queries_path, None, "mining needs relevance judgements: give --qrels or a BEIR directory")
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise DataError(qrels_path or queries_path, None, f"{len(missing)} judged queries are not in the queries file (first: {missing[0]!r})")
    positives = {q: {p: s for p, s in rel.items() if s > 0} for q, rel in qrels.items()}
    return queries, {q: rel for q, rel in positives.items() if rel}


def mine(queries_path: str, corpus: list[Passage], output: str, qrels_path: str | None = None, split: str = "train",
         method: str = "bm25", checkpoint: str | None = None, index_dir: str | None = None, num_negatives: int = 8,
         depth: int = 100, skip_top: int = 0, margin: float = 0.0, device: str = "auto") -> dict:
    """Write one line per (question, positive) with up to ``num_negatives`` mined negatives; returns counts."""
    queries, positives = _pairs(queries_path, qrels_path, split)
    by_id = {p.id: p for p in corpus}
    unknown = sorted({pid for rel in positives.values() for pid in rel if pid not in by_id})
    if unknown:
        raise DataError(qrels_path or queries_path, None, f"{len(unknown)} judged passages are not in the corpus (first: {unknown[0]!r})")
    qids = list(positives)
    texts = [queries[q] for q in qids]

    if method == "bm25":
        ranked = BM25(corpus).search(texts, depth + skip_top)
        pos_scores = None
    elif method == "model":
        if not checkpoint or not index_dir:
            raise ValueError("--method model needs --checkpoint and --index")
        runtime = pick_runtime(device, "auto")
        loaded = load_checkpoint(checkpoint, runtime.device)
        searcher = Searcher(index_dir, loaded.fingerprint)
        q_emb = encode_texts(loaded.encoder, loaded.tokenizer, texts, "query", runtime, 128, progress=True)
        hits = searcher.search(q_emb.numpy(), depth + skip_top)
        ranked = [[(h.id, h.score) for h in hs] for hs in hits]
        pos_list = sorted({pid for rel in positives.values() for pid in rel})
        p_emb = encode_texts(loaded.encoder, loaded.tokenizer, [by_id[p] for p in pos_list], "passage", runtime, 64, progress=True)
        p_row = {pid: i for i, pid in enumerate(pos_list)}
        pos_scores = {
            (q, pid): float(q_emb[i] @ p_emb[p_row[pid]]) for i, q in enumerate(qids) for pid in positives[q]
        }
    else:
        raise ValueError(f"--method must be bm25 or model, got {method!r}")

    written = skipped_margin = short = 0
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for q, hits in zip(qids, ranked):
            for pid in sorted(positives[q]):
                negatives = []
                for rank, (cand, score) in enumerate(hits):
                    if rank < skip_top or cand in positives[q]:
                        continue
                    if pos_scores is not None and score > pos_scores[(q, pid)] - margin:
                        skipped_margin += 1
                        continue
                    negatives.append(by_id[cand])
                    if len(negatives) == num_negatives:
                        break
                short += len(negatives) < num_negatives
                record = {"query": queries[q], "positive": _passage(by_id[pid]), "negatives": [_passage(p) for p in negatives]}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
    tmp.replace(out)
    stats = {"examples": written, "queries": len(qids), "method": method, "skipped_within_margin": skipped_margin,
             "examples_with_fewer_negatives": short}
    log.info("mined %s", stats)
    return stats


def _passage(p: Passage) -> dict:
    return {"id": p.id, "title": p.title, "text": p.text}


