"""The DPR loss against values computed by hand, and its gradient against autograd of a naive formula."""

import math
import zlib

import pytest
import torch

from dpr_service.core.loss import candidate_log_probs, in_batch_nll, scores

# Two questions, each with a positive and one hard negative; layout [pos0, neg0, pos1, neg1].
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
P = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
POS = torch.tensor([0, 2])
e = math.e


def test_with_hard_negatives_by_hand():
    # scores q0: [2, 0, 1, 0]; q1: [0, 1, 1, 0]
    l0 = math.log(e**2 + 1 + e + 1) - 2
    l1 = math.log(1 + e + e + 1) - 1
    assert in_batch_nll(Q, P, POS).item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    per_q = in_batch_nll(Q, P, POS, reduction="none")
    assert per_q.tolist() == pytest.approx([l0, l1], abs=1e-6)


def test_without_hard_negatives_by_hand():
    p = P[[0, 2]]  # only the positives: scores q0: [2, 1]; q1: [0, 1]
    l0 = math.log(e**2 + e) - 2
    l1 = math.log(1 + e) - 1
    assert in_batch_nll(Q, p, torch.tensor([0, 1])).item() == pytest.approx((l0 + l1) / 2, abs=1e-6)


def test_duplicate_of_own_positive_is_masked():
    # passage 1 is the same passage as q0's positive (same id): it must not count as q0's negative
    p_ids = torch.tensor([7, 7, 8, 9])
    l0 = math.log(e**2 + e + 1) - 2  # candidates p0, p2, p3
    l1 = math.log(1 + e + e + 1) - 1  # q1's positive (id 8) has no duplicate: unchanged
    got = in_batch_nll(Q, P, POS, p_ids=p_ids, reduction="none")
    assert got.tolist() == pytest.approx([l0, l1], abs=1e-6)


