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

Kinds (METHODS.md §6), with p the teacher and q the student:
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

Memory: the student tail needs the logits with a sample's stored ids masked out, one [P, V]
tensor at a time; with M > 1 samples each is recomputed in backward (activation checkpointing)
instead of keeping M of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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
    logits = _upcast(student_logits) / temperature

    buckets = torch.cat([topk_logprobs, tail_logprob.unsqueeze(-1)], dim=-1).to(logits.dtype)
    no_teacher = ~torch.isfinite(buckets).any(dim=-1)  # [P, M]: padding rows
    buckets = buckets.masked_fill(no_teacher.unsqueeze(-1), 0.0)  # keeps those rows finite; loss zeroed below
    teacher_logp = torch.log_softmax(buckets / temperature, dim=-1)  # [P, M, k+1]

    stored = torch.isfinite(buckets[..., :-1])  # [P, M, k]; False for padded slots
    logz = torch.logsumexp(logits, dim=-1)  # [P]
    ids = topk_ids.long()
    stored_logq = logits.gather(-1, ids.flatten(1)).view_as(ids) - logz[:, None, None]
    stored_logq = stored_logq.masked_fill(~stored, -math.inf)

    # Tail bucket: log of the student mass outside the stored ids, from the logits themselves so
    # that a tail mass far below float epsilon keeps its exact log. One sample at a time, and with
    # several samples recomputed in backward, so memory stays one [P, V] whatever M.
    samples = ids.shape[1]
    tails = [
        _logsumexp_outside(logits, ids[:, m], stored[:, m]) if samples == 1
        else checkpoint(_logsumexp_outside, logits, ids[:, m], stored[:, m], use_reentrant=False)
        for m in range(samples)
    ]
    tail_logq = torch.stack(tails, dim=1) - logz[:, None]  # -inf when the ids cover V

    student_logq = torch.cat([stored_logq, tail_logq.unsqueeze(-1)], dim=-1)
    loss = _divergence(teacher_logp, student_logq, kind, skew_lambda, jsd_beta)
    return loss.masked_fill(no_teacher, 0.0)


# Sampled caches (random-sampling KD, METHODS.md §7) hold draws from the teacher p: an unbiased
# estimate p_hat of p. A loss admits an unbiased estimate from them when its student-dependent part
# is linear in p: forward KL's cross-entropy -sum p log q. The others are refused, for this reason.
SAMPLED_BIASED = {
    "rkl": "reverse KL sums q·log(q/p) over the student's support and log p is not linear in p, so draws from p "
           "give no unbiased estimate of it",
    "skl": "skew KL takes log(λp + (1-λ)q), not linear in p, so its estimate from draws is biased",
    "srkl": "skew reverse KL takes log((1-λ)p + λq), not linear in p, so its estimate from draws is biased",
    "jsd": "JSD takes log(βp + (1-β)q), not linear in p, so its estimate from draws is biased",
    "tvd": "total variation takes |p - q|, not linear in p (E|p_hat - q| > |p - q|), so its estimate is biased",
}


def sampled_kd_loss(student_logits: Tensor, sampled_ids: Tensor, sampled_weights: Tensor,
                    temperature: float = 1.0) -> Tensor:
    """Per-(position, sample) estimate [P, M] of the cross-entropy -sum_v p_v log q_v from sampled ids.

    student_logits [P, V]; sampled_ids [P, M, S] (int); sampled_weights [P, M, S]: the unbiased
    estimate p_hat of the (tempered) teacher at those ids, 0 in padding slots (moekd.encoding.
    sampled_estimate). E[loss] = H(p, q) = KL(p || q) + H(p): its gradient is unbiased for the
    forward-KL gradient (the teacher entropy H(p) does not depend on the student), so the value
    is the forward KL plus a constant.
    """
    if student_logits.dim() != 2 or sampled_ids.dim() != 3 or sampled_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"sampled_ids: expected [P={student_logits.shape[0]}, M, S] for logits [P, V], "
                         f"got {list(sampled_ids.shape)}")
    if sampled_weights.shape != sampled_ids.shape:
        raise ValueError(f"sampled_weights: expected the shape of sampled_ids {list(sampled_ids.shape)}, "
                         f"got {list(sampled_weights.shape)}")
    logq = torch.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    ids = sampled_ids.long()
    at_ids = logq.gather(-1, ids.flatten(1)).view_as(ids)
    return -(sampled_weights.to(at_ids.dtype) * at_ids).sum(dim=-1)


def _logsumexp_outside(logits: Tensor, ids: Tensor, stored: Tensor) -> Tensor:
    """logsumexp of each row of `logits` [P, V] over the ids [P, k] not stored there.

    Padded slots scatter into an extra column that is dropped, so they never hide a real id.
    """
    vocab_size = logits.shape[-1]
    in_topk = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=logits.device)
    in_topk.scatter_(-1, ids.masked_fill(~stored, vocab_size), True)
    return torch.logsumexp(logits.masked_fill(in_topk[:, :vocab_size], -math.inf), dim=-1)


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


def reduce_kd_loss(per_sample: Tensor, mask: Tensor, sample_index: Tensor | None = None) -> Tensor:
    """Scalar mean of a [P, M] loss over the positions where mask [P] is True.

    sample_index None averages over the M teacher samples; a LongTensor [P] instead takes one
    sample per position (the trainer draws one per example and repeats it over its positions).
    An all-masked batch gives 0 that still carries a (zero) gradient; masked entries may hold
    inf or NaN without reaching the value or the gradient.
    """
    if per_sample.dim() != 2 or mask.shape != per_sample.shape[:1]:
        raise ValueError(f"mask: expected shape [P] = [{per_sample.shape[0]}] for a [P, M] loss, got {list(mask.shape)}")
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
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


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
        raise ValueError(f"topk_ids: expected integer ids [P={num_positions}, M, k], got {topk_ids.dtype} {list(topk_ids.shape)}")
    if topk_ids.shape[-1] > vocab_size:
        raise ValueError(f"topk_ids: k = {topk_ids.shape[-1]} exceeds the vocabulary size {vocab_size}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs: expected the shape of topk_ids {list(topk_ids.shape)}, got {list(topk_logprobs.shape)}")
    if tail_logprob.shape != topk_ids.shape[:2]:
        raise ValueError(f"tail_logprob: expected shape [P, M] = {list(topk_ids.shape[:2])}, got {list(tail_logprob.shape)}")
