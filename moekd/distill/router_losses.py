"""Router terms for MoE students: Balanced Distillation (docs/methods.md §6) and the family's auxiliary loss.

Per target position, teacher sample m and mapped student layer l, with p the cached teacher
gate distribution mapped onto the student's experts (gate_maps.py), g the student's router
logits and q = gate(g) the student's gate distribution (the adapter `moekd.routing.routers.recognise_routers`
finds for its router: softmax(g) for softmax routers, sigmoid(g) / sum for sigmoid ones):
- Monte-Carlo expert exploration: K draws e_j from the current p, each weighted by
  w_j = p[e_j] and then suppressed, p[e_j] <- α·p[e_j], renormalised;
  L_mc = Σ_j w_j·(-log q(e_j)) / Σ_j w_j.
- coverage: KL(p̄ || q̄), p̄ and q̄ the mean gate distributions over the positions (and
  samples) of one forward: a micro-batch, or a rank's share of it under DDP (a batch statistic,
  so with several ranks this one term is a mean over shares, not the whole batch's). The
  published code accumulates both means over the Monte-Carlo draws instead and detaches the
  student's side; the exact means give the student a gradient.
- entropy-aware router distillation: L_router = KL(p || q_τ) - β·H(q_τ), q_τ = q^(1/τ)
  renormalised (= softmax(g/τ) on softmax routers, the published form; on sigmoid routers it
  tempers the gate distribution itself), τ a learned scalar per mapped layer, clamped to
  [0.5, 1.5] after every optimiser step. Per layer because gate sharpness changes with depth
  (the teacher's gate entropy and the SAR router shift both vary by layer): one shared τ
  would have to fit all layers at once, and per-layer τs cost one scalar each.
Each term is averaged over positions and samples, then over the mapped layers; the
objective adds expert_weight·(L_mc + coverage_weight·L_cov + L_router), plus
router_aux_coef·(the student family's own load-balancing loss over every MoE layer and
non-padding token) when that coefficient is positive.
The draws use uniforms the loader draws per example from (seed, epoch, example) (gate_maps.py),
so a resumed run, every evaluation and any number of ranks draw the same.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from moekd.distill.gate_maps import GateTargets, expert_map, parse_layer_map
from moekd.errors import MoekdError
from moekd.routing.routers import recognise_routers

TAU_RANGE = (0.5, 1.5)
TINY = torch.finfo(torch.float32).tiny
LAYER_STATS = ("gate_entropy", "load_cv", "gate_kl")


def mc_draws(p: torch.Tensor, uniforms: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts [K, ...] and weights [K, ...] of K suppressed draws from p [..., N]; uniforms [K, ...] in (0, 1]."""
    current = p.clone()
    experts, weights = [], []
    for u in uniforms:
        total = current.sum(-1, keepdim=True)
        # inverse CDF: the first expert whose cumulative mass reaches u·total (u > 0 never picks a zero-mass expert)
        e = (current.cumsum(-1) < u.unsqueeze(-1) * total).sum(-1, keepdim=True).clamp(max=p.shape[-1] - 1)
        picked = current.gather(-1, e)
        experts.append(e.squeeze(-1))
        weights.append((picked / total).squeeze(-1))
        current = current.scatter(-1, e, picked * alpha)
    return torch.stack(experts), torch.stack(weights)


