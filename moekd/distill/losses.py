"""Distillation losses over sparse (top-k + tail bucket) teacher distributions, and their dense reference.

The cache stores, per target position and teacher sample, the teacher's k largest log-probs
(normalised over the full vocabulary at T = 1), their ids and the log of the mass outside them
(the tail). `sparse_kd_loss` compares the two (k+1)-bucket *coarsened* distributions:

    teacher p: the k stored log-probs and the tail, renormalised over the k+1 buckets (decoded
               log-probs carry a small quantisation error, so their mass is only ~1);
    student q: its probabilities of the k stored ids, and 1 - sum of those as the tail bucket
               (computed in log space from the logits outside the stored ids, never as 1 - sum).

The loss is the exact divergence between these two distributions: nothing is clamped, and a
small k never makes it zero (a renormalised top-1 loss is identically zero). With k = V it is
the full-vocabulary divergence that `dense_kd_loss` computes.

Kinds (docs/methods.md §5.1), with p the teacher and q the student:
    fkl   forward KL           KL(p || q) = sum p log(p/q)
    rkl   reverse KL           KL(q || p)
    skl   skew KL              KL(p || λp + (1-λ)q)          λ = skew_lambda
    srkl  skew reverse KL      KL(q || (1-λ)p + λq)
    jsd   Jensen-Shannon(β)    β KL(p || m) + (1-β) KL(q || m),  m = βp + (1-β)q,  β = jsd_beta
    tvd   total variation      ½ sum |p - q|

Temperature T divides the student logits and the teacher bucket log-probs, each renormalised
(over the vocabulary, resp. over the k+1 buckets). This is exact for the stored ids relative to
each other; the tail is tempered as one bucket, which approximates tempering the teacher's
full distribution at T != 1 (exact at T = 1, and exact for any T when k = V). The returned loss
is the divergence between the tempered distributions, *not* multiplied by T²: it stays a true
divergence for every kind (TVD and JSD are bounded), matching the LLM distillation recipes
this toolkit follows (GKD, DistiLLM). For Hinton's convention, multiply the result by T².

Numerics: everything is computed in at least float32 whatever the student dtype. A bucket with
teacher log-prob -inf is treated as absent: a top-k slot with -inf is padding (its id may be
anything valid, duplicates included) and its student mass stays in the tail bucket; a bucket
that is empty on both sides (the tail when the stored ids cover the vocabulary) contributes 0
with zero gradient. A row whose buckets are all -inf carries no teacher distribution: its loss
is 0. Reverse KL is +inf where the teacher gives zero mass to a bucket the student does not,
as the definition says (the skew, JSD and TV kinds stay finite there).

How the student side is computed, the same for every kind and any M (logits z over V, tempered):
the logits at the stored ids of all M samples of a position (their union U) are gathered, and
one logsumexp is taken over the logits outside U ("the rest"), in a single [P, V] pass that
masks U in place. Everything else works on the ids of U, per position:

    log Z       = log(rest + sum of exp(z) over the distinct ids of U)
    log q(i)    = z_i - log Z
    log tail_m  = log(rest + sum of exp(z) over the ids of U that sample m does not hold) - log Z

with the sums in float64, relative to the largest logit of U, and the rest entering as
exp(lse_rest - that shift). The tail is thus a sum of positive terms, never 1 - (stored mass): no cancellation, so
it keeps the float32 precision of a logsumexp at every size, far below float epsilon (tested
from 1e-1 to 1e-80 against the per-sample masked computation this replaced, values and
gradients), and the stored ids may cover all but a vanishing part of the student's mass. (A
tail taken as 1 - stored mass, even in float64, loses its digits below ~1e-16 of the mass and
reaches 0, an infinite forward KL, for a confident student.) The only limit is float64's range:
ids of U more than ~700 nats below the largest stored logit add nothing to another sample's tail.
The gradient costs one [P, V] pass too: outside U it is exp(z_v - lse_rest), the share of v in
the rest, times one number per position, and the ids of U get theirs from the small graph. So
the [P, V] work of a KD loss is that of a cross-entropy (a max, an exp, a sum, and a scaled copy
in backward), whatever M; with labels, the cross-entropy of an objective mixing KD and CE shares
that same pass (at T = 1; at T != 1 it takes a second pass at T = 1).

`sparse_kd_loss` takes [P, V] logits (autograd: a custom backward for the [P, V] part).
`exact_losses_` is `dense_kd_loss` for one chunk against a teacher given by its final hidden states
and output layer (a hidden cache's exact loss); the sampled caches' estimate is in sampled_losses.py.
`sparse_losses_` is the same computation on one chunk of logits it may overwrite, returning the
gradient of a weighted sum of KD and CE directly: the chunked training objective
(objective.py, chunked.py) feeds it one chunk of positions at a time, so no step holds [P, V].
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

KD_LOSSES = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd")


def sparse_kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    skew_lambda: float = 0.1,
    jsd_beta: float = 0.5,
) -> Tensor:
    """Per-(position, sample) divergence [P, M] between the (k+1)-bucket teacher and student distributions.

    student_logits [P, V] (any float dtype); topk_ids [P, M, k] (int); topk_logprobs [P, M, k];
    tail_logprob [P, M]. See the module docstring for the definitions.
    """
    _check_options(kind, temperature, skew_lambda, jsd_beta)
    _check_sparse_shapes(student_logits, topk_ids, topk_logprobs, tail_logprob)
    teacher = _teacher_buckets(topk_logprobs, tail_logprob, temperature, _compute_dtype(student_logits.dtype))
    student_logq = student_bucket_logprobs(student_logits, topk_ids, teacher.stored, temperature)
    return _divergence(teacher.logp, student_logq, kind, skew_lambda, jsd_beta).masked_fill(teacher.absent, 0.0)


def student_bucket_logprobs(
    student_logits: Tensor, topk_ids: Tensor, stored: Tensor, temperature: float = 1.0
) -> Tensor:
    """The student's log-probs [P, M, k+1] over each sample's buckets: the stored ids (-inf at padded
    slots, stored [P, M, k] False) and the tail, from logits [P, V] divided by the temperature."""
    slots = _Slots(topk_ids.long().flatten(1), stored.flatten(1))
    at_ids, lse_rest = _LogitsAtIdsAndRest.apply(student_logits, slots.ids, slots.valid, temperature)
    return _student_log_probs(at_ids, lse_rest, slots, stored)[1]


def sparse_losses_(
    logits: Tensor,
    topk_ids: Tensor | None,
    topk_logprobs: Tensor | None,
    tail_logprob: Tensor | None,
    labels: Tensor | None,
    kd_weight: float,
    ce_weight: float,
    need_grad: bool,
    kind: str = "fkl",
    temperature: float = 1.0,
    skew_lambda: float = 0.1,
    jsd_beta: float = 0.5,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """KD and CE of one chunk of positions, with the gradient of kd_weight·ΣKD + ce_weight·ΣCE.

    Consumes `logits` [C, V] (float32 or float64, contiguous: overwritten). Returns the detached
    per-(position, sample) divergence [C, M] (None when topk_ids is None), the per-position
    cross-entropy of `labels` [C] at T = 1 (None when labels is None), and with need_grad the
    gradient with respect to the logits [C, V] (in the logits' storage, or in that of their
    tempered copy), else None. The definitions are those of `sparse_kd_loss` and
    `masked_cross_entropy`; the caller checks options, shapes and ids.
    """
    kd = ce = None
    passes = []  # (d pass logits / d logits, slots, at_ids, lse_rest, rest, rest_sum): one [C, V] pass each
    with torch.enable_grad() if need_grad else nullcontext():
        if topk_ids is not None:
            teacher = _teacher_buckets(topk_logprobs, tail_logprob, temperature, logits.dtype)
            slots = _Slots(topk_ids.long().flatten(1), teacher.stored.flatten(1))
            shared = labels is not None and temperature == 1.0
            if shared:  # the labels join the stored ids as extra slots: one pass for KD and CE
                slots = _Slots(
                    torch.cat([slots.ids, labels.long().unsqueeze(1)], 1), F.pad(slots.valid, (0, 1), value=True)
                )
            if temperature == 1.0:
                tempered = logits
            elif labels is None:
                tempered = logits.div_(temperature)
            else:  # a copy: the CE pass below needs the logits at T = 1
                tempered = logits / temperature
            passes.append((1.0 / temperature, slots, *_logits_at_ids_and_rest_(tempered, slots.ids, slots.valid)))
            at_ids, lse_rest = _track(passes[-1], need_grad)
            log_z, student_logq = _student_log_probs(at_ids, lse_rest, slots, teacher.stored)
            kd = _divergence(teacher.logp, student_logq, kind, skew_lambda, jsd_beta).masked_fill(teacher.absent, 0.0)
            if shared:
                ce = log_z - at_ids[:, -1]
        if labels is not None and ce is None:
            slots = _Slots(
                labels.long().unsqueeze(1), torch.ones(len(labels), 1, dtype=torch.bool, device=labels.device)
            )
            passes.append((1.0, slots, *_logits_at_ids_and_rest_(logits, slots.ids, slots.valid)))
            at_ids, lse_rest = _track(passes[-1], need_grad)
            ce = torch.logaddexp(lse_rest, at_ids[:, 0]) - at_ids[:, 0]
        if not need_grad:
            return _detached(kd), _detached(ce), None
        objective = sum(w * t.sum() for w, t in ((kd_weight, kd), (ce_weight, ce)) if t is not None)
        grads = torch.autograd.grad(objective, [t for p in passes for t in p[2:4]], materialize_grads=True)
    grad = None
    for n, (scale, slots, _, _, rest, rest_sum) in enumerate(passes):
        pass_grad = _rest_grad_(rest, rest_sum, slots.ids, grads[2 * n], grads[2 * n + 1])
        if scale != 1.0:
            pass_grad.mul_(scale)
        grad = pass_grad if grad is None else grad.add_(pass_grad)
    return _detached(kd), _detached(ce), grad


class _LogitsAtIdsAndRest(torch.autograd.Function):
    """(logits / T at the ids [P, n], logsumexp of logits / T outside the valid ids [P]), with a one-pass backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, valid: Tensor, temperature: float):
        z = torch.empty(logits.shape, dtype=_compute_dtype(logits.dtype), device=logits.device).copy_(logits)
        at_ids, lse_rest, rest, rest_sum = _logits_at_ids_and_rest_(
            z.div_(temperature) if temperature != 1 else z, ids, valid
        )
        ctx.save_for_backward(rest, rest_sum, ids)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        return at_ids, lse_rest

    @staticmethod
    def backward(ctx, grad_at_ids: Tensor, grad_lse_rest: Tensor):
        rest, rest_sum, ids = ctx.saved_tensors
        grad = _rest_grad_(rest.clone(), rest_sum, ids, grad_at_ids, grad_lse_rest)  # a copy: the graph may be retained
        grad = grad.div_(ctx.temperature) if ctx.temperature != 1 else grad
        return grad.to(ctx.logits_dtype), None, None, None


