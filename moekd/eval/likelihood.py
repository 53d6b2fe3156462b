"""Teacher-forced scores on the reference responses: deterministic, so they separate models that
ROUGE-L's sampling noise cannot.

Per dataset, over every response position (the positions a cache stores: prompt_len-1 .. L-2,
each predicting the next reference token, EOS included), with the examples tokenized exactly as
for training (`tokenize_records`):
- nll: mean over positions of -log q(y_{t+1}), in nats;
- kl_from_teacher: mean over positions of KL(p_T || q) = sum_v p_T(v) (log p_T(v) - log q(v)) over
  the full vocabulary, with p_T the reference teacher under its native routing. Forward KL, the
  divergence the students are distilled with.
Log-softmax runs in float64 on the float32 logits; sums are float64.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from moekd.cache_builder.build import example_tables
from moekd.cache_builder.runner import pad_batch
from moekd.data.prompts import TokenizedExample


@torch.no_grad()
def response_log_probs(
    model, tables, batch: list[int], pad_id: int, routing=None, row_seeds=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-softmax [P_b, V] at the batch's response positions (row-major), and the tokens they predict [P_b]."""
    input_ids, attention, targets = pad_batch(tables, batch, pad_id)
    device = next(model.parameters()).device
    context = routing.active(row_seeds=row_seeds) if routing is not None else nullcontext()
    with context:
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
    next_tokens = torch.roll(input_ids, -1, dims=1)[targets]
    return logits[targets.to(device)].double().log_softmax(dim=-1).cpu(), next_tokens


def response_scores(
    model,
    examples: list[TokenizedExample],
    pad_id: int,
    batch_size: int = 16,
    teacher=None,
    routing=None,
    row_seeds: list[int] | None = None,
) -> dict:
    """{"nll", "kl_from_teacher" (None without a teacher), "positions"} of `model` on the examples' responses.

    `routing` (a RouterController of `model`) routes the model inside each forward, with one
    seed per example in `row_seeds` for a stochastic policy; the teacher always runs natively.
    """
    tables = example_tables(examples)
    nll, kl, positions = 0.0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = list(range(start, min(start + batch_size, len(examples))))
        seeds = [row_seeds[i] for i in batch] if row_seeds is not None else None
        log_q, tokens = response_log_probs(model, tables, batch, pad_id, routing, seeds)
        nll -= float(log_q.gather(1, tokens[:, None]).sum())
        positions += len(tokens)
        if teacher is not None:
            log_p, _ = response_log_probs(teacher, tables, batch, pad_id)
            p_t = log_p.exp()
            kl += float(torch.where(p_t > 0, p_t * (log_p - log_q), 0.0).sum())  # 0 log 0 = 0
    return {
        "nll": nll / positions,
        "kl_from_teacher": kl / positions if teacher is not None else None,
        "positions": positions,
    }
