"""The chunked losses of sampled and hidden caches against their dense references on full logits, values
and gradients (hidden states, output layer weight and bias), in uneven chunks, mixed with CE."""

import math

import pytest
import torch
import torch.nn.functional as F

from moekd.distill.chunked import OutputLayer, chunked_output_loss
from moekd.distill.losses import KD_LOSSES, dense_kd_loss, exact_losses_, teacher_logprobs
from moekd.distill.objective import cache_objective
from moekd.distill.sampled_losses import sampled_kd_loss, sampled_losses_
from tests.test_chunked_losses import assert_same, leaves, options

V, D, TEACHER_D = 40, 8, 12


def student_problem(positions, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(positions, D, generator=g, dtype=torch.float64)
    head = OutputLayer(
        0.8 * torch.randn(V, D, generator=g, dtype=torch.float64),
        0.3 * torch.randn(V, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(V, (positions,), generator=g)
    return hidden.to(dtype), OutputLayer(head.weight.to(dtype), head.bias.to(dtype)), labels, g


def sampled_batch(positions=13, samples=2, width=6, seed=0, dtype=torch.float32):
    """Draw-like targets: unique ids per (position, sample) with positive weights, two padding slots (id 0, weight 0)."""
    hidden, head, labels, g = student_problem(positions, seed, dtype)
    ids = torch.stack([torch.randperm(V, generator=g)[:width] for _ in range(positions * samples)]).view(
        positions, samples, width
    )
    weights = torch.rand(positions, samples, width, generator=g, dtype=torch.float64) + 0.05
    weights[..., -2:] = 0.0
    ids[..., -2:] = 0
    weights = weights / weights.sum(-1, keepdim=True)
    return hidden, head, {"sampled_ids": ids, "sampled_weights": weights.to(dtype), "labels": labels}


def hidden_batch(positions=13, samples=2, seed=0, dtype=torch.float32, teacher_vocab=V):
    hidden, head, labels, g = student_problem(positions, seed, dtype)
    teacher_hidden = torch.randn(positions, samples, TEACHER_D, generator=g, dtype=torch.float64)
    teacher_weight = 0.7 * torch.randn(teacher_vocab, TEACHER_D, generator=g, dtype=torch.float64)
    return hidden, head, {"hidden_states": teacher_hidden.to(dtype), "labels": labels}, teacher_weight.to(dtype)


def chunked(hidden, head, batch, o, chunk, teacher_layer=None):
    hidden, head = leaves(hidden, head)
    terms = chunked_output_loss(hidden, head, cache_objective(batch, o, torch.device("cpu"), teacher_layer), chunk)
    grads = torch.autograd.grad(terms["loss"], (hidden, head.weight, head.bias))
    return {key: value.detach() for key, value in terms.items()}, grads


def reference(hidden, head, batch, o, per_sample_kd):
    """(1-w)·mean KD + w·mean CE on full logits through autograd; per_sample_kd(logits) -> [P, M]."""
    hidden, head = leaves(hidden, head)
    logits = head.logits(hidden)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    kd = per_sample_kd(logits).mean()
    ce = F.cross_entropy(logits, batch["labels"])
    terms = (
        {"loss": (1 - o.ce_weight) * kd + o.ce_weight * ce, "kd_loss": kd, "ce_loss": ce}
        if o.ce_weight
        else {"loss": kd}
    )
    grads = torch.autograd.grad(terms["loss"], (hidden, head.weight, head.bias))
    return {key: value.detach() for key, value in terms.items()}, grads


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_sampled_chunked_equals_the_estimate_on_full_logits(temperature, ce_weight):
    """SampledObjective = sampled_kd_loss on full logits, with padding slots, uneven chunks, CE shared (T = 1) or not."""
    o = options("fkl", "sampled", ce_weight=ce_weight, temperature=temperature)
    for dtype, tolerance in (
        (torch.float32, dict(rtol=2e-5, atol=2e-6)),
        (torch.float64, dict(rtol=1e-10, atol=1e-12)),
    ):
        hidden, head, batch = sampled_batch(dtype=dtype)
        expected = reference(
            hidden,
            head,
            batch,
            o,
            lambda logits: sampled_kd_loss(logits, batch["sampled_ids"], batch["sampled_weights"], temperature),
        )
        assert_same(chunked(hidden, head, batch, o, chunk=5), expected, **tolerance)


def test_sampled_losses_with_weights_p_are_the_dense_cross_entropy():
    """All V ids with the teacher's probabilities as weights: the estimate is the exact H(p, q) = KL + H(p)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, V, generator=g, dtype=torch.float64)
    teacher = torch.log_softmax(2 * torch.randn(6, V, generator=g, dtype=torch.float64), -1)
    kd, ce, grad = sampled_losses_(
        logits.clone(), torch.arange(V).expand(6, 1, V), teacher.exp().unsqueeze(1), None, 1.0, 0.0, True
    )
    entropy = -(teacher.exp() * teacher).sum(-1)
    torch.testing.assert_close(kd[:, 0], dense_kd_loss(logits, teacher) + entropy)
    leaf = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad(dense_kd_loss(leaf, teacher).sum(), leaf)
    torch.testing.assert_close(grad, expected)
    assert ce is None


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_hidden_chunked_equals_the_dense_loss_of_the_teachers_logits(kind):
    """ExactObjective = dense_kd_loss against log_softmax(h·Wᵀ) of the teacher on full logits, at T = 1 and 2.5,
    M = 2 samples, mixed with CE, in float64 to rounding."""
    for temperature in (1.0, 2.5):
        o = options(kind, "hidden", ce_weight=0.3, temperature=temperature)
        for dtype, tolerance in (
            (torch.float32, dict(rtol=2e-5, atol=2e-6)),
            (torch.float64, dict(rtol=1e-10, atol=1e-12)),
        ):
            hidden, head, batch, weight = hidden_batch(dtype=dtype)
            teacher = [F.linear(batch["hidden_states"][:, m], weight) for m in range(2)]
            expected = reference(
                hidden,
                head,
                batch,
                o,
                lambda logits: torch.stack(
                    [dense_kd_loss(logits, torch.log_softmax(t, -1), kind, temperature) for t in teacher], 1
                ),
            )
            assert_same(chunked(hidden, head, batch, o, chunk=5, teacher_layer=weight), expected, **tolerance)


def test_hidden_loss_is_bit_for_bit_the_loss_of_a_bfloat16_teachers_own_logits():
    """Stored bf16 states and a bf16 output layer give the teacher's logits exactly, so the loss of each
    position is the dense loss computed from those logits, to the bit, in chunks or not."""
    g = torch.Generator().manual_seed(5)
    teacher_hidden = torch.randn(9, 1, TEACHER_D, generator=g).to(torch.bfloat16)
    weight = torch.randn(V, TEACHER_D, generator=g).to(torch.bfloat16)
    own_logits = F.linear(teacher_hidden[:, 0], weight)  # the teacher's lm_head, as it runs
    student = torch.randn(9, V, generator=g)
    for kind in ("fkl", "rkl", "jsd"):
        for temperature in (1.0, 2.0):
            expected = dense_kd_loss(student, torch.log_softmax(own_logits.float(), -1), kind, temperature)
            for rows in (slice(0, 9), slice(2, 7)):
                kd, _, _ = exact_losses_(
                    student[rows].clone(),
                    teacher_hidden[rows].float(),
                    weight,
                    None,
                    1.0,
                    0.0,
                    False,
                    kind,
                    temperature,
                )
                assert torch.equal(kd[:, 0], expected[rows])


def test_a_larger_student_vocabulary_gives_the_extra_ids_teacher_probability_zero():
    logp = teacher_logprobs(torch.randn(3, TEACHER_D), torch.randn(V - 4, TEACHER_D), V)
    assert logp.shape == (3, V) and torch.isneginf(logp[:, V - 4 :]).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3))
    hidden, head, batch, weight = hidden_batch(teacher_vocab=V - 4)
    terms, grads = chunked(hidden, head, batch, options("fkl", "hidden"), chunk=4, teacher_layer=weight)
    assert math.isfinite(terms["loss"].item()) and all(torch.isfinite(g).all() for g in grads)


def test_a_hidden_batch_without_the_teacher_layer_is_refused():
    hidden, head, batch, _ = hidden_batch()
    with pytest.raises(ValueError, match="teacher_layer"):
        cache_objective(batch, options("fkl", "hidden"), torch.device("cpu"))
