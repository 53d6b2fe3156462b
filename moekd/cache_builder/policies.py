"""Routing policies: which experts each token row of each MoE layer activates.

A policy sees the layer's gate distribution g [T, N] (float32, rows sum to 1; how a router
family defines g is in `moekd/routers.py`) and returns the selected experts. The router family then
weights the selection with its own scores (softmax, sigmoid, ...): the expanding policies (`all`,
`ka`, `topp`) renormalise the selected scores to 1 (docs/methods.md §2: on softmax routers, mask the
other logits to -inf and softmax) and then apply the family's scale (routed scaling); `mc` keeps
the family's native weighting exactly (incl. whether it renormalises).

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
          loaded into the teacher first (build.py does that; the policy itself routes as `all`).

Sampling without replacement is Gumbel-top-k: the k largest of log g_i + G_i with
G_i = -log(-log u_i) draw k experts exactly as k successive draws from g renormalised over the
experts left. The uniforms are counter-based (`token_uniforms`): u for (row seed, layer,
position, slot) is a splitmix64 hash of those four integers, so a draw never depends on batch
composition, padding, device or call order. Slot 0 is the KA coin, slot 1 + i expert i's Gumbel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekd.errors import MoekdError

POLICY_NAMES = ("topk", "all", "ka", "topp", "mc", "sar")
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


# describe() of every policy returns its make_policy keyword arguments other than m, so
# make_policy(policy.name, m=policy.samples, **policy.describe()) rebuilds it.


def make_policy(
    name: str,
    m: int | None = None,
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
    if m is not None and m < 1:
        raise MoekdError(f"--m must be at least 1 (teacher samples per example), got {m}")
    if name in ("topk", "all", "topp", "sar") and m not in (None, 1):
        raise MoekdError(
            f"--m {m} with --policy {name}: the policy is deterministic, so all {m} samples would be identical; "
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
        return MonteCarloRouting(samples=m or 2)
    ka_lambda = 0.05 if ka_lambda is None else ka_lambda
    ka_drop = 1 if ka_drop is None else ka_drop
    if ka_lambda == 0 and (m or 2) > 1:
        raise MoekdError(
            f"--m {m or 2} with --ka-lambda 0: KA then always keeps the top experts, so every sample would be "
            "identical; use --m 1 or a --ka-lambda above 0"
        )
    if not 0.0 <= ka_lambda <= 1.0:
        raise MoekdError(f"--ka-lambda must be in [0, 1] (probability of sampling the kept experts), got {ka_lambda}")
    if ka_drop < 1:
        raise MoekdError(
            f"--ka-drop must be at least 1 (experts dropped per token), got {ka_drop}; to keep every expert use --policy all"
        )
    return KnowledgeAugmentation(samples=m or 2, ka_lambda=float(ka_lambda), ka_drop=int(ka_drop))
