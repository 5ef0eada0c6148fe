"""Query-side training against a fixed index (dpr train --index): the loss by hand, the negatives by
the mining rules, the checkpoint bound to the index's passage encoder, resume exact."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_beir
from safetensors.torch import load_file

from dpr_service.core.artifact import ArtifactError
from dpr_service.core.checkpoint import load_checkpoint, passage_fingerprint, save_checkpoint, load_base_model
from dpr_service.core.config import EncoderConfig
from dpr_service.core.search import Searcher
from index.build import build
from trainer import query_side
from trainer.config import ConfigError, TrainConfig
from trainer.distributed import Dist
from trainer.train import train

SINGLE = Dist()


def _corpus(vectors, content=None) -> query_side.IndexedCorpus:
    n = vectors.shape[0]
    ids = [f"p{i}" for i in range(n)]
    return query_side.IndexedCorpus(None, None, vectors, ids, {p: i for i, p in enumerate(ids)},
                                    torch.tensor(content if content is not None else list(range(n))), np.arange(n))


class _Encoder:  # what query_side_loss reads of an encoder: its config
    config = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.5)


def test_index_negatives_follow_the_mining_rules():
    """Best first; never a known positive, never a copy of one (same content group), never above the
    ratio ceiling of the positive's score."""
    p = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.9, 0.4], [0.8, 0.6], [0.5, 0.8], [0.0, 1.0], [0.7, 0.7]])
    # rows: 0 positive; 1 scores 0.99 > 0.95 * 1 (too close); 2 a copy of the known positive 5; 6 a known positive
    corpus = _corpus(p, content=[0, 1, 5, 3, 4, 5, 6])
    q = torch.tensor([[1.0, 0.0]])
    neg = query_side.index_negatives(q, corpus, torch.tensor([0]), torch.tensor([[0, 5, 6]]), k=3, ratio=0.95)
    assert neg.tolist() == [[3, 4, -1]]  # 0.8 then 0.5; nothing else qualifies


def test_a_dot_product_keeps_negatives_above_the_positive():
    """As the trainer's mining: the ratio rule reads cosine scores only; with a dot product the passages
    ranked above the positive are the negatives query-side training exists to push down."""
    class Dot:
        config = EncoderConfig(pooling="cls", similarity="dot", temperature=1.0)

    p = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    corpus = _corpus(p)
    q = torch.tensor([[1.0, 0.0]])
    batch = query_side.QueryBatch({}, torch.tensor([0]), torch.tensor([[0]]))
    assert query_side.index_negatives(q, corpus, batch.positive_rows, batch.known_rows, k=3, ratio=None).tolist() == [[1, 2, 3]]
    assert query_side.index_negatives(q, corpus, batch.positive_rows, batch.known_rows, k=3, ratio=0.95).tolist() == [[3, -1, -1]]
    loss, _ = query_side.query_side_loss(Dot(), q, batch, corpus, SINGLE, "topk", k=3, ratio=0.95)
    expected = -(1.0 - math.log(math.exp(1.0) + math.exp(3.0) + math.exp(2.0) + math.exp(0.5)))
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_corpus_loss_is_the_nll_over_every_passage_by_hand():
    """--index-loss corpus: -log softmax over all N passages, each question's other known positives
    and their copies removed, by hand."""
    torch.manual_seed(0)
    vectors = F.normalize(torch.randn(9, 4), dim=-1)
    corpus = _corpus(vectors, content=[0, 1, 2, 3, 4, 5, 6, 2, 8])  # row 7 is a copy of row 2
    q = F.normalize(torch.randn(2, 4), dim=-1).requires_grad_()
    batch = query_side.QueryBatch({}, torch.tensor([0, 2]), torch.tensor([[0, -1], [2, 5]]))
    loss, masked = query_side.query_side_loss(_Encoder(), q, batch, corpus, SINGLE, "corpus", k=0, ratio=None)
    t = 0.5
    expected = 0.0
    for i, (pos, drop) in enumerate([(0, set()), (2, {5, 7})]):
        logits = [float(q[i].detach() @ vectors[j]) / t for j in range(9) if j not in drop]
        expected += -(float(q[i].detach() @ vectors[pos]) / t - math.log(sum(math.exp(x) for x in logits)))
    assert float(loss.detach()) == pytest.approx(expected / 2, abs=1e-5)
    assert masked == 2  # question 2's other positive (row 5) and the copy of its positive (row 7)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_topk_loss_is_in_batch_nll_over_positives_and_index_negatives():
    """--index-loss topk: the candidates are every question's positive and its negatives, shared by
    the batch; a passage retrieved for two questions is one candidate; the value by hand."""
    torch.manual_seed(1)
    vectors = F.normalize(torch.randn(12, 4), dim=-1)
    corpus = _corpus(vectors)
    q = F.normalize(torch.randn(3, 4), dim=-1)
    batch = query_side.QueryBatch({}, torch.tensor([0, 1, 2]), torch.tensor([[0], [1], [2]]))
    negs = query_side.index_negatives(q, corpus, batch.positive_rows, batch.known_rows, k=2, ratio=None)
    loss, _ = query_side.query_side_loss(_Encoder(), q, batch, corpus, SINGLE, "topk", k=2, ratio=None)
    columns = sorted({0, 1, 2} | set(negs.flatten().tolist()))
    expected = 0.0
    for i in range(3):
        logits = [float(q[i] @ vectors[j]) / 0.5 for j in columns]
        expected += -(float(q[i] @ vectors[i]) / 0.5 - math.log(sum(math.exp(x) for x in logits)))
    assert float(loss) == pytest.approx(expected / 3, abs=1e-5)


