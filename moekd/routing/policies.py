"""Routing policies: which experts each token row of each MoE layer activates.

A policy sees the layer's gate distribution g [T, N] (float32, rows sum to 1; how a router
family defines g is in `moekd/routing/routers.py`) and returns the selected experts. The router family then
weights the selection with its own scores (softmax, sigmoid, ...): the expanding policies (`all`,
`ka`, `topp`) renormalise the selected scores to 1 (docs/methods.md §2: on softmax routers, mask the
other logits to -inf and softmax) and then apply the family's scale (routed scaling); `mc` keeps
the family's native weighting exactly (incl. whether it renormalises). On a router whose native
weighting is no known computation (Phi-3.5-MoE's sparsemixer, ...), every policy that rewrites
the selection uses the published weighting: softmax over the kept experts' logits.

- `topk`: the router's own top-k; no rewrite, bit-identical to the unhooked model. With
          `experts` K (docs/methods.md §2.1, published Figure 2): the K experts with the largest g, in
          expert order, renormalised like `all`. K = the router's k installs no rewrite (the
          native policy, bit for bit); K = N selects exactly what `all` selects.
- `all`:  every expert (k = N).
- `ka`:   Knowledge Augmentation. Per token row and layer, with probability λ (`ka_lambda`)
          sample N - `ka_drop` experts without replacement from g, else take the N - `ka_drop`
          experts with the largest g.
- `topp`: the smallest set of experts, taken in order of decreasing g, whose mass reaches
          `top_p`. Tokens with fewer experts than the layer's widest row get zero-weight padding
          slots (their flag in `valid` is False).
- `mc`:   Monte-Carlo expert exploration: the router's usual k experts sampled without
          replacement from g. Across M passes every expert is visited in proportion to its
          probability of being in such a draw, not only the native top-k.
- `sar`:  Student-Aware Router: `all`, with the router weights of a `moekd sar train` file
          loaded into the teacher first (build.py and `moekd eval` do that with
          routing/router_file.py's load_router_file; the policy itself routes as `all`).

Sampling without replacement is Gumbel-top-k: the k largest of log g_i + G_i with
G_i = -log(-log u_i) draw k experts exactly as k successive draws from g renormalised over the
experts left. The uniforms are counter-based (`moekd.seeds.token_uniforms`): u for (row seed, layer,
position, slot) is a splitmix64 hash of those four integers, so a draw never depends on batch
composition, padding, device or call order. Slot 0 is the KA coin, slot 1 + i expert i's Gumbel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekd.errors import MoekdError
from moekd.options import Part

POLICY_NAMES = ("topk", "all", "ka", "topp", "mc", "sar")


def gumbel_top_k(gates: torch.Tensor, uniforms: torch.Tensor, k: int) -> torch.Tensor:
    """k experts per row drawn without replacement from `gates` [T, N], given uniforms [T, N]."""
    keys = gates.double().log() - (-uniforms.log()).log()
    return keys.topk(k, dim=-1).indices


@dataclass(frozen=True)
class NativeTopK:
    samples: int = 1
    experts: int | None = None  # K; None = the router's own k
    name = "topk"
    stochastic = False
    renormalise = True

    def describe(self) -> dict:
        return {} if self.experts is None else {"experts": self.experts}

    def is_native(self, top_k: int | None) -> bool:
        """True when the policy is the router's own top-k (no rewrite needed)."""
        return self.experts is None or self.experts == top_k

    def select(self, gates: torch.Tensor, uniforms: torch.Tensor | None, top_k: int):
        # expert order, so that K = N gives `all`'s index (and weights) bit for bit
        return gates.topk(self.experts, dim=-1).indices.sort(dim=-1).values, None


@dataclass(frozen=True)
class AllExperts:
    samples: int = 1
    name = "all"
    stochastic = False
    renormalise = True

    def describe(self) -> dict:
        return {}

    def select(self, gates: torch.Tensor, uniforms: torch.Tensor | None, top_k: int):
        tokens, experts = gates.shape
        return torch.arange(experts, device=gates.device).expand(tokens, experts), None


@dataclass(frozen=True)
class StudentAwareRouting(AllExperts):
    """All experts under trained router weights (the weights are loaded by the build, not here)."""

    name = "sar"


@dataclass(frozen=True)
class KnowledgeAugmentation:
    samples: int = 2
    ka_lambda: float = 0.05
    ka_drop: int = 1
    name = "ka"
    stochastic = True
    renormalise = True

    def describe(self) -> dict:
        return {"ka_lambda": self.ka_lambda, "ka_drop": self.ka_drop}

    def select(self, gates: torch.Tensor, uniforms: torch.Tensor, top_k: int):
        keep = gates.shape[1] - self.ka_drop
        top = gates.topk(keep, dim=-1).indices
        sampled = gumbel_top_k(gates, uniforms[:, 1:], keep)
        explore = uniforms[:, :1] < self.ka_lambda
        return torch.where(explore, sampled, top), None


