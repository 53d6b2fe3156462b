"""What an encoding of teacher distributions is: the interface every encoding module implements.

An `Encoding` is one value of `cache build --encoding`. It owns everything about its arrays:
the flags that configure it (defaults and checks), the encoder the build runs on the teacher's
logits, the array specs of a store, decoding, the value checks of `verify --deep`, the line
`cache info` shows, and what the training loader and `CacheReader.sparse_distribution` make of
the decoded arrays. The registry in `moekd.encodings` maps flag values and stored kinds to them.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from moekd.errors import MoekdError
from moekd.schemas.cache import ArraySpec

PER_SAMPLE = ["position", "sample"]  # the leading dims of every per-position teacher array


@dataclass
class SparseDistribution:
    """Teacher probabilities of some token ids per position and sample: the exact values of a top-k
    store, unbiased estimates from a sampled one."""

    ids: np.ndarray  # int32 [P, M, S]
    probs: np.ndarray  # float32 [P, M, S]; 0 in padding slots
    rest: np.ndarray | None  # float32 [P, M]: mass outside `ids` (topk: the tail); None when unknown (sampled)
    estimate: bool  # True: probs are unbiased estimates (E[probs] = p), not exact values


class Encoder:
    """Turns the teacher's logits at N stored positions of one sample into the encoding's arrays [N, ...].

    `encode(logits [N, V], seeds [N], positions [N], targets)` gets each position's row seed and
    position inside its example, and the batch's target mask [B, T] for a model that computed
    logits everywhere. Nothing depends on how positions are batched."""

    info = None  # the encoding's metadata record (a pydantic model of moekd.schemas.cache)

    def fixed_arrays(self) -> dict[str, np.ndarray]:
        """Arrays written once per store, before any unit."""
        return {}

    def capturing(self):
        """Context in which the teacher's forwards run."""
        return nullcontext()

    def encode(self, logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, targets=None) -> dict:
        raise NotImplementedError


class Encoding:
    """One `--encoding`: see the module docstring. Subclasses set the class attributes."""

    name: str  # the --encoding value
    kind: str  # the stored metadata's `kind`
    flags: dict[str, str] = {}  # its cache build flags -> BuildOptions field
    id_array: str | None = None  # the stored array naming token ids (None: the whole vocabulary)

    def check_flags(self, values: dict) -> dict:
        """The flags' checked values with defaults filled in, by BuildOptions field name."""
        raise NotImplementedError

    def encoder(self, flags: dict, model, vocab_size: int) -> Encoder:
        raise NotImplementedError

    def array_specs(self, info, num_positions: int, samples: int, vocab_size: int) -> dict[str, ArraySpec]:
        """Every array of this encoding in a store of these sizes."""
        raise NotImplementedError

    def decode(self, info, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The decoded teacher arrays (CacheExample's names) from the stored ones."""
        raise NotImplementedError

    def value_problems(self, info, raw: dict, decoded: dict, vocab: int) -> list[str]:
        """What `verify --deep` finds wrong in one range of decoded positions."""
        raise NotImplementedError

    def fixed_problems(self, group, info) -> list[str]:
        """What `verify --deep` finds wrong in the arrays written once per store."""
        return []

    def describe(self, info) -> str:
        """One line for `cache info`."""
        raise NotImplementedError

    def largest_id(self, info, ids: np.ndarray) -> int:
        """The largest token id in a block of the stored `id_array`."""
        return int(ids.max(initial=-1))

    def training_targets(self, info, decoded: dict, temperature: float) -> dict:
        """What the training loss takes from the decoded arrays (default: them)."""
        return decoded

    def sparse_distribution(self, info, decoded: dict, temperature: float, location: str) -> SparseDistribution:
        raise MoekdError(
            f"cache {location} stores hidden states, from which the full distribution follows: "
            "use hidden_states with output_layer() instead of a sparse distribution"
        )
