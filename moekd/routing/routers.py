"""MoE routers of Hugging Face models: where they are and what they compute.

Shared by the cache builder (routing policies, gate capture) and the training side (MoE
students, router training), so it imports neither.

Where: a model declares its router classes in `_can_record_outputs["router_logits"]` (on the
causal LM or on an inner model); `find_routers` returns the matching modules.

What: routers are recognised by what they compute, never by class name. `recognise_routers`
runs the model once on a few tokens, records each router's call and asks which known
computation reproduces the router's own selection weights from its own logits
(moekd/routing/recognition.py). Where none does (Phi-3.5-MoE's sparsemixer, ...) but the
router gives one logit per expert per token, it takes the published weighting (the KA paper's
definition): g = softmax(logits), and a selection's weights are the softmax of its logits. A computation (`GateAdapter`, moekd/routing/adapter.py) is data:
the per-expert score (softmax or sigmoid of the logits, the logits' own probabilities, or the
router's `score_fn`), whether the selected scores are renormalised, a constant or per-expert
scale (routed scaling), and where the selection is (the router's output, or the call of the
module its MoE block hands it to). The native top-k choice itself (selection bias, group
limits, ...) is never modelled: policies replace it and select from g.

Gate distribution g (what policies select from, what `gate_probs` returns, float32 [T, N]):
the per-expert scores normalised to sum 1: softmax(logits) for softmax routers, sigmoid(logits)
/ sum for sigmoid routers. Native weighting of a selection S: the scores of S, renormalised to 1
if the family does, times the family's scale. The expanding policies (all, ka, topp) always
renormalise before the scale; `mc` keeps the family's weighting exactly. `adapter.weighting`
says which: "native" or "published".

API for both sides (stable):
- `find_routers(model) -> [(name, router)]` (module order, no forward)
- `recognise_routers(model) -> [RouterInfo]` (forward order; one short forward; remembers each adapter)
- `gate_adapter(router) -> GateAdapter` for a router recognised before; raises MoekdError if it
  is unsupported (the error names its class and why)
- `adapter.gate_probs(router, logits) -> float32 [T, N]`, `adapter.weights(router, logits,
  index, valid=None, renormalise=False) -> float32 [T, k]`
- `gate_parameters(router) -> [(name, Parameter)]`: the parameters g depends on (trainable by
  router training); `frozen_router_tensors(router) -> [name]`: the router's other parameters
  and buffers (selection biases such as `e_score_correction_bias`, per-expert scales).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from moekd.errors import MoekdError
from moekd.routing.adapter import GateAdapter
from moekd.routing.recognition import (
    detach,
    fit_router,
    gate_parameter_names,
    router_quirks,
)


@dataclass
class RouterInfo:
    """One router of a model and what `recognise_routers` found out about it."""

    name: str
    module: nn.Module
    adapter: GateAdapter | None
    reason: str | None = None  # why no adapter fits (adapter is None)
    gate_parameter_names: tuple[str, ...] = ()
    quirks: tuple[str, ...] = field(default_factory=tuple)
    target: nn.Module | None = None  # experts layout: the module whose call carries the selection
    logits_at: int = 0  # where the logits are in the router's output (its `router_logits` recorder's index)


_RECOGNISED: weakref.WeakKeyDictionary[nn.Module, RouterInfo] = weakref.WeakKeyDictionary()


def router_recorders(model: nn.Module) -> list[tuple[type | None, str | None, int, str | None]]:
    """(class, class-name suffix, output index of the logits, layer name) of every `router_logits` recorder."""
    specs = []
    for module in model.modules():
        entries = module.__dict__.get("_can_record_outputs") or getattr(type(module), "_can_record_outputs", None) or {}
        entries = entries.get("router_logits") if isinstance(entries, dict) else None
        if entries is None:
            continue
        for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
            if isinstance(entry, type):  # a bare class records output index 1 (transformers' default)
                specs.append((entry, None, 1, None))
            elif isinstance(entry, str):
                specs.append((None, entry, 1, None))
            else:
                specs.append((entry.target_class, entry.class_name, entry.index, entry.layer_name))
    return list(dict.fromkeys(specs))


def _routers_with_index(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    specs = router_recorders(model)
    found = []
    for name, module in model.named_modules():
        for cls, suffix, index, layer in specs:
            matches = (cls is not None and isinstance(module, cls)) or (suffix and name.endswith(suffix))
            if matches and (layer is None or f".{layer.strip('.')}." in f".{name}."):
                found.append((name, module, index))
                break
    return found


def router_classes(model: nn.Module) -> tuple[type, ...]:
    """Router module classes the model declares for recording `router_logits`; empty for dense models."""
    return tuple(dict.fromkeys(cls for cls, _, _, _ in router_recorders(model) if cls is not None))


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, router) of every MoE router in the model, in module order (no forward runs).

    Module order is forward order in nearly every family; `recognise_routers` gives the true one.
    """
    return [(name, module) for name, module, _ in _routers_with_index(model)]


