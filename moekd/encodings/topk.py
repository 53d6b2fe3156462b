"""topk: the k largest log-probs of the teacher, their ids and the exact tail mass.

Per stored position p and teacher sample m: the k largest log-probs (normalised over the full
vocabulary at T = 1), their ids, and the log of the mass outside them (the tail, computed exactly
from the full distribution, -inf when there is none). Two codecs (`logprob_codec`):
- `u16_steps_sorted_ids` (schema 1.1, what builds write): `topk_ids` int32, the ids ascending and
  delta-coded along k (the first absolute, then the differences); `topk_steps` uint16, each
  log-prob in the order of the ids as round(-log p * scale) steps below 0; `tail_steps` uint16,
  the tail likewise. Step 65535 means -inf; log-probs below -65534/scale nats are clamped there.
  Chosen by measurement over the 1.0 layout (bench/topk_codec.py): sorted, delta-coded ids compress
  better than ids in rank order, and steps below 0 need no float32 top-1.
- `u16_gap_delta` (schema 1.0, read only): `topk_ids` int32 in rank order; `top1_logprob` float32
  exact; `topk_gaps` uint16 gaps below the top-1 at 1/256 nat, delta-coded along k;
  `tail_logprob` float32.
Either way a decoded log-prob is within 1/(2*scale) nat of the teacher's (within the clamp), and
decoding returns the ids in rank order (log-probs descending).
"""

from __future__ import annotations

import numpy as np
import torch

from moekd.encodings.base import PER_SAMPLE, Encoder, Encoding, SparseDistribution
from moekd.errors import MoekdError
from moekd.schemas.cache import ArraySpec, TopkEncoding

SCALE = 256.0  # u16_gap_delta's steps per nat
MAX_STEPS = np.iinfo(np.uint16).max
MAX_GAP = MAX_STEPS / SCALE
MAX_ABS_ERROR = 0.5 / SCALE
TOPK_SCALE = 256.0  # u16_steps_sorted_ids: the default steps per nat (`cache build --logprob-scale`)
NEG_INF_STEP = MAX_STEPS  # u16_steps_sorted_ids: the step that stands for -inf
DEFAULT_K = 64
LOGSOFTMAX_ROWS = 1024  # positions per fp32 log-softmax, to bound memory at large vocabularies


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, scale: float) -> dict[str, np.ndarray]:
    """The `u16_steps_sorted_ids` arrays of ids [..., k], log-probs [..., k] and tail log-probs [...]."""
    order = np.argsort(ids, axis=-1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, -1).astype(np.int64)
    return {
        "topk_ids": np.diff(sorted_ids, axis=-1, prepend=0).astype(np.int32),
        "topk_steps": _steps(np.take_along_axis(logprobs, order, -1), scale),
        "tail_steps": _steps(tail, scale),
    }


def decode_topk(
    topk_ids: np.ndarray, topk_steps: np.ndarray, tail_steps: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [..., k] int32, log-probs [..., k] float32 descending, tail [...] float32) from `encode_topk` output."""
    ids = np.cumsum(topk_ids, axis=-1, dtype=np.int64)
    order = np.argsort(topk_steps, axis=-1, kind="stable")  # rank order: steps ascending
    ids = np.take_along_axis(ids, order, -1).astype(np.int32)
    return ids, _logprobs(np.take_along_axis(topk_steps, order, -1), scale), _logprobs(tail_steps, scale)


def _steps(logprobs: np.ndarray, scale: float) -> np.ndarray:
    steps = np.clip(np.rint(-np.asarray(logprobs, dtype=np.float64) * scale), 0, MAX_STEPS - 1)
    return np.where(np.isneginf(logprobs), NEG_INF_STEP, steps).astype(np.uint16)


def _logprobs(steps: np.ndarray, scale: float) -> np.ndarray:
    return np.where(steps == NEG_INF_STEP, -np.inf, -steps.astype(np.float64) / scale).astype(np.float32)


def encode_logprobs(topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`u16_gap_delta` (schema 1.0): (top1 [...], delta-coded gaps [..., k] uint16) of descending log-probs [..., k]."""
    top1 = topk_logprobs[..., 0].astype(np.float32)
    steps = np.rint((top1[..., None].astype(np.float64) - topk_logprobs) * SCALE)
    steps = np.clip(steps, 0, MAX_STEPS).astype(np.int64)
    steps = np.maximum.accumulate(steps, axis=-1)  # guard monotonicity against ties in float rounding
    deltas = np.diff(steps, axis=-1, prepend=0)
    return top1, deltas.astype(np.uint16)


