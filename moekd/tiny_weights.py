"""The weights of the tiny models, drawn from their own seeded generator, never from the library's init.

`build_tiny` builds a model from its config twice under two torch seeds: what the library sets the
same both times (norm weights, zero biases, a padding row, A_log = log 1..n) is kept; every other
value is drawn from a `torch.Generator` seeded by (seed, parameter name), so a tiny model is the
same whatever the library's random initialisation or the global torch seed. Two recipes:

- "training": every drawn value ~ N(0, initializer_range²) (0.02 when the config has none), the
  usual pre-training init: near-uniform gates, near-uniform outputs. For students and for the
  teachers the demo trains.
- "routing": a tiny teacher on which routing policies really differ. Drawn matrices keep the
  scale of their input (N(0, 1/fan_in); embeddings N(0, 1)), so experts change the output as much
  as attention does; drawn vectors (sinks, A_log, dt_bias) ~ N(0, 0.02²), trainable router
  vectors (norm weights, biases, per-expert scales) ~ U(0.5, 1.5). On a seeded batch, the output
  layer is then scaled so the logits spread `OUTPUT_STD` over the vocabulary (peaked next-token
  distributions), and each router, in forward order, has its matrices scaled so that its top-k
  experts carry `gate_mass` of the gate distribution g on average (trained MoEs: about 0.5-0.7),
  without letting its logits' spread pass `MAX_LOGIT_STD` (sigmoid routers saturate before, so
  they reach less).

docs/tiny_models.md gives the measured gate mass and KL(topk || all) per family.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

RECIPES = ("training", "routing")
OUTPUT_STD = 3.0  # spread of the output logits over the vocabulary: peaked next-token distributions
VECTOR_STD = 0.02
MAX_LOGIT_STD = 4.0
SCALES = [2 ** (i / 4) for i in range(-16, 17)]  # router scales tried: 1/16 .. 16, four per octave


# The config fields by which MoE families give their native top-k.
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "top_k_experts", "moe_top_k", "moe_k")


def build_tiny(make, seed: int, init: str = "routing", gate_mass: float = 0.6) -> nn.Module:
    """`make()` (a model built from its config) with its weights set by `init` from `seed`, in eval mode."""
    if init not in RECIPES:
        raise ValueError(f"init: {init!r} is not one of {RECIPES}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make()
        torch.manual_seed(1)
        other = dict(make().named_parameters())
    model.eval()
    std = getattr(model.config, "initializer_range", None) or 0.02
    scales = _routing_scales(model) if init == "routing" else {}
    # trainable router matrices are drawn whatever the library sets (some families set zeros); under
    # "routing" router vectors too (norm weights, per-expert scales ~ U(0.5, 1.5)): all ones, a
    # per-expert scale could not be told from none. Frozen ones (selection biases) stay as set.
    routers = {n for n, p in _router_parameters(model) if p.requires_grad and (p.dim() >= 2 or init == "routing")}
    with torch.no_grad():
        for name, param in model.named_parameters():
            kept = param == other[name] if name not in routers else torch.zeros_like(param, dtype=torch.bool)
            if kept.all():
                continue
            generator = _generator(seed, name)
            if init == "routing" and name in routers and param.dim() < 2:
                noise = torch.rand(param.shape, generator=generator) + 0.5
            else:
                noise = torch.randn(param.shape, generator=generator)
                noise = noise * (scales.get(name, VECTOR_STD) if init == "routing" else std)
            param.copy_(torch.where(kept, param, noise.to(param.dtype)))
    if init == "routing":
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))
        _calibrate_output(model, ids)
        _calibrate_routers(model, ids, gate_mass)
    return model


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))  # CPU generators keep 32 bits


def _routing_scales(model: nn.Module) -> dict[str, float]:
    """Std of each matrix under the routing recipe: 1/sqrt(fan_in), embeddings 1."""
    scales = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dim() < 2:
                continue
            if isinstance(module, nn.Embedding):
                fan_in = 1
            elif isinstance(module, nn.Linear):
                fan_in = param.shape[1]
            elif isinstance(module, nn.modules.conv._ConvNd):
                fan_in = param[0].numel()
            else:  # a raw matrix (stacked experts, a router): its orientation is the family's
                fan_in = (param.shape[-1] * param.shape[-2]) ** 0.5
            scales.setdefault(f"{module_name}.{name}".lstrip("."), fan_in**-0.5)
    return scales


def _router_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    from moekd.routing.routers import find_routers

    return [(f"{n}.{p}", t) for n, router in find_routers(model) for p, t in router.named_parameters()]


def _forward(model: nn.Module, ids: torch.Tensor):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def _calibrate_output(model: nn.Module, ids: torch.Tensor) -> None:
    """Scale the output layer so the logits' spread over the vocabulary is `OUTPUT_STD` (whatever the
    family multiplies them by: Cohere's logit_scale, Gemma's embedding scale when tied)."""
    spread = _forward(model, ids).logits.float().std(dim=-1).mean()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(OUTPUT_STD / spread)


def _calibrate_routers(model: nn.Module, ids: torch.Tensor, gate_mass: float) -> None:
    """Scale each router's matrices, in forward order, so its top-k carry `gate_mass` of g on the batch `ids`."""
    from moekd.routing.routers import recognise_routers

    for info in recognise_routers(model):
        call = _first_call(model, info.module, ids)
        if call is None:
            continue
        matrices = [p for p in info.module.parameters() if p.dim() >= 2 and p.requires_grad]
        drawn = [p.detach().clone() for p in matrices]
        best = None
        with torch.no_grad():
            for scale in SCALES:
                for p, d in zip(matrices, drawn):
                    p.copy_(d * scale)
                found = _gate_mass(info, info.module(*call[0], **call[1]), top_k_of(model, info))
                if found is None:
                    break
                mass, spread = found
                miss = abs(mass - gate_mass) + (spread > MAX_LOGIT_STD)
                if best is None or miss < best[0]:
                    best = (miss, scale)
            for p, d in zip(matrices, drawn):
                p.copy_(d * (best[1] if best else 1.0))


