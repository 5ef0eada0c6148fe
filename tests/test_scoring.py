"""``POST /score``'s computation (core/scoring.py) against the trainer's loss on tricky batches:
the same question twice with different positives, duplicate passages, a positive that is another
item's negative, passages without ids, and a cosine / temperature 0.05 checkpoint."""

import json

import pytest
import torch

from dpr_service.core.batches import collate
from dpr_service.core.checkpoint import load_base_model, load_checkpoint, save_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import pick_runtime
from dpr_service.core.formats import Passage, read_train_data
from dpr_service.core.loss import candidate_log_probs
from dpr_service.core.scoring import ScoreItem, score_items
from trainer.evaluate import batch_losses, dev_nll

CPU = pick_runtime("cpu", "fp32")


@pytest.fixture(scope="module", params=[("dot", 1.0), ("cosine", 0.05)], ids=["dot", "cosine-0.05"])
def loaded(request, tmp_path_factory, tiny_model):
    similarity, temperature = request.param
    cfg = EncoderConfig(pooling="mean", similarity=similarity, temperature=temperature, query_max_length=16, passage_max_length=32)
    encoder, tokenizer = load_base_model(str(tiny_model), cfg)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_checkpoint(path, encoder, tokenizer)
    return load_checkpoint(path)


def P(pid: str, text: str, title: str = "") -> Passage:
    return Passage(text=text, title=title, id=pid)


A = P("a", "apple river mountain")
B = P("b", "violin desert planet")
C = P("c", "harbor glacier lantern")
D = P("d", "copper falcon meadow")
E = P("e", "canyon orchid thunder")

TRICKY = {
    # the case: one question, two lines with different positives (a triplet file repeats it)
    "same question twice": [ScoreItem("what is the apple near the river", A, [C]),
                            ScoreItem("what is the apple near the river", B, [D])],
    "duplicate passages": [ScoreItem("the violin in the desert", B, [C, C]),
                           ScoreItem("the copper falcon", D, [C, B])],
    "positive is another item's negative": [ScoreItem("the apple and the river", A, [B]),
                                            ScoreItem("the violin and the desert", B, [A, E])],
    # issue 31.1: a copy of the first item's positive, under another id, as the second item's negative
    "copy of a positive as another item's negative": [ScoreItem("the apple and the river", A, [C]),
                                                       ScoreItem("the violin and the desert", B, [B, P("a-copy", "Apple  river mountain"), A])],
    "same question, shared negative, uneven negatives": [ScoreItem("canyon thunder", E, [A, B, C]),
                                                         ScoreItem("canyon thunder", D, []),
                                                         ScoreItem("harbor lantern", C, [E])],
}


def _write_plain(path, items: list[ScoreItem]):
    def ctx(p):
        return {"id": p.id, "title": p.title, "text": p.text}

    path.write_text("".join(json.dumps({"query": it.question, "positive": ctx(it.positive),
                                        "negatives": [ctx(n) for n in it.negatives]}) + "\n" for it in items))
    return path


def _trainer_losses(loaded, tmp_path, items: list[ScoreItem]) -> torch.Tensor:
    """The trainer's per-question losses for these items as one batch, read from a training file
    by the trainer's reader (which shares known positives between lines of the same question)."""
    data = read_train_data(_write_plain(tmp_path / "batch.jsonl", items))
    batch = collate(data.examples, [ex.hard_negatives for ex in data.examples], loaded.tokenizer)
    with torch.no_grad():
        return batch_losses(loaded.encoder, batch, CPU)


@pytest.mark.parametrize("case", list(TRICKY))
def test_score_in_batch_equals_the_trainers_loss(loaded, tmp_path, case):
    items = TRICKY[case]
    scored = score_items(loaded, CPU, items, in_batch=True)
    expected = _trainer_losses(loaded, tmp_path, items)
    assert [s.loss for s in scored] == pytest.approx(expected.tolist(), abs=1e-5)


def test_same_question_masks_the_other_lines_positive(loaded):
    """Issue 14.3: /score counted the other line's positive as a negative (losses 1.0015 / 1.9524
    where the trainer gave 0.7857 / 1.1817): it is a known positive of the same question."""
    items = TRICKY["same question twice"]
    scored = score_items(loaded, CPU, items, in_batch=True)
    assert scored[0].probabilities[0] > 0 and all(s.rank >= 1 for s in scored)
    # unmasked (every other passage a negative) is a different, larger loss
    q = loaded.encoder.encode_queries(**loaded.tokenizer.queries([it.question for it in items]))
    p = loaded.encoder.encode_passages(**loaded.tokenizer.passages([A, C, B, D]))
    cfg = loaded.config
    unmasked = -candidate_log_probs(q, p, torch.tensor([0, 2]), similarity=cfg.similarity,
                                    temperature=cfg.temperature)[[0, 1], [0, 2]]
    assert all(s.loss < u - 1e-4 for s, u in zip(scored, unmasked.tolist()))


def test_dev_nll_equals_the_mean_score(loaded, tmp_path):
    items = TRICKY["same question twice"] + [ScoreItem("the canyon orchid", E, [A])]
    data = read_train_data(_write_plain(tmp_path / "dev.jsonl", items))
    nll = dev_nll(loaded.encoder, loaded.tokenizer, data, CPU, batch_size=3, hard_negatives=1)
    scored = score_items(loaded, CPU, items, in_batch=True)
    assert nll == pytest.approx(sum(s.loss for s in scored) / 3, abs=1e-5)


def test_passages_without_ids_are_one_passage_by_content(loaded, tmp_path):
    unnamed = [ScoreItem("the violin in the desert", Passage(B.text), [Passage(C.text)]),
               ScoreItem("the copper falcon", Passage(D.text), [Passage(B.text)])]
    named = [ScoreItem(it.question, P(f"x-{it.positive.text}", it.positive.text),
                       [P(f"x-{n.text}", n.text) for n in it.negatives]) for it in unnamed]
    assert [s.loss for s in score_items(loaded, CPU, unnamed, True)] == pytest.approx(
        [s.loss for s in score_items(loaded, CPU, named, True)], abs=1e-6)


def test_without_in_batch_each_item_sees_only_its_own_passages(loaded):
    items = [ScoreItem("the apple and the river", A, [B, C]), ScoreItem("the copper falcon", D, [E])]
    together = score_items(loaded, CPU, items, in_batch=False)
    alone = [score_items(loaded, CPU, [it], in_batch=True)[0] for it in items]
    for t, a in zip(together, alone):
        assert t.loss == pytest.approx(a.loss, abs=1e-5)
        assert t.probabilities == pytest.approx(a.probabilities, abs=1e-5)
        assert sum(t.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_copy_of_a_positive_is_not_a_negative_of_its_question(loaded):
    """Issue 31.1: columns ['a', 'c', 'b', 'b', 'a-copy', 'a']: the copy of item 0's positive (item 1's
    negative) counted against item 0. Item 0's loss must be as if the copy were not in the request."""
    with_copy = score_items(loaded, CPU, TRICKY["copy of a positive as another item's negative"], in_batch=True)
    without = score_items(loaded, CPU, [ScoreItem("the apple and the river", A, [C]),
                                        ScoreItem("the violin and the desert", B, [B, A])], in_batch=True)
    assert with_copy[0].loss == pytest.approx(without[0].loss, abs=1e-6)
    assert with_copy[1].probabilities[2] > 0  # for item 1 the copy is a negative like any other
