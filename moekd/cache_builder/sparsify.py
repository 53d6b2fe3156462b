"""Turning teacher logits into the sparse next-token distributions the cache stores."""

from __future__ import annotations

import torch

LOGSOFTMAX_ROWS = 1024  # positions per fp32 log-softmax, to bound memory at large vocabularies


@torch.no_grad()
def sparse_next_token(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probs (normalised over the full vocabulary) and the log tail mass of rows [P, V]."""
    ids, logprobs, tails = [], [], []
    for chunk in logits.split(LOGSOFTMAX_ROWS):
        full = torch.log_softmax(chunk.float(), dim=-1)
        top_lp, top_id = full.topk(k, dim=-1, sorted=True)
        full.scatter_(-1, top_id, float("-inf"))  # what is left is the tail
        ids.append(top_id)
        logprobs.append(top_lp)
        tails.append(torch.logsumexp(full, dim=-1))
    return torch.cat(ids), torch.cat(logprobs), torch.cat(tails)
