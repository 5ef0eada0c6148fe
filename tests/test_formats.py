"""Each accepted data format, and each kind of bad input named by file and line."""

import json
import subprocess
import sys

import pytest
from conftest import write_beir, write_dpr, write_plain

from dpr_service.core.formats import (
    DataError, content_id, read_corpus, read_eval_data, read_judged, read_train_data,
)
from dpr_service.core.metrics import retrieval_metrics


def test_plain_jsonl(tmp_path):
    data = read_train_data(write_plain(tmp_path / "t.jsonl", n=5, hard_negatives=2))
    assert len(data.examples) == 5
    ex = data.examples[0]
    assert ex.query.startswith("what is the") and len(ex.hard_negatives) == 2
    assert ex.positive.id == "p0" and ex.positive.title
    assert len(data.corpus) == 15  # positives and negatives, deduplicated by id


def test_plain_jsonl_string_passages_get_content_ids(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"query": "q", "positive": "some text", "negatives": ["other", "some text"]}) + "\n")
    ex = read_train_data(path).examples[0]
    assert ex.positive.id == content_id("", "some text")
    assert ex.hard_negatives[1].id == ex.positive.id  # same text, same id: the loss masks it


def test_dpr_json_and_jsonl(tmp_path):
    path = write_dpr(tmp_path / "d.json", n=6)
    data = read_train_data(path)
    assert len(data.examples) == 6
    assert data.examples[2].answers and data.examples[2].hard_negatives[0].id.startswith("n2-")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in json.loads(path.read_text())))
    assert [e.query for e in read_train_data(jsonl).examples] == [e.query for e in data.examples]
    ev = read_eval_data(path)
    assert len(ev.queries) == 6 and ev.answers["0"] and ev.qrels["0"] == {"p0": 1}


def test_beir_training_pairs_and_eval(tmp_path):
    root = write_beir(tmp_path / "beir", n=10)
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq0\td1\t2\nq1\td2\t0\n")
    data = read_train_data(root, "train")
    # one example per relevant pair (score > 0); each knows all of its query's positives
    assert [(e.query, e.positive.id) for e in data.examples] == [(data.examples[0].query, "d0"), (data.examples[0].query, "d1")]
    assert data.examples[0].known_positive_ids == {"d0", "d1"}
    assert len(data.corpus) == 10
    ev = read_eval_data(root, "dev")
    assert set(ev.queries) == {f"q{i}" for i in range(10) if i % 2 == 1}
    assert all("leak" not in q for q in ev.queries.values())  # BEIR metadata is never read


def test_beir_missing_split_names_the_splits(tmp_path):
    root = write_beir(tmp_path / "beir", n=4)
    with pytest.raises(DataError, match=r"qrels/test.tsv: missing: no 'test' split \(splits here: dev, train\)"):
        read_train_data(root, "test")
    for read in (read_eval_data, read_judged):  # dpr eval/bm25/mine and the trainer's --dev say the same
        with pytest.raises(DataError, match=r"qrels/test.tsv: missing: no 'test' split \(splits here: dev, train\)"):
            read(root, split="test")


def test_trainer_and_dpr_eval_read_a_beir_split_alike(tmp_path):
    """Every judged query and every judgement, also of passages absent from the corpus (trec_eval
    counts them in the ideal ranking and in recall) and of queries with nothing relevant (BEIR
    averages those in as 0): the metrics' conventions decide, not the reader."""
    root = write_beir(tmp_path / "beir", n=6)
    with open(root / "qrels" / "dev.tsv", "a") as fh:
        fh.write("q1\tgone\t2\nq0\td0\t0\n")
    ev = read_eval_data(root, "dev")
    queries, answers, qrels = read_judged(root, split="dev")
    assert ev.qrels == qrels and ev.queries == queries and answers == {}
    assert qrels["q1"] == {"d1": 1, "gone": 2} and qrels["q0"] == {"d0": 0}