# ----------------------------------------------------------------------------- end to end, tiny model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("qside")
    beir = write_beir(root / "beir", n=24, splits=("train", "dev"))
    cfg = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, query_max_length=16,
                        passage_max_length=32, shared=True)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    save_checkpoint(root / "ckpt", encoder, tokenizer)
    index = build(root / "ckpt", beir, root / "index", factory="Flat", progress=False, bm25=False)
    return root, beir, root / "ckpt", index


def _cfg(root, ckpt, beir, index, out, **kw) -> TrainConfig:
    base = dict(model=str(ckpt), train=str(beir), index=str(index) if index else None, output=str(out), batch_size=4, lr=1e-3,
                log_every=1, progress=False, seed=3, max_steps=6, index_negatives=3)
    base.update(kw)
    return TrainConfig.from_settings(**base)


def test_query_side_run_trains_the_query_encoder_only(setup, tmp_path):
    root, beir, ckpt, index = setup
    out = train(_cfg(root, ckpt, beir, index, tmp_path / "run"))
    start, new = load_checkpoint(ckpt), load_checkpoint(out)
    assert not new.config.shared and start.config.shared
    # the passage encoder is the index's, bit for bit; the query encoder moved
    start_w = load_file(ckpt / "query_encoder" / "model.safetensors")
    passage_w = load_file(out / "passage_encoder" / "model.safetensors")
    query_w = load_file(out / "query_encoder" / "model.safetensors")
    assert all(torch.equal(start_w[k], passage_w[k]) for k in start_w)
    assert any(not torch.equal(start_w[k], query_w[k]) for k in start_w)
    assert new.passage_fingerprint == start.passage_fingerprint == passage_fingerprint(new.encoder, new.tokenizer)
    assert new.passage_source == start.fingerprint and new.fingerprint != start.fingerprint
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["passage_fingerprint"] == start.passage_fingerprint
    Searcher(index, new.identity)  # accepted: the new query encoder serves the index as it is
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 6 and all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_an_index_of_another_passage_encoder_is_refused(setup, tmp_path, tiny_model):
    """Training, serving and evaluation name both checkpoints and both passage encoders."""
    root, beir, ckpt, index = setup
    other_cfg = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, query_max_length=16,
                              passage_max_length=32, shared=True, passage_prompt="passage: ")
    encoder, tokenizer = load_base_model(str(tiny_model), other_cfg)
    save_checkpoint(tmp_path / "other", encoder, tokenizer)
    with pytest.raises(ConfigError, match=r"--index .*the index was built with checkpoint [0-9a-f]{12}.*passage encoder"):
        train(_cfg(root, tmp_path / "other", beir, index, tmp_path / "run"))
    other = load_checkpoint(tmp_path / "other")
    with pytest.raises(ArtifactError, match=r"its passage encoder [0-9a-f]{12,} is not the checkpoint's \([0-9a-f]{12,}\)"):
        Searcher(index, other.identity)


