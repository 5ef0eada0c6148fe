"""Readers for the data formats every stage accepts. Pure Python: no torch, no web stack.

* DPR JSON (a list) or JSONL: ``question``, ``answers``, ``positive_ctxs``, ``negative_ctxs``,
  ``hard_negative_ctxs``; each ctx has ``title``, ``text`` and ``passage_id``.
* BEIR directories: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
  (``_id``, ``text``), ``qrels/<split>.tsv`` (query-id, corpus-id, score; score > 0 is relevant).
* Plain JSONL: ``{"query": ..., "positive": ..., "negatives": [...]}``; a passage there is a
  string or ``{"title", "text", "id"}``.
* DPR's passage TSV (``id``, ``text``, ``title``), for indexing.
* Judged queries for ``dpr eval``/``bm25``/``mine`` (:func:`read_judged`): a BEIR directory or
  queries.jsonl with a qrels TSV, DPR JSONL with ``answers``, or DPR's qas TSV/CSV
  (``question <TAB> ['answer', ...]``).

In DPR and plain files, lines that repeat a query text (triplet files list a query once per
positive) stay one training example each, but every one of them knows all of that query's
positives, and evaluation sees one query with all of them relevant.

Every problem raises :class:`DataError`, whose message names the file, the line and what is wrong:
bytes that are not UTF-8, strings that are not valid Unicode (JSON's ``\\u`` escapes can spell
lone surrogates), bad JSON or TSV, and fields of the wrong kind.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import itertools
import json
import logging
import math
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
    """One training example: a question, its positive, its hard negatives and DPR negatives, answers, and every passage id known to answer it."""
    query: str
    positive: Passage
    hard_negatives: list[Passage] = field(default_factory=list)
    negatives: list[Passage] = field(default_factory=list)  # DPR's negative_ctxs (e.g. BM25 random)
    answers: list[str] = field(default_factory=list)
    known_positive_ids: frozenset[str] = frozenset()  # every passage known to answer this query


@dataclass
class TrainData:
    """The training examples, the passage pool that mining and random negatives draw from, and where they came from."""
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


def is_passage(title: str, text: str) -> bool:
    """The one rule for what a passage is, in every reader here and every endpoint (the API's
    ``PassageIn``): a title, a text or both, not both blank (Python's whitespace, ``str.strip``).
    A title-only passage is encoded as ``[CLS] title [SEP] [SEP]`` like any titled one."""
    return bool(title.strip() or text.strip())


EMPTY_PASSAGE = "both 'title' and 'text' are empty"  # what a reader says when is_passage is False


def content_id(title: str, text: str) -> str:
    """An id for a passage without one: a sha1 prefix of its title and text, so the same text gets the same id everywhere."""
    return "sha1:" + hashlib.sha1(f"{title}\x1f{text}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- low-level readers


def iter_lines(path: Path, newline: str | None = None) -> Iterator[tuple[int, str]]:
    """Yield (line number, line) of a UTF-8 text file, a leading byte-order mark dropped.

    Bytes that are not UTF-8 are reported on their own line: they are decoded as lone surrogates
    (``surrogateescape``) and each line is checked, where a strict text-mode file decodes 8 KiB at
    a time and fails on whichever earlier line it happens to be reading. ``newline`` as ``open``'s
    (``""`` for csv)."""
    try:
        fh = open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)
    except OSError as e:
        raise DataError(path, None, f"cannot open ({e.strerror})") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                byte = ord(line[e.start]) - 0xDC00
                raise DataError(path, lineno, f"not UTF-8 text (byte 0x{byte:02x} at column {e.start + 1})") from None
            yield lineno, line


def iter_tsv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) for each row of a tab-separated UTF-8 file (csv's quoting, as
    DPR and BEIR write them); rows whose fields are all blank are skipped. The line number is the
    row's first line (a quoted field may span lines)."""
    reader = csv.reader((line for _, line in iter_lines(path, newline="")), delimiter="\t")
    while True:
        lineno = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a field over csv.field_size_limit()
            raise DataError(path, lineno, f"bad TSV ({e})") from None
        if any(f.strip() for f in row):
            yield lineno, row


def json_error_place(text: str, pos: int) -> tuple[int, int, bool]:
    """Where a JSON parse error at character ``pos`` of ``text`` is to be shown: (line, column, both
    1-based; whether it is the end of a line). The parser reads past blanks before it fails, so an
    error found at the end of the text, or on a later line after nothing but blanks, is placed just
    past the last character before those blanks: at the end of the line that lacks its ``}`` (or
    ``]``, ``,``), not at column 1 of the next line. Any other error stays where the parser failed."""
    last = len(text[:pos].rstrip())  # just past the last non-blank character before pos
    at_end = pos >= len(text) or "\n" in text[last:pos]
    place = last if at_end else pos
    return text.count("\n", 0, place) + 1, place - text.rfind("\n", 0, place), at_end


def json_error_message(e: json.JSONDecodeError) -> tuple[int, str]:
    """(line of ``e.doc``, 1-based, and the message) for a parse error: ``bad JSON: <what> (column
    N)``, placed by :func:`json_error_place`; at the end of a line, the message says so, and for a
    missing ``,`` there it asks whether a closing ``}`` or ``]`` is missing."""
    line, column, at_end = json_error_place(e.doc, e.pos)
    if not at_end:
        return line, f"bad JSON: {e.msg} (column {column})"
    hint = ": is a closing '}' or ']' missing?" if e.msg.startswith("Expecting ',' delimiter") else ""
    return line, f"bad JSON: {e.msg} (column {column}, the end of the line{hint})"


def _json_error(path: Path, lineno: int, e: Exception) -> DataError:
    if isinstance(e, json.JSONDecodeError):
        line, message = json_error_message(e)
        return DataError(path, lineno + line - 1, message)
    if isinstance(e, RecursionError):
        return DataError(path, lineno, "bad JSON: nested too deeply")
    return DataError(path, lineno, f"bad JSON: {e}")  # ValueError: an integer over 4300 digits


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise _json_error(path, lineno, e) from None
        if not isinstance(obj, dict):
            raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def iter_json_array(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number where the element starts, object) for a JSON file holding a list."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(path, None, f"cannot open ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, data.count(b"\n", 0, e.start) + 1, f"not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    del data
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
            raise _json_error(path, 1, e) from None  # e.doc is the whole file: its line is the file's
        except (ValueError, RecursionError) as e:
            raise _json_error(path, start, e) from None
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


def _unicode(value: str, path: Path, lineno: int, what: str) -> str:
    """``value`` if it is valid Unicode. JSON's ``\\u`` escapes can spell lone surrogates, which
    ``json`` accepts and no UTF-8 encoder does: content hashes, tokenizers and the passage store
    would fail on them far from the line at fault. Every string field passes through here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(path, lineno, f"{what} is not valid Unicode (lone surrogate {value[e.start]!r} "
                                      f"at character {e.start + 1})") from None
    return value


def field_text(obj: dict, key: str, path: Path, lineno: int, what: str, required: bool = True) -> str:
    """``obj[key]`` as a string of valid Unicode; missing, null or blank is an error when ``required``."""
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(path, lineno, f"{what}: missing field '{key}'")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(path, lineno, f"{what}: field '{key}' must be a string, got {type(value).__name__}")
    _unicode(value, path, lineno, f"{what}: field '{key}'")
    if required and not value.strip():
        raise DataError(path, lineno, f"{what}: field '{key}' is empty")
    return value


def field_id(value, path: Path, lineno: int, what: str) -> str:
    """A passage or query id as a string (JSON numbers allowed; null, empty or an object is an error)."""
    if value is None or isinstance(value, (bool, list, dict)) or not str(value).strip():
        raise DataError(path, lineno, f"{what}: expected a non-empty string or number, got {json.dumps(value)}")
    return _unicode(str(value), path, lineno, what)


def _ctx(obj, path: Path, lineno: int, what: str) -> Passage:
    """A DPR ctx or a plain-JSONL passage (a string or an object with title/text/id)."""
    if isinstance(obj, str):
        _unicode(obj, path, lineno, f"{what}: text")
        if not obj.strip():
            raise DataError(path, lineno, f"{what}: empty text")
        return Passage(text=obj, id=content_id("", obj))
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"{what}: expected a string or an object, got {type(obj).__name__}")
    if obj.get("text") is None:
        raise DataError(path, lineno, f"{what}: missing field 'text'")
    text = field_text(obj, "text", path, lineno, what, required=False)  # may be empty when the title is not
    title = field_text(obj, "title", path, lineno, what, required=False)
    if not is_passage(title, text):
        raise DataError(path, lineno, f"{what}: {EMPTY_PASSAGE}")
    key = next((k for k in ("passage_id", "psg_id", "id", "_id") if obj.get(k) not in (None, "")), None)
    pid = field_id(obj[key], path, lineno, f"{what}: field '{key}'") if key else content_id(title, text)
    return Passage(text=text, title=title, id=pid)


def _ctx_list(obj: dict, key: str, path: Path, lineno: int) -> list[Passage]:
    value = obj.get(key) or []
    if not isinstance(value, list):
        raise DataError(path, lineno, f"field '{key}' must be a list, got {type(value).__name__}")
    return [_ctx(c, path, lineno, f"{key}[{i}]") for i, c in enumerate(value)]


def field_answers(obj: dict, path: Path, lineno: int) -> list[str]:
    """DPR's ``answers``: a list of strings (absent or null: none)."""
    answers = obj.get("answers")
    if answers is None:
        return []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(path, lineno, "field 'answers' must be a list of strings")
    for i, a in enumerate(answers):
        _unicode(a, path, lineno, f"answers[{i}]")
    return answers


# ----------------------------------------------------------------------------- DPR and plain records


def _dpr_record(obj: dict, path: Path, lineno: int) -> tuple[TrainExample, list[Passage]]:
    """The example and every passage the record names (its other positives belong in the corpus:
    evaluation counts them as relevant)."""
    question = field_text(obj, "question", path, lineno, "question")
    positives = _ctx_list(obj, "positive_ctxs", path, lineno)
    if not positives:
        raise DataError(path, lineno, "field 'positive_ctxs' is missing or empty")
    ex = TrainExample(
        query=question,
        positive=positives[0],  # DPR trains on the first (best) positive
        hard_negatives=_ctx_list(obj, "hard_negative_ctxs", path, lineno),
        negatives=_ctx_list(obj, "negative_ctxs", path, lineno),
        answers=field_answers(obj, path, lineno),
        known_positive_ids=frozenset(p.id for p in positives),
    )
    return ex, [ex.positive, *ex.hard_negatives, *ex.negatives, *positives[1:]]


def _plain_record(obj: dict, path: Path, lineno: int) -> tuple[TrainExample, list[Passage]]:
    query = field_text(obj, "query", path, lineno, "query")
    if "positive" not in obj:
        raise DataError(path, lineno, "missing field 'positive'")
    positive = _ctx(obj["positive"], path, lineno, "positive")
    negatives = obj.get("negatives") or []
    if not isinstance(negatives, list):
        raise DataError(path, lineno, f"field 'negatives' must be a list, got {type(negatives).__name__}")
    hard = [_ctx(n, path, lineno, f"negatives[{i}]") for i, n in enumerate(negatives)]
    ex = TrainExample(
        query=query,
        positive=positive,
        hard_negatives=hard,
        answers=field_answers(obj, path, lineno),
        known_positive_ids=frozenset([positive.id]),
    )
    return ex, [positive, *hard]


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".json":
        return iter_json_array(path)
    return iter_jsonl(path)


def _read_file(path: Path) -> tuple[list[TrainExample], list[Passage]]:
    """The examples of a DPR or plain file, one per line, and every passage they name (first
    occurrence of each id, in file order)."""
    examples: list[TrainExample] = []
    corpus: dict[str, Passage] = {}
    kind = None
    for lineno, obj in _records(path):
        if kind is None:
            kind = "dpr" if "question" in obj else "plain" if "query" in obj else None
            if kind is None:
                raise DataError(path, lineno, "neither 'question' (DPR format) nor 'query' (plain JSONL) found")
        ex, passages = _dpr_record(obj, path, lineno) if kind == "dpr" else _plain_record(obj, path, lineno)
        examples.append(ex)
        for p in passages:
            corpus.setdefault(p.id, p)
    if not examples:
        raise DataError(path, None, "no examples in the file")
    share_known_positives(examples)
    return examples, list(corpus.values())


def share_known_positives(examples: list[TrainExample]) -> None:
    """Lines with the same query text are one query: triplet files repeat a query once per
    positive. Each line stays a training example with its own positive, but knows all of the
    query's positives, so the loss masks the other lines' positives instead of pushing them away.

    Changes ``known_positive_ids`` of ``examples`` in place. The readers apply it to every file and
    ``POST /score`` to the items of a request, so a batch masks the same passages in both."""
    known: dict[str, set[str]] = {}
    for ex in examples:
        known.setdefault(ex.query, set()).update(ex.known_positive_ids)
    frozen = {q: frozenset(ids) for q, ids in known.items()}
    for ex in examples:
        ex.known_positive_ids = frozen[ex.query]


# ----------------------------------------------------------------------------- BEIR


def read_beir_corpus(path: Path) -> list[Passage]:
    """A BEIR ``corpus.jsonl``: ``_id``, ``title``, ``text`` per line (one of title and text non-empty)."""
    return _unique_passages(path, _beir_passages(path))


def _beir_passages(path: Path) -> Iterator[tuple[int, Passage]]:
    for lineno, obj in iter_jsonl(path):
        if "_id" not in obj:
            raise DataError(path, lineno, "missing field '_id'")
        pid = field_id(obj["_id"], path, lineno, "field '_id'")
        text = field_text(obj, "text", path, lineno, f"passage {pid}", required=False)
        title = field_text(obj, "title", path, lineno, f"passage {pid}", required=False)
        if not is_passage(title, text):
            raise DataError(path, lineno, f"passage {pid}: {EMPTY_PASSAGE}")
        yield lineno, Passage(text=text, title=title, id=pid)


def _unique_passages(path: Path, rows: Iterator[tuple[int, Passage]]) -> list[Passage]:
    """The passages in file order; an id given twice, or no passage at all, is a DataError."""
    corpus, ids = [], set()
    for lineno, p in rows:
        if p.id in ids:
            raise DataError(path, lineno, f"duplicate passage id {p.id!r}")
        ids.add(p.id)
        corpus.append(p)
    if not corpus:
        raise DataError(path, None, "empty corpus")
    return corpus


def read_beir_queries(path: Path) -> dict[str, str]:
    """BEIR ``queries.jsonl``: {query id: text} (``metadata`` is ignored: it can leak judgements). Raises DataError naming file and line."""
    queries = {}
    for lineno, obj in iter_jsonl(path):
        if "_id" not in obj:
            raise DataError(path, lineno, "missing field '_id'")
        qid = field_id(obj["_id"], path, lineno, "field '_id'")
        # only the text: BEIR's 'metadata' can hold the relevant ids (SciFact) and must not leak
        queries[qid] = field_text(obj, "text", path, lineno, f"query {qid}")
    return queries


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query-id -> {corpus-id: score} from a BEIR qrels TSV (header optional)."""
    qrels: dict[str, dict[str, int]] = {}
    for lineno, row in iter_tsv(path):
        if lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(row) != 3:
            raise DataError(path, lineno, f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(row)}")
        qid, pid, score = (c.strip() for c in row)
        try:
            value = float(score)
        except ValueError:
            raise DataError(path, lineno, f"score {score[:60]!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(path, lineno, f"score {score[:60]!r} is not a finite number")
        qrels.setdefault(qid, {})[pid] = int(value)
    return qrels


def split_qrels_path(root: Path, split: str) -> Path:
    """``root/qrels/<split>.tsv``; a :class:`DataError` listing the splits present when it is missing."""
    path = root / "qrels" / f"{split}.tsv"
    if not path.is_file():
        have = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise DataError(path, None, f"missing: no '{split}' split (splits here: {', '.join(have) or 'none'})")
    return path


def check_beir_dir(root: Path) -> None:
    """A :class:`DataError` naming the first of corpus.jsonl and queries.jsonl that ``root`` lacks."""
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (root / name).is_file():
            raise DataError(root / name, None, "missing (a BEIR directory holds corpus.jsonl, queries.jsonl, qrels/)")


def _beir_parts(root: Path, split: str) -> tuple[list[Passage], dict[str, str], dict[str, dict[str, int]]]:
    check_beir_dir(root)
    qrels_path = split_qrels_path(root, split)
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


# ----------------------------------------------------------------------------- judged queries


def read_queries(path: str | Path, split: str = "test", need_split: bool = True
                 ) -> tuple[dict[str, str], dict[str, list[str]], dict | None]:
    """(queries, answers, qrels or None) from a BEIR directory (its ``qrels/<split>.tsv`` unless
    ``need_split`` is false), a BEIR queries.jsonl, DPR JSONL (``question``, ``answers``, optional
    ``id``) or DPR's qas TSV/CSV (``question <TAB> ['answer', ...]``). Every bad line is a
    :class:`DataError` naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        check_beir_dir(path)
        qrels = read_qrels(split_qrels_path(path, split)) if need_split else None
        return read_beir_queries(path / "queries.jsonl"), {}, qrels
    if not path.exists():
        raise DataError(path, None, "no such file or directory")
    if path.suffix in (".tsv", ".csv"):
        return (*read_dpr_qas(path), None)
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


def read_dpr_qas(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """DPR's qas file (``nq-test.qa.csv``): ``question <TAB> ['answer', ...]`` (a Python list
    literal, read with ``ast.literal_eval``, never ``eval``) per line -> (queries, answers), both
    keyed by line number."""
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


# ----------------------------------------------------------------------------- entry points


def read_train_data(path: Path | str, split: str = "train") -> TrainData:
    """Training examples and a passage pool, from a DPR JSON/JSONL file, a plain JSONL file or a BEIR directory."""
    path = Path(path)
    if path.is_dir():
        return _read_beir_train(path, split)
    if not path.exists():
        raise DataError(path, None, "no such file or directory")
    examples, corpus = _read_file(path)
    return TrainData(examples, corpus, str(path))


def read_eval_data(path: Path | str, split: str = "dev") -> EvalData:
    """Queries, qrels, corpus and answers for the trainer's exact-search evaluation, from the same
    formats. A BEIR split is read as ``dpr eval`` reads it (:func:`read_judged`): every judged
    query and every judgement, also of passages missing from the corpus (the metrics decide, see
    :mod:`dpr_service.core.metrics`)."""
    path = Path(path)
    if path.is_dir():  # the queries and judgements of dpr eval (read_judged), so both score the same
        queries, _, qrels = read_judged(path, None, split)
        corpus = read_beir_corpus(path / "corpus.jsonl")
        ids = {p.id for p in corpus}
        absent = sum(1 for rel in qrels.values() for pid, s in rel.items() if s > 0 and pid not in ids)
        if absent:
            log.warning("%s: %d relevant judgements name passages missing from corpus.jsonl; they count as never "
                        "retrieved (as trec_eval)", split_qrels_path(path, split), absent)
        return EvalData(queries, qrels, corpus, {}, f"{path} ({split})")
    if not path.exists():
        raise DataError(path, None, "no such file or directory")
    examples, corpus = _read_file(path)
    # one query per distinct text, numbered "0", "1", ... in order of first appearance; its
    # relevant passages are the union over its lines (already in known_positive_ids), sorted
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    answers: dict[str, list[str]] = {}
    qid_of: dict[str, str] = {}
    for ex in examples:
        qid = qid_of.get(ex.query)
        if qid is None:
            qid = qid_of[ex.query] = str(len(qid_of))
            queries[qid] = ex.query
            qrels[qid] = {pid: 1 for pid in sorted(ex.known_positive_ids)}
        merged = answers.setdefault(qid, [])
        merged.extend(a for a in ex.answers if a not in merged)
    answers = {q: a for q, a in answers.items() if a}
    return EvalData(queries, qrels, corpus, answers, str(path))


# ----------------------------------------------------------------------------- corpora for indexing


def read_dpr_tsv(path: Path) -> list[Passage]:
    """DPR's passage file (``psgs_w100.tsv``): ``id <TAB> text <TAB> title`` with a header line."""
    return _unique_passages(path, _dpr_tsv_passages(path))


def _dpr_tsv_passages(path: Path) -> Iterator[tuple[int, Passage]]:
    # strictly decoded UTF-8 holds no lone surrogates: iter_lines is this format's Unicode check
    for lineno, row in iter_tsv(path):
        if lineno == 1 and row[0].strip().lower() == "id":
            continue
        if len(row) not in (2, 3):
            raise DataError(path, lineno, f"expected 'id<TAB>text<TAB>title', got {len(row)} columns")
        pid, text, title = row[0].strip(), row[1], row[2] if len(row) == 3 else ""
        if not pid:
            raise DataError(path, lineno, "empty passage id")
        if not is_passage(title, text):
            raise DataError(path, lineno, f"passage {pid}: {EMPTY_PASSAGE}")
        yield lineno, Passage(text=text, title=title, id=pid)


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


# ----------------------------------------------------------------------------- a training run's own files


def metrics_lines(path: Path, start: int = 0) -> tuple[list[dict], int]:
    """The complete JSON lines of a run's ``metrics.jsonl`` from byte ``start`` on, and the offset
    after the last one read. A line still being written (no newline yet) is left for the next call;
    a line cut by a crash is skipped (the trainer truncates it when the run resumes). A missing
    file gives ``([], start)``. Every reader of ``metrics.jsonl`` goes through here."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
    except FileNotFoundError:
        return [], start
    end = data.rfind(b"\n") + 1
    lines = []
    for raw in data[:end].splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            lines.append(record)
    return lines, start + end


def read_eval(checkpoint: Path) -> dict | None:
    """The dev figures of ``checkpoint/eval.json`` (the trainer writes it into ``best/``), or None
    when there is none or it cannot be read (a damaged file is no figures, not an error)."""
    try:
        figures = json.loads((Path(checkpoint) / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    return figures if isinstance(figures, dict) else None
