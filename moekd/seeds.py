"""Counter-based random streams: the seeds and uniforms that routing policies, sampled token draws
and Monte-Carlo exploration share.

Every random number moekd draws for a store is a splitmix64 hash of integers that name it
(SEED_DERIVATION, recorded in every store's metadata), so a draw never depends on batch
composition, padding, device, rank or call order, and a cached sample can be recomputed.
"""

from __future__ import annotations

import torch

SEED_DERIVATION = (
    "row seed = mix64(mix64(mix64(seed) ^ example_index) ^ sample_index) mod 2**63 with mix64 the splitmix64 step; "
    "the uniform of (row seed, MoE layer, token position, slot) is mix64(mix64(mix64(mix64(row_seed) ^ layer) ^ position) ^ slot) "
    "top 53 bits + 0.5, over 2**53; slot 0 = KA coin, slot 1+i = Gumbel of expert i"
)

_MASK64 = (1 << 64) - 1


def _int64(c: int) -> int:
    """The two's-complement int64 with the bits of unsigned 64-bit `c`."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MUL1 = _int64(0xBF58476D1CE4E5B9)
_MUL2 = _int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask off the copied sign bits for a logical shift
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 step on int64 tensors (wrapping arithmetic = uint64 arithmetic bit for bit)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MUL1
    x = (x ^ _shift_right(x, 27)) * _MUL2
    return x ^ _shift_right(x, 31)


def derive_seed(base_seed: int, example_index: int, sample_index: int) -> int:
    """Seed of teacher sample `sample_index` of example `example_index`: a value in [0, 2**63)."""
    x = mix64(torch.tensor(_int64(base_seed & _MASK64), dtype=torch.int64))
    x = mix64(x ^ example_index)
    x = mix64(x ^ sample_index)
    return int(x) & ((1 << 63) - 1)


def token_uniforms(row_seeds: torch.Tensor, layer: int, positions: torch.Tensor, slots: int) -> torch.Tensor:
    """float64 uniforms in (0, 1), shape [B*T, slots], for int64 row seeds [B] and positions [B, T]."""
    key = mix64(mix64(row_seeds) ^ layer)
    key = mix64(key[:, None] ^ positions).reshape(-1, 1)
    bits = mix64(key ^ torch.arange(slots, dtype=torch.int64, device=key.device))
    return (_shift_right(bits, 11).double() + 0.5) * 2.0**-53
