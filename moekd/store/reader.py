"""Reading a complete store, from a local path, a packed .zip or an fsspec URL (s3://, gs://, http(s)://, ...).

from moekd import CacheReader
r = CacheReader("run.zarr")
ex = r[0]   # input_ids [L], target_positions [P], and what the store's encoding holds:
            # topk:    topk_ids [P,M,k], topk_logprobs [P,M,k], tail_logprob [P,M]
            # sampled: sampled_ids [P,M,S], sampled_counts [P,M,S] (+ sampled_logprobs, proposal_logz when t != 1)
            # hidden:  hidden_states [P,M,d] (float32); r.output_layer() [V,d]
r.sparse_distribution(0, 100)   # ids and (estimated) probabilities, for topk and sampled stores
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekd.encodings import SparseDistribution, decode_teacher, encoding_of, teacher_arrays
from moekd.encodings.hidden import tensor_from_bits
from moekd.errors import MoekdError
from moekd.schemas import parse_metadata
from moekd.schemas.cache import CacheMetadata, EncodingInfo
from moekd.store.location import open_group


@dataclass
class CacheExample:
    index: int
    source_index: int  # row of the source data
    input_ids: np.ndarray  # int32 [L]
    prompt_len: int
    target_positions: np.ndarray  # int32 [P]: position t holds the distribution over token t+1
    # topk stores
    topk_ids: np.ndarray | None = None  # int32 [P, M, k]
    topk_logprobs: np.ndarray | None = None  # float32 [P, M, k], descending, normalised over the full vocabulary
    tail_logprob: np.ndarray | None = None  # float32 [P, M], log of the mass outside the top-k
    # sampled stores
    sampled_ids: np.ndarray | None = None  # int32 [P, M, S], unique and ascending; padding slots hold 0
    sampled_counts: np.ndarray | None = None  # int32 [P, M, S], draws of each id (0 in padding slots)
    sampled_logprobs: np.ndarray | None = None  # float32 [P, M, S], teacher log p of each id (t != 1 only)
    proposal_logz: np.ndarray | None = None  # float32 [P, M], log sum_v p_v^t (t != 1 only)
    # hidden stores
    hidden_states: np.ndarray | None = None  # float32 [P, M, d], decoded; logits = h @ output_layer.T
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # further position arrays (e.g. gates)


class CacheReader:
    """Random access to the examples of a complete store."""

    def __init__(self, path_or_url: str | Path, storage_options: dict | None = None):
        self.location = str(path_or_url)
        self.storage_options = storage_options
        self.group = open_group(path_or_url, storage_options)
        self.meta: CacheMetadata = parse_metadata(self.group.attrs.get("moekd"), self.location)
        if self.meta.build.status != "complete":
            raise MoekdError(
                f"cache {self.location} is an unfinished build (status {self.meta.build.status!r}); "
                "finish it with `moekd cache build ... --resume` before reading it"
            )
        self.token_offsets = self.group["example_token_offsets"][:]
        self.position_offsets = self.group["example_position_offsets"][:]
        self.prompt_len = self.group["example_prompt_len"][:]
        self.source_index = self.group["example_source_index"][:]
        self.teacher_names = teacher_arrays(self.meta.encoding)
        self.extra_names = sorted(
            name
            for name, spec in self.meta.layout.arrays.items()
            if spec.dims[0] == "position" and name not in self.teacher_names and name != "target_positions"
        )

    def __len__(self) -> int:
        return len(self.prompt_len)

    @property
    def encoding(self) -> EncodingInfo:
        return self.meta.encoding

    @property
    def num_positions(self) -> int:
        return self.meta.layout.num_positions

    def example_lengths(self) -> np.ndarray:
        """Tokens per example."""
        return np.diff(self.token_offsets)

    def read_positions(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Decoded position arrays for stored positions [start, stop), in one read per array."""
        raw = {
            name: self.group[name][start:stop] for name in (*self.teacher_names, "target_positions", *self.extra_names)
        }
        out = {"target_positions": raw["target_positions"], **decode_teacher(self.encoding, raw)}
        out.update({name: raw[name] for name in self.extra_names})
        return out

    def largest_stored_id(self) -> int:
        """The largest teacher token id the stored distributions name (topk and sampled stores), shard by shard."""
        encoding = encoding_of(self.encoding)
        if encoding.id_array is None:
            raise MoekdError(f"cache {self.location}: a hidden store covers the whole vocabulary, it names no ids")
        step, largest = self.meta.layout.positions_per_shard, -1
        for start in range(0, self.num_positions, step):
            ids = self.group[encoding.id_array][start : start + step]
            largest = max(largest, encoding.largest_id(self.encoding, ids))
        return largest

    def output_layer(self) -> torch.Tensor:
        """The teacher's output layer W [V, d] in its own dtype (hidden stores): logits = h @ W.T. Refused
        unless its bytes have the sha256 the store recorded when it was built."""
        if self.encoding.kind != "hidden":
            raise MoekdError(
                f"cache {self.location}: only --encoding hidden stores the output layer "
                f"(this one is {self.encoding.kind})"
            )
        stored = self.group["output_layer"][:]
        digest = hashlib.sha256(np.ascontiguousarray(stored).tobytes()).hexdigest()
        if digest != self.encoding.output_layer_sha256:
            raise MoekdError(
                f"cache {self.location}: output_layer has sha256 {digest[:12]}..., not the "
                f"{self.encoding.output_layer_sha256[:12]}... recorded at build: the stored teacher output "
                "layer was changed or damaged; rebuild the cache"
            )
        return tensor_from_bits(stored, self.encoding.output_layer_dtype)

    def sparse_distribution(self, start: int, stop: int, temperature: float = 1.0) -> SparseDistribution:
        """Teacher probabilities of the stored ids at positions [start, stop), at `temperature`.

        topk: the k stored ids and the tail, tempered and renormalised as k+1 buckets (exact at T = 1);
        sampled: the unbiased estimate (at T = 1, or T = 1/t for proposal temperature t; other
        temperatures have none). A hidden store keeps the full distribution, not a sparse one.
        """
        decoded = self.read_positions(start, stop)
        return encoding_of(self.encoding).sparse_distribution(self.encoding, decoded, temperature, self.location)

    def __getitem__(self, i: int) -> CacheExample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for a cache of {len(self)} examples")
        i = i % len(self)
        positions = self.read_positions(int(self.position_offsets[i]), int(self.position_offsets[i + 1]))
        t0, t1 = int(self.token_offsets[i]), int(self.token_offsets[i + 1])
        extra = {name: positions.pop(name) for name in self.extra_names}
        return CacheExample(
            index=i,
            source_index=int(self.source_index[i]),
            input_ids=self.group["input_ids"][t0:t1],
            prompt_len=int(self.prompt_len[i]),
            extra=extra,
            **positions,
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))
