"""Training on several ranks (`torchrun ... moekd train`): DistributedDataParallel over shares of each batch.

Every rank walks the same global batch order (loader.BatchOrder: same seed, same position) and
reads only its share of each batch -- examples r, r+W, r+2W, ... of it, which are sorted by
length, so shares are even. A step's loss is the mean over every target position of the global
batch, as in one process: each rank weights its part by (its positions / the batch's positions)
and multiplies by W, because DDP averages gradients over ranks. A rank whose share of a small
batch is empty still runs the forward and a zero backward, so that DDP's gradient all-reduce
finds every rank. Rank 0 writes metrics and checkpoints; the loader position in a checkpoint is
global, so a run resumes with any number of ranks.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from moekd.distributed import Ranks


class RankShare:
    """The part of every (epoch, batch index, examples) item of `order` that this rank trains on."""

    def __init__(self, order, ranks: Ranks):
        self.order, self.ranks = order, ranks

    def __iter__(self):
        for epoch, index, examples in self.order:
            yield epoch, index, list(examples)[self.ranks.rank :: self.ranks.world]


def wrap(model, ranks: Ranks, device: torch.device):
    """The model whose forward the loss calls: DDP's wrapper on several ranks, the model itself on one."""
    if ranks.world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def empty_share_backward(model, pad_id: int, device: torch.device) -> None:
    """A zero-loss forward and backward, for a rank with nothing in this micro-batch (DDP needs every rank).
    `model` is the (wrapped) Student: its output layer and router terms are applied too, so that every parameter
    gets a gradient."""
    hidden = model(input_ids=torch.full((1, 1), pad_id, device=device)).last_hidden_state
    zero = unwrap(model).output_layer.logits(hidden).sum() * 0.0
    if unwrap(model).router_terms is not None:  # the router terms' τ, used outside the forward
        zero = zero + sum(p.sum() for p in unwrap(model).router_terms.parameters()) * 0.0
    zero.backward()


def combined(ranks: Ranks, sums: dict[str, float], positions: int) -> tuple[dict[str, float], int]:
    """Per-rank sums over target positions (and their counts) added up over all ranks."""
    if ranks.world == 1:
        return sums, positions
    gathered = ranks.gather((sums, positions))
    keys = sorted({key for rank_sums, _ in gathered for key in rank_sums})
    return {key: sum(rank_sums.get(key, 0.0) for rank_sums, _ in gathered) for key in keys}, sum(n for _, n in gathered)
