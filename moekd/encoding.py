"""How teacher distributions are encoded in a store: the codecs shared by the builder and the reader.

Three encodings (`cache build --encoding`), all per stored position p and teacher sample m:

topk -- the k largest log-probs (normalised over the full vocabulary at T = 1), their ids, and
the log of the mass outside them (the tail, computed exactly from the full distribution, -inf
when there is none). Two codecs (`logprob_codec`):
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

sampled -- random-sampling KD: n draws with replacement from the proposal r = p^t / Z_t, kept
as the unique ids (ascending) and their counts c_i (padding: id 0, count 0). The estimate
p_hat_i = (c_i / n) * p_i / r_i is unbiased for p (E[p_hat] = p); with t = 1 it is c_i / n and
needs nothing else, with t != 1 the store also keeps log p_i and log Z_t. See `sampled_estimate`.

hidden -- the teacher's final hidden state h [d] (the input of its output layer), from which
logits = h @ W.T with the output layer W [V, d] stored once. zarr 3.1.6 has no bfloat16 or
float8 dtype, so the bits are stored: bf16 as uint16 bit patterns (round to nearest even), fp8
as uint8 bit patterns of float8 e4m3fn after dividing each row by its scale max|h| / 448
(stored as float32); fp32 as float32. An element's error is at most HIDDEN_RELATIVE_ERROR of
its value (fp8: or 2^-10 of the row's scale, below e4m3's normal range).
"""

from __future__ import annotations

import numpy as np
import torch

SCALE = 256.0  # u16_gap_delta's steps per nat
MAX_STEPS = np.iinfo(np.uint16).max
MAX_GAP = MAX_STEPS / SCALE
MAX_ABS_ERROR = 0.5 / SCALE

FP8_MAX = 448.0  # largest finite float8 e4m3fn
# Relative rounding error of one element: half a unit in the last place (7 and 3 mantissa bits).
HIDDEN_RELATIVE_ERROR = {"fp32": 0.0, "bf16": 2.0**-8, "fp8": 2.0**-4}
HIDDEN_STORED_DTYPE = {"fp32": "float32", "bf16": "uint16", "fp8": "uint8"}

TOPK_SCALE = 256.0  # u16_steps_sorted_ids: the default steps per nat (`cache build --logprob-scale`)
NEG_INF_STEP = MAX_STEPS  # u16_steps_sorted_ids: the step that stands for -inf


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


def sampled_estimate(
    counts: torch.Tensor,
    draws: int,
    proposal_temp: float,
    logprobs: torch.Tensor | None = None,
    proposal_logz: torch.Tensor | None = None,
    target_temp: float = 1.0,
) -> torch.Tensor:
    """Unbiased estimate [..., S] (float32) of the teacher's probabilities of the stored ids.

    counts [..., S] of `draws` draws from r = p^t / Z_t (t = proposal_temp). The target is the
    teacher at temperature `target_temp` (p^(1/T) renormalised). The draws themselves come from
    the teacher at temperature 1/t, so for T = 1/t the estimate is c / n; for T = 1 (t != 1) it is
    importance-weighted, c / n * p / r = c / n * exp((1 - t) log p + log Z_t), which needs the
    stored log-probs and log Z_t. Other temperatures have no unbiased estimate from these draws.
    """
    frequency = counts.double() / draws
    if estimable_temperature(target_temp, proposal_temp) is None:
        raise ValueError(
            f"no unbiased estimate of the teacher at temperature {target_temp} from draws at proposal "
            f"temperature {proposal_temp}: train at temperature 1 or {1 / proposal_temp:g}"
        )
    if abs(target_temp * proposal_temp - 1.0) < 1e-12:
        return frequency.float()
    log_ratio = (1.0 - proposal_temp) * logprobs.double() + proposal_logz.double().unsqueeze(-1)
    return torch.where(counts > 0, frequency * log_ratio.exp(), 0.0).float()


def estimable_temperature(target_temp: float, proposal_temp: float) -> str | None:
    """How draws at proposal temperature t estimate the teacher at temperature T without bias:
    'frequencies' (T = 1/t), 'importance' (T = 1, t != 1), or None (any other T)."""
    if abs(target_temp * proposal_temp - 1.0) < 1e-12:
        return "frequencies"
    return "importance" if target_temp == 1.0 else None


def encode_hidden(hidden: torch.Tensor, dtype: str) -> dict[str, np.ndarray]:
    """Stored bits of hidden states [..., d] (any float dtype): `hidden_states`, plus `hidden_scale` for fp8."""
    if dtype == "fp32":
        return {"hidden_states": hidden.float().cpu().numpy()}
    if dtype == "bf16":
        bits = hidden.to(torch.bfloat16).view(torch.int16)
        return {"hidden_states": bits.cpu().numpy().view(np.uint16)}
    h = hidden.float()
    scale = h.abs().amax(dim=-1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    bits = (h / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8)
    return {"hidden_states": bits.cpu().numpy(), "hidden_scale": scale.cpu().numpy()}


def decode_hidden(bits: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> torch.Tensor:
    """float32 hidden states [..., d] from `encode_hidden` output."""
    if dtype == "fp32":
        return torch.from_numpy(np.ascontiguousarray(bits))
    if dtype == "bf16":
        return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float()
    values = torch.from_numpy(np.ascontiguousarray(bits)).view(torch.float8_e4m3fn).float()
    return values * torch.from_numpy(np.asarray(scale, dtype=np.float32)).unsqueeze(-1)


def tensor_bits(weight: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array zarr can store: bfloat16 as its uint16 bit patterns."""
    weight = weight.detach().cpu().contiguous()
    if weight.dtype == torch.bfloat16:
        return weight.view(torch.int16).numpy().view(np.uint16)
    return weight.numpy()


def tensor_from_bits(values: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `tensor_bits` for a tensor of torch dtype name `dtype` (float32, float16, bfloat16)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(values))
