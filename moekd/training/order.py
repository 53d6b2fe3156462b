"""Which examples train and in which order: the held-out split and the batch order, shared by
every training loop (`moekd train`, `moekd sar train`).

- Split: a fixed held-out subset of the examples for evaluation, the same for every run on the
  same examples (it does not depend on --seed), never trained on.
- Order: per epoch, seeded by (seed, epoch). Examples are shuffled inside each position shard
  of the store, sorted by length within small windows (less padding), packed into batches
  whose padded size (rows x longest row) stays within the token budget, and the batches are
  then shuffled across the whole epoch. A batch therefore reads from one shard file, in one
  coordinate read per array, while the model still sees shards interleaved.
- Position: (epoch, batch index) identifies the next batch; `BatchOrder(start=...)` continues
  exactly where a checkpoint stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekd.data.batches import pack
from moekd.errors import MoekdError

SPLIT_SEED = 0  # held-out examples are chosen independently of --seed, so runs compare on the same set
LENGTH_WINDOW = 64  # examples sorted by length together before packing


@dataclass(frozen=True)
class LoaderPosition:
    epoch: int
    batch: int  # index of the next batch within the epoch


def held_out_split(num_examples: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) example indices, both sorted; eval holds round(fraction x E) examples, at least 1."""
    if not 0 <= eval_fraction < 1:
        raise MoekdError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    num_eval = max(1, round(eval_fraction * num_examples)) if eval_fraction > 0 else 0
    if num_examples - num_eval < 1:
        raise MoekdError(
            f"the training data holds {num_examples} example(s): too few to hold {num_eval} out for evaluation "
            "and train on the rest; use more data or --eval-fraction 0"
        )
    chosen = np.random.default_rng(SPLIT_SEED).permutation(num_examples)[:num_eval]
    is_eval = np.zeros(num_examples, dtype=bool)
    is_eval[chosen] = True
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


def plan_epoch(
    indices: np.ndarray, lengths: np.ndarray, shards: np.ndarray, batch_tokens: int, seed: int, epoch: int
) -> list[list[int]]:
    """The batches of one epoch, in order (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch])
    shuffled = indices[np.lexsort((rng.random(len(indices)), shards[indices]))]  # grouped by shard, random within
    batches = []
    for members in np.split(shuffled, np.flatnonzero(np.diff(shards[shuffled])) + 1):
        for w in range(0, len(members), LENGTH_WINDOW):
            window = members[w : w + LENGTH_WINDOW]
            members[w : w + LENGTH_WINDOW] = window[np.argsort(-lengths[window], kind="stable")]
        batches += pack(members, lengths, batch_tokens)
    return [batches[i] for i in rng.permutation(len(batches))]


class BatchOrder:
    """Iterates (epoch, batch index, example indices) from `start`, over `epochs` epochs or forever."""

    def __init__(
        self,
        indices: np.ndarray,
        lengths: np.ndarray,
        shards: np.ndarray,
        batch_tokens: int,
        seed: int,
        start: LoaderPosition = LoaderPosition(0, 0),
        epochs: int | None = None,
    ):
        longest = int(lengths[indices].max())
        if batch_tokens < longest:
            raise MoekdError(
                f"--batch-tokens {batch_tokens} is below the longest training example ({longest} tokens); raise it"
            )
        self.indices, self.lengths, self.shards = indices, lengths, shards
        self.batch_tokens, self.seed, self.start, self.epochs = batch_tokens, seed, start, epochs

    def epoch(self, epoch: int) -> list[list[int]]:
        return plan_epoch(self.indices, self.lengths, self.shards, self.batch_tokens, self.seed, epoch)

    def __iter__(self):
        epoch, first = self.start.epoch, self.start.batch
        while self.epochs is None or epoch < self.epochs:
            for b, examples in enumerate(self.epoch(epoch)[first:], start=first):
                yield epoch, b, examples
            epoch, first = epoch + 1, 0
