"""Losses on a language model's output layer, computed chunk by chunk over positions: no [P, V] logits.

`chunked_output_loss(hidden, head, chunk_loss, chunk)` takes the final hidden states [P, d] of
the positions to score and the output layer (`OutputLayer`: weight [V, d], optional bias, the
logit scaling or soft-capping some families apply). For each chunk of `chunk` positions it
computes the chunk's logits [C, V] in float32, hands them to `chunk_loss`, which returns the
chunk's loss terms and the gradient of its "loss" term with respect to those logits, and sends
that gradient through the output layer at once (grad_hidden = g·W, grad_W += gᵀ·h): forward and
backward of a chunk both happen in the forward call, as in Liger-Kernel's fused linear losses.
So each logit is computed once, a step runs the three matmuls of a plain lm_head + loss, and at
most one chunk's [C, V] buffers exist at a time. The backward of the returned loss only scales
the gradients kept for hidden, W and b by its incoming gradient (a scalar loss: any objective
built on it differentiates correctly; double backward is not supported).

A chunk loss is any callable with a `terms` tuple (names, "loss" first) that maps (logits
[C, V] float32, which it may overwrite; the chunk's rows as a slice of the P positions;
need_grad) to (a 1-D tensor of the chunk's contribution to each term, the gradient of the
"loss" contribution with respect to the logits or None). objective.py's is the sparse KD + CE
of a cached batch; a loss against a full teacher distribution computed per chunk (for example
from stored teacher hidden states and the teacher's own output layer) fits the same slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class OutputLayer:
    """logits = softcap·tanh(s / softcap) with s = scale·(h Wᵀ + b); without softcap, logits = s."""

    weight: Tensor  # [V, d]
    bias: Tensor | None = None  # [V]
    scale: float = 1.0  # Cohere's logit_scale, Granite's 1 / logits_scaling
    softcap: float | None = None  # Gemma 2/3's final_logit_softcapping

    def logits(self, hidden: Tensor) -> Tensor:
        """All the logits of hidden [..., d], through autograd: the reference the chunked loss must match."""
        dtype = torch.promote_types(hidden.dtype, self.weight.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        logits = F.linear(hidden.to(dtype), self.weight.to(dtype), bias) * self.scale
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)


class ChunkLoss(Protocol):
    terms: tuple[str, ...]

    def __call__(self, logits: Tensor, rows: slice, need_grad: bool) -> tuple[Tensor, Tensor | None]: ...


def chunked_output_loss(
    hidden: Tensor,
    head: OutputLayer,
    chunk_loss: ChunkLoss,
    chunk: int,
    matmul_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The sum over chunks of `chunk_loss`'s terms, as float32 scalars (float64 for float64 inputs); "loss" carries the gradient
    to hidden [P, d], head.weight and head.bias (the other terms are detached).

    matmul_dtype: the dtype of the logit matmuls (default: that of hidden and weight promoted);
    bfloat16 under CUDA autocast, as autocast would run the lm_head. The logits are upcast to
    float32 per chunk either way.
    """
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive number of positions, got {chunk}")
    inputs = (hidden, head.weight, head.bias)
    needs = tuple(t is not None and t.requires_grad and torch.is_grad_enabled() for t in inputs)
    if any(needs):
        loss, values = _ChunkedOutputLoss.apply(
            *inputs, head.scale, head.softcap, chunk_loss, chunk, matmul_dtype, needs
        )
    else:
        loss, values, _ = _run_chunks(hidden, head, chunk_loss, chunk, matmul_dtype, needs)
    return {"loss": loss, **{name: values[n] for n, name in enumerate(chunk_loss.terms[1:])}}


class _ChunkedOutputLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, scale, softcap, chunk_loss, chunk, matmul_dtype, needs):
        head = OutputLayer(weight, bias, scale, softcap)
        loss, values, grads = _run_chunks(hidden, head, chunk_loss, chunk, matmul_dtype, needs)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(values)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss, values

    @staticmethod
    def backward(ctx, grad_loss, _grad_values):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if grad is not None:
                grad = grad.mul_(grad_loss) if grad_loss.item() != 1.0 else grad  # the loss scaled by the objective
                grad = grad.to(dtype)
            grads.append(grad)
        return (*grads, None, None, None, None, None, None)


def _run_chunks(
    hidden: Tensor,
    head: OutputLayer,
    chunk_loss: ChunkLoss,
    chunk: int,
    matmul_dtype: torch.dtype | None,
    needs: tuple[bool, bool, bool],
):
    """(loss, other term values, (grad_hidden, grad_weight, grad_bias) or Nones) over all chunks."""
    dtype = matmul_dtype or torch.promote_types(hidden.dtype, head.weight.dtype)
    layer = OutputLayer(
        head.weight.detach().to(dtype),
        None if head.bias is None else head.bias.detach().to(dtype),
        head.scale,
        head.softcap,
    )
    accumulate = torch.promote_types(head.weight.dtype, torch.float32)
    grads = [
        torch.empty_like(hidden) if needs[0] else None,
        None,  # grad_weight: allocated by the first chunk
        torch.zeros(head.weight.shape[0], dtype=accumulate, device=hidden.device) if needs[2] else None,
    ]
    total = torch.zeros(len(chunk_loss.terms), dtype=torch.float64, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, min(start + chunk, hidden.shape[0]))
            total += _chunk(hidden[rows].detach().to(dtype), rows, layer, chunk_loss, needs, grads, accumulate)
    logits_dtype = torch.promote_types(dtype, torch.float32)
    return total[0].to(logits_dtype), total[1:].to(logits_dtype), tuple(grads)


def _chunk(h: Tensor, rows: slice, layer: OutputLayer, chunk_loss: ChunkLoss, needs, grads: list, accumulate) -> Tensor:
    """One chunk, forward and backward: its term values; its gradients added to grads. A function, so
    that its [C, V] buffers are freed before the next chunk's are allocated."""
    need_grad = any(needs)
    logits = F.linear(h, layer.weight, layer.bias).to(torch.promote_types(h.dtype, torch.float32))
    if layer.scale != 1.0:
        logits.mul_(layer.scale)
    if layer.softcap is not None:
        logits.div_(layer.softcap).tanh_()
        softcap_slope = 1 - logits.square() if need_grad else None  # d softcap·tanh(s/softcap) / ds
        logits.mul_(layer.softcap)
    values, grad = chunk_loss(logits, rows, need_grad)
    if not need_grad:
        return values
    if layer.softcap is not None:
        grad.mul_(softcap_slope)
    grad_bias = grad.sum(dim=0) if needs[2] else None
    grad = grad.to(h.dtype)
    grad_hidden, grad_weight, _ = grads
    if needs[0]:
        grad_hidden[rows] = torch.mm(grad, layer.weight).mul_(layer.scale).to(grad_hidden.dtype)
    if needs[1] and grad_weight is None:
        grads[1] = torch.mm(grad.T, h).to(accumulate)
        if layer.scale != 1.0:
            grads[1].mul_(layer.scale)
    elif needs[1] and h.dtype == accumulate:
        grad_weight.addmm_(grad.T, h, alpha=layer.scale)
    elif needs[1]:  # low-precision matmuls, float32 accumulation over the chunks
        grad_weight.add_(torch.mm(grad.T, h).to(accumulate), alpha=layer.scale)
    if needs[2]:
        grads[2].add_(grad_bias.to(accumulate), alpha=layer.scale)
    return values
