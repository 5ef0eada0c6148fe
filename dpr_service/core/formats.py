"""Readers for the data formats every stage accepts. Pure Python: no torch, no web stack.

* DPR JSON (a list) or JSONL: ``question``, ``answers``, ``positive_ctxs``, ``negative_ctxs``,
  ``hard_negative_ctxs``; each ctx has ``title``, ``text`` and ``passage_id``.
* BEIR directories: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
  (``_id``, ``text``), ``qrels/<split>.tsv`` (query-id, corpus-id, score; score > 0 is relevant).
* Plain JSONL: ``{"query": ..., "positive": ..., "negatives": [...]}``; a passage there is a
  string or ``{"title", "text", "id"}``.

Every problem raises :class:`DataError`, whose message names the file, the line and what is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


class DataError(Exception):
    """Bad input data: ``path:line: message``."""

    def __init__(self, path: Path | str, line: int | None, message: str):
        self.path, self.line, self.message = str(path), line, message
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Passage:
    """A passage as every stage sees it. ``id`` is the source's id, or a hash of the content."""

    text: str
    title: str = ""
    id: str = ""


@dataclass
class TrainExample:
    query: str
    positive: Passage
    hard_negatives: list[Passage] = field(default_factory=list)
    negatives: list[Passage] = field(default_factory=list)  # DPR's negative_ctxs (e.g. BM25 random)
    answers: list[str] = field(default_factory=list)
    known_positive_ids: frozenset[str] = frozenset()  # every passage known to answer this query


@dataclass
class TrainData:
    examples: list[TrainExample]
    corpus: list[Passage]  # the pool that missing hard negatives are drawn from
    source: str


