"""The training objective of one batch: one student forward to the final hidden states, then KD
over the stored teacher distributions and/or cross-entropy on the ground-truth tokens, computed
chunk by chunk of positions from those hidden states and the output layer (chunked.py, losses.py).

KD is averaged over the response positions of a batch; with --ce-weight w the objective is
(1-w)·KD + w·CE, so w moves between pure distillation (0) and pure SFT (1) at a constant scale.
With M > 1 teacher samples the per-sample losses are averaged (the loader already picked one
sample per example for --samples random).

KD by the cache's encoding (`cache_objective` picks the chunk loss of `KDLoss.teacher`, OBJECTIVES):
topk, the (k+1)-bucket divergence (`SparseObjective`); sampled, the unbiased estimate of the
forward-KL cross-entropy (`SampledObjective`: KL + the teacher's entropy, a constant); hidden,
the exact full-vocabulary divergence of every kind at any temperature, the teacher's log-probs
recomputed per chunk from its stored hidden states and output layer (`ExactObjective`).

The seam: `batch_loss` = `Student.forward` (the batch's one forward; the module that
DistributedDataParallel wraps; `output_router_logits=True` returns an MoE student's router
logits from it) followed by `output_terms` (the loss terms from the hidden states at the target
positions). Terms computed from other outputs of that forward add to the returned "loss": an
MoE student's router terms (router_losses.py: Balanced Distillation, the family's load-balancing
loss), computed by the Student's `router_terms` from the router logits of the same forward; the
logit objective alone is then logged as logit_loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekd.distill.chunked import OutputLayer, chunked_output_loss
from moekd.distill.losses import exact_losses_, sparse_losses_
from moekd.distill.sampled_losses import sampled_losses_


@dataclass(frozen=True)
class KDLoss:
    """What the logit objective of a batch computes: the settings it reads (TrainOptions.kd_loss() gives a run's)."""

    loss: str  # fkl, rkl, skl, srkl, jsd, tvd or ce
    temperature: float
    skew_lambda: float
    jsd_beta: float
    ce_weight: float
    chunk: int  # positions per chunk of the output layer and the loss
    teacher: str = "topk_tail"  # the cache encoding's kind: which stored teacher arrays the KD reads


def batch_loss(
    student, batch: dict, kd: KDLoss, device: torch.device, teacher_layer: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """loss (and kd_loss, ce_loss when mixed; logit_loss and the router terms with router terms): means over
    the batch's target positions.

    `student` is a Student, or a wrapper around one whose `.module` is the Student
    (DistributedDataParallel): it is called once, and its output layer applied by the loss.
    teacher_layer: the teacher's output layer W [V, d] of a hidden cache (CacheSource.teacher_output_layer).
    """
    inner = getattr(student, "module", student)
    routing = inner.router_terms
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        # Right padding under a causal mask never reaches real tokens: no attention mask needed.
        output = student(input_ids=batch["input_ids"].to(device), output_router_logits=routing is not None)
    hidden = output.last_hidden_state.flatten(0, 1)[batch["rows"].to(device)]
    terms = output_terms(hidden, inner.output_layer, batch, kd, device, teacher_layer)
    if routing is None:
        return terms
    router = routing(output.router_logits, batch, training=inner.training)
    return {**terms, **router, "logit_loss": terms["loss"], "loss": terms["loss"] + router["loss"]}


def output_terms(
    hidden: torch.Tensor,
    head: OutputLayer,
    batch: dict,
    kd: KDLoss,
    device: torch.device,
    teacher_layer: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The objective's terms from the final hidden states [P, d] of the batch's target positions."""
    matmul_dtype = torch.bfloat16 if device.type == "cuda" else None  # what autocast would run the lm_head in
    return chunked_output_loss(hidden, head, cache_objective(batch, kd, device, teacher_layer), kd.chunk, matmul_dtype)


@torch.no_grad()
def held_out_loss(
    student,
    batches,
    kd: KDLoss,
    device,
    combine=lambda sums, positions: (sums, positions),
    teacher_layer: torch.Tensor | None = None,
) -> dict[str, float]:
    """Held-out loss terms, averaged over all held-out target positions (all teacher samples).
    `combine` adds up the sums of all ranks, each of which evaluated its share of the batches."""
    student.eval()
    sums: dict[str, float] = {}
    positions = 0
    for b in batches:
        if not len(b["rows"]):
            continue  # this rank's share of a batch was empty
        for key, value in batch_loss(student, b, kd, device, teacher_layer).items():
            sums[key] = sums.get(key, 0.0) + value.item() * len(b["rows"])
        positions += len(b["rows"])
    sums, positions = combine(sums, positions)
    return {f"eval_{key}": value / positions for key, value in sums.items()}


class _Objective:
    """What every chunk loss (chunked.ChunkLoss) of a batch shares: (1-w)·mean KD + w·mean CE, or mean CE for
    --loss ce; a subclass computes a chunk's KD and CE (`_losses`) from the teacher arrays it keeps."""

    TEACHER: tuple[str, ...] = ()  # the batch's teacher arrays [P, M, ...] that _losses takes

    def __init__(self, batch: dict, kd: KDLoss, device: torch.device):
        self.kd = kd
        self.labels = batch["labels"].to(device)
        self.teacher = None if kd.loss == "ce" else tuple(batch[key].to(device) for key in self.TEACHER)
        self.ce_share = 1.0 if self.teacher is None else kd.ce_weight  # w
        self.terms = ("loss", "kd_loss", "ce_loss") if self.teacher is not None and kd.ce_weight else ("loss",)
        positions = max(len(self.labels), 1)
        self.kd_scale = 0.0 if self.teacher is None else 1.0 / (positions * self.teacher[0].shape[1])  # mean over P, M
        self.ce_scale = 1.0 / positions

    def __call__(self, logits: torch.Tensor, rows: slice, need_grad: bool):
        w = self.ce_share
        labels = self.labels[rows] if w else None
        kd_weight, ce_weight = (1 - w) * self.kd_scale, w * self.ce_scale
        if self.teacher is None:
            kd, ce, grad = sparse_losses_(logits, None, None, None, labels, kd_weight, ce_weight, need_grad)
        else:
            kd, ce, grad = self._losses(
                logits, tuple(t[rows] for t in self.teacher), labels, kd_weight, ce_weight, need_grad
            )
        kd_mean = kd.double().sum() * self.kd_scale if kd is not None else 0.0  # this chunk's share of the means
        ce_mean = ce.double().sum() * self.ce_scale if ce is not None else 0.0
        values = [(1 - w) * kd_mean + w * ce_mean] + ([kd_mean, ce_mean] if len(self.terms) == 3 else [])
        return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=logits.device) for v in values]), grad


