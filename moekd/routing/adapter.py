"""What an MoE router computes, as data: its per-expert score, renormalisation and scale.

A `GateAdapter` is found for each router by `moekd.routing.routers.recognise_routers` and applied by
the routing policies (moekd/routing/controller.py) and the training side: `gate_probs` is
the gate distribution g, `weights` the family's weighting of any selection, `read`/`write`
(or `read_call`/`write_call`) take the selection out of and back into the router's output (or
the call of the module its block hands the selection to).

Weighting: `native` where a known computation reproduces the router's own weights; `published`
(the KA paper's definition) where none does but the router has one logit per expert per token:
the logits outside the selection are set to -inf and the kept experts weighted by the softmax of
the rest, i.e. score softmax, renormalised, no scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SCORES = ("softmax", "sigmoid", "probabilities", "score_fn")
PUBLISHED_TEXT = "published (softmax over the kept experts' logits, the others at -inf)"
SCORE_TEXT = {
    "softmax": "softmax(logits)",
    "sigmoid": "sigmoid(logits) / sum",
    "probabilities": "the router's output probabilities",
    "score_fn": "score_fn(logits) / sum",
}


@dataclass(frozen=True)
class GateAdapter:
    """One router's computation: score per expert, renormalisation and scale of the selected scores."""

    score: str  # one of SCORES
    normalise: bool  # the family renormalises the selected scores to sum 1
    scale: float = 1.0  # constant factor on the weights (routed scaling)
    scale_name: str | None = None  # router attribute holding that constant, read live
    expert_scale: str | None = None  # router parameter/buffer [N] multiplying each expert's weight
    layout: str = "triple"  # triple: (logits, weights, index, ...); dense: (scores [T, N], logits);
    # experts: the router returns logits, its block hands (index, weights) to `target`
    num_experts: int = 0
    top_k: int = 0
    target: str | None = None  # experts layout: the sibling module that receives the selection
    index_arg: int | str | None = None  # ... and where in its call the index and weights are
    weights_arg: int | str | None = None
    weighting: str = "native"  # or "published"
    native_misfit: str = ""  # published weighting: why no native computation fits

    @classmethod
    def published(cls, layout: str, num_experts: int, top_k: int, native_misfit: str, **target) -> GateAdapter:
        """The published weighting on a router whose own weighting is no known computation."""
        return cls(
            "softmax",
            True,
            layout=layout,
            num_experts=num_experts,
            top_k=top_k,
            weighting="published",
            native_misfit=native_misfit,
            **target,
        )

    def scores(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """float32 [T, N] native per-expert scores."""
        x = logits.float()
        if self.score == "softmax":
            return torch.softmax(x, dim=-1)
        if self.score == "sigmoid":
            return x.sigmoid()
        if self.score == "score_fn":
            return router.score_fn(x).float()
        return x

    def gate_probs(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """float32 [T, N] gate distribution g: the scores normalised to sum 1 per token."""
        s = self.scores(router, logits)
        return s if self.score == "softmax" else s / s.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    def weights(
        self, router: nn.Module, logits: torch.Tensor, index: torch.Tensor, valid=None, renormalise: bool = False
    ) -> torch.Tensor:
        """float32 [T, k] weights of the selected experts `index`: native weighting, renormalised if asked
        (the published weighting always renormalises: softmax over the kept logits)."""
        if self.weighting == "published":
            kept = logits.float().gather(1, index)
            return torch.softmax(kept if valid is None else kept.masked_fill(~valid, float("-inf")), dim=-1)
        w = self.scores(router, logits).gather(1, index)
        if valid is not None:
            w = w * valid
        if renormalise or self.normalise:
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        w = w * (float(getattr(router, self.scale_name)) if self.scale_name else self.scale)
        if self.expert_scale:
            w = w * router_tensor(router, self.expert_scale).float().flatten()[index]
        return w

    def read(self, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, N], weights [T, k], index [T, k]) from the router's output."""
        if self.layout == "dense":  # the selected experts are the nonzero scores
            dense, logits = output[0], output[1]
            index = dense.float().topk(max(int((dense != 0).sum(dim=-1).max()), 1), dim=-1).indices
            return logits, dense.gather(1, index), index
        return output[0], output[1], output[2]

    def write(self, output, weights: torch.Tensor, index: torch.Tensor):
        """The router's output with the selection replaced by (weights, index)."""
        if self.layout == "dense":
            dense = torch.zeros_like(output[0]).scatter_(1, index, weights.to(output[0].dtype))
            return (dense, *output[1:])
        return (output[0], weights.to(output[1].dtype), index, *output[3:])

    def read_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """experts layout: (weights, index) from the call of the target module."""
        return call_argument(args, kwargs, self.weights_arg), call_argument(args, kwargs, self.index_arg)

    def write_call(self, args: tuple, kwargs: dict, weights: torch.Tensor, index: torch.Tensor):
        """experts layout: the target's call with the selection replaced."""
        native = call_argument(args, kwargs, self.weights_arg)
        args, kwargs = list(args), dict(kwargs)
        for where, value in ((self.weights_arg, weights.to(native.dtype)), (self.index_arg, index)):
            if isinstance(where, int):
                args[where] = value
            else:
                kwargs[where] = value
        return tuple(args), kwargs

    def published_difference(self, renormalise: bool) -> str | None:
        """How this weighting of a selection differs from the published one (None: they coincide).

        `renormalise`: the policy renormalises the kept scores (all, ka, topp, topk --experts); mc does
        not. Renormalised softmax scores are the softmax of the kept logits; renormalised router
        probabilities are the softmax of the kept log-probabilities.
        """
        differences = []
        if self.score in ("sigmoid", "score_fn"):
            differences.append(f"{SCORE_TEXT[self.score]} of the kept experts, not a softmax of their logits")
        if not (renormalise or self.normalise):
            differences.append("the kept scores are not renormalised")
        if self.scale_name or self.scale != 1.0:
            differences.append(f"× {self.scale_name} ({self.scale:g})" if self.scale_name else f"× {self.scale:g}")
        if self.expert_scale:
            differences.append(f"× {self.expert_scale}[expert]")
        return "; ".join(differences) or None

    def describe(self) -> dict:
        """What the families table says about it: kind, gate distribution g and native weighting."""
        if self.weighting == "published":
            return {
                "kind": "published"
                + {"dense": " (dense scores)", "experts": " (picked in the MoE block)"}.get(self.layout, ""),
                "g": SCORE_TEXT["softmax"],
                "weighting": f"none fits ({self.native_misfit})",
            }
        scale = (
            f" × {self.scale_name} ({self.scale:g})"
            if self.scale_name
            else f" × {self.scale:g}"
            if self.scale != 1.0
            else ""
        )
        if self.expert_scale:
            scale += f" × {self.expert_scale}[expert]"
        kind = self.score + {"dense": " (dense scores)", "experts": " (picked in the MoE block)"}.get(self.layout, "")
        base = "renormalised" if self.normalise else "not renormalised"
        return {"kind": kind, "g": SCORE_TEXT[self.score], "weighting": f"selected scores, {base}{scale}"}


def call_argument(args: tuple, kwargs: dict, where: int | str):
    return args[where] if isinstance(where, int) else kwargs[where]


def router_tensor(router: nn.Module, name: str) -> torch.Tensor:
    return router.get_parameter(name) if name in dict(router.named_parameters()) else router.get_buffer(name)
