"""``dpr eval`` and ``dpr bm25``: retrieval quality of an index (or of BM25) on judged queries."""

from __future__ import annotations

import ast
import csv
import json
import logging
from pathlib import Path


from dpr_service.core.checkpoint import load_checkpoint
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import DataError, Passage, iter_jsonl, read_beir_queries, read_qrels
from dpr_service.core.inference import encode_texts
from dpr_service.core.metrics import answer_accuracy, retrieval_metrics

from .search import Searcher

log = logging.getLogger("index")


def read_queries(path: str | Path, split: str = "test") -> tuple[dict[str, str], dict[str, list[str]], dict | None]:
    """(queries, answers, qrels or None) from a BEIR directory, a BEIR queries.jsonl, DPR JSONL
    (question + answers) or DPR's qas TSV/CSV (``question <TAB> ['answer', ...]``)."""
    path = Path(path)
    if path.is_dir():
        qrels = read_qrels(path / "qrels" / f"{split}.tsv") if (path / "qrels" / f"{split}.tsv").is_file() else None
        if qrels is None:
            raise DataError(path / "qrels" / f"{split}.tsv", None, f"missing: no '{split}' split")
        queries = read_beir_queries(path / "queries.jsonl")
        return {q: queries[q] for q in qrels if q in queries}, {}, qrels
    if not path.exists():
        raise DataError(path, None, "no such file or directory")
    if path.suffix in (".tsv", ".csv"):
        return (*_read_qas(path), None)
    queries, answers = {}, {}
    for lineno, obj in iter_jsonl(path):
        if "question" in obj:
            qid = str(obj.get("id", lineno))
            queries[qid] = str(obj["question"])
            if obj.get("answers"):
                answers[qid] = [str(a) for a in obj["answers"]]
        elif "_id" in obj and "text" in obj:
            queries[str(obj["_id"])] = str(obj["text"])
        else:
            raise DataError(path, lineno, "expected BEIR ('_id', 'text') or DPR ('question', 'answers') fields")
    return queries, answers, None


def _read_qas(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    queries, answers = {}, {}
    with open(path, encoding="utf-8", newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
            if not row:
                continue
            if len(row) != 2:
                raise DataError(path, lineno, f"expected 'question<TAB>answers', got {len(row)} columns")
            try:
                parsed = ast.literal_eval(row[1])  # DPR writes Python list literals
            except (ValueError, SyntaxError):
                raise DataError(path, lineno, f"answers {row[1][:60]!r} are not a list literal") from None
            if not isinstance(parsed, list):
                raise DataError(path, lineno, "answers must be a list")
            queries[str(lineno)] = row[0]
            answers[str(lineno)] = [str(a) for a in parsed]
    return queries, answers


def evaluate_index(checkpoint: str, index_dir: str, queries_path: str, qrels_path: str | None = None,
                   split: str = "test", k: int = 100, device: str = "auto", progress: bool = True) -> dict:
    queries, answers, qrels = read_queries(queries_path, split)
    if qrels_path:
        qrels = read_qrels(Path(qrels_path))
        queries = {q: t for q, t in queries.items() if q in qrels}
    if not qrels and not answers:
        raise DataError(queries_path, None, "no relevance judgements: give --qrels, or questions with answers")
    runtime = pick_runtime(device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    searcher = Searcher(index_dir, loaded.fingerprint)
    qids = list(queries)
    q_emb = encode_texts(loaded.encoder, loaded.tokenizer, [queries[q] for q in qids], "query", runtime, 128, progress)
    hits = searcher.search(q_emb.numpy(), k)
    run = {q: [h.id for h in hs] for q, hs in zip(qids, hits)}
    return score_run(run, qrels, answers, lambda ids: {pid: p.text for pid, p in searcher.passages(ids).items()}) | {
        "queries": len(qids), "passages": searcher.count}


def score_run(run: dict, qrels: dict | None, answers: dict, texts_of) -> dict:
    metrics = {}
    if qrels:
        metrics.update(retrieval_metrics(run, {q: r for q, r in qrels.items() if q in run}))
    if answers:
        ids = sorted({pid for ranked in run.values() for pid in ranked})
        metrics.update(answer_accuracy(run, answers, texts_of(ids)))
    return metrics


# ----------------------------------------------------------------------------- BM25


class BM25:
    """BM25 (bm25s, Lucene's scoring) over title + text, English stop words and Snowball stemming,
    as BEIR's and Pyserini's baselines."""

    def __init__(self, corpus: list[Passage], progress: bool = False):
        import bm25s
        import Stemmer

        self._bm25s = bm25s
        self.stemmer = Stemmer.Stemmer("english")
        self.ids = [p.id for p in corpus]
        tokens = bm25s.tokenize([f"{p.title} {p.text}".strip() for p in corpus], stopwords="en",
                                stemmer=self.stemmer, show_progress=progress)
        self.retriever = bm25s.BM25()
        self.retriever.index(tokens, show_progress=progress)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        tokens = self._bm25s.tokenize(queries, stopwords="en", stemmer=self.stemmer, show_progress=False)
        k = min(k, len(self.ids))
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return [[(self.ids[d], float(s)) for d, s in zip(row_d, row_s) if s > 0] for row_d, row_s in zip(docs, scores)]


def evaluate_bm25(corpus: list[Passage], queries_path: str, qrels_path: str | None = None, split: str = "test",
                  k: int = 100) -> dict:
    queries, answers, qrels = read_queries(queries_path, split)
    if qrels_path:
        qrels = read_qrels(Path(qrels_path))
        queries = {q: t for q, t in queries.items() if q in qrels}
    bm25 = BM25(corpus)
    qids = list(queries)
    results = bm25.search([queries[q] for q in qids], k)
    run = {q: [pid for pid, _ in hits] for q, hits in zip(qids, results)}
    text = {p.id: p.text for p in corpus}
    return score_run(run, qrels, answers, lambda ids: {i: text[i] for i in ids}) | {"queries": len(qids), "passages": len(corpus)}


def format_metrics(metrics: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(metrics, indent=2)
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in metrics.items())