@dataclass(frozen=True)
class TopP:
    samples: int = 1
    top_p: float = 0.9
    name = "topp"
    stochastic = False
    renormalise = True

    def describe(self) -> dict:
        return {"top_p": self.top_p}

    def select(self, gates: torch.Tensor, uniforms: torch.Tensor | None, top_k: int):
        sorted_gates, order = gates.sort(dim=-1, descending=True)
        mass_before = sorted_gates.cumsum(dim=-1) - sorted_gates
        valid = mass_before < self.top_p
        width = int(valid.sum(dim=-1).max())
        return order[:, :width], valid[:, :width]


@dataclass(frozen=True)
class MonteCarloRouting:
    samples: int = 2
    name = "mc"
    stochastic = True
    renormalise = False

    def describe(self) -> dict:
        return {}

    def select(self, gates: torch.Tensor, uniforms: torch.Tensor, top_k: int):
        return gumbel_top_k(gates, uniforms[:, 1:], top_k), None


RoutingPolicy = NativeTopK | AllExperts | StudentAwareRouting | KnowledgeAugmentation | TopP | MonteCarloRouting


# describe() of every policy returns its make_policy keyword arguments other than samples, so
# make_policy(policy.name, samples=policy.samples, **policy.describe()) rebuilds it.


def check_router_flag(policy: str | None, router) -> None:
    """--policy sar and --router FILE go together (cache build, eval); `policy` None is native routing."""
    if policy == "sar" and router is None:
        raise MoekdError("--policy sar needs --router FILE: the router file `moekd sar train --out` wrote")
    if router is not None and policy != "sar":
        given = f"--policy {policy}" if policy else "native routing (no --policy)"
        raise MoekdError(f"--router applies only to --policy sar, not {given}; drop it or use --policy sar")


# The flags of a policy's parameters (cache build, eval, routing stats): make_policy's (None: the default).
POLICY_PARAM_PARTS = (
    Part(
        "ka_lambda",
        "ka_lambda",
        float,
        "ka: probability of sampling the kept experts instead of taking the top ones (default 0.05).",
    ),
    Part("ka_drop", "ka_drop", int, "ka: experts left out per token and layer (default 1: N-1 kept)."),
    Part("top_p", "top_p", float, "topp: gate mass the selected experts must reach."),
    Part(
        "experts",
        "experts",
        int,
        "topk: activate the K experts with the largest gates, renormalised (default: the router's own k; K = N is the same as --policy all).",
    ),
)
# cache build also takes the number of teacher samples per example
POLICY_PARTS = (
    Part("m", "samples", int, "Teacher samples per example (stochastic policies; ka default 2)."),
    *POLICY_PARAM_PARTS,
)


def make_policy(
    name: str,
    samples: int | None = None,
    ka_lambda: float | None = None,
    ka_drop: int | None = None,
    top_p: float | None = None,
    experts: int | None = None,
) -> RoutingPolicy:
    """The policy `name` with its parameters checked; parameters left as None take the defaults."""
    if name not in POLICY_NAMES:
        raise MoekdError(f"--policy: unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    owners = {
        "--ka-lambda": (ka_lambda, "ka"),
        "--ka-drop": (ka_drop, "ka"),
        "--top-p": (top_p, "topp"),
        "--experts": (experts, "topk"),
    }
    for flag, (value, owner) in owners.items():
        if value is not None and name != owner:
            raise MoekdError(f"{flag} applies only to --policy {owner}, not --policy {name}; drop it")
    if samples is not None and samples < 1:
        raise MoekdError(f"--m must be at least 1 (teacher samples per example), got {samples}")
    if name in ("topk", "all", "topp", "sar") and samples not in (None, 1):
        raise MoekdError(
            f"--m {samples} with --policy {name}: the policy is deterministic, so all {samples} samples would be identical; "
            "use --m 1, or a stochastic policy (ka, mc)"
        )
    if name == "topk":
        if experts is not None and experts < 1:
            raise MoekdError(f"--experts must be at least 1 (experts activated per token), got {experts}")
        return NativeTopK(experts=None if experts is None else int(experts))
    if name == "all":
        return AllExperts()
    if name == "sar":
        return StudentAwareRouting()
    if name == "topp":
        top_p = 0.9 if top_p is None else top_p
        if not 0.0 < top_p <= 1.0:
            raise MoekdError(f"--top-p must be in (0, 1], got {top_p}")
        return TopP(top_p=float(top_p))
    if name == "mc":
        return MonteCarloRouting(samples=samples or 2)
    ka_lambda = 0.05 if ka_lambda is None else ka_lambda
    ka_drop = 1 if ka_drop is None else ka_drop
    if ka_lambda == 0 and (samples or 2) > 1:
        raise MoekdError(
            f"--m {samples or 2} with --ka-lambda 0: KA then always keeps the top experts, so every sample would be "
            "identical; use --m 1 or a --ka-lambda above 0"
        )
    if not 0.0 <= ka_lambda <= 1.0:
        raise MoekdError(f"--ka-lambda must be in [0, 1] (probability of sampling the kept experts), got {ka_lambda}")
    if ka_drop < 1:
        raise MoekdError(
            f"--ka-drop must be at least 1 (experts dropped per token), got {ka_drop}; to keep every expert use --policy all"
        )
    return KnowledgeAugmentation(samples=samples or 2, ka_lambda=float(ka_lambda), ka_drop=int(ka_drop))
