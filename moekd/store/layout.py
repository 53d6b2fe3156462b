"""Where everything lives in a store: array names, shapes, chunking, and the unit plan.

A store is one Zarr v3 group holding flat arrays:
- per token: `input_ids` [T];
- per example: `example_token_offsets` [E+1], `example_position_offsets` [E+1],
  `example_prompt_len` [E], `example_source_index` [E] (row of the source data);
- per stored position p (response positions only, see the alignment convention):
  `target_positions` [P] (position inside its example), and per sample m the teacher's
  distribution in the store's encoding (see moekd.encodings):
  topk: `topk_ids` [P, M, k] (ascending, delta-coded), `topk_steps` [P, M, k], `tail_steps` [P, M]
  (schema 1.0 stores: `topk_ids`, `topk_gaps` [P, M, k], `top1_logprob`, `tail_logprob` [P, M]);
  sampled: `sampled_ids` [P, M, S], `sampled_counts` [P, M, S], with t != 1 also
  `sampled_logprobs` [P, M, S] and `proposal_logz` [P, M];
  hidden: `hidden_states` [P, M, d] (bits), with fp8 also `hidden_scale` [P, M]; and once per
  store the teacher's output layer `output_layer` [V, d];
  with --router-probs the teacher's gate distributions per MoE layer: `gate_probs` [P, M, L, N]
  (full), or `gate_ids` [P, M, L, R], `gate_probs` [P, M, L, R] and `gate_rest` [P, M, L] (the
  mass of the other experts).
Position arrays are sharded along P; the build writes one shard range ("unit") at a time, so
no two units ever share a file and each unit can be redone alone after a crash. Arrays that do
not depend on the teacher's passes (tables, the output layer) are written before any unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekd.encodings import encoding_of
from moekd.schemas.cache import ArraySpec, EncodingInfo

POSITIONS_PER_CHUNK = 256
POSITIONS_PER_SHARD = 65536
TOKENS_PER_CHUNK = 16384
EXAMPLES_PER_CHUNK = 16384
VOCAB_ROWS_PER_CHUNK = 4096

BUILD_DIR = ".moekd-build"  # resume state of an unfinished build; removed once the store is complete
MANIFEST = "manifest.json"  # per-file sha256 of a complete store
ROOT_META = "zarr.json"


def array_specs(
    num_examples: int,
    num_tokens: int,
    num_positions: int,
    samples: int,
    encoding: EncodingInfo,
    vocab_size: int,
    extra: dict[str, ArraySpec] | None = None,
) -> dict[str, ArraySpec]:
    """Every array of a store with these sizes; `extra` adds position arrays (first dim P)."""
    E, T, P = num_examples, num_tokens, num_positions
    specs = {
        "input_ids": ArraySpec(shape=[T], dtype="int32", dims=["token"]),
        "example_token_offsets": ArraySpec(shape=[E + 1], dtype="int64", dims=["example+1"]),
        "example_position_offsets": ArraySpec(shape=[E + 1], dtype="int64", dims=["example+1"]),
        "example_prompt_len": ArraySpec(shape=[E], dtype="int32", dims=["example"]),
        "example_source_index": ArraySpec(shape=[E], dtype="int64", dims=["example"]),
        "target_positions": ArraySpec(shape=[P], dtype="int32", dims=["position"]),
    }
    specs.update(encoding_of(encoding).array_specs(encoding, P, samples, vocab_size))
    specs.update(extra or {})
    return specs


def position_arrays(specs: dict[str, ArraySpec]) -> list[str]:
    return sorted(name for name, spec in specs.items() if spec.dims[0] == "position")


def chunking(spec: ArraySpec, positions_per_shard: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(chunk shape, shard shape or None) of an array."""
    first = spec.dims[0]
    rest = tuple(spec.shape[1:])
    if first == "position":
        chunk = min(POSITIONS_PER_CHUNK, positions_per_shard)
        return (chunk, *rest), (positions_per_shard, *rest)
    if first == "token":
        return (TOKENS_PER_CHUNK,), None
    if first == "vocab":
        return (min(VOCAB_ROWS_PER_CHUNK, spec.shape[0]), *rest), None
    return (EXAMPLES_PER_CHUNK,), None


@dataclass(frozen=True)
class Unit:
    index: int
    start: int  # first position
    stop: int  # one past the last position


def plan_units(num_positions: int, positions_per_shard: int) -> list[Unit]:
    starts = range(0, num_positions, positions_per_shard)
    return [Unit(i, s, min(s + positions_per_shard, num_positions)) for i, s in enumerate(starts)]


def unit_marker(unit: Unit) -> str:
    """Path, inside the store, of the marker that commits `unit` during a build."""
    return f"{BUILD_DIR}/units/{unit.index:06d}.json"


def examples_overlapping(position_offsets: np.ndarray, unit: Unit) -> range:
    """Indices of the examples with at least one stored position inside `unit`."""
    first = int(np.searchsorted(position_offsets, unit.start, side="right")) - 1
    last = int(np.searchsorted(position_offsets, unit.stop, side="left"))
    return range(max(first, 0), last)
