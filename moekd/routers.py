"""MoE routers of Hugging Face models: where they are and what they compute.

Shared by the cache builder (routing policies, gate capture) and the training side (MoE
students, router training), so it imports neither.

Where: a model declares its router classes in `_can_record_outputs["router_logits"]` (on the
causal LM or on an inner model); `find_routers` returns the matching modules in forward order.

What: routers are recognised by what they compute, never by class name. `recognise_routers`
runs the model once on a few tokens, records each router's call and asks which known
computation reproduces the router's own output from its own logits. A computation
(`GateAdapter`) is data: the per-expert score (softmax or sigmoid of the logits, the logits'
own probabilities, or the router's `score_fn`), whether the selected scores are renormalised,
and a constant or per-expert scale (routed scaling). The native top-k choice itself (selection
bias, group limits, ...) is never modelled: policies replace it and select from g.

Gate distribution g (what policies select from, what `gate_probs` returns, float32 [T, N]):
the per-expert scores normalised to sum 1: softmax(logits) for softmax routers, sigmoid(logits)
/ sum for sigmoid routers. Native weighting of a selection S: the scores of S, renormalised to 1
if the family does, times the family's scale. The expanding policies (all, ka, topp) always
renormalise before the scale; `mc` keeps the family's weighting exactly.

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

SCORES = ("softmax", "sigmoid", "probabilities", "score_fn")
SCORE_TEXT = {
    "softmax": "softmax(logits)",
    "sigmoid": "sigmoid(logits) / sum",
    "probabilities": "the router's output probabilities",
    "score_fn": "score_fn(logits) / sum",
}


@dataclass(frozen=True)
class GateAdapter:
    """One router's computation: score per expert, renormalisation and scale of the selected scores."""

    score: str                      # one of SCORES
    normalise: bool                 # the family renormalises the selected scores to sum 1
    scale: float = 1.0              # constant factor on the weights (routed scaling)
    scale_name: str | None = None   # router attribute holding that constant, read live
    expert_scale: str | None = None  # router parameter/buffer [N] multiplying each expert's weight
    layout: str = "triple"          # triple: (logits, weights, index, ...); dense: (scores [T, N], logits)
    num_experts: int = 0
    top_k: int = 0

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

    def weights(self, router: nn.Module, logits: torch.Tensor, index: torch.Tensor, valid=None,
                renormalise: bool = False) -> torch.Tensor:
        """float32 [T, k] weights of the selected experts `index`: native weighting, renormalised if asked."""
        w = self.scores(router, logits).gather(1, index)
        if valid is not None:
            w = w * valid
        if renormalise or self.normalise:
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        w = w * (float(getattr(router, self.scale_name)) if self.scale_name else self.scale)
        if self.expert_scale:
            w = w * _tensor(router, self.expert_scale).float().flatten()[index]
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

    def describe(self) -> dict:
        """What the table says about it: gate distribution g and native weighting."""
        scale = ""
        if self.scale_name or self.scale != 1.0:
            scale = f" × {self.scale_name or ''} {self.scale:g}".replace("  ", " ")
        if self.expert_scale:
            scale += f" × {self.expert_scale}[expert]"
        base = "renormalised" if self.normalise else "not renormalised"
        return {"g": SCORE_TEXT[self.score], "weighting": f"scores of the top-{self.top_k}, {base}{scale}"}


@dataclass
class RouterInfo:
    """One router of a model and what `recognise_routers` found out about it."""

    name: str
    module: nn.Module
    adapter: GateAdapter | None
    reason: str | None = None       # why no adapter fits (adapter is None)
    gate_parameter_names: tuple[str, ...] = ()
    quirks: tuple[str, ...] = field(default_factory=tuple)


_RECOGNISED: "weakref.WeakKeyDictionary[nn.Module, RouterInfo]" = weakref.WeakKeyDictionary()


