"""Recognising an MoE router by what it computes: fit one recorded call to a `GateAdapter`.

`fit_router` reads the router's output layout, then tries every known computation (score
function x renormalised or not x constant or per-expert scale) on the router's own logits and
chosen experts, and keeps the one that reproduces its weights; where none does, the router
still has one logit per expert per token and takes the published weighting. `gate_parameter_names` and
`router_quirks` find, from the same call, the parameters g depends on and the family's quirks.
Used by `moekd.routing.routers.recognise_routers`.
"""

from __future__ import annotations

import torch
from torch import nn

from moekd.routing.adapter import GateAdapter


def detach(x):
    """A copy of a call's tensors (nested in tuples, lists, dicts) cut from autograd."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(detach(v) for v in x)
    if isinstance(x, dict):
        return {k: detach(v) for k, v in x.items()}
    return x


def _selection_in_call(args: tuple, kwargs: dict, tokens: int):
    """(index location, weights location, index, weights) of a call carrying a [T, k] selection, or None."""
    located = [*enumerate(args), *kwargs.items()]
    ints = [
        (w, t)
        for w, t in located
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == tokens and not t.is_floating_point()
    ]
    floats = [
        (w, t)
        for w, t in located
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == tokens and t.is_floating_point()
    ]
    for index_at, index in ints:
        for weights_at, weights in floats:
            if weights.shape == index.shape:
                return index_at, weights_at, index, weights
    return None


def _layout(output, logits_at: int):
    """('triple' | 'dense', logits, weights, index) of a router output, or a reason string."""
    if isinstance(output, torch.Tensor):
        return f"it returns one tensor of shape {tuple(output.shape)}, not [tokens, experts] logits"
    if not isinstance(output, (tuple, list)):
        return f"it returns {type(output).__name__}, not tensors"
    shapes = ", ".join(str(tuple(o.shape)) if isinstance(o, torch.Tensor) else type(o).__name__ for o in output)
    if not all(isinstance(o, torch.Tensor) for o in output):
        return f"it returns ({shapes}): expert-grouped dispatch, not a per-token selection that a policy could replace"
    if (
        logits_at == 0
        and len(output) >= 3
        and output[0].dim() == 2
        and output[1].dim() == 2
        and output[1].shape == output[2].shape
        and not output[2].is_floating_point()
        and output[1].shape[0] == output[0].shape[0]
    ):
        return "triple", output[0], output[1], output[2]
    if logits_at == 1 and len(output) == 2 and output[0].dim() == 2 and output[0].shape == output[1].shape:
        dense = output[0].float()
        k = int((dense != 0).sum(dim=-1).max())
        if k == 0:
            return "its dense scores are all zero"
        index = dense.topk(k, dim=-1).indices
        return "dense", output[1], output[0].gather(1, index), index
    return (
        f"it returns tensors of shapes {shapes} with the logits at position {logits_at}; moekd reads "
        "(logits [T, N], weights [T, k], index [T, k], ...) or (scores [T, N], logits [T, N]): no per-token "
        "selection to replace and no [T, N] logits, one per expert, to weight it by"
    )


def _score_candidates(router: nn.Module, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-expert scores each known score function gives these logits."""
    x = logits.float()
    scores = {"softmax": torch.softmax(x, -1), "sigmoid": x.sigmoid()}
    if (x >= 0).all() and torch.allclose(x.sum(-1), torch.ones_like(x[:, 0]), atol=1e-3):
        scores["probabilities"] = x  # the router returns probabilities in place of logits (Gemma 4)
    if isinstance(getattr(router, "score_fn", None), nn.Module):  # an activation module (ACT2FN[scoring_func])
        scores["score_fn"] = router.score_fn(x).float()
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
    names = [
        n
        for n, a in vars(router).items()
        if isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a - value) <= 1e-4 * abs(value)
    ]
    return min(names, key=lambda n: "scal" not in n, default=None)


def fit_router(router, logits_at, output, siblings: dict) -> GateAdapter | str:
    """The adapter reproducing this router's weights from its own logits, else the published weighting
    (its logits are one per expert per token), or why neither applies.

    `siblings` holds the first call of each module beside the router: where a router returns
    only logits, the selection is looked for in the call of the module its block hands it to.
    """
    target = {}
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        for child, (args, kwargs) in siblings.items():
            found = _selection_in_call(args, kwargs, output.shape[0])
            if found:
                index_at, weights_at, index, weights = found
                layout = ("experts", output, weights, index)
                target = dict(target=child, index_arg=index_at, weights_arg=weights_at)
                break
        else:
            return "it returns only its logits, and no module beside it receives a per-token selection"
    else:
        layout = _layout(output, logits_at)
    if isinstance(layout, str):
        return layout
    layout, logits, weights, index = layout
    experts = logits.shape[1]
    declared = {
        n: a for n, a in vars(router).items() if "experts" in n and isinstance(a, int) and not isinstance(a, bool)
    }
    if declared and experts not in declared.values():
        counts = ", ".join(f"{n} = {a}" for n, a in declared.items())
        return (
            f"it scores {experts} classes but declares {counts}: a class that is not an expert, so there is no "
            "logit per expert alone for a gate distribution or the published weighting"
        )
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
    if error > tolerance:  # one logit per expert per token: the published weighting applies
        misfit = f"its weights are no known function of the selected experts' scores (closest fit off by {error:.2g})"
        return GateAdapter.published(layout, experts, index.shape[1], misfit, **target)
    scale_name = _scale_attribute(router, scale) if abs(scale - 1.0) > tolerance else None
    scale = float(getattr(router, scale_name)) if scale_name else (1.0 if abs(scale - 1.0) <= tolerance else scale)
    return GateAdapter(score, normalise, scale, scale_name, expert_scale, layout, experts, index.shape[1], **target)


def gate_parameter_names(router, args, kwargs, logits_at) -> tuple[str, ...]:
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
            output = router(*detach(args), **detach(kwargs))
            logits = output if isinstance(output, torch.Tensor) else output[logits_at]
            grads = torch.autograd.grad(logits.float().sum(), list(params.values()), allow_unused=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        router.train(training)
    return tuple(n for n, g in zip(params, grads) if g is not None)


def router_quirks(block: nn.Module | None, router, adapter: GateAdapter, gate_names, args, kwargs) -> tuple[str, ...]:
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
            first = router(*detach(args), **detach(kwargs))
            second = router(*detach(args), **detach(kwargs))
    finally:
        router.train(training)
    first = first if isinstance(first, (tuple, list)) else [first]
    second = second if isinstance(second, (tuple, list)) else [second]
    return any(isinstance(a, torch.Tensor) and not torch.equal(a, b) for a, b in zip(first, second))