def test_candidate_mask_restricts_each_question():
    # per-item scoring as /score does without in-batch negatives: q0 sees {p0, p1}, q1 sees {p2, p3}
    mask = torch.tensor([[True, True, False, False], [False, False, True, True]])
    l0 = math.log(e**2 + 1) - 2
    l1 = math.log(e + 1) - 1
    assert in_batch_nll(Q, P, POS, candidate_mask=mask, reduction="none").tolist() == pytest.approx([l0, l1], abs=1e-6)
    log_probs = candidate_log_probs(Q, P, POS, candidate_mask=mask)
    assert torch.isinf(log_probs[0, 2]) and torch.isinf(log_probs[1, 0])
    assert log_probs.exp().sum(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_positive_is_never_masked():
    mask = torch.zeros(2, 4, dtype=torch.bool)  # masks everything, positive included
    assert in_batch_nll(Q, P, POS, candidate_mask=mask).item() == pytest.approx(0.0, abs=1e-7)


def test_cosine_with_temperature_by_hand():
    q = torch.tensor([[3.0, 4.0]])  # unit (0.6, 0.8)
    p = torch.tensor([[6.0, 8.0], [1.0, 0.0]])  # cosines 1.0 and 0.6
    tau = 0.5
    expected = math.log(math.exp(1 / tau) + math.exp(0.6 / tau)) - 1 / tau
    got = in_batch_nll(q, p, torch.tensor([0]), similarity="cosine", temperature=tau)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert scores(q, p, "cosine", tau).tolist()[0] == pytest.approx([2.0, 1.2], abs=1e-6)


def naive_nll(q, p, pos, p_ids, mask):
    """The formula written out, one question and one candidate at a time, in float64."""
    total = 0.0
    for i in range(q.shape[0]):
        denom = 0.0
        for j in range(p.shape[0]):
            allowed = bool(mask[i, j]) and not (j != pos[i] and p_ids[j] == p_ids[pos[i]])
            if allowed or j == pos[i]:
                denom = denom + torch.exp(q[i] @ p[j])
        total = total - torch.log(torch.exp(q[i] @ p[pos[i]]) / denom)
    return total / q.shape[0]


def test_gradient_matches_autograd_of_naive_formula():
    torch.manual_seed(0)
    b, h, d = 4, 2, 8
    q = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    p = torch.randn(b * (1 + h), d, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(b) * (1 + h)
    p_ids = torch.arange(b * (1 + h))
    p_ids[4] = p_ids[3]  # question 1's positive appears again as question 1's first hard negative
    mask = torch.rand(b, b * (1 + h)) > 0.2

    naive = naive_nll(q, p, pos, p_ids, mask)
    gq_ref, gp_ref = torch.autograd.grad(naive, (q, p))
    # in_batch_nll works in float32, as training does; compare in float32 precision
    q32 = q.detach().float().requires_grad_()
    p32 = p.detach().float().requires_grad_()
    loss = in_batch_nll(q32, p32, pos, p_ids=p_ids, candidate_mask=mask)
    loss.backward()
    assert loss.item() == pytest.approx(naive.item(), abs=1e-5)
    torch.testing.assert_close(q32.grad.double(), gq_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p32.grad.double(), gp_ref, atol=1e-5, rtol=1e-4)


def test_bf16_embeddings_are_scored_in_float32():
    got = in_batch_nll(Q.bfloat16(), P.bfloat16(), POS)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(in_batch_nll(Q, P, POS).item(), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"positive_idx": torch.tensor([0])}, "positive_idx"),
        ({"p_ids": torch.tensor([1, 2])}, "p_ids"),
        ({"candidate_mask": torch.ones(3, 4, dtype=torch.bool)}, "candidate_mask"),
        ({"similarity": "l2"}, "similarity"),
        ({"reduction": "sum"}, "reduction"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {"positive_idx": POS, **kwargs}
    with pytest.raises(ValueError, match=message):
        in_batch_nll(Q, P, args.pop("positive_idx"), **args)


# ----------------------------------------------------------------------------- masking by content (issue 31.1)

class _RowsTokenizer:
    """Stands in for the text tokenizer: one row per text, so collate's layout can be checked without a model."""

    def queries(self, texts):
        return {"input_ids": torch.arange(len(texts))[:, None]}

    def passages(self, passages):
        return {"input_ids": torch.arange(len(passages))[:, None]}


def _embed(passages, dim=8):
    """One fixed random vector per passage content (title and text), so a copy scores as its original."""
    out = []
    for p in passages:
        g = torch.Generator().manual_seed(zlib.crc32(f"{p.title}\x1f{p.text}".encode()))
        out.append(torch.randn(dim, generator=g))
    return torch.stack(out)


def test_copy_of_a_positive_under_another_id_is_masked_for_its_question():
    """Issue 31.1: batch columns ['a1', 'c1', 'b1', 'b1', 'a1-copy', 'a1']: q1's positive a1 came back under
    the id 'a1-copy' as q2's hard negative and counted against q1 (loss 1.4213 >= log 2). Its loss must be
    the loss with that column removed; for q2 (whose positive is b1) the copy stays a negative."""
    from dpr_service.core.batches import collate
    from dpr_service.core.formats import Passage, TrainExample

    a1, c1, b1 = Passage("the river bank", "river", "a1"), Passage("a mountain", "", "c1"), Passage("violin", "", "b1")
    a1_copy = Passage("The  river bank", "River", "a1-copy")  # the same passage up to case and spacing
    q1 = TrainExample("where is the river", a1, known_positive_ids=frozenset({"a1"}))
    q2 = TrainExample("who plays the violin", b1, known_positive_ids=frozenset({"b1"}))
    negatives = [[c1], [b1, a1_copy, a1]]
    batch = collate([q1, q2], negatives, _RowsTokenizer())
    cols = [a1, c1, b1, b1, a1_copy, a1]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, generator=g)
    p = _embed(cols)
    p[4] = p[0]  # the copy is encoded as its original
    q[0] = p[0] * 2  # q1 likes its positive (and so its copy)

    got = in_batch_nll(q, p, batch.positive_idx, p_ids=batch.p_hashes, candidate_mask=batch.candidate_mask(), reduction="none")
    keep = [0, 1, 2, 3]  # q1's candidates: a1, c1, b1, b1 (the copy and the repeated a1 are a1)
    s = q[0] @ p[keep].T
    expected_q1 = float(torch.logsumexp(s, 0) - s[0])
    assert got[0].item() == pytest.approx(expected_q1, abs=1e-5)
    mask = batch.candidate_mask()
    assert mask[0].tolist() == [False, True, True, True, False, False]
    assert mask[1].tolist() == [True, True, False, False, True, True]  # a1-copy and a1 are q2's negatives
    assert batch.masked == 2 + 1  # q1: a1-copy and a1; q2: its positive's repeat


def test_copy_of_a_known_positive_is_masked_too():
    """A question's other known positive k (by id) and a copy of k under another id are both not its negatives."""
    from dpr_service.core.batches import collate
    from dpr_service.core.formats import Passage, TrainExample

    a, k, k_copy, n = (Passage("apple", "", "a"), Passage("kiwi", "fruit", "k"), Passage("Kiwi", "fruit ", "k2"),
                       Passage("nut", "", "n"))
    q1 = TrainExample("fruit", a, known_positive_ids=frozenset({"a", "k"}))
    q2 = TrainExample("green fruit", n, known_positive_ids=frozenset({"n"}))
    batch = collate([q1, q2], [[], [k, k_copy]], _RowsTokenizer())  # columns a, n, k, k2
    assert batch.candidate_mask()[0].tolist() == [False, True, False, False]
    assert batch.candidate_mask()[1].tolist() == [True, False, True, True]


def test_the_trainer_counts_the_global_batchs_masked_pairs_on_every_rank():
    """The training log's masked_pairs: under torch.distributed each rank holds a slice of the global
    batch but reports what the loss masks over all of it, the single-process count."""
    from dpr_service.core.formats import Passage, TrainExample
    from trainer.batches import EpochBatches

    a, b, c, d = (Passage(t, id=i) for t, i in (("apple", "a"), ("violin", "b"), ("canyon", "c"), ("comet", "d")))
    a_copy = Passage("Apple", id="a-copy")
    examples = [TrainExample("q apple", a, hard_negatives=[c], known_positive_ids=frozenset({"a"})),
                TrainExample("q violin", b, hard_negatives=[a_copy], known_positive_ids=frozenset({"b"})),
                TrainExample("q canyon", c, hard_negatives=[d], known_positive_ids=frozenset({"c"})),
                TrainExample("q comet", d, hard_negatives=[b], known_positive_ids=frozenset({"d"}))]
    corpus = [a, b, c, d, a_copy]
    single = EpochBatches(examples, corpus, _RowsTokenizer(), 4, 1, seed=0, epoch=0)[0]
    ranks = [EpochBatches(examples, corpus, _RowsTokenizer(), 4, 1, seed=0, epoch=0, rank=r, world_size=2)[0] for r in (0, 1)]
    # each positive is another question's negative (c, a-copy, d, b): one masked pair per question
    assert single.masked == 4
    assert [r.masked for r in ranks] == [4, 4]
    assert single.to(torch.device("cpu")).masked == 4  # kept by to() and pin_memory() (the DataLoader's)