def _block(model: nn.Module, name: str) -> nn.Module | None:
    """The module holding the router `name` (its MoE block)."""
    return model.get_submodule(name.rpartition(".")[0]) if "." in name else None


def recognise_routers(model: nn.Module, tokens: int = 16) -> list[RouterInfo]:
    """Every router of `model`, in the order they run, with the adapter that reproduces its output (or why none does).

    Runs the model once, in eval mode and without gradients, on `tokens` seeded token ids.
    """
    routers = _routers_with_index(model)
    if not routers:
        return []
    calls: dict[int, tuple] = {}  # in the order the routers first ran

    def recorder(position):
        def hook(module, args, kwargs, output):
            calls.setdefault(position, (detach(args), detach(kwargs), detach(output)))

        return hook

    sibling_calls: dict[
        tuple[int, str], tuple
    ] = {}  # first call of each module beside a router, for the experts layout

    def sibling_recorder(position, child):
        def hook(module, args, kwargs):
            sibling_calls.setdefault((position, child), (detach(args), detach(kwargs)))

        return hook

    handles = [m.register_forward_hook(recorder(i), with_kwargs=True) for i, (_, m, _) in enumerate(routers)]
    for i, (name, router, _) in enumerate(routers):
        block = _block(model, name)
        for child, module in block.named_children() if block is not None else []:
            if module is not router:
                handles.append(module.register_forward_pre_hook(sibling_recorder(i, child), with_kwargs=True))
    embeddings = model.get_input_embeddings()
    ids = torch.randint(0, embeddings.num_embeddings, (1, tokens), generator=torch.Generator().manual_seed(0))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(
                input_ids=ids.to(embeddings.weight.device),
                attention_mask=torch.ones_like(ids).to(embeddings.weight.device),
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    infos = []
    order = [*calls, *(p for p in range(len(routers)) if p not in calls)]
    for position in order:
        name, module, index = routers[position]
        if position not in calls:
            info = RouterInfo(name, module, None, "it did not run in a forward of the model", logits_at=index)
        else:
            args, kwargs, output = calls[position]
            block = _block(model, name)
            siblings = {child: call for (p, child), call in sibling_calls.items() if p == position}
            adapter = fit_router(module, index, output, siblings)
            if isinstance(adapter, str):
                info = RouterInfo(name, module, None, adapter, logits_at=index)
            else:
                gate_names = gate_parameter_names(module, args, kwargs, index)
                target = block.get_submodule(adapter.target) if adapter.target else None
                info = RouterInfo(
                    name,
                    module,
                    adapter,
                    None,
                    gate_names,
                    router_quirks(block, module, adapter, gate_names, args, kwargs),
                    target,
                    index,
                )
        _RECOGNISED[module] = info
        infos.append(info)
    return infos


def gate_adapter(router: nn.Module) -> GateAdapter:
    """The adapter `recognise_routers` found for `router`; MoekdError if it is unsupported or not recognised yet."""
    info = _RECOGNISED.get(router)
    if info is None:
        raise MoekdError(
            f"router {type(router).__name__} was not recognised yet: call moekd.routing.routers.recognise_routers(model) first"
        )
    if info.adapter is None:
        raise MoekdError(f"router class {type(router).__name__} is not supported: {info.reason}")
    return info.adapter


def gate_parameters(router: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the router parameters its logits, hence g, depend on (found by autograd)."""
    gate_adapter(router)
    names = set(_RECOGNISED[router].gate_parameter_names)
    return [(n, p) for n, p in router.named_parameters() if n in names]


def frozen_router_tensors(router: nn.Module) -> list[str]:
    """Names of the router's parameters and buffers that g does not depend on (selection biases, scales)."""
    gate_adapter(router)
    names = set(_RECOGNISED[router].gate_parameter_names)
    return [n for n, _ in [*router.named_parameters(), *router.named_buffers()] if n not in names]