def router_recorders(model: nn.Module) -> list[tuple[type | None, str | None, int, str | None]]:
    """(class, class-name suffix, output index of the logits, layer name) of every `router_logits` recorder."""
    specs = []
    for module in model.modules():
        entries = (module.__dict__.get("_can_record_outputs") or getattr(type(module), "_can_record_outputs", None) or {})
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
            if (cls is not None and isinstance(module, cls)) or (suffix and name.endswith(suffix)):
                if layer is None or f".{layer.strip('.')}." in f".{name}.":
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
            calls.setdefault(position, (_detach(args), _detach(kwargs), _detach(output)))
        return hook

    handles = [m.register_forward_hook(recorder(i), with_kwargs=True) for i, (_, m, _) in enumerate(routers)]
    embeddings = model.get_input_embeddings()
    ids = torch.randint(0, embeddings.num_embeddings, (1, tokens), generator=torch.Generator().manual_seed(0))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids.to(embeddings.weight.device), attention_mask=torch.ones_like(ids).to(embeddings.weight.device),
                  use_cache=False)
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
            info = RouterInfo(name, module, None, "it did not run in a forward of the model")
        else:
            args, kwargs, output = calls[position]
            adapter = _recognise(module, index, output)
            if isinstance(adapter, str):
                info = RouterInfo(name, module, None, adapter)
            else:
                gate_names = _gate_parameter_names(module, args, kwargs, index)
                block = model.get_submodule(name.rpartition(".")[0]) if "." in name else None
                info = RouterInfo(name, module, adapter, None, gate_names, _quirks(block, module, adapter, gate_names, args, kwargs))
        _RECOGNISED[module] = info
        infos.append(info)
    return infos


def gate_adapter(router: nn.Module) -> GateAdapter:
    """The adapter `recognise_routers` found for `router`; MoekdError if it is unsupported or not recognised yet."""
    info = _RECOGNISED.get(router)
    if info is None:
        raise MoekdError(f"router {type(router).__name__} was not recognised yet: call moekd.routers.recognise_routers(model) first")
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


# ---------------------------------------------------------------- recognition


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _tensor(router: nn.Module, name: str) -> torch.Tensor:
    return router.get_parameter(name) if name in dict(router.named_parameters()) else router.get_buffer(name)


def _layout(output, logits_at: int):
    """('triple' | 'dense', logits, weights, index) of a router output, or a reason string."""
    if isinstance(output, torch.Tensor):
        return "it returns only its logits: the MoE block around it picks and weights the experts"
    if not isinstance(output, (tuple, list)):
        return f"it returns {type(output).__name__}, not tensors"
    shapes = ", ".join(str(tuple(o.shape)) if isinstance(o, torch.Tensor) else type(o).__name__ for o in output)
    if not all(isinstance(o, torch.Tensor) for o in output):
        return f"it returns ({shapes}): expert-grouped dispatch, not a per-token selection"
    if (logits_at == 0 and len(output) >= 3 and output[0].dim() == 2 and output[1].dim() == 2
            and output[1].shape == output[2].shape and not output[2].is_floating_point()
            and output[1].shape[0] == output[0].shape[0]):
        return "triple", output[0], output[1], output[2]
    if logits_at == 1 and len(output) == 2 and output[0].dim() == 2 and output[0].shape == output[1].shape:
        dense = output[0].float()
        k = int((dense != 0).sum(dim=-1).max())
        if k == 0:
            return "its dense scores are all zero"
        index = dense.topk(k, dim=-1).indices
        return "dense", output[1], output[0].gather(1, index), index
    return (f"it returns tensors of shapes {shapes} with the logits at position {logits_at}; moekd reads "
            "(logits [T, N], weights [T, k], index [T, k], ...) or (scores [T, N], logits [T, N])")


def _score_candidates(router: nn.Module, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    x = logits.float()
    scores = {"softmax": torch.softmax(x, -1), "sigmoid": x.sigmoid()}
    if (x >= 0).all() and torch.allclose(x.sum(-1), torch.ones_like(x[:, 0]), atol=1e-3):
        scores["probabilities"] = x
    if isinstance(getattr(router, "score_fn", None), nn.Module) or callable(getattr(router, "score_fn", None)):
        try:
            scores["score_fn"] = router.score_fn(x).float()
        except Exception:  # a score_fn that does not take logits is not one of ours
            pass
    return scores


def _fit(weights: torch.Tensor, base: torch.Tensor, router: nn.Module, index: torch.Tensor, experts: int):
    """Best (error, scale, expert_scale name) explaining weights = base × scale (× per-expert tensor)."""
    w = weights.float()
    denominator = w.abs().max().clamp_min(1e-12)
    fits = []
    ratio = w / base.clamp_min(1e-30)
    c = float(ratio.flatten().median())
    fits.append((float((w - c * base).abs().max() / denominator), c, None))
    for name, t in [*router.named_parameters(), *router.named_buffers()]:
        if t.numel() == experts and t.is_floating_point():
            pred = base * t.detach().float().flatten()[index]
            fits.append((float((w - pred).abs().max() / denominator), 1.0, name))
    return min(fits, key=lambda f: f[0])


def _scale_attribute(router: nn.Module, value: float) -> str | None:
    """The router attribute holding the constant `value` (names with "scal" first), if any."""
    names = [n for n, a in vars(router).items()
             if isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a - value) <= 1e-4 * abs(value)]
    return min(names, key=lambda n: "scal" not in n, default=None)


