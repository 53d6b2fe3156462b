"""Sparse (top-k + tail bucket) distillation losses against textbook formulas in float64, on seeded data."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from moekd.distill.losses import (
    KD_LOSSES,
    dense_kd_loss,
    masked_cross_entropy,
    reduce_kd_loss,
    sparse_kd_loss,
)

P, M, V = 6, 3, 16
SKEW_LAMBDA, JSD_BETA = 0.1, 0.5


def textbook(p, q, kind):
    """The docs/methods.md §5.1 definitions, straight from probabilities [..., C] (all > 0 or matching zeros)."""

    def kl(a, b):
        return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(-1)

    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "skl":
        return kl(p, SKEW_LAMBDA * p + (1 - SKEW_LAMBDA) * q)
    if kind == "srkl":
        return kl(q, (1 - SKEW_LAMBDA) * p + SKEW_LAMBDA * q)
    if kind == "jsd":
        m = JSD_BETA * p + (1 - JSD_BETA) * q
        return JSD_BETA * kl(p, m) + (1 - JSD_BETA) * kl(q, m)
    return 0.5 * (p - q).abs().sum(-1)


@dataclass
class Case:
    teacher_logp: torch.Tensor  # float64 [P, M, V], full-vocabulary teacher log-probs
    student: torch.Tensor  # float64 [P, V] student logits
    topk_ids: torch.Tensor  # [P, M, k]
    topk_logprobs: torch.Tensor  # float64 [P, M, k]
    tail_logprob: torch.Tensor  # float64 [P, M]
    weights: torch.Tensor  # float64 [P, M], random weights so that gradients test every entry


def make_case(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher_logp = torch.log_softmax(2.0 * torch.randn(P, M, V, generator=g, dtype=torch.float64), dim=-1)
    student = 1.5 * torch.randn(P, V, generator=g, dtype=torch.float64)
    topk_logprobs, topk_ids = teacher_logp.topk(k, dim=-1)
    tail_logprob = teacher_logp.scatter(-1, topk_ids, -math.inf).logsumexp(-1)  # -inf when k = V
    weights = torch.rand(P, M, generator=g, dtype=torch.float64) + 0.5
    return Case(teacher_logp, student, topk_ids, topk_logprobs, tail_logprob, weights)


def sparse_value_and_grad(case, kind, dtype=torch.float32, **options):
    student = case.student.to(dtype).requires_grad_()
    loss = sparse_kd_loss(
        student, case.topk_ids, case.topk_logprobs.float(), case.tail_logprob.float(), kind=kind, **options
    )
    (grad,) = torch.autograd.grad((loss * case.weights.to(loss.dtype)).sum(), student)
    return loss, grad


def coarse_reference(case, kind, temperature=1.0):
    """Textbook divergence of the (k+1)-bucket distributions, built explicitly in float64.

    Teacher: the stored log-probs and the tail, tempered and renormalised over the k+1 buckets (at
    T = 1 exactly p[ids] and 1 - sum p[ids]). Student: q[ids] and 1 - sum q[ids], q = softmax(z / T).
    """
    student = case.student.clone().requires_grad_()
    teacher_buckets = torch.cat([case.topk_logprobs, case.tail_logprob.unsqueeze(-1)], dim=-1)
    p = (teacher_buckets / temperature).exp()
    p = p / p.sum(-1, keepdim=True)
    q_full = torch.softmax(student / temperature, dim=-1).unsqueeze(1).expand(P, M, V)
    q_ids = q_full.gather(-1, case.topk_ids)
    q = torch.cat([q_ids, 1 - q_ids.sum(-1, keepdim=True)], dim=-1)
    loss = textbook(p, q, kind)
    (grad,) = torch.autograd.grad((loss * case.weights).sum(), student)
    return loss, grad


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", KD_LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_matches_textbook(kind, temperature):
    case = make_case(k=V)
    teacher_logp = case.teacher_logp[:, 0]
    expected = textbook(
        torch.softmax(teacher_logp / temperature, -1), torch.softmax(case.student / temperature, -1), kind
    )
    actual = dense_kd_loss(case.student, teacher_logp, kind=kind, temperature=temperature)
    assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KD_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_support_equals_dense(kind, dtype):
    """k = V, tail -inf: the sparse loss is the full-vocabulary loss, values and gradients."""
    case = make_case(k=V)
    sparse, sparse_grad = sparse_value_and_grad(case, kind, dtype)

    student = case.student.to(dtype).requires_grad_()
    upcast = student.float()  # once, so that the M gradients add up in float32 as in the sparse loss
    dense = torch.stack([dense_kd_loss(upcast, case.teacher_logp[:, m].float(), kind=kind) for m in range(M)], dim=1)
    (dense_grad,) = torch.autograd.grad((dense * case.weights.float()).sum(), student)

    assert sparse.dtype == torch.float32 and sparse_grad.dtype == dtype
    assert torch.isfinite(sparse_grad).all()
    assert_close(sparse, dense)
    if dtype == torch.float32:
        assert_close(sparse_grad, dense_grad)
    else:  # the same float32 gradient, rounded to bfloat16 (2^-8 relative)
        assert_close(sparse_grad, dense_grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("kind", KD_LOSSES)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_topk_with_tail_equals_coarse_divergence(kind, k):
    case = make_case(k)
    loss, grad = sparse_value_and_grad(case, kind)
    expected, expected_grad = coarse_reference(case, kind)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


@pytest.mark.parametrize("kind", KD_LOSSES)
@pytest.mark.parametrize("k", [1, 2])
def test_small_k_tail_bucket_matters(kind, k):
    """Renormalised top-k is zero at k = 1 and far off at k = 2; the tail bucket keeps the loss exact."""
    case = make_case(k)
    loss, _ = sparse_value_and_grad(case, kind)

    p_ids = case.topk_logprobs.exp()
    q_ids = torch.softmax(case.student, -1).unsqueeze(1).expand(P, M, V).gather(-1, case.topk_ids)
    renormalised = textbook(p_ids / p_ids.sum(-1, keepdim=True), q_ids / q_ids.sum(-1, keepdim=True), kind)

    assert loss.min() > 1e-3 and loss.mean() > 0.1
    assert (loss.double() - renormalised).abs().mean() > 0.1
    if k == 1:
        assert renormalised.abs().max() < 1e-12


def test_fkl_gradient_is_unbiased_on_stored_ids():
    """Forward KL with a tail: d/dz_i = q_i - p_i on the stored ids, q_j (1 - p_tail / q_tail) elsewhere."""
    case = make_case(k=3)
    case.weights = torch.ones(P, M, dtype=torch.float64)
    _, grad = sparse_value_and_grad(case, "fkl")

    q = torch.softmax(case.student, -1).unsqueeze(1).expand(P, M, V)
    p_tail = case.tail_logprob.exp().unsqueeze(-1)
    q_tail = 1 - q.gather(-1, case.topk_ids).sum(-1, keepdim=True)
    expected = q * (1 - p_tail / q_tail)
    expected = expected.scatter(-1, case.topk_ids, q.gather(-1, case.topk_ids) - case.topk_logprobs.exp())
    assert_close(grad, expected.sum(1))


def test_student_tail_below_float32_epsilon_keeps_its_log():
    """A student with ~1e-16 mass outside the stored ids: 1 - sum(q) would be 0 in float32 and the loss inf."""
    case = make_case(k=3)
    ids = case.topk_ids[:, 0]  # the ids of teacher sample 0
    case.student = case.student.scatter(-1, ids, 40.0)
    loss, _ = sparse_value_and_grad(case, "fkl")

    log_q = torch.log_softmax(case.student, -1)
    log_q_tail = log_q.scatter(-1, ids, -math.inf).logsumexp(-1)
    assert log_q_tail.max() < -35
    p_ids, p_tail = case.topk_logprobs[:, 0].exp(), case.tail_logprob[:, 0].exp()
    expected = (p_ids * (case.topk_logprobs[:, 0] - log_q.gather(-1, ids))).sum(-1)
    expected = expected + p_tail * (case.tail_logprob[:, 0] - log_q_tail)
    assert_close(loss[:, 0], expected)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_temperature(kind):
    """T divides both logit sets; the teacher buckets are renormalised; no T² factor."""
    case = make_case(k=4)
    at_t1, _ = sparse_value_and_grad(case, kind, temperature=1.0)
    at_t2, grad_t2 = sparse_value_and_grad(case, kind, temperature=2.0)
    expected, expected_grad = coarse_reference(case, kind, temperature=2.0)
    assert_close(at_t2, expected)
    assert_close(grad_t2, expected_grad)
    assert (at_t1 - at_t2).abs().max() > 1e-2

    # With every id stored, tempering the buckets is tempering the teacher exactly.
    full = make_case(k=V)
    sparse_full, _ = sparse_value_and_grad(full, kind, temperature=2.0)
    dense = textbook(torch.softmax(full.teacher_logp / 2, -1), torch.softmax(full.student / 2, -1).unsqueeze(1), kind)
    assert_close(sparse_full, dense)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_quantised_teacher_buckets_are_renormalised(kind):
    case = make_case(k=4)
    noise = (torch.rand(case.topk_logprobs.shape, generator=torch.Generator().manual_seed(1)) - 0.5) / 256
    case.topk_logprobs = (case.topk_logprobs + noise.double()).float().double()
    mass = case.topk_logprobs.exp().sum(-1) + case.tail_logprob.exp()
    assert (mass - 1).abs().max() > 1e-4

    loss, grad = sparse_value_and_grad(case, kind)
    expected, expected_grad = coarse_reference(case, kind)  # renormalises the k+1 buckets
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_padded_slots_and_rows_without_teacher(kind):
    """-inf slots (with duplicate ids) change nothing; an all -inf row gives 0 and no gradient."""
    case = make_case(k=4)
    loss, grad = sparse_value_and_grad(case, kind)

    pad_ids = torch.stack([case.topk_ids[..., 0], torch.zeros_like(case.topk_ids[..., 0])], dim=-1)
    case.topk_ids = torch.cat([case.topk_ids, pad_ids], dim=-1)
    case.topk_logprobs = F.pad(case.topk_logprobs, (0, 2), value=-math.inf)
    padded_loss, padded_grad = sparse_value_and_grad(case, kind)
    assert_close(padded_loss, loss)
    assert_close(padded_grad, grad)

    case.topk_logprobs[0] = -math.inf
    case.tail_logprob[0] = -math.inf
    empty_loss, empty_grad = sparse_value_and_grad(case, kind)
    assert torch.equal(empty_loss[0], torch.zeros(M)) and torch.equal(empty_grad[0], torch.zeros(V))
    assert_close(empty_loss[1:], loss[1:])
    assert_close(empty_grad[1:], grad[1:])


def test_reduce_mean_and_one_sample_per_position():
    g = torch.Generator().manual_seed(2)
    values = torch.rand(P, M, generator=g)
    mask = torch.tensor([True, False, True, True, False, True])
    sample_index = torch.randint(M, (P,), generator=g)

    assert_close(reduce_kd_loss(values, mask), values[mask].mean())
    assert_close(reduce_kd_loss(values, mask, sample_index), values[torch.arange(P), sample_index][mask].mean())

    # Masked positions may hold anything, even NaN, without reaching the value or the gradient.
    per_sample = torch.where(mask[:, None], values, torch.tensor(math.nan)).requires_grad_()
    reduced = reduce_kd_loss(per_sample, mask)
    reduced.backward()
    assert_close(reduced, values[mask].mean())
    assert torch.isfinite(per_sample.grad).all() and torch.equal(per_sample.grad[~mask], torch.zeros(2, M))


def test_all_masked_batch_gives_zero_with_gradient():
    case = make_case(k=3)
    student = case.student.float().requires_grad_()
    per_sample = sparse_kd_loss(student, case.topk_ids, case.topk_logprobs.float(), case.tail_logprob.float())
    reduced = reduce_kd_loss(per_sample, torch.zeros(P, dtype=torch.bool))
    assert reduced.item() == 0.0 and reduced.requires_grad
    reduced.backward()
    assert torch.equal(student.grad, torch.zeros(P, V))


def test_mean_forward_kl_over_samples_is_cross_entropy_to_mean_teacher():
    """mean_m KL(p_m || q) = CE(mean_m p_m, q) - mean_m H(p_m)."""
    case = make_case(k=V)
    loss, _ = sparse_value_and_grad(case, "fkl")
    mask = torch.ones(P, dtype=torch.bool)
    teacher_p = case.teacher_logp.exp()
    cross_entropy = -(teacher_p.mean(1) * torch.log_softmax(case.student, -1)).sum(-1)
    entropy = -(teacher_p * case.teacher_logp).sum(-1).mean(1)
    assert_close(reduce_kd_loss(loss, mask), (cross_entropy - entropy).mean())


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_gradcheck(kind):
    g = torch.Generator().manual_seed(3)
    teacher_logp = torch.log_softmax(torch.randn(2, 2, 5, generator=g, dtype=torch.float64), -1)
    topk_logprobs, topk_ids = teacher_logp.topk(2, dim=-1)
    tail = teacher_logp.scatter(-1, topk_ids, -math.inf).logsumexp(-1)
    student = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(logits):
        return sparse_kd_loss(logits, topk_ids, topk_logprobs, tail, kind=kind, temperature=1.5)

    assert torch.autograd.gradcheck(loss, (student,))


def test_masked_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(P, V, generator=g).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(V, (P,), generator=g)
    mask = torch.tensor([True, True, False, True, False, False])
    labels[~mask] = 10**6  # ignored wherever masked

    expected = F.cross_entropy(logits.float()[mask], labels[mask])
    assert_close(masked_cross_entropy(logits, labels, mask), expected)

    none = masked_cross_entropy(logits, labels, torch.zeros(P, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad.float(), torch.zeros(P, V))


@pytest.mark.parametrize(
    "options, parameter",
    [
        ({"kind": "kl"}, "kind"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"skew_lambda": 1.0}, "skew_lambda"),
        ({"jsd_beta": 0.0}, "jsd_beta"),
    ],
)
def test_invalid_options_name_the_parameter(options, parameter):
    case = make_case(k=2)
    with pytest.raises(ValueError, match=parameter):
        sparse_kd_loss(case.student, case.topk_ids, case.topk_logprobs, case.tail_logprob, **options)


def test_invalid_shapes_name_the_tensor():
    case = make_case(k=2)
    with pytest.raises(ValueError, match="topk_logprobs"):
        sparse_kd_loss(case.student, case.topk_ids, case.topk_logprobs[..., :1], case.tail_logprob)
    with pytest.raises(ValueError, match="tail_logprob"):
        sparse_kd_loss(case.student, case.topk_ids, case.topk_logprobs, case.tail_logprob[:, 0])
    with pytest.raises(ValueError, match="topk_ids"):
        sparse_kd_loss(case.student, case.topk_ids.double(), case.topk_logprobs, case.tail_logprob)
