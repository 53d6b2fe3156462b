"""The sparse KD loss as moekd computed it before the chunked rewrite: the exact reference for the tail bucket.

For each teacher sample it builds a [P, V] copy of the student logits with that sample's stored
ids masked out and takes its logsumexp: exact for a tail of any size, but M full-vocabulary passes
(and, with M > 1, their recomputation in backward). Kept here, outside the library, as the
reference that tests compare the new computation with (values, gradients and the tail error
bound) and as the "current implementation" baseline of bench/loss_scale.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from moekd.distill.losses import _divergence


def exact_sparse_kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    skew_lambda: float = 0.1,
    jsd_beta: float = 0.5,
) -> Tensor:
    """Per-(position, sample) divergence [P, M], the definitions of moekd.distill.losses.sparse_kd_loss."""
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)) / temperature
    buckets = torch.cat([topk_logprobs, tail_logprob.unsqueeze(-1)], dim=-1).to(logits.dtype)
    no_teacher = ~torch.isfinite(buckets).any(dim=-1)
    buckets = buckets.masked_fill(no_teacher.unsqueeze(-1), 0.0)
    teacher_logp = torch.log_softmax(buckets / temperature, dim=-1)

    stored = torch.isfinite(buckets[..., :-1])
    logz = torch.logsumexp(logits, dim=-1)
    ids = topk_ids.long()
    stored_logq = logits.gather(-1, ids.flatten(1)).view_as(ids) - logz[:, None, None]
    stored_logq = stored_logq.masked_fill(~stored, -math.inf)
    samples = ids.shape[1]
    tails = [
        exact_tail_logsumexp(logits, ids[:, m], stored[:, m])
        if samples == 1
        else checkpoint(exact_tail_logsumexp, logits, ids[:, m], stored[:, m], use_reentrant=False)
        for m in range(samples)
    ]
    tail_logq = torch.stack(tails, dim=1) - logz[:, None]
    student_logq = torch.cat([stored_logq, tail_logq.unsqueeze(-1)], dim=-1)
    loss = _divergence(teacher_logp, student_logq, kind, skew_lambda, jsd_beta)
    return loss.masked_fill(no_teacher, 0.0)


def exact_tail_logsumexp(logits: Tensor, ids: Tensor, stored: Tensor) -> Tensor:
    """logsumexp of each row of `logits` [P, V] over the ids [P, k] not stored there (padded slots never hide an id)."""
    vocab_size = logits.shape[-1]
    in_topk = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=logits.device)
    in_topk.scatter_(-1, ids.masked_fill(~stored, vocab_size), True)
    return torch.logsumexp(logits.masked_fill(in_topk[:, :vocab_size], -math.inf), dim=-1)
