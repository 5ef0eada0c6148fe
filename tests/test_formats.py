"""Each accepted data format, and each kind of bad input named by file and line."""

import json
import subprocess
import sys

import pytest
from conftest import write_beir, write_dpr, write_plain

from dpr_service.core.formats import DataError, content_id, read_eval_data, read_train_data


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


@pytest.mark.parametrize(
    "lines, line, message",
    [
        (['{"query": "q", "positive": "p"}', '{"query": "q2", "positive": "p"'], 2, "bad JSON"),
        (['{"query": "q", "positive": "p"}', '{"query": "q2"}'], 2, "missing field 'positive'"),
        (['{"query": "q", "positive": "p"}', '', '{"query": "  ", "positive": "p"}'], 3, "field 'query' is empty"),
        (['{"query": "q", "positive": {"title": "t", "text": ""}}'], 1, "positive: field 'text' is empty"),
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