def _logits_at_ids_and_rest_(z: Tensor, ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The one [P, V] pass. Consumes z [P, V]: returns z at `ids` [P, n], the logsumexp of each row
    outside its valid ids [P], and, in z's storage, exp(z - shift) outside those ids (0 at them) with
    its row sums [P]: what the backward needs."""
    z_at_ids = z.gather(1, ids)
    # -inf at the valid ids; a padded slot (amin with +inf) leaves its id as it is, even one it shares.
    fill = torch.full_like(z_at_ids, math.inf).masked_fill_(valid, -math.inf)
    z.scatter_reduce_(1, ids, fill, reduce="amin")
    shift = z.amax(dim=1, keepdim=True)
    shift.masked_fill_(~torch.isfinite(shift), 0.0)  # rows with nothing outside the ids
    rest = z.sub_(shift).exp_()
    rest_sum = rest.sum(dim=1)
    return z_at_ids, shift.squeeze(1) + rest_sum.log(), rest, rest_sum


def _rest_grad_(rest: Tensor, rest_sum: Tensor, ids: Tensor, grad_at_ids: Tensor, grad_lse_rest: Tensor) -> Tensor:
    """Gradient with respect to z [P, V] from those of (z at ids, lse_rest), in rest's storage."""
    scale = torch.where(rest_sum > 0, grad_lse_rest / rest_sum, 0.0)  # d lse_rest / d z_v = rest_v / rest_sum
    return rest.mul_(scale.unsqueeze(1)).scatter_add_(1, ids, grad_at_ids)


class _Slots:
    """The ids gathered for one pass [P, n] and which are real (valid); each distinct valid id of a row
    gets a group number (its rank among them), and `distinct` marks one slot per group."""

    def __init__(self, ids: Tensor, valid: Tensor):
        self.ids, self.valid = ids, valid
        sorted_key, order = ids.masked_fill(~valid, -1).sort(dim=1)
        first = sorted_key >= 0
        first[:, 1:] &= sorted_key[:, 1:] != sorted_key[:, :-1]
        self.distinct = torch.zeros_like(valid).scatter_(1, order, first)
        self.group = torch.empty_like(ids).scatter_(1, order, (first.cumsum(dim=1) - 1).clamp_(min=0))


def _student_log_probs(at_ids: Tensor, lse_rest: Tensor, slots: _Slots, stored: Tensor) -> tuple[Tensor, Tensor]:
    """log Z [P] and log q over the buckets [P, M, k+1] of the samples whose stored ids fill the first M·k slots.

    The ids of the slots were left out of lse_rest; each distinct valid one comes back once. The
    sums are in float64, relative to the row's largest such logit (shift), so that no term of a
    float32 student overflows and none that matters underflows.
    """
    rows, samples, k = stored.shape
    n = slots.ids.shape[1]
    shift = at_ids.detach().masked_fill(~slots.valid, -math.inf).amax(dim=1)
    shift = shift.masked_fill(~torch.isfinite(shift), 0.0).double()
    terms = (at_ids.double() - shift.unsqueeze(1)).exp().masked_fill(~slots.distinct, 0.0)
    by_group = torch.zeros_like(terms).scatter_add(1, slots.group, terms)  # [P, n]: each distinct id once
    rest = (lse_rest.double() - shift).exp()
    log_z = _log(rest + by_group.sum(dim=1)) + shift

    # Tail of sample m: the rest plus the distinct ids (of any slot: other samples', labels) it does not hold.
    held = torch.zeros(rows, samples, n, dtype=torch.bool, device=stored.device)  # [p, m, group]
    held.view(rows, -1).scatter_reduce_(
        1,
        torch.arange(samples, device=stored.device).repeat_interleave(k) * n + slots.group[:, : samples * k],
        stored.view(rows, -1),
        reduce="amax",
    )
    others = torch.bmm((~held).double(), by_group.unsqueeze(2)).squeeze(2)  # [P, M]
    tail_logq = _log(rest.unsqueeze(1) + others) + (shift - log_z).unsqueeze(1)  # -inf when the ids cover V

    log_z = log_z.to(at_ids.dtype)
    stored_logq = (at_ids[:, : samples * k] - log_z.unsqueeze(1)).view(rows, samples, k).masked_fill(~stored, -math.inf)
    return log_z, torch.cat([stored_logq, tail_logq.to(at_ids.dtype).unsqueeze(-1)], dim=-1)


class _Teacher(NamedTuple):
    logp: Tensor  # [P, M, k+1] tempered log-probs over the buckets
    absent: Tensor  # [P, M] rows that carry no teacher distribution
    stored: Tensor  # [P, M, k] real (not padded) slots


def _teacher_buckets(topk_logprobs: Tensor, tail_logprob: Tensor, temperature: float, dtype: torch.dtype) -> _Teacher:
    buckets = torch.cat([topk_logprobs, tail_logprob.unsqueeze(-1)], dim=-1).to(dtype)
    absent = ~torch.isfinite(buckets).any(dim=-1)
    buckets = buckets.masked_fill(absent.unsqueeze(-1), 0.0)  # keeps those rows finite; their loss is zeroed
    return _Teacher(torch.log_softmax(buckets / temperature, dim=-1), absent, torch.isfinite(topk_logprobs))


def _log(x: Tensor) -> Tensor:
    """log of x >= 0: -inf with a zero (not NaN) gradient at 0."""
    positive = x > 0
    return torch.where(positive, x, 1.0).log().masked_fill(~positive, -math.inf)


def _track(pass_: tuple, need_grad: bool) -> tuple[Tensor, Tensor]:
    """The pass's (at_ids, lse_rest) as leaves of the small graph whose gradient the pass's backward takes."""
    return pass_[2].requires_grad_(need_grad), pass_[3].requires_grad_(need_grad)


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def dense_kd_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    skew_lambda: float = 0.1,
    jsd_beta: float = 0.5,
) -> Tensor:
    """Per-position divergence [P] over the full vocabulary: student_logits [P, V], teacher_logprobs [P, V].

    The same definitions as `sparse_kd_loss` (teacher log-probs tempered and renormalised over V);
    the reference for tests and the loss of online distillation.
    """
    _check_options(kind, temperature, skew_lambda, jsd_beta)
    if student_logits.dim() != 2 or teacher_logprobs.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logprobs: expected the shape of student_logits [P, V] = {list(student_logits.shape)}, "
            f"got {list(teacher_logprobs.shape)}"
        )
    logits = _upcast(student_logits)
    student_logq = torch.log_softmax(logits / temperature, dim=-1)
    teacher_logp = torch.log_softmax(teacher_logprobs.to(logits.dtype) / temperature, dim=-1)
    return _divergence(teacher_logp, student_logq, kind, skew_lambda, jsd_beta)


