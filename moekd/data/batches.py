"""Batches of tokenized examples: the alignment rule, right padding and packing, written once for the
build, training, SAR, routing statistics and evaluation.

The alignment rule (the store's `next_token` convention): an example of L tokens whose prompt is
its first `prompt_len` tokens has a teacher distribution at positions prompt_len-1 .. L-2; the
distribution at position t predicts token t+1, so exactly the response tokens are predicted.
"""

from __future__ import annotations

import numpy as np
import torch


def response_positions(prompt_len: int, length: int) -> np.ndarray:
    """The positions whose next token is a response token (int64)."""
    return np.arange(prompt_len - 1, length - 1, dtype=np.int64)


def right_pad(
    sequences: list[np.ndarray], pad_id: int, marked: list[np.ndarray] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, mask) [B, longest]: the sequences left-aligned, `pad_id` after them;
    `mask` is True at each row's `marked` positions (none when `marked` is None)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        attention[row, : len(seq)] = 1
        if marked is not None:
            mask[row, torch.as_tensor(np.asarray(marked[row], dtype=np.int64))] = True
    return input_ids, attention, mask


def pack(order, lengths: np.ndarray, batch_tokens: int) -> list[list[int]]:
    """Consecutive examples of `order` grouped so that rows x longest row <= batch_tokens (a longer
    example is a batch of its own)."""
    batches, current, longest = [], [], 0
    for i in np.asarray(order).tolist():
        wider = max(longest, int(lengths[i]))
        if current and (len(current) + 1) * wider > batch_tokens:
            batches.append(current)
            current, wider = [], int(lengths[i])
        current.append(i)
        longest = wider
    if current:
        batches.append(current)
    return batches


def longest_first(indices, lengths: np.ndarray) -> list[int]:
    """`indices` ordered by decreasing length (ties by index): `pack` then pads least."""
    return sorted(indices, key=lambda i: (-int(lengths[i]), i))
