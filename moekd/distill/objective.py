"""The training objective of one batch: student forward, then KD over the stored teacher
distributions (losses.py) and/or cross-entropy on the ground-truth tokens.

KD is averaged over the response positions of a batch; with --ce-weight w the objective is
(1-w)·KD + w·CE, so w moves between pure distillation (0) and pure SFT (1) at a constant scale.
With M > 1 teacher samples the per-sample losses are averaged (the loader already picked one
sample per example for --samples random). An MoE student's router terms (router_losses.py:
Balanced Distillation, the family's load-balancing loss) come from the router logits of the
same forward and are added to that logit objective (logged as logit_loss).
"""

from __future__ import annotations

import torch

from moekd.distill.losses import masked_cross_entropy, reduce_kd_loss, sparse_kd_loss
from moekd.distill.options import TrainOptions


def batch_loss(model, batch: dict, o: TrainOptions, device: torch.device, routing=None) -> dict[str, torch.Tensor]:
    """loss (and kd_loss, ce_loss when mixed; the router terms with `routing`): means over the batch's target positions."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        # Right padding under a causal mask never reaches real tokens: no attention mask needed.
        out = model(input_ids=batch["input_ids"].to(device), use_cache=False, **(
            {"output_router_logits": True} if routing is not None else {}))
    terms = _logit_terms(out.logits.flatten(0, 1)[batch["rows"].to(device)], batch, o, device)
    if routing is None:
        return terms
    router = routing(out.router_logits, batch, training=model.training)
    return {**terms, **router, "logit_loss": terms["loss"], "loss": terms["loss"] + router["loss"]}


def _logit_terms(logits: torch.Tensor, batch: dict, o: TrainOptions, device: torch.device) -> dict[str, torch.Tensor]:
    labels = batch["labels"].to(device)
    mask = torch.ones_like(labels, dtype=torch.bool)
    if o.loss == "ce":
        return {"loss": masked_cross_entropy(logits, labels, mask)}
    per_sample = sparse_kd_loss(
        logits, batch["topk_ids"].to(device), batch["topk_logprobs"].to(device), batch["tail_logprob"].to(device),
        o.loss, o.temperature, o.skew_lambda, o.jsd_beta,
    )
    kd = reduce_kd_loss(per_sample, mask)
    if not o.ce_weight:
        return {"loss": kd}
    ce = masked_cross_entropy(logits, labels, mask)
    return {"loss": (1 - o.ce_weight) * kd + o.ce_weight * ce, "kd_loss": kd, "ce_loss": ce}


@torch.no_grad()
def held_out_loss(model, batches, o: TrainOptions, device, routing=None) -> dict[str, float]:
    """Held-out loss terms, averaged over all held-out target positions (all teacher samples)."""
    model.eval()
    sums: dict[str, float] = {}
    positions = 0
    for b in batches:
        for key, value in batch_loss(model, b, o, device, routing).items():
            sums[key] = sums.get(key, 0.0) + value.item() * len(b["rows"])
        positions += len(b["rows"])
    return {f"eval_{key}": value / positions for key, value in sums.items()}