@dataclass
class EvalData:
    """Queries, relevance judgements and the corpus they refer to (exact-search evaluation)."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    corpus: list[Passage]
    answers: dict[str, list[str]]
    source: str


def content_id(title: str, text: str) -> str:
    return "sha1:" + hashlib.sha1(f"{title}\x1f{text}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- low-level readers


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line."""
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(path, None, f"cannot open ({e.strerror})") from None
    with fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(path, lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except UnicodeDecodeError:
            raise DataError(path, lineno + 1, "not UTF-8 text") from None


def iter_json_array(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number where the element starts, object) for a JSON file holding a list."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(path, None, "not UTF-8 text") from None
    except OSError as e:
        raise DataError(path, None, f"cannot open ({e.strerror})") from None
    decoder = json.JSONDecoder()
    pos, line, counted = 0, 1, 0

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos >= len(text) or text[pos] != "[":
        raise DataError(path, line_at(pos), "expected a JSON list of questions (DPR format)")
    pos = skip_ws(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        start = line_at(pos)
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(path, start, f"expected a JSON object, got {type(obj).__name__}")
        yield start, obj
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise DataError(path, line_at(pos), "bad JSON: expected ',' or ']' between list elements")


def _text(obj: dict, key: str, path: Path, lineno: int, what: str, required: bool = True) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(path, lineno, f"{what}: missing field '{key}'")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(path, lineno, f"{what}: field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(path, lineno, f"{what}: field '{key}' is empty")
    return value


def _ctx(obj, path: Path, lineno: int, what: str) -> Passage:
    """A DPR ctx or a plain-JSONL passage (a string or an object with title/text/id)."""
    if isinstance(obj, str):
        if not obj.strip():
            raise DataError(path, lineno, f"{what}: empty text")
        return Passage(text=obj, id=content_id("", obj))
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"{what}: expected a string or an object, got {type(obj).__name__}")
    text = _text(obj, "text", path, lineno, what)
    title = _text(obj, "title", path, lineno, what, required=False)
    pid = next((obj[k] for k in ("passage_id", "psg_id", "id", "_id") if obj.get(k) not in (None, "")), None)
    return Passage(text=text, title=title, id=str(pid) if pid is not None else content_id(title, text))


def _ctx_list(obj: dict, key: str, path: Path, lineno: int) -> list[Passage]:
    value = obj.get(key) or []
    if not isinstance(value, list):
        raise DataError(path, lineno, f"field '{key}' must be a list, got {type(value).__name__}")
    return [_ctx(c, path, lineno, f"{key}[{i}]") for i, c in enumerate(value)]


def _answers(obj: dict, path: Path, lineno: int) -> list[str]:
    answers = obj.get("answers") or []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(path, lineno, "field 'answers' must be a list of strings")
    return answers


# ----------------------------------------------------------------------------- DPR and plain records


def _dpr_record(obj: dict, path: Path, lineno: int) -> TrainExample:
    question = _text(obj, "question", path, lineno, "question")
    positives = _ctx_list(obj, "positive_ctxs", path, lineno)
    if not positives:
        raise DataError(path, lineno, "field 'positive_ctxs' is missing or empty")
    return TrainExample(
        query=question,
        positive=positives[0],  # DPR trains on the first (best) positive
        hard_negatives=_ctx_list(obj, "hard_negative_ctxs", path, lineno),
        negatives=_ctx_list(obj, "negative_ctxs", path, lineno),
        answers=_answers(obj, path, lineno),
        known_positive_ids=frozenset(p.id for p in positives),
    )


def _plain_record(obj: dict, path: Path, lineno: int) -> TrainExample:
    query = _text(obj, "query", path, lineno, "query")
    if "positive" not in obj:
        raise DataError(path, lineno, "missing field 'positive'")
    positive = _ctx(obj["positive"], path, lineno, "positive")
    negatives = obj.get("negatives") or []
    if not isinstance(negatives, list):
        raise DataError(path, lineno, f"field 'negatives' must be a list, got {type(negatives).__name__}")
    hard = [_ctx(n, path, lineno, f"negatives[{i}]") for i, n in enumerate(negatives)]
    return TrainExample(
        query=query,
        positive=positive,
        hard_negatives=hard,
        answers=_answers(obj, path, lineno),
        known_positive_ids=frozenset([positive.id]),
    )


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".json":
        return iter_json_array(path)
    return iter_jsonl(path)


def _read_file_examples(path: Path) -> list[TrainExample]:
    examples = []
    kind = None
    for lineno, obj in _records(path):
        if kind is None:
            kind = "dpr" if "question" in obj else "plain" if "query" in obj else None
            if kind is None:
                raise DataError(path, lineno, "neither 'question' (DPR format) nor 'query' (plain JSONL) found")
        examples.append(_dpr_record(obj, path, lineno) if kind == "dpr" else _plain_record(obj, path, lineno))
    if not examples:
        raise DataError(path, None, "no examples in the file")
    return examples


def _corpus_from_examples(examples: list[TrainExample]) -> list[Passage]:
    seen: dict[str, Passage] = {}
    for ex in examples:
        for p in (ex.positive, *ex.hard_negatives, *ex.negatives):
            seen.setdefault(p.id, p)
    return list(seen.values())


# ----------------------------------------------------------------------------- BEIR


def read_beir_corpus(path: Path) -> list[Passage]:
    corpus, ids = [], set()
    for lineno, obj in iter_jsonl(path):
        if "_id" not in obj:
            raise DataError(path, lineno, "missing field '_id'")
        pid = str(obj["_id"])
        text = _text(obj, "text", path, lineno, f"passage {pid}", required=False)
        title = _text(obj, "title", path, lineno, f"passage {pid}", required=False)
        if not text.strip() and not title.strip():
            raise DataError(path, lineno, f"passage {pid}: both 'title' and 'text' are empty")
        if pid in ids:
            raise DataError(path, lineno, f"duplicate passage id {pid!r}")
        ids.add(pid)
        corpus.append(Passage(text=text, title=title, id=pid))
    if not corpus:
        raise DataError(path, None, "empty corpus")
    return corpus


def read_beir_queries(path: Path) -> dict[str, str]:
    queries = {}
    for lineno, obj in iter_jsonl(path):
        if "_id" not in obj:
            raise DataError(path, lineno, "missing field '_id'")
        # only the text: BEIR's 'metadata' can hold the relevant ids (SciFact) and must not leak
        queries[str(obj["_id"])] = _text(obj, "text", path, lineno, f"query {obj['_id']}")
    return queries


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query-id -> {corpus-id: score} from a BEIR qrels TSV (header optional)."""
    qrels: dict[str, dict[str, int]] = {}
    try:
        fh = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(path, None, f"cannot open ({e.strerror})") from None
    with fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(row) != 3:
                raise DataError(path, lineno, f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(row)}")
            qid, pid, score = (c.strip() for c in row)
            try:
                value = int(float(score))
            except ValueError:
                raise DataError(path, lineno, f"score {score!r} is not a number") from None
            qrels.setdefault(qid, {})[pid] = value
    return qrels


def _beir_parts(root: Path, split: str) -> tuple[list[Passage], dict[str, str], dict[str, dict[str, int]]]:
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (root / name).is_file():
            raise DataError(root / name, None, "missing (a BEIR directory holds corpus.jsonl, queries.jsonl, qrels/)")
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise DataError(qrels_path, None, f"missing: no '{split}' split (splits here: {', '.join(have) or 'none'})")
    corpus = read_beir_corpus(root / "corpus.jsonl")
    queries = read_beir_queries(root / "queries.jsonl")
    qrels = read_qrels(qrels_path)
    ids = {p.id for p in corpus}
    missing_q = [q for q in qrels if q not in queries]
    if missing_q:
        raise DataError(qrels_path, None, f"{len(missing_q)} query ids not in queries.jsonl (first: {missing_q[0]!r})")
    dropped = sum(1 for rel in qrels.values() for pid in rel if pid not in ids)
    if dropped:
        log.warning("%s: %d judgements name passages missing from corpus.jsonl; ignored", qrels_path, dropped)
        qrels = {q: {p: s for p, s in rel.items() if p in ids} for q, rel in qrels.items()}
    return corpus, queries, qrels


def _read_beir_train(root: Path, split: str) -> TrainData:
    corpus, queries, qrels = _beir_parts(root, split)
    by_id = {p.id: p for p in corpus}
    examples = []
    for qid, rel in qrels.items():
        positives = frozenset(pid for pid, s in rel.items() if s > 0)
        for pid in sorted(positives):  # one training pair per relevant passage
            examples.append(TrainExample(query=queries[qid], positive=by_id[pid], known_positive_ids=positives))
    if not examples:
        raise DataError(root / "qrels" / f"{split}.tsv", None, "no judgements with score > 0")
    return TrainData(examples, corpus, f"{root} ({split})")


# ----------------------------------------------------------------------------- entry points


def read_train_data(path: Path | str, split: str = "train") -> TrainData:
    """Training examples and a passage pool, from a DPR JSON/JSONL file, a plain JSONL file or a BEIR directory."""
    path = Path(path)
    if path.is_dir():
        return _read_beir_train(path, split)
    if not path.exists():
        raise DataError(path, None, "no such file or directory")
    examples = _read_file_examples(path)
    return TrainData(examples, _corpus_from_examples(examples), str(path))


def read_eval_data(path: Path | str, split: str = "dev") -> EvalData:
    """Queries, qrels, corpus and answers for exact-search evaluation, from the same formats."""
    path = Path(path)
    if path.is_dir():
        corpus, queries, qrels = _beir_parts(path, split)
        qrels = {q: rel for q, rel in qrels.items() if any(s > 0 for s in rel.values())}
        return EvalData({q: queries[q] for q in qrels}, qrels, corpus, {}, f"{path} ({split})")
    if not path.exists():
        raise DataError(path, None, "no such file or directory")
    examples = _read_file_examples(path)
    queries, qrels, answers = {}, {}, {}
    for i, ex in enumerate(examples):
        qid = str(i)
        queries[qid] = ex.query
        qrels[qid] = {pid: 1 for pid in ex.known_positive_ids}
        if ex.answers:
            answers[qid] = ex.answers
    return EvalData(queries, qrels, _corpus_from_examples(examples), answers, str(path))


# ----------------------------------------------------------------------------- corpora for indexing


def read_dpr_tsv(path: Path) -> list[Passage]:
    """DPR's passage file (``psgs_w100.tsv``): ``id <TAB> text <TAB> title`` with a header line."""
    corpus, ids = [], set()
    try:
        fh = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(path, None, f"cannot open ({e.strerror})") from None
    with fh:
        lineno = 0
        try:
            for lineno, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
                if not row:
                    continue
                if lineno == 1 and row[0].strip().lower() == "id":
                    continue
                if len(row) not in (2, 3):
                    raise DataError(path, lineno, f"expected 'id<TAB>text<TAB>title', got {len(row)} columns")
                pid, text, title = row[0].strip(), row[1], row[2] if len(row) == 3 else ""
                if not pid:
                    raise DataError(path, lineno, "empty passage id")
                if not text.strip():
                    raise DataError(path, lineno, f"passage {pid}: empty text")
                if pid in ids:
                    raise DataError(path, lineno, f"duplicate passage id {pid!r}")
                ids.add(pid)
                corpus.append(Passage(text=text, title=title, id=pid))
        except UnicodeDecodeError:
            raise DataError(path, lineno + 1, "not UTF-8 text") from None
        except csv.Error as e:
            raise DataError(path, lineno, f"bad TSV ({e})") from None
    if not corpus:
        raise DataError(path, None, "empty corpus")
    return corpus


def read_corpus(path: Path | str) -> list[Passage]:
    """Passages to index: a BEIR directory (its corpus.jsonl), a corpus.jsonl, or DPR's psgs .tsv."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.exists():
        raise DataError(path, None, "no such file or directory")
    if path.suffix in (".tsv", ".csv"):
        return read_dpr_tsv(path)
    return read_beir_corpus(path)
