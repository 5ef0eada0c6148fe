"""``dpr eval`` and ``dpr bm25``: retrieval quality of an index (or of BM25) on judged queries."""

from __future__ import annotations

import ast
import itertools
import json
import logging
from pathlib import Path

from dpr_service.core.bm25 import BM25
from dpr_service.core.checkpoint import load_checkpoint
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import DataError, Passage, iter_jsonl, iter_tsv, read_beir_queries, read_qrels
from dpr_service.core.formats import field_answers, field_id, field_text  # the field checks every reader uses
from dpr_service.core.inference import encode_texts
from dpr_service.core.metrics import answer_accuracy, retrieval_metrics

from dpr_service.core.search import Searcher

log = logging.getLogger("index")


def read_queries(path: str | Path, split: str = "test", need_split: bool = True
                 ) -> tuple[dict[str, str], dict[str, list[str]], dict | None]:
    """(queries, answers, qrels or None) from a BEIR directory (its ``qrels/<split>.tsv`` unless
    ``need_split`` is false), a BEIR queries.jsonl, DPR JSONL (``question``, ``answers``, optional
    ``id``) or DPR's qas TSV/CSV (``question <TAB> ['answer', ...]``). Every bad line is a
    :class:`DataError` naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        qrels_path = path / "qrels" / f"{split}.tsv"
        qrels = None
        if need_split:
            if not qrels_path.is_file():
                raise DataError(qrels_path, None, f"missing: no '{split}' split")
            qrels = read_qrels(qrels_path)
        return read_beir_queries(path / "queries.jsonl"), {}, qrels
    if not path.exists():
        raise DataError(path, None, "no such file or directory")
    if path.suffix in (".tsv", ".csv"):
        return (*_read_qas(path), None)
    records = iter_jsonl(path)
    first = next(records, None)
    if first is None:
        raise DataError(path, None, "no queries in the file")
    if "question" not in first[1]:
        if "_id" in first[1]:
            return read_beir_queries(path), {}, None
        raise DataError(path, first[0], "expected BEIR ('_id', 'text') or DPR ('question', 'answers') fields")
    queries: dict[str, str] = {}
    answers: dict[str, list[str]] = {}
    line_of: dict[str, int] = {}
    for lineno, obj in itertools.chain([first], records):
        # a record without an id is named by its line; an id given twice is an error, never an overwrite
        qid = field_id(obj["id"], path, lineno, "field 'id'") if obj.get("id") not in (None, "") else f"line {lineno}"
        if qid in line_of:
            raise DataError(path, lineno, f"query id {qid!r} already used on line {line_of[qid]}")
        line_of[qid] = lineno
        queries[qid] = field_text(obj, "question", path, lineno, "question")
        if given := field_answers(obj, path, lineno):
            answers[qid] = given
    return queries, answers, None


def _read_qas(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """DPR's qas file: ``question <TAB> ['answer', ...]`` (a Python list literal) per line."""
    queries, answers = {}, {}
    for lineno, row in iter_tsv(path):  # a line that is not UTF-8 is a DataError naming it
        if len(row) != 2:
            raise DataError(path, lineno, f"expected 'question<TAB>answers', got {len(row)} columns")
        if not row[0].strip():
            raise DataError(path, lineno, "empty question")
        try:
            parsed = ast.literal_eval(row[1].strip())  # DPR writes Python list literals
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise DataError(path, lineno, f"answers {row[1][:60]!r} are not a list literal") from None
        if not isinstance(parsed, (list, tuple)) or not all(isinstance(a, str) for a in parsed):
            raise DataError(path, lineno, f"answers must be a list of strings, got {row[1][:60]!r}")
        queries[str(lineno)] = row[0]
        answers[str(lineno)] = list(parsed)
    if not queries:
        raise DataError(path, None, "no questions in the file")
    return queries, answers


def read_judged(queries_path: str | Path, qrels_path: str | Path | None = None, split: str = "test",
                need_qrels: bool = False) -> tuple[dict[str, str], dict[str, list[str]], dict | None]:
    """The judged queries for ``dpr eval``, ``dpr bm25`` and ``dpr mine``: (queries, answers,
    qrels or None), reduced to the queries that have judgements (qrels, else answers).

    ``--qrels`` replaces a BEIR directory's split. Judgements of queries missing from the queries
    file, qrels without a relevant passage, and no judgements at all are :class:`DataError`s;
    ``need_qrels`` (mining) does not accept answers alone."""
    queries, answers, qrels = read_queries(queries_path, split, need_split=qrels_path is None)
    source = Path(queries_path) / "qrels" / f"{split}.tsv" if qrels_path is None else Path(qrels_path)
    if qrels_path is not None:
        qrels = read_qrels(Path(qrels_path))
    if qrels is None:
        if need_qrels:
            raise DataError(queries_path, None, "mining needs relevance judgements: give --qrels or a BEIR directory")
        if not answers:
            raise DataError(queries_path, None, "no relevance judgements: give --qrels, a BEIR directory with "
                                                "qrels/<split>.tsv, or questions with answers")
        return {q: queries[q] for q in answers}, answers, None
    if not qrels:
        raise DataError(source, None, "no judgements in the file")
    missing = [q for q in qrels if q not in queries]
    if len(missing) == len(qrels):
        raise DataError(source, None, f"none of its {len(qrels)} judged query ids is in {queries_path} "
                                      f"(first: {missing[0]!r}); do the files belong together?")
    if missing:
        raise DataError(source, None, f"{len(missing)} judged query ids are not in {queries_path} (first: {missing[0]!r})")
    if not any(score > 0 for rel in qrels.values() for score in rel.values()):
        raise DataError(source, None, "no judgement with a score > 0 (nothing is relevant)")
    return ({q: queries[q] for q in qrels}, {q: a for q, a in answers.items() if q in qrels}, qrels)


def evaluate_index(checkpoint: str, index_dir: str, queries_path: str, qrels_path: str | None = None,
                   split: str = "test", k: int = 100, device: str = "auto", progress: bool = True) -> dict:
    queries, answers, qrels = read_judged(queries_path, qrels_path, split)
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


def evaluate_bm25(corpus: list[Passage], queries_path: str, qrels_path: str | None = None, split: str = "test",
                  k: int = 100) -> dict:
    queries, answers, qrels = read_judged(queries_path, qrels_path, split)
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