class SparseObjective(_Objective):
    """Top-k caches: the (k+1)-bucket divergence of losses.py (and CE alone for --loss ce, from any batch)."""

    TEACHER = ("topk_ids", "topk_logprobs", "tail_logprob")

    def _losses(self, logits, teacher, labels, kd_weight, ce_weight, need_grad):
        kd = self.kd
        return sparse_losses_(
            logits,
            *teacher,
            labels,
            kd_weight,
            ce_weight,
            need_grad,
            kd.loss,
            kd.temperature,
            kd.skew_lambda,
            kd.jsd_beta,
        )


class SampledObjective(_Objective):
    """Sampled caches: the unbiased estimate of the forward-KL cross-entropy (sampled_losses.py); the
    other losses were refused when the cache was opened (sources.check_loss_fits_cache)."""

    TEACHER = ("sampled_ids", "sampled_weights")

    def _losses(self, logits, teacher, labels, kd_weight, ce_weight, need_grad):
        return sampled_losses_(logits, *teacher, labels, kd_weight, ce_weight, need_grad, self.kd.temperature)


class ExactObjective(_Objective):
    """Hidden caches: the exact full-vocabulary divergence (losses.exact_losses_), the teacher's log-probs of a
    chunk computed from its stored final hidden states and output layer."""

    TEACHER = ("hidden_states",)

    def __init__(self, batch: dict, kd: KDLoss, device: torch.device, teacher_layer: torch.Tensor):
        super().__init__(batch, kd, device)
        self.weight = teacher_layer.to(device)

    def _losses(self, logits, teacher, labels, kd_weight, ce_weight, need_grad):
        kd = self.kd
        return exact_losses_(
            logits,
            *teacher,
            self.weight,
            labels,
            kd_weight,
            ce_weight,
            need_grad,
            kd.loss,
            kd.temperature,
            kd.skew_lambda,
            kd.jsd_beta,
        )


# The chunk loss of each cache encoding (by its stored kind, moekd/encodings).
OBJECTIVES = {"topk_tail": SparseObjective, "sampled": SampledObjective, "hidden": ExactObjective}


def cache_objective(batch: dict, kd: KDLoss, device: torch.device, teacher_layer: torch.Tensor | None = None):
    """The chunk loss of a batch, by the teacher arrays it carries; teacher_layer: the output layer of a hidden cache."""
    objective = SparseObjective if kd.loss == "ce" else OBJECTIVES[kd.teacher]  # CE reads no teacher arrays
    if objective is ExactObjective:
        if teacher_layer is None:
            raise ValueError(
                "teacher_layer: a batch of a hidden cache needs the teacher's output layer "
                "(CacheSource.teacher_output_layer)"
            )
        return ExactObjective(batch, kd, device, teacher_layer)
    return objective(batch, kd, device)