def test_query_side_resume_is_exact(setup, tmp_path):
    root, beir, ckpt, index = setup
    straight = train(_cfg(root, ckpt, beir, index, tmp_path / "a", max_steps=8))
    train(_cfg(root, ckpt, beir, index, tmp_path / "b", max_steps=8, stop_after=3))
    resumed = train(_cfg(root, ckpt, beir, index, tmp_path / "b", max_steps=8, resume=True))
    a = load_file(straight / "query_encoder" / "model.safetensors")
    b = load_file(resumed / "query_encoder" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed query encoder differs from the uninterrupted run"


def test_corpus_loss_run_and_dev_evaluation_on_stored_vectors(setup, tmp_path, monkeypatch):
    """--index-loss corpus trains; the dev retrieval evaluation searches the index's vectors (the
    passage encoder is never run over the dev corpus)."""
    root, beir, ckpt, index = setup
    import trainer.evaluate as evaluate_mod

    encoded = []
    real = evaluate_mod.encode_texts
    monkeypatch.setattr(evaluate_mod, "encode_texts", lambda enc, tok, items, kind, *a, **kw: (encoded.append(kind), real(enc, tok, items, kind, *a, **kw))[1])
    out = train(_cfg(root, ckpt, beir, index, tmp_path / "run", index_loss="corpus", dev=str(beir), eval_every=3))
    assert (out.parent / "best" / "eval.json").is_file()
    assert "passage" not in encoded and "query" in encoded


def test_an_index_of_another_corpus_with_the_same_ids_is_refused(setup, tmp_path):
    """Ids such as "d0" recur across corpora: the positives' texts must be the index's."""
    root, beir, ckpt, index = setup
    other = write_beir(tmp_path / "other", n=24, seed=5, splits=("train",))
    with pytest.raises(ConfigError, match=r"--index .* --train .*: passage 'd\d+' has another title or text in the index"):
        train(_cfg(root, ckpt, other, index, tmp_path / "run"))


def test_resume_against_a_changed_index_is_refused(setup, tmp_path):
    root, beir, ckpt, index = setup
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    train(_cfg(root, ckpt, beir, copy, tmp_path / "run", max_steps=6, stop_after=2))
    shutil.rmtree(copy)
    build(ckpt, write_beir(tmp_path / "bigger", n=30, splits=("train",)), copy, factory="Flat", progress=False, bm25=False)
    with pytest.raises(ConfigError, match="--resume --index .*: the index changed since the run started"):
        train(_cfg(root, ckpt, beir, copy, tmp_path / "run", max_steps=6, resume=True))


def test_flags_that_do_not_apply_are_refused(setup, tmp_path):
    root, beir, ckpt, index = setup
    with pytest.raises(ConfigError, match="--chunk-size does not apply with --index"):
        train(_cfg(root, ckpt, beir, index, tmp_path / "r1", chunk_size=2))
    with pytest.raises(ConfigError, match="--index-loss must be one of topk, corpus"):
        train(_cfg(root, ckpt, beir, index, tmp_path / "r2", index_loss="all"))
    with pytest.raises(ConfigError, match="--passage-max-length 16: with --index the passage side stays"):
        train(_cfg(root, ckpt, beir, index, tmp_path / "r3", passage_max_length=16))
    with pytest.raises(ConfigError, match="--index-loss and --index-negatives apply with --index only"):
        train(_cfg(root, ckpt, beir, None, tmp_path / "r4", index_loss="corpus"))


def test_the_search_in_chunks_equals_one_pass(monkeypatch):
    """index_negatives scores SEARCH_CHUNK passages at a time: the same rows as all at once (a chunk
    size that divides nothing, and one larger than the corpus)."""
    torch.manual_seed(2)
    corpus = _corpus(F.normalize(torch.randn(500, 8), dim=-1), content=[i // 2 for i in range(500)])  # pairs of copies
    q = F.normalize(torch.randn(4, 8), dim=-1)
    positive_rows, known_rows = torch.tensor([0, 10, 20, 30]), torch.tensor([[0, 5], [10, -1], [20, 21], [30, -1]])
    whole = query_side.index_negatives(q, corpus, positive_rows, known_rows, k=12, ratio=0.95)
    monkeypatch.setattr(query_side, "SEARCH_CHUNK", 37)
    assert torch.equal(query_side.index_negatives(q, corpus, positive_rows, known_rows, k=12, ratio=0.95), whole)
    assert not set(whole[0].tolist()) & {0, 1, 4, 5}  # the positive, the known one and their copies
