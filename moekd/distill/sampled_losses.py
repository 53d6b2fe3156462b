"""The distillation loss of a sampled cache (random-sampling KD, docs/methods.md §4.2, §5.3).

A sampled cache holds, per position and teacher sample, ids drawn from the teacher and weights
w_i that make p_hat_i = w_i an unbiased estimate of the teacher p at those ids
(moekd.encodings.sampled.sampled_estimate). A loss has an unbiased estimate from them when its
student-dependent part is linear in p: forward KL's cross-entropy H(p, q) = -sum_v p_v log q_v,
estimated by -sum_i w_i log q_i. E[estimate] = KL(p || q) + H(p): its gradient is unbiased for
the forward-KL gradient (the teacher entropy H(p) does not depend on the student), and its value
is the forward KL plus that constant. The other losses are refused (`SAMPLED_BIASED` says why).

`sampled_kd_loss` takes [P, V] logits (autograd); `sampled_losses_` is the same estimate on one
chunk of logits it may overwrite, with the gradient of a weighted sum of KD and CE, for the
chunked training objective (objective.py): no step holds [P, V]. Both compute in at least float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

SAMPLED_BIASED = {
    "rkl": "reverse KL sums q·log(q/p) over the student's support and log p is not linear in p, so draws from p "
    "give no unbiased estimate of it",
    "skl": "skew KL takes log(λp + (1-λ)q), not linear in p, so its estimate from draws is biased",
    "srkl": "skew reverse KL takes log((1-λ)p + λq), not linear in p, so its estimate from draws is biased",
    "jsd": "JSD takes log(βp + (1-β)q), not linear in p, so its estimate from draws is biased",
    "tvd": "total variation takes |p - q|, not linear in p (E|p_hat - q| > |p - q|), so its estimate is biased",
}


def sampled_kd_loss(
    student_logits: Tensor, sampled_ids: Tensor, sampled_weights: Tensor, temperature: float = 1.0
) -> Tensor:
    """Per-(position, sample) estimate [P, M] of the cross-entropy -sum_v p_v log q_v from sampled ids.

    student_logits [P, V]; sampled_ids [P, M, S] (int); sampled_weights [P, M, S]: the unbiased
    estimate of the (tempered) teacher at those ids, 0 in padding slots. q is the student at the
    temperature.
    """
    if student_logits.dim() != 2 or sampled_ids.dim() != 3 or sampled_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"sampled_ids: expected [P={student_logits.shape[0]}, M, S] for logits [P, V], "
            f"got {list(sampled_ids.shape)}"
        )
    if sampled_weights.shape != sampled_ids.shape:
        raise ValueError(
            f"sampled_weights: expected the shape of sampled_ids {list(sampled_ids.shape)}, "
            f"got {list(sampled_weights.shape)}"
        )
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    logq = torch.log_softmax(logits / temperature, dim=-1)
    ids = sampled_ids.long()
    at_ids = logq.gather(-1, ids.flatten(1)).view_as(ids)
    return -(sampled_weights.to(at_ids.dtype) * at_ids).sum(dim=-1)


def sampled_losses_(
    logits: Tensor,
    sampled_ids: Tensor | None,
    sampled_weights: Tensor | None,
    labels: Tensor | None,
    kd_weight: float,
    ce_weight: float,
    need_grad: bool,
    temperature: float = 1.0,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The estimate of `sampled_kd_loss` and the cross-entropy of one chunk, with the gradient of
    kd_weight·ΣKD + ce_weight·ΣCE.

    Consumes `logits` [C, V] (float32 or float64, contiguous: overwritten). Returns the
    per-(position, sample) estimate [C, M] (None without sampled_ids), the per-position
    cross-entropy of `labels` [C] at T = 1 (None without labels) and with need_grad the gradient
    with respect to the logits (else None). Both are sums of weighted negative log-likelihoods,
    -sum_j a_j log q(id_j), whose gradient is (sum_j a_j)·q - (a_j at id_j) per row: one softmax
    pass each (one for both at T = 1, where the label joins the drawn ids as one more slot).
    """
    kd = ce = grad = None
    if sampled_ids is not None:
        rows, samples, width = sampled_ids.shape
        ids, weights = sampled_ids.long().flatten(1), sampled_weights.to(logits.dtype).flatten(1)
        grad_weights = weights * kd_weight
        shared = labels is not None and temperature == 1.0
        if shared:
            ids = torch.cat([ids, labels.long().unsqueeze(1)], 1)
            grad_weights = torch.cat([grad_weights, torch.full_like(weights[:, :1], ce_weight)], 1)
        tempered = (
            logits if temperature == 1.0 else logits / temperature if labels is not None else logits.div_(temperature)
        )
        nll, grad = _weighted_nll_(tempered, ids, grad_weights if need_grad else None)
        kd = (weights * nll[:, : samples * width]).view(rows, samples, width).sum(dim=-1)
        if grad is not None and temperature != 1.0:
            grad.div_(temperature)
        if shared:
            ce = nll[:, -1]
    if labels is not None and ce is None:
        ids = labels.long().unsqueeze(1)
        nll, ce_grad = _weighted_nll_(
            logits,
            ids,
            torch.full(ids.shape, ce_weight, dtype=logits.dtype, device=logits.device) if need_grad else None,
        )
        ce = nll[:, 0]
        grad = ce_grad if grad is None else grad.add_(ce_grad)
    return kd, ce, grad


def _weighted_nll_(z: Tensor, ids: Tensor, grad_weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """-log softmax(z) at ids [C, n], and with grad_weights a [C, n] the gradient of
    -sum_j a_j log softmax(z)_(id_j) with respect to z [C, V], in z's storage (z is consumed)."""
    log_z = torch.logsumexp(z, dim=1, keepdim=True)
    nll = log_z - z.gather(1, ids)
    if grad_weights is None:
        return nll, None
    grad = z.sub_(log_z).exp_().mul_(grad_weights.sum(dim=1, keepdim=True))
    return nll, grad.scatter_add_(1, ids, -grad_weights)