def _first_call(model: nn.Module, router: nn.Module, ids: torch.Tensor):
    calls = []
    handle = router.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs)), with_kwargs=True)
    try:
        _forward(model, ids)
    finally:
        handle.remove()
    return calls[0] if calls else None


def router_logits(info, output) -> torch.Tensor | None:
    """A router's [T, N] logits from its output, or None when it has no per-token logits (product keys)."""
    if info.adapter is not None:
        return output if info.adapter.layout == "experts" else info.adapter.read(output)[0]
    logits = output if isinstance(output, torch.Tensor) else output[info.logits_at]
    return logits if logits.dim() == 2 else None


def gate_distribution(info, logits: torch.Tensor) -> torch.Tensor:
    """float32 [T, N] g of a router: its adapter's, else softmax of its logits (routers moekd does not support)."""
    if info.adapter is not None:
        return info.adapter.gate_probs(info.module, logits)
    return torch.softmax(logits.float(), dim=-1)


def top_k_of(model: nn.Module, info) -> int:
    """A router's native k: its adapter's, else the config's top-k field (1 if it has none)."""
    if info.adapter is not None:
        return info.adapter.top_k
    text = model.config.get_text_config()
    return next((getattr(text, f) for f in TOP_K_FIELDS if isinstance(getattr(text, f, None), int)), 1)


def _gate_mass(info, output, k: int) -> tuple[float, float] | None:
    """(mean top-k share of g, mean spread of the logits) of one router call, or None without logits."""
    logits = router_logits(info, output)
    if logits is None:
        return None
    g = gate_distribution(info, logits)
    return float(g.topk(k, dim=-1).values.sum(-1).mean()), float(logits.float().std(dim=-1).mean())
