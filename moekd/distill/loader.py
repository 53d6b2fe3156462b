"""Training batches from an example source (sources.py): split, order, padding, worker processes.

- Split: a fixed held-out subset of the examples for evaluation, the same for every run on the
  same examples (it does not depend on --seed), never trained on.
- Order: per epoch, seeded by (seed, epoch). Examples are shuffled inside each position shard
  of the store, sorted by length within small windows (less padding), packed into batches
  whose padded size (rows x longest row) stays within the token budget, and the batches are
  then shuffled across the whole epoch. A batch therefore reads from one shard file, in one
  coordinate read per array, while the model still sees shards interleaved.
- Position: (epoch, batch index) identifies the next batch; `BatchOrder(start=...)` continues
  exactly where a checkpoint stopped.
- Workers: a torch DataLoader over a map-style dataset whose items are whole batches; each
  worker process opens its own store handles (see sources.CacheSource).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moekd.data.batches import pack, right_pad
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


class BatchDataset(Dataset):
    """Item (epoch, batch index, example indices) -> one padded batch of tensors.

    Keys: input_ids [B, W] (right-padded), lengths [B] (tokens per row), rows [P] (flat index
    b*W + t of each target position), labels [P] (the token each position predicts), examples [B],
    epoch, batch, tokens (unpadded); from a cache also the teacher arrays of its encoding
    (CacheSource.read's, e.g. topk_ids [P, M', k], topk_logprobs [P, M', k], tail_logprob [P, M'])
    where M' = M for samples="mean" and 1 for "random" (one sample per example, drawn from (seed,
    epoch, example)); with `gate_targets` (gate_maps.GateTargets) also teacher_gates
    [P, M', L, N_S] from the stored gate arrays of the same samples and mc_uniforms [K, P, M', L]
    for the Monte-Carlo expert draws.
    """

    def __init__(self, source, pad_id: int, samples: str = "mean", seed: int = 0, gate_targets=None):
        if samples not in ("mean", "random"):
            raise MoekdError(f"--samples must be mean or random, got {samples!r}")
        self.source, self.pad_id, self.samples, self.seed = source, pad_id, samples, seed
        self.gate_targets = gate_targets

    def __getitem__(self, item: tuple[int, int, list[int]]) -> dict:
        epoch, index, examples = item[0], item[1], list(item[2])
        if not examples:  # a rank's share of a batch with fewer examples than ranks (see parallel.py)
            return {
                "examples": torch.zeros(0, dtype=torch.long),
                "rows": torch.zeros(0, dtype=torch.long),
                "epoch": epoch,
                "batch": index,
                "tokens": 0,
            }
        data = self.source.read(examples)
        counts, positions = data["token_counts"], data["position_counts"]
        padded = right_pad(np.split(data["input_ids"], np.cumsum(counts)[:-1]), self.pad_id)[0]
        input_ids, width = padded.numpy(), padded.shape[1]
        row_of_position = np.repeat(np.arange(len(examples)), positions)
        t = data["target_positions"].astype(np.int64)
        batch = {
            "input_ids": padded,
            "lengths": torch.from_numpy(counts.astype(np.int64)),
            "rows": torch.from_numpy(row_of_position * width + t),
            "labels": torch.from_numpy(input_ids[row_of_position, t + 1]),
            "examples": torch.tensor(examples),
            "epoch": epoch,
            "batch": index,
            "tokens": int(counts.sum()),
        }
        if self.source.has_teacher:
            teacher = data["teacher"]
            per_sample = {**teacher, **{name: data[name] for name in self.source.gate_arrays}}  # [P, M, ...] each
            if self.samples == "random" and self.source.samples > 1:
                drawn = np.array(
                    [np.random.default_rng([self.seed, epoch, e]).integers(self.source.samples) for e in examples]
                )
                at, pick = np.arange(len(row_of_position)), drawn[row_of_position]
                per_sample = {name: a[at, pick][:, None] for name, a in per_sample.items()}
            batch.update({name: torch.from_numpy(np.ascontiguousarray(per_sample[name])) for name in teacher})
            if self.gate_targets is not None:
                batch.update(
                    self.gate_targets(
                        {name: per_sample[name] for name in self.source.gate_arrays}, examples, positions, epoch
                    )
                )
        return batch


def _as_is(batch):
    return batch


def make_loader(dataset: BatchDataset, order, workers: int, prefetch: int = 4) -> DataLoader:
    """Batches of `order` (an iterable of (epoch, index, examples)) read by `workers` processes."""
    return DataLoader(
        dataset,
        sampler=order,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=False,
    )