def decode_logprobs(top1: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Log-probs [..., k] (float32) from `encode_logprobs` output."""
    steps = np.cumsum(gaps, axis=-1, dtype=np.int64)
    return (top1[..., None].astype(np.float64) - steps / SCALE).astype(np.float32)


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


class TopkEncoder(Encoder):
    """The k largest log-probs, their ids and the exact tail of each row."""

    def __init__(self, k: int, scale: float = TOPK_SCALE):
        self.k, self.scale = k, scale
        self.info = TopkEncoding(
            k=k,
            logprob_codec="u16_steps_sorted_ids",
            scale=scale,
            max_abs_error_nats=0.5 / scale,
            max_gap_nats=(MAX_STEPS - 1) / scale,
            normalisation="log_softmax over the teacher's full output vocabulary at temperature 1, in float32",
            tail="tail = log of the probability mass outside the top-k (exact, from the full distribution)",
        )

    def encode(
        self, logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, targets=None
    ) -> dict[str, np.ndarray]:
        ids, logprobs, tail = sparse_next_token(logits, self.k)
        return encode_topk(ids.cpu().numpy(), logprobs.cpu().numpy(), tail.cpu().numpy(), self.scale)


class Topk(Encoding):
    name, kind, id_array = "topk", "topk_tail", "topk_ids"
    flags = {"--k": "k", "--logprob-scale": "logprob_scale"}

    def check_flags(self, values: dict) -> dict:
        k = DEFAULT_K if values.get("k") is None else values["k"]
        scale = TOPK_SCALE if values.get("logprob_scale") is None else float(values["logprob_scale"])
        if k < 1:
            raise MoekdError(f"--k must be at least 1, got {k}")
        if not (np.isfinite(scale) and 1 <= scale <= 4096):
            raise MoekdError(f"--logprob-scale must be in [1, 4096] steps per nat, got {scale}")
        return {"k": k, "logprob_scale": scale}

    def encoder(self, flags: dict, model, vocab_size: int) -> Encoder:
        if flags["k"] > vocab_size:
            raise MoekdError(f"--k {flags['k']} exceeds the teacher's vocabulary of {vocab_size}")
        return TopkEncoder(flags["k"], flags["logprob_scale"])

    def array_specs(self, info, num_positions: int, samples: int, vocab_size: int) -> dict[str, ArraySpec]:
        P, M, k = num_positions, samples, info.k
        if info.logprob_codec == "u16_gap_delta":  # schema 1.0
            return {
                "topk_ids": ArraySpec(shape=[P, M, k], dtype="int32", dims=[*PER_SAMPLE, "rank"]),
                "topk_gaps": ArraySpec(shape=[P, M, k], dtype="uint16", dims=[*PER_SAMPLE, "rank"]),
                "top1_logprob": ArraySpec(shape=[P, M], dtype="float32", dims=PER_SAMPLE),
                "tail_logprob": ArraySpec(shape=[P, M], dtype="float32", dims=PER_SAMPLE),
            }
        return {
            "topk_ids": ArraySpec(shape=[P, M, k], dtype="int32", dims=[*PER_SAMPLE, "slot"]),
            "topk_steps": ArraySpec(shape=[P, M, k], dtype="uint16", dims=[*PER_SAMPLE, "slot"]),
            "tail_steps": ArraySpec(shape=[P, M], dtype="uint16", dims=PER_SAMPLE),
        }

    def decode(self, info, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if info.logprob_codec == "u16_gap_delta":  # schema 1.0
            return {
                "topk_ids": raw["topk_ids"],
                "topk_logprobs": decode_logprobs(raw["top1_logprob"], raw["topk_gaps"]),
                "tail_logprob": raw["tail_logprob"],
            }
        ids, logprobs, tail = decode_topk(raw["topk_ids"], raw["topk_steps"], raw["tail_steps"], info.scale)
        return {"topk_ids": ids, "topk_logprobs": logprobs, "tail_logprob": tail}

    def value_problems(self, info, raw: dict, decoded: dict, vocab: int) -> list[str]:
        ids, logprobs, tail = decoded["topk_ids"], decoded["topk_logprobs"], decoded["tail_logprob"]
        problems = []
        if np.any(ids < 0) or np.any(ids >= vocab):
            problems.append(f"topk_ids outside [0, {vocab})")
        if not np.all(np.isfinite(logprobs)) or np.any(logprobs > 0):
            problems.append("top-k log-probs not finite and <= 0")
        if np.any(np.isnan(tail)) or np.any(tail > 0):
            problems.append("tail log-probs NaN or > 0")
        mass = np.exp(logprobs.astype(np.float64)).sum(-1) + np.exp(tail.astype(np.float64))
        # each decoded probability may exceed the teacher's by the quantisation error: a factor e^max_abs_error
        if np.any(mass > np.exp(info.max_abs_error_nats) * (1 + 1e-6)):
            problems.append(f"probability mass up to {mass.max():.6f} > 1")
        return problems

    def describe(self, info) -> str:
        return f"topk: top-{info.k} + tail, {info.logprob_codec} (max error {info.max_abs_error_nats:.5f} nat)"

    def largest_id(self, info, ids: np.ndarray) -> int:
        if info.logprob_codec == "u16_steps_sorted_ids":
            ids = ids.sum(axis=-1, dtype=np.int64)  # delta-coded ascending ids: the last one, per row
        return int(ids.max(initial=-1))

    def sparse_distribution(self, info, decoded: dict, temperature: float, location: str) -> SparseDistribution:
        """The k stored ids and the tail, tempered and renormalised as k+1 buckets (exact at T = 1)."""
        buckets = np.concatenate([decoded["topk_logprobs"], decoded["tail_logprob"][..., None]], axis=-1)
        tempered = torch.log_softmax(torch.from_numpy(buckets.astype(np.float64)) / temperature, dim=-1).exp().numpy()
        return SparseDistribution(
            decoded["topk_ids"], tempered[..., :-1].astype(np.float32), tempered[..., -1].astype(np.float32), False
        )


TOPK = Topk()