@pytest.mark.parametrize(
    "lines, line, message",
    [
        (['{"query": "q", "positive": "p"}', '{"query": "q2", "positive": "p"'], 2, "bad JSON"),
        (['{"query": "q", "positive": "p"}', '{"query": "q2"}'], 2, "missing field 'positive'"),
        (['{"query": "q", "positive": "p"}', '', '{"query": "  ", "positive": "p"}'], 3, "field 'query' is empty"),
        (['{"query": "q", "positive": {"title": " ", "text": ""}}'], 1, "positive: both 'title' and 'text' are empty"),
        (['{"query": "q", "positive": {"title": "t"}}'], 1, "positive: missing field 'text'"),
        (['{"query": "q", "positive": "p", "negatives": [""]}'], 1, r"negatives\[0\]: empty text"),
        (['{"query": "q", "positive": "p", "negatives": "x"}'], 1, "'negatives' must be a list"),
        (['[1, 2]'], 1, "expected a JSON object"),
        (['{"text": "q"}'], 1, "neither 'question'"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, lines, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as err:
        read_train_data(path)
    assert err.value.line == line and err.value.path == str(path)
    assert str(err.value).startswith(f"{path}:{line}: ")


def test_bad_dpr_json_element_line(tmp_path):
    records = [
        {"question": "q1", "positive_ctxs": [{"title": "t", "text": "x"}]},
        {"question": "q2", "positive_ctxs": []},
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records, indent=2))
    with pytest.raises(DataError, match="'positive_ctxs' is missing or empty") as err:
        read_train_data(path)
    second = path.read_text().splitlines().index("  {", 2) + 1  # where the second element starts
    assert err.value.line == second


MISSING_BRACE = '{"query": "q2", "positive": "p"'  # 31 characters: the parser fails past its end


@pytest.mark.parametrize("ending, last_newline", [("\n", True), ("\r\n", True), ("\n", False)])
def test_a_missing_brace_is_placed_at_the_end_of_its_line(tmp_path, ending, last_newline):
    """Issue 31.10: the parser fails on the newline (or the end of the file) after the line that
    lacks its '}', which was reported as column 1 (of the next line); the error names the line and
    the column past its last character, whatever the line ending."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes((ending.join(['{"query": "q", "positive": "p"}', MISSING_BRACE]) + (ending if last_newline else "")).encode())
    with pytest.raises(DataError) as err:
        read_train_data(path)
    assert err.value.line == 2
    assert "column 32" in str(err.value) and "end of the line" in str(err.value) and "'}'" in str(err.value), str(err.value)
    corpus = tmp_path / "beir"  # every JSONL reader shares the rule: a BEIR corpus too
    corpus.mkdir()
    cut = '{"_id": "d1", "text": "b"'
    (corpus / "corpus.jsonl").write_text('{"_id": "d0", "text": "a"}\n' + cut + "\n")
    with pytest.raises(DataError, match=rf"corpus.jsonl:2: bad JSON: .*column {len(cut) + 1}, the end of the line"):
        read_corpus(corpus / "corpus.jsonl")


def test_a_json_error_inside_a_line_keeps_its_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q" "positive": "p"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: bad JSON: Expecting ',' delimiter \(column 15\)$"):
        read_train_data(path)


def test_a_missing_brace_in_a_dpr_json_list_names_its_line(tmp_path):
    """In a DPR JSON list the parser fails on the next element (line 4, column 3); the error names
    line 3, the one lacking its '}', and the column past its end."""
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"question": "q1", "positive_ctxs": [{"text": "x"}]},\n'
                    '  {"question": "q2", "positive_ctxs": [{"text": "y"}]\n'
                    '  {"question": "q3", "positive_ctxs": [{"text": "z"}]}\n]\n')
    width = len('  {"question": "q2", "positive_ctxs": [{"text": "y"}]')
    with pytest.raises(DataError) as err:
        read_train_data(path)
    assert err.value.line == 3 and f"column {width + 1}" in str(err.value) and "end of the line" in str(err.value), str(err.value)


def test_truncated_dpr_json(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[\n  {"question": "q1", "positive_ctxs": [{"text": "x"}]},\n  {"question": "q2", "posi')
    with pytest.raises(DataError, match="bad JSON") as err:
        read_train_data(path)
    assert err.value.line == 3


def test_bad_qrels_row(tmp_path):
    root = write_beir(tmp_path / "beir", n=4)
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\n")
    with pytest.raises(DataError, match=r"train.tsv:2: expected 3 tab-separated columns"):
        read_train_data(root)


def test_non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"query": "q", "positive": "p"}\n{"query": "caf\xe9", "positive": "p"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_train_data(path)


def test_cli_reports_bad_data_without_traceback(tmp_path, tiny_model):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "positive": "p"}\n{"query": "q2", "positive": ""}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "dpr_service.cli", "train", "--model", str(tiny_model), "--train", str(path),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert f"{path}:2: positive: empty text" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- TSV: one line reader for qrels and passages


@pytest.mark.parametrize(
    "rows, line, message",
    [
        (b"q0\td0\t1\nq1\td1\tinf\n", 3, r"score 'inf' is not a finite number"),
        (b"q0\td0\tnan\n", 2, r"score 'nan' is not a finite number"),
        (b"q0\td0\t1e400\n", 2, r"score '1e400' is not a finite number"),
        (b"q0\td0\t1\nq\xe9\td1\t1\n", 3, r"not UTF-8 text \(byte 0xe9 at column 2\)"),
        (b"q0\td0\t1\nq1\t" + b"x" * 200_000 + b"\t1\n", 3, r"bad TSV \(field larger than field limit"),
    ],
    ids=["inf", "nan", "overflow", "latin-1", "huge-field"],
)
def test_bad_qrels_values_name_file_and_line(tmp_path, rows, line, message):
    root = write_beir(tmp_path / "beir", n=4)
    qrels = root / "qrels" / "train.tsv"
    qrels.write_bytes(b"query-id\tcorpus-id\tscore\n" + rows)
    with pytest.raises(DataError, match=message) as err:
        read_train_data(root)
    assert (err.value.path, err.value.line) == (str(qrels), line)


def test_qrels_with_byte_order_mark_and_crlf(tmp_path):
    root = write_beir(tmp_path / "beir", n=4)
    (root / "qrels" / "train.tsv").write_bytes(b"\xef\xbb\xbfquery-id\tcorpus-id\tscore\r\nq0\td0\t1\r\n\r\nq1\td1\t2\r\n")
    data = read_train_data(root)
    assert [e.positive.id for e in data.examples] == ["d0", "d1"]


@pytest.mark.parametrize(
    "rows, line, message",
    [
        # a bad byte far past the first 8 KiB block is still reported on its own line
        (b"".join(b"p%d\tsome text\tt\n" % i for i in range(1, 2000)) + b"p0\tcaf\xe9\tt\n", 2001, "not UTF-8 text"),
        (b"p1\tcaf\xed\xb3\xa9\tt\n", 2, r"not UTF-8 text \(byte 0xed"),  # an encoded lone surrogate
        (b"p1\t" + b"x" * 200_000 + b"\tt\n", 2, "bad TSV"),
        (b'p1\t"quoted\ntext"\tt\np1\tagain\tt\n', 4, "duplicate passage id 'p1'"),  # a row's first line
    ],
    ids=["latin-1-after-8KiB", "encoded-surrogate", "huge-field", "multi-line-row"],
)
def test_bad_dpr_tsv_names_file_and_line(tmp_path, rows, line, message):
    path = tmp_path / "psgs.tsv"
    path.write_bytes(b"id\ttext\ttitle\n" + rows)
    with pytest.raises(DataError, match=message) as err:
        read_corpus(path)
    assert (err.value.path, err.value.line) == (str(path), line)


def test_non_utf8_is_reported_on_its_own_line(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [json.dumps({"query": f"q{i}", "positive": f"p{i}"}).encode() for i in range(600)]
    lines[499] = b'{"query": "caf\xe9", "positive": "p"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xe9 at column 15\)") as err:
        read_train_data(path)
    assert err.value.line == 500
    dpr = tmp_path / "d.json"
    dpr.write_bytes(b'[\n{"question": "q", "positive_ctxs": [{"text": "x"}]},\n{"question": "caf\xe9"}\n]')
    with pytest.raises(DataError, match="not UTF-8 text") as err:
        read_train_data(dpr)
    assert err.value.line == 3


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"query": "q", "positive": "p", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "bad JSON: nested too deeply"),
        ('{"query": "q", "positive": "p", "x": ' + "1" * 5000 + "}", "bad JSON: Exceeds the limit"),
    ],
    ids=["deep-nesting", "huge-int"],
)
def test_json_that_python_refuses_is_a_data_error(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"query": "q", "positive": "p"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as err:
        read_train_data(path)
    assert err.value.line == 2
    path = tmp_path / "t.json"
    path.write_text('[\n{"question": "q", "positive_ctxs": ["p"]},\n' + line.replace('"query"', '"question"') + "\n]")
    with pytest.raises(DataError, match=message) as err:
        read_train_data(path)
    assert err.value.line == 3


# ----------------------------------------------------------------------------- lone surrogates (valid JSON, not Unicode)

BAD = "caf\udce9"  # json.dumps writes it as the escape "caf\\udce9", which json.loads accepts


def _plain(**fields) -> dict:
    return {"query": "q", "positive": "p", **fields}


def _dpr(**fields) -> dict:
    return {"question": "q", "answers": ["a"], "positive_ctxs": [{"title": "t", "text": "x", "passage_id": "p1"}], **fields}


PLAIN_SURROGATES = [
    (_plain(query=BAD), "query: field 'query'"),
    (_plain(positive=BAD), "positive: text"),
    (_plain(positive={"title": BAD, "text": "x"}), "positive: field 'title'"),
    (_plain(positive={"text": BAD}), "positive: field 'text'"),
    (_plain(positive={"text": "x", "id": BAD}), "positive: field 'id'"),
    (_plain(negatives=["n", BAD]), r"negatives\[1\]: text"),
    (_plain(answers=[BAD]), r"answers\[0\]"),
]
DPR_SURROGATES = [
    (_dpr(question=BAD), "question: field 'question'"),
    (_dpr(positive_ctxs=[{"title": "t", "text": BAD}]), r"positive_ctxs\[0\]: field 'text'"),
    (_dpr(positive_ctxs=[{"text": "x", "passage_id": BAD}]), r"positive_ctxs\[0\]: field 'passage_id'"),
    (_dpr(hard_negative_ctxs=[{"title": BAD, "text": "x"}]), r"hard_negative_ctxs\[0\]: field 'title'"),
    (_dpr(negative_ctxs=[{"text": BAD}]), r"negative_ctxs\[0\]: field 'text'"),
    (_dpr(answers=["a", BAD]), r"answers\[1\]"),
]


@pytest.mark.parametrize(
    "suffix, record, message",
    [(".jsonl", r, m) for r, m in PLAIN_SURROGATES + DPR_SURROGATES] + [(".json", r, m) for r, m in DPR_SURROGATES],
)
def test_lone_surrogates_name_file_and_line(tmp_path, suffix, record, message):
    good = _dpr() if "question" in record else _plain()
    path = tmp_path / f"bad{suffix}"
    if suffix == ".jsonl":
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        line = 2
    else:
        path.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(record) + "\n]")
        line = 3
    assert "\\udce9" in path.read_text()
    for read in (read_train_data, read_eval_data):
        with pytest.raises(DataError, match=message + r" is not valid Unicode \(lone surrogate '\\udce9' at character 4\)") as err:
            read(path)
        assert (err.value.path, err.value.line) == (str(path), line)


@pytest.mark.parametrize(
    "name, record, message",
    [
        ("corpus.jsonl", {"_id": "d9", "title": "t", "text": BAD}, "passage d9: field 'text'"),
        ("corpus.jsonl", {"_id": "d9", "title": BAD, "text": "x"}, "passage d9: field 'title'"),
        ("corpus.jsonl", {"_id": BAD, "title": "t", "text": "x"}, "field '_id'"),
        ("queries.jsonl", {"_id": "q9", "text": BAD}, "query q9: field 'text'"),
        ("queries.jsonl", {"_id": BAD, "text": "what"}, "field '_id'"),
    ],
)
def test_lone_surrogates_in_beir(tmp_path, name, record, message):
    root = write_beir(tmp_path / "beir", n=4)
    path = root / name
    path.write_text(path.read_text() + json.dumps(record) + "\n")
    readers = [read_train_data, read_eval_data] + ([read_corpus] if name == "corpus.jsonl" else [])
    for read in readers:
        with pytest.raises(DataError, match=message + " is not valid Unicode") as err:
            read(root)
        assert (err.value.path, err.value.line) == (str(path), 5)


# ----------------------------------------------------------------------------- a query on several lines is one query


def _triplets(path):
    rows = [("what is a walnut", "p1"), ("what is a comet", "p2"), ("what is a walnut", "p3")]
    path.write_text("".join(json.dumps({"query": q, "positive": {"text": f"text of {p}", "id": p}}) + "\n" for q, p in rows))
    return path


def test_repeated_query_lines_share_known_positives(tmp_path):
    data = read_train_data(_triplets(tmp_path / "t.jsonl"))
    # still one example per line, each with its own positive
    assert [(e.query, e.positive.id) for e in data.examples] == [
        ("what is a walnut", "p1"), ("what is a comet", "p2"), ("what is a walnut", "p3")]
    # but each knows every positive of its query: in a batch, the other line's positive is masked
    assert [e.known_positive_ids for e in data.examples] == [{"p1", "p3"}, {"p2"}, {"p1", "p3"}]


def test_repeated_dpr_question_shares_known_positives(tmp_path):
    def ctx(pid):
        return {"title": "", "text": f"text of {pid}", "passage_id": pid}
    records = [
        {"question": "q1", "answers": ["a"], "positive_ctxs": [ctx("p1"), ctx("p1b")]},
        {"question": "q2", "answers": ["b"], "positive_ctxs": [ctx("p2")]},
        {"question": "q1", "answers": ["a", "c"], "positive_ctxs": [ctx("p3")]},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    data = read_train_data(path)
    assert [e.positive.id for e in data.examples] == ["p1", "p2", "p3"]
    assert [e.known_positive_ids for e in data.examples] == [{"p1", "p1b", "p3"}, {"p2"}, {"p1", "p1b", "p3"}]
    ev = read_eval_data(path)
    assert ev.queries == {"0": "q1", "1": "q2"}
    assert ev.qrels == {"0": {"p1": 1, "p1b": 1, "p3": 1}, "1": {"p2": 1}}
    assert ev.answers == {"0": ["a", "c"], "1": ["b"]}
    # every judged passage is in the corpus, also a record's second positive
    assert {p.id for p in ev.corpus} == {"p1", "p1b", "p2", "p3"}
    ranked = {"0": {"p1": 4.0, "p3": 3.0, "p1b": 2.0, "p2": 1.0}, "1": {"p2": 4.0, "p1": 3.0, "p1b": 2.0, "p3": 1.0}}
    assert retrieval_metrics(ranked, ev.qrels)["ndcg@10"] == pytest.approx(1.0)


def test_repeated_query_is_one_eval_query(tmp_path):
    path = _triplets(tmp_path / "t.jsonl")
    ev = read_eval_data(path)
    assert ev.queries == {"0": "what is a walnut", "1": "what is a comet"}  # numbered in order of first appearance
    assert ev.qrels == {"0": {"p1": 1, "p3": 1}, "1": {"p2": 1}}
    perfect = {"0": {"p1": 3.0, "p3": 2.0, "p2": 1.0}, "1": {"p2": 3.0, "p1": 2.0, "p3": 1.0}}
    assert retrieval_metrics(perfect, ev.qrels)["ndcg@10"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    "line, message",
    [
        (json.dumps({"query": BAD, "positive": "p"}), "query: field 'query' is not valid Unicode"),
        (json.dumps({"query": "q2", "positive": BAD}), "positive: text is not valid Unicode"),
    ],
    ids=["query", "passage"],
)
def test_cli_reports_invalid_unicode_without_traceback(tmp_path, tiny_model, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "positive": "p"}\n' + line + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--model", str(tiny_model), "--train", str(path), "--output", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{path}:2: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_reports_bad_qrels_without_traceback(tmp_path, tiny_model):
    root = write_beir(tmp_path / "beir", n=4)
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\tinf\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dpr_service.cli", "train", "--model", str(tiny_model), "--train", str(root),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{root / 'qrels' / 'train.tsv'}:2: score 'inf' is not a finite number" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "record, message",
    [
        ({"_id": None, "title": "", "text": "apple"}, "field '_id': expected a non-empty string or number, got null"),
        ({"_id": "", "title": "", "text": "apple"}, "field '_id': expected a non-empty string or number"),
        ({"_id": ["a"], "title": "", "text": "apple"}, "field '_id': expected a non-empty string or number"),
    ],
)
def test_corpus_ids_must_be_non_empty(tmp_path, record, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"_id": "d1", "title": "", "text": "river"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"corpus.jsonl:2: .*{message}"):
        read_corpus(path)


def test_answers_must_be_a_list_even_when_falsy(tmp_path):
    path = tmp_path / "train.jsonl"
    record = {"question": "q", "answers": 0, "positive_ctxs": [{"title": "", "text": "apple", "passage_id": "1"}]}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'answers' must be a list of strings"):
        read_train_data(path)


# ----------------------------------------------------------------------------- packaging metadata (issue 14.14)


def test_pyproject_reads_without_setuptools_deprecations():
    """The license as an SPDX string: the TOML table form printed a deprecation banner on every install."""
    import warnings
    from pathlib import Path

    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration

    root = Path(__file__).resolve().parents[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(setuptools.Distribution(), str(root / "pyproject.toml"))
    assert [str(w.message).splitlines()[0] for w in caught] == []


def test_docker_env_file_is_ignored_by_git():
    """docker/.env holds the API key (docs/deployment.md puts it there): it must never be committed."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=root)
    assert r.returncode == 0