def _recognise(router, logits_at, output) -> GateAdapter | str:
    """The adapter reproducing this router output from its own logits, or why none does."""
    layout = _layout(output, logits_at)
    if isinstance(layout, str):
        return layout
    layout, logits, weights, index = layout
    experts = logits.shape[1]
    declared = {n: a for n, a in vars(router).items() if "experts" in n and isinstance(a, int) and not isinstance(a, bool)}
    if declared and experts not in declared.values():
        counts = ", ".join(f"{n} = {a}" for n, a in declared.items())
        return f"it scores {experts} classes but declares {counts}: a class that is not an expert"
    tolerance = 1e-4 if weights.dtype == torch.float32 else 2e-2
    best = None
    for score, s in _score_candidates(router, logits).items():
        selected = s.gather(1, index)
        for normalise in (True, False):
            base = selected / selected.sum(-1, keepdim=True).clamp_min(1e-20) if normalise else selected
            error, scale, expert_scale = _fit(weights, base, router, index, experts)
            if best is None or error < best[0]:
                best = (error, score, normalise, scale, expert_scale)
    error, score, normalise, scale, expert_scale = best
    if error > tolerance:
        return ("no known computation reproduces its weights (softmax, sigmoid or score_fn scores of the selected "
                f"experts, renormalised or not, times a constant or per-expert scale; closest off by {error:.2g})")
    scale_name = _scale_attribute(router, scale) if abs(scale - 1.0) > tolerance else None
    scale = float(getattr(router, scale_name)) if scale_name else (1.0 if abs(scale - 1.0) <= tolerance else scale)
    return GateAdapter(score, normalise, scale, scale_name, expert_scale, layout, experts, index.shape[1])


def _gate_parameter_names(router, args, kwargs, logits_at) -> tuple[str, ...]:
    """Router parameters the logits depend on: those autograd reaches from the logits of a replayed call."""
    params = dict(router.named_parameters())
    if not params:
        return ()
    flags = {n: p.requires_grad for n, p in params.items()}
    training = router.training
    try:
        router.eval()
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            output = router(*_detach(args), **_detach(kwargs))
            logits = output if isinstance(output, torch.Tensor) else output[logits_at]
            grads = torch.autograd.grad(logits.float().sum(), list(params.values()), allow_unused=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        router.train(training)
    return tuple(n for n, g in zip(params, grads) if g is not None)


def _quirks(block: nn.Module | None, router, adapter: GateAdapter, gate_names, args, kwargs) -> tuple[str, ...]:
    """Facts about a router beyond its weighting, found from its tensors, its call and its MoE block."""
    quirks = []
    experts = adapter.num_experts
    tensors = [*router.named_parameters(), *router.named_buffers()]
    bias = [n for n, t in tensors if t.numel() == experts and n not in gate_names and n != adapter.expert_scale]
    passed = [a for a in [*args[1:], *kwargs.values()] if isinstance(a, torch.Tensor) and a.numel() == experts]
    if bias:
        quirks.append(f"selection bias {', '.join(bias)} (native top-k only)")
    elif passed:
        quirks.append("selection bias passed in by the MoE block (native top-k only)")
    groups = getattr(router, "num_group", None) or getattr(router, "n_group", None)
    if isinstance(groups, int) and groups > 1:
        quirks.append(f"group-limited native top-k (n_group {groups}, topk_group {getattr(router, 'topk_group', '?')})")
    shared = [n for n, _ in block.named_children() if "shared" in n] if block is not None else []
    if shared:
        quirks.append(f"shared experts ({', '.join(shared)}), always on")
    if _random_in_train_mode(router, args, kwargs):
        quirks.append("random in train mode (jitter or sampling); the teacher runs in eval mode")
    return tuple(quirks)


def _random_in_train_mode(router, args, kwargs) -> bool:
    training = router.training
    try:
        router.train()
        with torch.no_grad():
            first = router(*_detach(args), **_detach(kwargs))
            second = router(*_detach(args), **_detach(kwargs))
    finally:
        router.train(training)
    first = first if isinstance(first, (tuple, list)) else [first]
    second = second if isinstance(second, (tuple, list)) else [second]
    return any(isinstance(a, torch.Tensor) and not torch.equal(a, b) for a, b in zip(first, second))
