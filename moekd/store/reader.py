"""Reading a complete store, from a local path, a packed .zip or an fsspec URL (s3://, gs://, http(s)://, ...).

    from moekd import CacheReader
    r = CacheReader("run.zarr")
    ex = r[0]   # input_ids [L], target_positions [P], topk_ids [P,M,k], topk_logprobs [P,M,k], tail_logprob [P,M]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekd.encoding import decode_logprobs
from moekd.errors import MoekdError
from moekd.schemas import parse_metadata
from moekd.schemas.cache import CacheMetadata
from moekd.store.location import open_group

DISTRIBUTION_ARRAYS = ("topk_ids", "topk_gaps", "top1_logprob", "tail_logprob")


@dataclass
class CacheExample:
    index: int
    source_index: int  # row of the source data
    input_ids: np.ndarray  # int32 [L]
    prompt_len: int
    target_positions: np.ndarray  # int32 [P]: position t holds the distribution over token t+1
    topk_ids: np.ndarray  # int32 [P, M, k]
    topk_logprobs: np.ndarray  # float32 [P, M, k], descending, normalised over the full vocabulary
    tail_logprob: np.ndarray  # float32 [P, M], log of the mass outside the top-k
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
        self.extra_names = sorted(
            name for name, spec in self.meta.layout.arrays.items()
            if spec.dims[0] == "position" and name not in DISTRIBUTION_ARRAYS and name != "target_positions"
        )

    def __len__(self) -> int:
        return len(self.prompt_len)

    @property
    def num_positions(self) -> int:
        return self.meta.layout.num_positions

    def example_lengths(self) -> np.ndarray:
        """Tokens per example."""
        return np.diff(self.token_offsets)

    def read_positions(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Decoded position arrays for stored positions [start, stop), in one read per array."""
        raw = {name: self.group[name][start:stop] for name in (*DISTRIBUTION_ARRAYS, "target_positions", *self.extra_names)}
        out = {
            "target_positions": raw["target_positions"],
            "topk_ids": raw["topk_ids"],
            "topk_logprobs": decode_logprobs(raw["top1_logprob"], raw["topk_gaps"]),
            "tail_logprob": raw["tail_logprob"],
        }
        out.update({name: raw[name] for name in self.extra_names})
        return out

    def __getitem__(self, i: int) -> CacheExample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for a cache of {len(self)} examples")
        i = i % len(self)
        positions = self.read_positions(int(self.position_offsets[i]), int(self.position_offsets[i + 1]))
        t0, t1 = int(self.token_offsets[i]), int(self.token_offsets[i + 1])
        return CacheExample(
            index=i,
            source_index=int(self.source_index[i]),
            input_ids=self.group["input_ids"][t0:t1],
            prompt_len=int(self.prompt_len[i]),
            target_positions=positions.pop("target_positions"),
            topk_ids=positions.pop("topk_ids"),
            topk_logprobs=positions.pop("topk_logprobs"),
            tail_logprob=positions.pop("tail_logprob"),
            extra=positions,
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))
