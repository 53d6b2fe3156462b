"""Training batches from an example source (sources.py), in the order of moekd/training/order.py:
padding, the teacher arrays of each batch, worker processes.

- Workers: a torch DataLoader over a map-style dataset whose items are whole batches; each
  worker process opens its own store handles (see sources.CacheSource).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moekd.data.batches import right_pad
from moekd.errors import MoekdError
from moekd.interrupt import quiet_worker


class BatchDataset(Dataset):
    """Item (epoch, batch index, example indices) -> one padded batch of tensors.

    Keys: input_ids [B, W] (right-padded), lengths [B] (tokens per row), rows [P] (flat index
    b*W + t of each target position), labels [P] (the token each position predicts), examples [B],
    epoch, batch, tokens (unpadded); from a cache also the teacher arrays of its encoding
    (CacheSource.read's, e.g. topk_ids [P, M', k], topk_logprobs [P, M', k], tail_logprob [P, M'])
    where M' = M for sample_mode "mean" and 1 for "random" (--samples) (one sample per example, drawn from (seed,
    epoch, example)); with `gate_targets` (gate_maps.GateTargets) also teacher_gates
    [P, M', L, N_S] from the stored gate arrays of the same samples and mc_uniforms [K, P, M', L]
    for the Monte-Carlo expert draws.
    """

    def __init__(self, source, pad_id: int, sample_mode: str = "mean", seed: int = 0, gate_targets=None):
        if sample_mode not in ("mean", "random"):
            raise MoekdError(f"--samples must be mean or random, got {sample_mode!r}")
        self.source, self.pad_id, self.sample_mode, self.seed = source, pad_id, sample_mode, seed
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
            if self.sample_mode == "random" and self.source.num_samples > 1:
                drawn = np.array(
                    [np.random.default_rng([self.seed, epoch, e]).integers(self.source.num_samples) for e in examples]
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
        worker_init_fn=quiet_worker,  # a signal stops the main process, which then stops the workers
    )
