"""Replicates and their statistics, shared by `moekd demo` and `bench/paper_table.py`.

A row of the comparison is trained once per training seed s (the student's initialisation and
the order of its batches both come from s). Each replicate is scored by:
- ROUGE-L: the mean over the sampling seeds of the dataset mean (what `moekd eval` reports),
- nll: teacher-forced response NLL on the test split (nats per response token, deterministic),
- kl: KL(native teacher || student) on the test responses (nats per response token, exact);
and where measured (rows trained from a cache; MoE students):
- heldout_kd: the KD loss on the cache's held-out examples at the end of training,
- load_cv, gate_entropy: the MoE student's expert-load CV and gate entropy on the test split.
A row reports, per metric, the mean and the sample std (ddof=1) over training seeds of these
per-replicate values, and the paired difference to a reference row (e.g. KD from the `topk`
cache): d_s = row_s - reference_s over the seeds both share, mean(d) with the two-sided 95%
Student-t interval mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n) (sd with ddof=1, n seeds).
Pairing removes what a seed does to both rows alike (the same initialisation and batch order).
"""

from __future__ import annotations

import math
import resource
import time
from contextlib import contextmanager

import numpy as np

METRICS = ("rougeL", "nll", "kl", "heldout_kd", "load_cv", "gate_entropy")


def mean_std(values) -> dict:
    """{"mean", "std" (ddof=1; None for one value), "n"}."""
    values = np.asarray(list(values), dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else None
    return {"mean": float(values.mean()), "std": std, "n": len(values)}


def paired_difference(row: dict[int, float], reference: dict[int, float], confidence: float = 0.95) -> dict:
    """Mean of row[s] - reference[s] over the shared seeds s, with its Student-t interval (None for one seed)."""
    from scipy.stats import t

    seeds = sorted(set(row) & set(reference))
    diffs = np.array([row[s] - reference[s] for s in seeds], dtype=np.float64)
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(diffs), "confidence": confidence}
    half = float(t.ppf(0.5 + confidence / 2, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(diffs), "confidence": confidence}


def summarise_rows(replicates: dict[str, dict[int, dict]], reference: str | None) -> dict[str, dict]:
    """Per row: each metric's mean/std over training seeds and, when `reference` is a row, the paired difference.

    `replicates[row][seed]` holds the replicate's metrics (keys of METRICS, None where not measured).
    """
    summary = {}
    for name, by_seed in replicates.items():
        row = {}
        for metric in METRICS:
            values = {s: r[metric] for s, r in by_seed.items() if r.get(metric) is not None}
            if not values:
                continue
            row[metric] = mean_std(values.values())
            if reference in replicates and name != reference:
                ref = {s: r[metric] for s, r in replicates[reference].items() if r.get(metric) is not None}
                if set(values) & set(ref):
                    row[metric]["vs_reference"] = paired_difference(values, ref)
        summary[name] = row
    return summary


def expert_specialisation(loads: dict[str, np.ndarray], counts: dict[str, int]) -> list[dict]:
    """Per MoE layer: how much the expert a token goes to depends on its task family.

    `loads[family]` is that family's expert load [L, N] (share of its token-to-expert assignments,
    rows sum to 1) and `counts[family]` its number of tokens. With p(e) the load over all families
    weighted by tokens: H(E) = -sum p(e) log p(e), the mutual information I(F; E) = H(E) - sum_f
    p(f) H(E | f) in nats (0: every family uses the experts alike; at most min(log F, log N)), and the
    share of each family's assignments that go to its most used expert.
    """
    families = sorted(loads)
    weights = np.array([counts[f] for f in families], dtype=np.float64)
    weights /= weights.sum()
    stacked = np.stack([loads[f] for f in families])  # [F, L, N]

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    layers = []
    for layer in range(stacked.shape[1]):
        marginal = (weights[:, None] * stacked[:, layer]).sum(axis=0)
        conditional = sum(w * entropy(stacked[i, layer]) for i, w in enumerate(weights))
        layers.append(
            {
                "expert_entropy": entropy(marginal),
                "mutual_information": entropy(marginal) - conditional,
                "top_expert_share": {f: float(stacked[i, layer].max()) for i, f in enumerate(families)},
            }
        )
    return layers


class Stopwatch:
    """Wall and CPU seconds (user + system, this process and its finished child processes) per named part."""

    def __init__(self):
        self.parts: dict[str, dict[str, float]] = {}

    @contextmanager
    def part(self, name: str):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            total = self.parts.setdefault(name, {"wall_seconds": 0.0, "cpu_seconds": 0.0})
            total["wall_seconds"] += time.perf_counter() - wall
            total["cpu_seconds"] += _cpu_seconds() - cpu


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