def mc_exploration_loss(log_q: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j·(-log q(e_j)) / Σ_j w_j per row: experts, weights [K, ...] -> [...]; log_q [..., N] broadcasts to them."""
    nll = -log_q.expand(*experts.shape, log_q.shape[-1]).gather(-1, experts.unsqueeze(-1)).squeeze(-1)
    return (weights * nll).sum(0) / weights.sum(0)


def coverage_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(mean p || mean q) per layer: p [P, M, L, N], q [P, L, N] -> [L]."""
    p_mean, q_mean = p.mean((0, 1)), q.mean(0)
    return (torch.special.xlogy(p_mean, p_mean) - p_mean * q_mean.clamp_min(TINY).log()).sum(-1)


def entropy_aware_kl(p: torch.Tensor, q_tau: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(p || q_τ) - β·H(q_τ) per layer, averaged over positions and samples: p [P, M, L, N], q_τ [P, L, N] -> [L]."""
    log_q = q_tau.clamp_min(TINY).log()
    kl = (torch.special.xlogy(p, p) - p * log_q.unsqueeze(1)).sum(-1).mean((0, 1))
    entropy = -(q_tau * log_q).sum(-1).mean(0)
    return kl - beta * entropy


def tempered(log_q: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """q^(1/τ) renormalised, from log q [..., N]: softmax(g/τ) when q = softmax(g)."""
    return torch.softmax(log_q / tau, dim=-1)


def load_cv(q: torch.Tensor, top_k: int) -> torch.Tensor:
    """Coefficient of variation (population std / mean) of the expert load per layer: q [P, L, N] -> [L].

    The load is each expert's share of the top-k choices by gate probability (the native choice
    of softmax routers)."""
    hits = torch.zeros_like(q).scatter_(-1, q.topk(top_k, dim=-1).indices, 1.0).sum(0)
    load = hits / hits.sum(-1, keepdim=True)
    return load.std(-1, correction=0) / load.mean(-1)


@dataclass(frozen=True)
class RouterWeights:
    """What the router terms read of a run's settings (TrainOptions' fields of the same names)."""

    expert_weight: float
    coverage_weight: float
    mc_alpha: float
    router_beta: float
    router_tau_init: float
    router_aux_coef: float


class RouterObjective(nn.Module):
    """The router terms of one batch, from the student's router logits of its one forward; holds τ.

    `routers` are the student's (router module, GateAdapter) pairs in forward order, the order of
    the model's `router_logits`; `pairs` the (student layer, teacher layer) map of Balanced
    Distillation (None: only the family's auxiliary loss)."""

    def __init__(self, w: RouterWeights, routers: list, pairs: list[tuple[int, int]] | None, aux_loss=None):
        super().__init__()
        self.w, self.aux_loss = w, aux_loss
        self.routers = list(routers)  # a plain list: the modules belong to the model, not to this one
        self.student_layers = [s for s, _ in pairs] if pairs else []
        self.tau = nn.Parameter(torch.full((len(self.student_layers),), float(w.router_tau_init)))

    @property
    def columns(self) -> list[str]:
        """Metric names this objective adds (training and held-out), for metrics.csv."""
        names = ["logit_loss"]
        if self.student_layers:
            names += ["mc_loss", "coverage_loss", "router_loss"]
            names += [f"{stat}/{s}" for s in self.student_layers for stat in LAYER_STATS]
        if self.aux_loss is not None:
            names.append("aux_loss")
        taus = [f"tau/{s}" for s in self.student_layers]
        return names + [f"eval_{n}" for n in names] + taus

    @torch.no_grad()
    def clamp_(self) -> None:
        self.tau.clamp_(*TAU_RANGE)

    def forward(self, router_logits: tuple[torch.Tensor, ...], batch: dict, training: bool) -> dict[str, torch.Tensor]:
        """{"loss": what to add to the logit objective, the terms, per-layer statistics}."""
        if len(router_logits) != len(self.routers):  # entry s must be the s-th router's logits
            raise RuntimeError(
                f"the student returned router logits of {len(router_logits)} layers for {len(self.routers)} routers"
            )
        terms: dict[str, torch.Tensor] = {}
        total = router_logits[0].new_zeros((), dtype=torch.float32)
        if self.student_layers:
            terms.update(self._balanced_distillation(router_logits, batch, training))
            total = total + self.w.expert_weight * (
                terms["mc_loss"] + self.w.coverage_weight * terms["coverage_loss"] + terms["router_loss"]
            )
        if self.aux_loss is not None:
            terms["aux_loss"] = self.aux_loss(router_logits, batch)
            total = total + self.w.router_aux_coef * terms["aux_loss"]
        return {"loss": total, **terms}

    def _balanced_distillation(self, router_logits, batch: dict, training: bool) -> dict[str, torch.Tensor]:
        device = router_logits[0].device
        rows = batch["rows"].to(device)
        p = batch["teacher_gates"].to(device)  # [P, M, L, N]
        # router logits are [B*W, N] over the padded batch; rows = b*W + t picks the target positions
        q = torch.stack(
            [
                adapter.gate_probs(router, router_logits[s][rows].float())
                for s, (router, adapter) in ((s, self.routers[s]) for s in self.student_layers)
            ],
            dim=1,
        )
        log_q = q.clamp_min(TINY).log()
        experts, weights = mc_draws(p, batch["mc_uniforms"].to(device), self.w.mc_alpha)
        mc = mc_exploration_loss(log_q.unsqueeze(1), experts, weights).mean((0, 1))
        coverage = coverage_kl(p, q)
        router = entropy_aware_kl(p, tempered(log_q, self.tau.to(device)[:, None]), self.w.router_beta)
        terms = {"mc_loss": mc.mean(), "coverage_loss": coverage.mean(), "router_loss": router.mean()}
        with torch.no_grad():
            stats = torch.stack(
                [
                    -(q * log_q).sum(-1).mean(0),
                    load_cv(q, self.routers[self.student_layers[0]][1].top_k),
                    (torch.special.xlogy(p, p) - p * log_q.unsqueeze(1)).sum(-1).mean((0, 1)),
                ]
            )
        for i, s in enumerate(self.student_layers):
            terms.update({f"{stat}/{s}": stats[k, i] for k, stat in enumerate(LAYER_STATS)})
            if training:
                terms[f"tau/{s}"] = self.tau[i].detach()
        return terms


class FamilyAuxLoss:
    """The student family's own load-balancing loss (transformers' `load_balancing_loss_func`), without padding."""

    def __init__(self, model, num_experts: int, top_k: int):
        self.fn = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
        if self.fn is None:
            raise MoekdError(
                f"--router-aux-coef: {type(model).__name__} has no auxiliary load-balancing loss in transformers "
                "(DeepSeek-V3-style models balance with a correction bias instead); use --router-aux-coef 0"
            )
        self.num_experts, self.top_k = num_experts, top_k

    def __call__(self, router_logits, batch: dict) -> torch.Tensor:
        width = batch["input_ids"].shape[1]
        mask = torch.arange(width)[None, :] < batch["lengths"][:, None]
        return self.fn(tuple(router_logits), self.num_experts, self.top_k, mask.to(router_logits[0].device)).float()


def router_objective(o, model, gates) -> tuple[RouterObjective | None, GateTargets | None]:
    """The router terms `o` asks for (None when neither --router-loss nor --router-aux-coef is on), and
    the gate targets the loader must build from the store's gate arrays (`gates`: its GateInfo)."""
    if o.router_loss == "none" and not o.router_aux_coef:
        return None, None
    flag = "--router-loss bdistill" if o.router_loss != "none" else "--router-aux-coef"
    infos = recognise_routers(model)  # forward order, the order of router_logits
    if not infos:
        raise MoekdError(
            f"{flag} needs an MoE student: {type(model).__name__} ({o.student}) has no router modules; "
            "use an MoE student, or train this one without router terms"
        )
    for info in infos:
        if info.adapter is None:
            raise MoekdError(
                f"{flag}: the student's router {info.name} ({type(info.module).__name__}) is not supported: "
                f"{info.reason}"
            )
    widths = sorted({info.adapter.num_experts for info in infos})
    if len(widths) > 1:
        raise MoekdError(
            f"{flag}: the student's MoE layers have different expert counts ({widths}); "
            "one expert map cannot fit them all"
        )
    pairs = targets = None
    if o.router_loss == "bdistill":
        pairs = parse_layer_map(o.layer_map, [info.name for info in infos], gates.layers)
        if o.router_layers == "last":
            pairs = pairs[-1:]
        targets = GateTargets(
            pairs, gates.num_experts, expert_map(o.expert_map, gates.num_experts, widths[0]), o.mc_draws, o.seed
        )
    aux = FamilyAuxLoss(model, widths[0], infos[0].adapter.top_k) if o.router_aux_coef else None
    routers = [(info.module, info.adapter) for info in infos]
    weights = RouterWeights(
        o.expert_weight, o.coverage_weight, o.mc_alpha, o.router_beta, o.router_tau_init, o.router_aux_coef
    )
    return RouterObjective(weights, routers, pairs, aux), targets
