"""The compact encoding of sparse teacher distributions, shared by the builder and the reader.

Per position and sample the teacher's k largest log-probs (sorted, descending) are stored as
- `top1_logprob` (float32): the largest log-prob, exact;
- `topk_gaps` (uint16): the gap of each log-prob below the top-1, in steps of 1/SCALE nat,
  delta-coded along k (gaps are non-decreasing, so the deltas are small and compress well);
- `tail_logprob` (float32): log of the probability mass outside the top-k, computed exactly
  from the full distribution (-inf when there is none).
Decoding error is at most 1/(2*SCALE) nat per log-prob for gaps below MAX_GAP nats; larger gaps
(probabilities below e^-256 of the top-1) are clamped to MAX_GAP.
"""

from __future__ import annotations

import numpy as np

SCALE = 256.0
MAX_STEPS = np.iinfo(np.uint16).max
MAX_GAP = MAX_STEPS / SCALE
MAX_ABS_ERROR = 0.5 / SCALE


def encode_logprobs(topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top1 [...], delta-coded gaps [..., k] uint16) of descending log-probs [..., k]."""
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
