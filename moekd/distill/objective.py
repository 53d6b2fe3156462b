"""The training objective of one batch: student forward, then KD over the stored teacher
distributions (losses.py) and/or cross-entropy on the ground-truth tokens.

KD is averaged over the response positions of a batch; with --ce-weight w the objective is
(1-w)·KD + w·CE, so w moves between pure distillation (0) and pure SFT (1) at a constant scale.
With M > 1 teacher samples the per-sample losses are averaged (the loader already picked one
sample per example for --samples random).
"""

from __future__ import annotations

import torch

from moekd.distill.losses import masked_cross_entropy, reduce_kd_loss, sparse_kd_loss
from moekd.distill.options import TrainOptions


def batch_loss(model, batch: dict, o: TrainOptions, device: torch.device) -> dict[str, torch.Tensor]:
    """loss (and kd_loss, ce_loss when mixed): means over the batch's target positions."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        # Right padding under a causal mask never reaches real tokens: no attention mask needed.
        logits = model(input_ids=batch["input_ids"].to(device), use_cache=False).logits
    logits = logits.flatten(0, 1)[batch["rows"].to(device)]
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
def held_out_loss(model, batches, o: TrainOptions, device, combine=lambda sums, positions: (sums, positions)) -> dict[str, float]:
    """Held-out loss terms, averaged over all held-out target positions (all teacher samples).
    `combine` adds up the sums of all ranks, each of which evaluated its share of the batches."""
    model.eval()
    sums: dict[str, float] = {}
    positions = 0
    for b in batches:
        if not len(b["rows"]):
            continue  # this rank's share of a batch was empty
        for key, value in batch_loss(model, b, o, device).items():
            sums[key] = sums.get(key, 0.0) + value.item() * len(b["rows"])
        positions += len(b["rows"])
    sums, positions = combine(sums, positions)
    return {f"eval_{key}": value / positions for key, value in sums.items()}

