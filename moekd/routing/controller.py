"""Find a teacher's MoE routers and make them route by a policy (see `policies.py`).

Routers and their gate distributions are described in `moekd/routing/routers.py`. A forward hook
rewrites `(weights, index)` only, so `output_router_logits=True` still records the raw
logits; the `topk` policy installs no rewrite at all.

Token positions for the random draws come from a forward pre-hook on the model: the row's
count of attended tokens before each token (cumsum of a 2D `attention_mask` - 1, which under
`generate()` covers the cached tokens too), else `position_ids`, else `cache_position`, else
past length + 0..T-1. A token's position is therefore the same with left or right padding,
in a prefill or in a KV-cached decoding step, and in a gradient-checkpointing replay.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from moekd.errors import MoekdError
from moekd.routing.adapter import PUBLISHED_TEXT
from moekd.routing.policies import NativeTopK, RoutingPolicy
from moekd.routing.routers import find_routers, recognise_routers
from moekd.seeds import token_uniforms


class RouterController:
    """Routes every MoE layer of `model` by `policy` inside `active()`; optionally records gates."""

    def __init__(self, model: nn.Module, policy: RoutingPolicy | None = None, capture_gates: bool = False):
        self.model = model
        self.policy = policy or NativeTopK()
        self.capture_gates = capture_gates
        native = isinstance(self.policy, NativeTopK)
        what = f"--experts {self.policy.experts}" if native else f"--policy {self.policy.name}"
        if not (native and self.policy.experts is None) and not find_routers(model):
            raise MoekdError(
                f"{what} needs an MoE teacher: {type(model).__name__} has no router modules; "
                "use --policy topk (without --experts) for a dense teacher"
            )
        # Each router in forward order with what it computes, from one short forward (moekd/routing/routers.py)
        infos = recognise_routers(model)
        self.moe_layers = [info.name for info in infos]
        self._routers = [info.module for info in infos]
        self._adapters = [info.adapter for info in infos]
        self._targets = [info.target for info in infos]
        self._logits: list[torch.Tensor | None] = [None] * len(infos)
        self.router_class = ", ".join(sorted({type(r).__name__ for r in self._routers})) or None
        sizes = {(a.num_experts, a.top_k) for a in self._adapters if a is not None}
        if capture_gates and len({n for n, _ in sizes}) > 1:
            raise MoekdError(
                f"capturing gate distributions: the MoE layers have different expert counts "
                f"{sorted({n for n, _ in sizes})}; use --router-probs none"
            )
        self.num_experts, self.top_k = min(sizes) if sizes else (None, None)
        self.rewrites = not (native and self.policy.is_native(self.top_k))
        unsupported = {type(i.module).__name__: i.reason for i in infos if i.adapter is None}
        if unsupported and (self.rewrites or capture_gates):
            what = what if self.rewrites else "capturing gate distributions"
            name, reason = next(iter(unsupported.items()))
            raise MoekdError(
                f"{what}: router class {name} is not supported: {reason}; use --policy topk without gate capture"
            )
        if native and self.rewrites and self.policy.experts > self.num_experts:
            raise MoekdError(
                f"{what}: the teacher has only {self.num_experts} experts per layer; use --experts 1..{self.num_experts}"
            )
        kinds = sorted({a.describe()["g"] for a in self._adapters if a is not None})
        self.gate_definition = " / ".join(kinds) or None
        # how the rewritten selections are weighted (native when nothing is rewritten)
        weightings = {a.weighting for a in self._adapters if a is not None} if self.rewrites else {"native"}
        self.weighting = " / ".join(sorted(weightings)) or None
        drop = getattr(self.policy, "ka_drop", 0)
        if self.num_experts is not None and drop >= self.num_experts:
            raise MoekdError(f"--ka-drop {drop} leaves no expert: the teacher has {self.num_experts} experts per layer")
        self._positions: torch.Tensor | None = None
        self._row_seeds: torch.Tensor | None = None
        self._gates: list[torch.Tensor | None] = []
        self._activated: list[torch.Tensor | None] = []

    def weighting_text(self) -> str:
        """How the selected experts are weighted, in words (printed at build time)."""
        texts = [
            f"the {PUBLISHED_TEXT} weighting, as no native one fits ({a.native_misfit})"
            if a.weighting == "published"
            else f"the family's native weighting ({a.describe()['weighting']})"
            for a in self._adapters
            if a is not None
        ]
        return "; ".join(dict.fromkeys(texts)) if self.rewrites else "the router's own top-k and weighting"

    @contextmanager
    def active(self, row_seeds: list[int] | None = None):
        """Install the hooks for the enclosed forwards (one seed per batch row for a stochastic policy)."""
        if self.policy.stochastic and row_seeds is None:
            raise ValueError(f"policy {self.policy.name} is stochastic: pass row_seeds, one per batch row")
        self._row_seeds = None if row_seeds is None else torch.tensor(row_seeds, dtype=torch.int64)
        self._gates = [None] * len(self._routers)
        self._activated = [None] * len(self._routers)
        handles = []
        try:
            if self.policy.stochastic:
                handles.append(self.model.register_forward_pre_hook(self._record_positions, with_kwargs=True))
            if self.rewrites or self.capture_gates:
                for layer, (router, target) in enumerate(zip(self._routers, self._targets)):
                    if target is None:
                        handles.append(router.register_forward_hook(self._router_hook(layer)))
                    else:  # the router returns logits only; its block hands the selection to `target`
                        handles.append(router.register_forward_hook(self._logits_hook(layer)))
                        handles.append(target.register_forward_pre_hook(self._target_hook(layer), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._positions = None

    def gate_probs(self) -> list[torch.Tensor]:
        """float32 [B*T, N] gate distribution of each MoE layer in the last forward (needs capture_gates)."""
        return self._captured(self._gates)

    def activated_experts(self) -> list[torch.Tensor]:
        """bool [B*T, N]: the experts each token activated (nonzero weight) per MoE layer in the last forward."""
        return self._captured(self._activated)

    def _captured(self, tensors: list) -> list[torch.Tensor]:
        if not self.capture_gates:
            raise ValueError("RouterController was built with capture_gates=False")
        if any(t is None for t in tensors):
            raise ValueError("no forward ran with the controller active")
        return list(tensors)

    def _route(self, layer: int, logits, weights, index):
        """The layer's (weights, index) under the policy (unchanged for topk), recording gates if asked."""
        router, adapter = self._routers[layer], self._adapters[layer]
        valid = None
        if self.rewrites:
            probs = adapter.gate_probs(router, logits)
            uniforms = self._uniforms(layer, logits, adapter.num_experts) if self.policy.stochastic else None
            index, valid = self.policy.select(probs, uniforms, adapter.top_k)
            weights = adapter.weights(router, logits, index, valid, self.policy.renormalise)
        if self.capture_gates:
            with torch.no_grad():
                self._gates[layer] = adapter.gate_probs(router, logits).detach()
                hit = torch.ones_like(index, dtype=torch.bool) if valid is None else valid
                self._activated[layer] = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, index, hit)
        return weights, index

    def _router_hook(self, layer: int):
        adapter = self._adapters[layer]

        def hook(router: nn.Module, args, output):
            weights, index = self._route(layer, *adapter.read(output))
            return adapter.write(output, weights, index) if self.rewrites else None

        return hook

    def _logits_hook(self, layer: int):
        def hook(router: nn.Module, args, output):
            self._logits[layer] = output

        return hook

    def _target_hook(self, layer: int):
        adapter = self._adapters[layer]

        def hook(target: nn.Module, args, kwargs):
            weights, index = self._route(layer, self._logits[layer], *adapter.read_call(args, kwargs))
            return adapter.write_call(args, kwargs, weights, index) if self.rewrites else None

        return hook

    def _uniforms(self, layer: int, logits: torch.Tensor, experts: int) -> torch.Tensor:
        if self._positions is None:
            raise RuntimeError("a router ran before the model's forward: call the model the controller was built with")
        rows, cols = self._positions.shape
        if rows * cols != logits.shape[0]:
            raise RuntimeError(f"router saw {logits.shape[0]} tokens but the model forward had {rows}x{cols}")
        seeds = self._row_seeds.to(logits.device)
        return token_uniforms(seeds, layer, self._positions.to(logits.device), experts + 1)

    def _record_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        rows, length = ids.shape if ids is not None else embeds.shape[:2]
        if len(self._row_seeds) != rows:
            raise ValueError(f"{len(self._row_seeds)} row seeds for a batch of {rows} rows")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        position_ids = kwargs.get("position_ids")
        cache_position = kwargs.get("cache_position")
        if mask is not None and mask.dim() == 2 and mask.shape[1] >= length:
            positions = (mask.long().cumsum(dim=-1) - 1)[:, -length:].clamp(min=0)
        elif position_ids is not None:
            positions = position_ids[0] if position_ids.dim() == 3 else position_ids
        elif cache_position is not None:
            positions = cache_position
        else:
            past = kwargs.get("past_key_values")
            start = past.get_seq_length() if past is not None else 0
            positions = torch.arange(start, start + length)
        self._positions = positions.long().expand(rows, length)
