"""Issue 31.2: one rule for what a passage is (a title, a text or both; not both blank), in every
reader of core/formats.py and every endpoint that takes passages (``PassageIn``): a title-only
passage that the index holds and /search returns is one that /encode and /score accept."""

import json

import pytest
from fastapi.testclient import TestClient

from dpr_service.api.schemas import PassageIn
from dpr_service.api.settings import Settings
from dpr_service.core.checkpoint import load_base_model, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.formats import DataError, is_passage, read_corpus, read_train_data

# (title, text): a passage or not. U+3000 is the ideographic space, U+00A0 a no-break space.
CASES = [
    ("Ember Light", "", True),
    ("", "lit in 1712", True),
    ("Ember Light", "lit in 1712", True),
    ("Ember Light", "  \n", True),
    ("", "", False),
    ("  ", "\t", False),
    ("\u3000", "\u00a0", False),
]


@pytest.mark.parametrize("title, text, ok", CASES)
def test_the_rule_is_the_same_in_the_core_and_the_api(title, text, ok):
    from pydantic import ValidationError

    assert is_passage(title, text) is ok
    if ok:
        assert PassageIn(title=title, text=text).text == text
    else:
        with pytest.raises(ValidationError, match="text"):
            PassageIn(title=title, text=text)


@pytest.mark.parametrize("title, text, ok", CASES)
def test_every_reader_applies_the_rule(tmp_path, title, text, ok):
    beir = tmp_path / "corpus.jsonl"
    beir.write_text(json.dumps({"_id": "d0", "title": "x", "text": "y"}) + "\n" + json.dumps({"_id": "d1", "title": title, "text": text}) + "\n")
    tsv = tmp_path / "psgs.tsv"
    tsv.write_text("id\ttext\ttitle\nd0\ty\tx\n" + f"d1\t{text}\t{title}\n")
    plain = tmp_path / "train.jsonl"
    plain.write_text(json.dumps({"query": "q", "positive": {"id": "d0", "title": "x", "text": "y"},
                                 "negatives": [{"id": "d1", "title": title, "text": text}]}) + "\n")
    dpr = tmp_path / "dpr.jsonl"
    dpr.write_text(json.dumps({"question": "q", "answers": [], "positive_ctxs": [{"passage_id": "d0", "title": "x", "text": "y"}],
                               "hard_negative_ctxs": [{"passage_id": "d1", "title": title, "text": text}]}) + "\n")
    readers = [(beir, read_corpus, ":2: "), (plain, read_train_data, ":1: "), (dpr, read_train_data, ":1: ")]
    if "\n" not in text + title and "\t" not in text + title:  # a TSV cell cannot hold them
        readers.append((tsv, read_corpus, ":3: "))
    for path, read, where in readers:
        if ok:
            result = read(path)
            corpus = result if isinstance(result, list) else result.corpus
            assert [(p.title, p.text) for p in corpus if p.id == "d1"] == [(title, text)], path.name
        else:
            with pytest.raises(DataError, match=rf"{path.name}{where}.*both 'title' and 'text' are empty"):
                read(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    from index.build import build

    root = tmp_path_factory.mktemp("titled")
    cfg = EncoderConfig(pooling="mean", similarity="dot", query_max_length=16, passage_max_length=32)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(root / "ckpt", encoder, tokenizer)
    corpus = root / "corpus.jsonl"
    rows = [{"_id": "t1", "title": "copper falcon", "text": ""},
            {"_id": "d1", "title": "", "text": "apple river mountain"},
            {"_id": "d2", "title": "violin", "text": "desert planet"}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build(root / "ckpt", corpus, root / "index", factory="Flat", progress=False)
    from dpr_service.api.app import create_app

    with TestClient(create_app(Settings(index=root / "index", device="cpu", batch_max_wait_ms=1))) as c:
        yield c


def test_a_title_only_passage_is_searched_encoded_and_scored_alike(served):
    hits = served.post("/search", json={"query": "copper falcon", "top_k": 3}).json()["results"][0]
    hit = next(h for h in hits if h["id"] == "t1")
    passage = {"title": "copper falcon", "text": ""}
    r = served.post("/encode", json={"texts": [passage], "kind": "passage"})
    assert r.status_code == 200, r.text
    p = r.json()["embeddings"][0]
    q = served.post("/encode", json={"texts": ["copper falcon"], "kind": "query"}).json()["embeddings"][0]
    assert sum(a * b for a, b in zip(q, p)) == pytest.approx(hit["score"], abs=1e-4)  # the index's vector
    r = served.post("/score", json={"items": [{"question": "copper falcon", "positive": passage, "negatives": ["apple river"]}]})
    assert r.status_code == 200, r.text
    for body, path in (({"texts": [{"title": " ", "text": ""}], "kind": "passage"}, "/encode"),
                       ({"items": [{"question": "q", "positive": {"title": "", "text": " "}}]}, "/score")):
        r = served.post(path, json=body)
        assert r.status_code == 422, r.text
        assert any(e["field"].endswith("text") and "title is empty" in e["message"] for e in r.json()["errors"]), r.text
