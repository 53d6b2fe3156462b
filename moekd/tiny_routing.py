"""How much a teacher's routing matters: gate mass, KL(topk || all) and the spread of `ka` samples.

Measured on the tiny teachers (tests/test_tiny_teachers.py, docs/tiny_models.md): a teacher whose
gates are near one-hot, or whose experts barely move the output, passes routing tests without
exercising the routing they claim to check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekd.routing.controller import RouterController
from moekd.routing.policies import make_policy
from moekd.routing.routers import recognise_routers
from moekd.tiny_weights import gate_distribution, router_logits, top_k_of


@dataclass
class RoutingStrength:
    gate_mass: float | None  # mean over tokens and MoE layers of the top-k experts' share of g
    uniform_mass: float | None  # the same share for uniform gates: mean over MoE layers of k / N
    kl_topk_all: float | None  # mean over positions of KL(p_topk || p_all), nats; None: `all` is refused
    kl_ka_samples: float | None  # mean over positions of KL between two ka (λ = 0.5) samples; None: refused
    supported: bool  # every router takes every policy


def routing_strength(model: nn.Module, ids: torch.Tensor) -> RoutingStrength:
    """The measures on a batch `ids` [B, T] (one forward per policy, no gradients)."""
    infos = recognise_routers(model)
    masses, uniform = [], []

    def record(info):
        def hook(module, args, output):
            logits = router_logits(info, output)
            if logits is not None:
                g, k = gate_distribution(info, logits), top_k_of(model, info)
                masses.append(float(g.topk(k, dim=-1).values.sum(-1).mean()))
                uniform.append(k / g.shape[-1])

        return hook

    handles = [info.module.register_forward_hook(record(info)) for info in infos]
    try:
        native = log_probs(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    mass, flat = (sum(masses) / len(masses), sum(uniform) / len(uniform)) if masses else (None, None)
    supported = bool(infos) and all(info.adapter is not None for info in infos)
    if not supported:
        return RoutingStrength(mass, flat, None, None, False)
    every = log_probs(model, ids, make_policy("all"))
    rows = ids.shape[0]
    first = log_probs(model, ids, make_policy("ka", samples=2, ka_lambda=0.5), list(range(rows)))
    second = log_probs(model, ids, make_policy("ka", samples=2, ka_lambda=0.5), list(range(rows, 2 * rows)))
    return RoutingStrength(mass, flat, kl(native, every), kl(first, second), True)


def log_probs(model: nn.Module, ids: torch.Tensor, policy=None, row_seeds=None) -> torch.Tensor:
    """float32 [B*T, V] next-token log-probabilities under `policy` (the native routing if None)."""
    with torch.no_grad():
        if policy is None:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        else:
            with RouterController(model, policy).active(row_seeds=row_seeds):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return logits.float().log_softmax(-1).flatten(0, 1)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) from log-probabilities [P, V]."""
    return float((p.exp() * (p - q)).sum(-1).mean())
