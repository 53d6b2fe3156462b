"""gates: the teacher's gate distributions per MoE layer (`cache build --router-probs`), stored beside
any token encoding for Balanced Distillation.

Per stored position p, sample m and MoE layer l: all N expert probabilities, `gate_probs`
[P, M, L, N] float16 (`--router-probs full`), or the R largest as `gate_ids` [P, M, L, R] uint16
and `gate_probs` [P, M, L, R] float16 with `gate_rest` [P, M, L] float32, the mass of the other
experts (`--router-probs top-R`). `dense_gates` spreads the rest evenly over the unstored experts.
"""

from __future__ import annotations

import numpy as np
import torch

from moekd.schemas.cache import ArraySpec

DIMS = ["position", "sample", "layer"]


def gate_specs(num_positions: int, samples: int, layers: int, num_experts: int, r: int) -> dict[str, ArraySpec]:
    """Gate-distribution arrays: all N experts when r == N, else the r largest plus the rest mass."""
    P, M, L = num_positions, samples, layers
    if r == num_experts:
        return {"gate_probs": ArraySpec(shape=[P, M, L, r], dtype="float16", dims=[*DIMS, "expert"])}
    return {
        "gate_ids": ArraySpec(shape=[P, M, L, r], dtype="uint16", dims=[*DIMS, "rank"]),
        "gate_probs": ArraySpec(shape=[P, M, L, r], dtype="float16", dims=[*DIMS, "rank"]),
        "gate_rest": ArraySpec(shape=[P, M, L], dtype="float32", dims=DIMS),
    }


def encode_gates(gates: np.ndarray, r: int) -> dict[str, np.ndarray]:
    """Gate distributions [..., N] as stored: all of them, or the r largest (ids, probs) and the rest mass."""
    if r == gates.shape[-1]:
        return {"gate_probs": gates.astype(np.float16)}
    order = np.argsort(-gates, axis=-1, kind="stable")[..., :r]
    top = np.take_along_axis(gates, order, axis=-1)
    rest = np.clip(1.0 - top.astype(np.float64).sum(-1), 0.0, 1.0)
    return {
        "gate_ids": order.astype(np.uint16),
        "gate_probs": top.astype(np.float16),
        "gate_rest": rest.astype(np.float32),
    }


def dense_gates(arrays: dict[str, torch.Tensor], num_experts: int) -> torch.Tensor:
    """float32 [..., N_T] gate distributions from stored `gate_probs` (full) or `gate_ids`/`gate_probs`/`gate_rest` (top-R)."""
    probs = arrays["gate_probs"].float()
    if "gate_ids" in arrays:
        others = num_experts - probs.shape[-1]
        spread = (arrays["gate_rest"].float() / others).unsqueeze(-1)
        dense = spread.expand(*probs.shape[:-1], num_experts).clone()
        probs = dense.scatter_(-1, arrays["gate_ids"].long(), probs)
    return probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def gate_problems(raw: dict[str, np.ndarray], num_experts: int) -> list[str]:
    """What `verify --deep` finds wrong in one range of stored gate arrays."""
    problems = []
    probs = raw["gate_probs"].astype(np.float64)
    mass = probs.sum(-1)
    if "gate_ids" in raw:
        if np.any(raw["gate_ids"] >= num_experts):
            problems.append(f"gate_ids outside [0, {num_experts})")
        mass = mass + raw["gate_rest"].astype(np.float64)
    # float16 probabilities: each carries a relative error below 2^-11
    if np.any(probs < 0) or np.any(np.abs(mass - 1) > 2e-3 * probs.shape[-1] ** 0.5 + 1e-3):
        problems.append("gate distributions are not probability distributions")
    return problems