def exact_losses_(
    logits: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None,
    kd_weight: float,
    ce_weight: float,
    need_grad: bool,
    kind: str = "fkl",
    temperature: float = 1.0,
    skew_lambda: float = 0.1,
    jsd_beta: float = 0.5,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`dense_kd_loss` of one chunk against the teacher's own distributions, and CE, with the gradient of
    kd_weight·ΣKD + ce_weight·ΣCE (a hidden cache's exact loss; the chunked objective calls it).

    logits [C, V] (float32 or float64); teacher_hidden [C, M, d]: the teacher's final hidden states;
    teacher_weight [V_t, d]: its output layer (`teacher_logprobs`). One teacher sample at a time, so
    the chunk's memory is a few [C, V] buffers whatever M. Returns the per-(position, sample)
    divergence [C, M], the per-position cross-entropy of `labels` [C] at T = 1 (None without labels)
    and with need_grad the gradient with respect to the logits (else None).
    """
    kd, grad = [], None
    with torch.enable_grad() if need_grad else nullcontext():
        student = logits.detach().requires_grad_(need_grad)
        for m in range(teacher_hidden.shape[1]):
            teacher = teacher_logprobs(teacher_hidden[:, m], teacher_weight, logits.shape[1])
            kd_m = dense_kd_loss(student, teacher, kind, temperature, skew_lambda, jsd_beta)
            if need_grad:
                (g,) = torch.autograd.grad(kd_m.sum() * kd_weight, student)
                grad = g if grad is None else grad.add_(g)
            kd.append(kd_m.detach())
        ce = None if labels is None else F.cross_entropy(student, labels.long(), reduction="none")
        if need_grad and ce is not None:
            (g,) = torch.autograd.grad(ce.sum() * ce_weight, student)
            grad = g if grad is None else grad.add_(g)
    return torch.stack(kd, dim=1), _detached(ce), grad


def teacher_logprobs(hidden: Tensor, weight: Tensor, vocab: int | None = None) -> Tensor:
    """A teacher's log-probs at T = 1 [C, vocab] from its final hidden states [C, d] and output layer W [V_t, d]:
    log_softmax(h·Wᵀ), the logits computed in W's dtype as the teacher computes them, then upcast to
    float32; -inf (probability 0) for the ids from V_t up to `vocab` (a student with a larger output layer)."""
    logits = F.linear(hidden.to(weight.dtype), weight)
    logp = torch.log_softmax(_upcast(logits), dim=-1)
    return logp if vocab is None or vocab == logp.shape[1] else F.pad(logp, (0, vocab - logp.shape[1]), value=-math.inf)


def reduce_kd_loss(per_sample: Tensor, mask: Tensor, sample_index: Tensor | None = None) -> Tensor:
    """Scalar mean of a [P, M] loss over the positions where mask [P] is True.

    sample_index None averages over the M teacher samples; a LongTensor [P] instead takes one
    sample per position (the trainer draws one per example and repeats it over its positions).
    An all-masked batch gives 0 that still carries a (zero) gradient; masked entries may hold
    inf or NaN without reaching the value or the gradient.
    """
    if per_sample.dim() != 2 or mask.shape != per_sample.shape[:1]:
        raise ValueError(
            f"mask: expected shape [P] = [{per_sample.shape[0]}] for a [P, M] loss, got {list(mask.shape)}"
        )
    if sample_index is None:
        per_position = per_sample.mean(dim=1)
    else:
        if sample_index.shape != mask.shape:
            raise ValueError(f"sample_index: expected shape {list(mask.shape)}, got {list(sample_index.shape)}")
        per_position = per_sample.gather(1, sample_index.long().unsqueeze(1)).squeeze(1)
    kept = torch.where(mask, per_position, torch.zeros_like(per_position))
    return kept.sum() / mask.sum().clamp(min=1)


def masked_cross_entropy(student_logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Mean cross-entropy [scalar] of logits [P, V] against labels [P] over positions where mask [P] is True.

    Computed in at least float32; labels at masked positions are ignored (any value); an
    all-masked batch gives 0 with a (zero) gradient.
    """
    if labels.shape != student_logits.shape[:1] or mask.shape != labels.shape:
        raise ValueError(
            f"labels, mask: expected shape [P] = [{student_logits.shape[0]}], got {list(labels.shape)}, {list(mask.shape)}"
        )
    targets = labels.long().masked_fill(~mask, -100)
    total = F.cross_entropy(_upcast(student_logits), targets, ignore_index=-100, reduction="sum")
    return total / mask.sum().clamp(min=1)


def _divergence(teacher_logp: Tensor, student_logq: Tensor, kind: str, skew_lambda: float, jsd_beta: float) -> Tensor:
    """Divergence of `kind` summed over the last dim, from log-probs of the same categories."""
    # A category empty on both sides contributes nothing. Give it finite stand-in values so that
    # no intermediate (logaddexp(-inf, -inf) in particular) puts NaN into the gradient.
    empty = torch.isneginf(teacher_logp) & torch.isneginf(student_logq)
    logp = teacher_logp.masked_fill(empty, 0.0)
    logq = student_logq.masked_fill(empty, 0.0)
    if kind == "fkl":
        terms = _kl_terms(logp, logq)
    elif kind == "rkl":
        terms = _kl_terms(logq, logp)
    elif kind == "skl":
        terms = _kl_terms(logp, _log_mixture(logp, logq, skew_lambda))
    elif kind == "srkl":
        terms = _kl_terms(logq, _log_mixture(logp, logq, 1.0 - skew_lambda))
    elif kind == "jsd":
        log_m = _log_mixture(logp, logq, jsd_beta)
        terms = jsd_beta * _kl_terms(logp, log_m) + (1.0 - jsd_beta) * _kl_terms(logq, log_m)
    else:  # tvd
        terms = 0.5 * (logp.exp() - logq.exp()).abs()
    return terms.masked_fill(empty, 0.0).sum(dim=-1)


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise a·log(a/b), 0 where a = 0 (also in the gradient)."""
    log_ratio = torch.where(torch.isneginf(log_a), torch.zeros_like(log_a), log_a - log_b)
    return log_a.exp() * log_ratio


def _log_mixture(logp: Tensor, logq: Tensor, weight_p: float) -> Tensor:
    """log(w·p + (1-w)·q) for 0 < w < 1."""
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))


def _upcast(logits: Tensor) -> Tensor:
    return logits.to(_compute_dtype(logits.dtype))


def _check_options(kind: str, temperature: float, skew_lambda: float, jsd_beta: float) -> None:
    if kind not in KD_LOSSES:
        raise ValueError(f"kind: expected one of {', '.join(KD_LOSSES)}, got {kind!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature}")
    if not 0 < skew_lambda < 1:
        raise ValueError(f"skew_lambda: expected 0 < skew_lambda < 1, got {skew_lambda}")
    if not 0 < jsd_beta < 1:
        raise ValueError(f"jsd_beta: expected 0 < jsd_beta < 1, got {jsd_beta}")


def _check_sparse_shapes(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits: expected shape [P, V], got {list(student_logits.shape)}")
    num_positions, vocab_size = student_logits.shape
    if topk_ids.dim() != 3 or topk_ids.shape[0] != num_positions or topk_ids.dtype.is_floating_point:
        raise ValueError(
            f"topk_ids: expected integer ids [P={num_positions}, M, k], got {topk_ids.dtype} {list(topk_ids.shape)}"
        )
    if topk_ids.shape[-1] > vocab_size:
        raise ValueError(f"topk_ids: k = {topk_ids.shape[-1]} exceeds the vocabulary size {vocab_size}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"topk_logprobs: expected the shape of topk_ids {list(topk_ids.shape)}, got {list(topk_logprobs.shape)}"
        )
    if tail_logprob.shape != topk_ids.shape[:2]:
        raise ValueError(
            f"tail_logprob: expected shape [P, M] = {list(topk_ids.shape[:2])}, got {list(tail_logprob.shape)}"
        )
    if topk_ids.numel() and not (int(topk_ids.min()) >= 0 and int(topk_ids.max()) < vocab_size):
        raise ValueError(
            f"topk_ids: ids must lie in [0, {vocab_size}), got {int(topk_ids.min())}..{int(topk_ids.max())}"
        )
