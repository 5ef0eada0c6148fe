"""The DPR loss against values computed by hand, and its gradient against autograd of a naive formula."""

import math

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
