"""The losses of Student-Aware Router training (docs/methods.md §3), on one batch.

Teacher p_T (all experts, trainable routers) and student q_s are compared on the response
positions of the batch (position t predicts token t+1), over the shared vocabulary V:

    reverse (published default)   KL(p_T || q_s) = Σ_v p_T log(p_T / q_s)
    forward                       -Σ_v q_s log p_T   (cross-entropy of p_T under q_s; equals
                                  KL(q_s || p_T) + H(q_s), the same gradient for the routers)

averaged over the response positions, plus β · Σ_layers (CV(importance)² + CV(load)²), summed
over the MoE layers, where for one layer over the batch's T non-padding tokens (prompt and
response; a router sees them all):

    importance_e = Σ_t g_t,e     the gate distribution g (`GateAdapter.gate_probs`) summed over tokens
    load_e       = #{t : e in the router's native top-k of token t}   (the experts the router itself
                   would activate: DeepSeek-V3's with its correction bias and group limit)
    CV(x)²       = Var(x) / mean(x)²   over the N experts, population variance.

The load is a count: its CV² is part of the reported loss but carries no gradient (the
published noisy top-k gating makes it smooth through the gate noise, which our teacher in eval
mode does not have). The routers learn balance through the importance term only.

The co-trained student (--co-train-student) minimises KL(q_s || p_T) (reverse KL, as published)
against the updated teacher.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from moekd.distill.losses import dense_kd_loss
from moekd.routing.routers import RouterInfo

TEACHER_KLDS = ("reverse", "forward")


def teacher_divergence(teacher_logits: Tensor, student_logits: Tensor, kind: str) -> Tensor:
    """Per-position divergence [P] of `kind` (see the module docstring); logits [P, V], in float32."""
    if kind == "reverse":
        return dense_kd_loss(student_logits, teacher_logits, "fkl")  # KL(p || q) with p the "teacher" argument
    if kind == "forward":
        q = torch.softmax(student_logits.float(), dim=-1)
        return -(q * torch.log_softmax(teacher_logits.float(), dim=-1)).sum(dim=-1)
    raise ValueError(f"kind: expected one of {', '.join(TEACHER_KLDS)}, got {kind!r}")


def student_divergence(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-position KL(q_s || p_T) [P]: the co-trained student's loss."""
    return dense_kd_loss(student_logits, teacher_logits, "rkl")


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation Var(x) / mean(x)² of a 1-D tensor (population variance)."""
    x = x.float()
    return x.var(unbiased=False) / x.mean() ** 2


def balance_terms(gates: Tensor, native_index: Tensor, counted: Tensor) -> tuple[Tensor, Tensor]:
    """(CV(importance)², CV(load)²) of one MoE layer: gates [T, N], native top-k index [T, k], counted [T] bool."""
    importance = gates[counted].sum(dim=0)
    load = torch.bincount(native_index[counted].flatten(), minlength=gates.shape[1])
    return cv_squared(importance), cv_squared(load)


class RouterRecorder:
    """Records each router's gate distribution (differentiable) and native top-k index in `recording()`.

    `infos` are the teacher's routers as `recognise_routers` found them. Its hooks go before any
    other on the routers (and on the module a router hands its selection to, for routers that
    return only logits), so they see the router's own selection, not a policy's rewrite.
    """

    def __init__(self, infos: list[RouterInfo]):
        self.infos = infos
        self.gates: list[Tensor] = []
        self.native_index: list[Tensor] = []

    @contextmanager
    def recording(self):
        self.gates = [None] * len(self.infos)
        self.native_index = [None] * len(self.infos)
        handles = []
        for layer, info in enumerate(self.infos):
            handles.append(info.module.register_forward_hook(self._router_hook(layer), prepend=True))
            if info.target is not None:
                handles.append(
                    info.target.register_forward_pre_hook(self._target_hook(layer), prepend=True, with_kwargs=True)
                )
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.gates, self.native_index = [], []  # nothing of the step's graph outlives it

    # A checkpointing replay in backward runs these hooks again: it leaves the forward's record.
    def _router_hook(self, layer: int):
        info = self.infos[layer]

        def hook(router, args, output):
            if info.target is None:
                logits, _, index = info.adapter.read(output)
            else:  # the router returns its logits; the index is in the call of `info.target`
                logits, index = output, None
            gates = info.adapter.gate_probs(router, logits)  # in a replay too: it must save what the forward saved
            if self.gates[layer] is None:
                self.gates[layer] = gates
            if index is not None and self.native_index[layer] is None:
                self.native_index[layer] = index.detach()

        return hook

    def _target_hook(self, layer: int):
        adapter = self.infos[layer].adapter

        def hook(target, args, kwargs):
            if self.native_index[layer] is None:
                self.native_index[layer] = adapter.read_call(args, kwargs)[1].detach()

        return hook


def teacher_loss(
    teacher_logits: Tensor, student_logits: Tensor, recorder: RouterRecorder, counted: Tensor, kind: str, beta: float
) -> dict[str, Tensor]:
    """The teacher's loss and its terms: loss = divergence + beta * (importance_cv2 + load_cv2), the
    CV² terms summed over the MoE layers; `counted` [B*T] marks the non-padding tokens."""
    divergence = teacher_divergence(teacher_logits, student_logits, kind).mean()
    terms = [balance_terms(g, i, counted) for g, i in zip(recorder.gates, recorder.native_index)]
    importance = torch.stack([t[0] for t in terms]).sum()
    load = torch.stack([t[1] for t in terms]).sum()
    return {
        "loss": divergence + beta * (importance + load),
        "divergence": divergence,
        "importance_cv2": importance,
        "load_cv2": load,
    }
