"""Per-layer routing statistics of a teacher over a set of examples (`moekd routing stats`).

For every MoE layer, over the counted tokens (`scope="response"`: the positions whose
next-token distribution the cache stores, i.e. `TokenizedExample.target_positions`;
`scope="all"`: every non-padding token):
- activated / dormant mass: mean over tokens of the gate mass of the experts the policy
  activated / did not activate (they sum to 1; docs/methods.md §1);
- mean number of activated experts per token;
- load: share of all token-to-expert assignments that went to each expert (sums to 1), and
  its coefficient of variation std/mean (population std; 0 = perfectly balanced);
- gate entropy: mean over tokens of -sum g log g, in nats (log N = uniform gates);
- with trained routers to compare (`moekd routing stats --compare router.safetensors`): the mean
  over tokens of KL(g || g') = sum g log(g / g'), in nats, where g' is the gate distribution of
  the same layer when the teacher runs with the trained router weights loaded (same policy, same
  tokens, each model its own forward: a deeper layer's g' also reflects the changed routing of
  the layers before it).
Gate distributions g are the ones `RouterController.gate_probs` defines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moekd.data.batches import right_pad
from moekd.data.prompts import TokenizedExample
from moekd.errors import MoekdError
from moekd.options import data_field_parts, option
from moekd.routing.controller import RouterController
from moekd.routing.policies import POLICY_PARAM_PARTS, RoutingPolicy, make_policy
from moekd.routing.router_file import (
    check_router_file,
    read_router_file,
    recognised_routers,
    router_gate_parameters,
    swapped_routers,
)
from moekd.seeds import derive_seed


@dataclass
class LayerRoutingStats:
    layer: str
    activated_mass: float
    dormant_mass: float
    mean_activated: float
    load: list[float]
    load_cv: float
    gate_entropy: float
    kl_to_trained: float | None = None


@dataclass
class RoutingStats:
    policy: str
    scope: str
    tokens: int
    router_class: str
    num_experts: int
    top_k: int
    layers: list[LayerRoutingStats]
    trained_routers: str | None = None  # the router file compared with, if any

    def to_dict(self) -> dict:
        return asdict(self)


def compute_routing_stats(
    model,
    examples: list[TokenizedExample],
    policy: RoutingPolicy | None = None,
    pad_token_id: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    scope: str = "response",
    compare: dict[str, torch.Tensor] | None = None,
    compare_name: str | None = None,
) -> RoutingStats:
    """Routing statistics of `model` under `policy` (native top-k by default) over `examples`;
    `compare` (router parameter name -> trained weights) adds each layer's KL(original || trained)."""
    _check_scope(scope)
    _check_policy(policy)
    ctrl = RouterController(model, policy, capture_gates=True)
    if not ctrl.moe_layers:
        raise MoekdError(f"--teacher: {type(model).__name__} has no MoE routers, so there is no routing to report")
    layers = len(ctrl.moe_layers)
    mass = np.zeros(layers)
    entropy = np.zeros(layers)
    active = np.zeros(layers)
    counts = np.zeros((layers, ctrl.num_experts))
    kl = np.zeros(layers)
    routers = router_gate_parameters(recognised_routers(model)) if compare is not None else None
    tokens = 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        ids, mask, counted = _pad_batch(batch, pad_token_id, scope)
        seeds = [derive_seed(seed, ex.source_index, 0) for ex in batch]
        with torch.no_grad(), ctrl.active(row_seeds=seeds):
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
        rows = counted.flatten()
        tokens += int(rows.sum())
        originals = [g[rows.to(g.device)].double().cpu() for g in ctrl.gate_probs()]
        for layer, (g, activated) in enumerate(zip(originals, ctrl.activated_experts())):
            a = activated[rows.to(activated.device)].cpu()
            mass[layer] += float((g * a).sum())
            entropy[layer] += float(-torch.special.xlogy(g, g).sum())
            active[layer] += float(a.sum())
            counts[layer] += a.sum(dim=0).double().numpy()
        if compare is not None:
            with torch.no_grad(), swapped_routers(routers, compare), ctrl.active(row_seeds=seeds):
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
            for layer, (g, trained) in enumerate(zip(originals, ctrl.gate_probs())):
                t = trained[rows.to(trained.device)].double().cpu()
                kl[layer] += float((torch.special.xlogy(g, g) - torch.special.xlogy(g, t)).sum())
    if tokens == 0:
        raise MoekdError(f"no {scope} tokens in the examples to compute routing statistics on")
    stats = []
    for layer, name in enumerate(ctrl.moe_layers):
        load = counts[layer] / counts[layer].sum()
        stats.append(
            LayerRoutingStats(
                layer=name,
                activated_mass=mass[layer] / tokens,
                dormant_mass=1.0 - mass[layer] / tokens,
                mean_activated=active[layer] / tokens,
                load=load.tolist(),
                load_cv=float(load.std() / load.mean()),
                gate_entropy=entropy[layer] / tokens,
                kl_to_trained=kl[layer] / tokens if compare is not None else None,
            )
        )
    return RoutingStats(
        ctrl.policy.name,
        scope,
        tokens,
        ctrl.router_class,
        ctrl.num_experts,
        ctrl.top_k,
        stats,
        compare_name if compare is not None else None,
    )


def _check_policy(policy: RoutingPolicy | None) -> None:
    if policy is not None and policy.name == "sar":
        raise MoekdError(
            "--policy sar: routing stats measures the teacher's own routers; to measure a SAR router "
            "against them use --policy all --compare router.safetensors"
        )


def _check_scope(scope: str) -> None:
    if scope not in ("response", "all"):
        raise MoekdError(f"--scope must be 'response' or 'all', got {scope!r}")


def _pad_batch(batch: list[TokenizedExample], pad_token_id: int, scope: str):
    """Right-padded input ids, attention mask and the bool [B, L] mask of counted tokens."""
    positions = [ex.target_positions if scope == "response" else np.arange(len(ex.input_ids)) for ex in batch]
    return right_pad([ex.input_ids for ex in batch], pad_token_id, positions)


@dataclass
class StatsOptions:
    """The settings of `moekd routing stats`: each flag's default and help, written once."""

    teacher: str = option(help="Teacher checkpoint directory (Hugging Face MoE causal LM).")
    data: str = option(help="Instruction data: .jsonl, .json, .parquet or a datasets save_to_disk directory.")
    policy: str = option(
        "topk", "Routing policy to measure: topk, all, ka, topp, mc (with --compare, both runs use it)."
    )
    policy_params: dict = option(default_factory=dict, help="--policy's parameters", parts=POLICY_PARAM_PARTS)
    scope: str = option("response", "Tokens counted: response (the positions the cache stores) or all.")
    max_examples: int = option(64, "Examples read from the start of --data.")
    batch_size: int = option(8, "Examples per teacher forward.")
    max_prompt_len: int = option(256, "Longest prompt in tokens.")
    max_len: int = option(512, "Longest prompt+response in tokens; longer responses are truncated.")
    seed: int = option(0, "Base seed of the stochastic policies (derived per example like cache build, sample 0).")
    dtype: str = option("auto", "Teacher dtype: auto, float32, bfloat16, float16.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    compare: str | None = option(
        None,
        "A router file of `moekd sar train` for this teacher: adds each layer's mean KL(original || trained gate distribution).",
    )
    plot: str | None = option(None, "Also save a per-layer plot (PNG) here.")
    as_json: bool = option(False, "Print the statistics as JSON on stdout instead of a table.", flag="--json")
    tokenizer: str | None = option(None, "Tokenizer directory, when it is not in the teacher's.")
    chat_template: bool = option(False, "Build prompts with the tokenizer's chat template, as cache build does.")
    fields: dict = option(default_factory=dict, help="the fields of a row", parts=data_field_parts())
    skip_invalid: bool = option(False, "Leave out bad or over-long rows instead of stopping.")


def routing_stats_for_files(o: StatsOptions) -> RoutingStats:
    """Load the teacher checkpoint (and --tokenizer, when it is not in the teacher's directory) and the data,
    and compute routing statistics on the first examples under the policy, prompted as `cache build`
    prompts them; --compare: a router file of `moekd sar train` for this teacher, compared layer by layer."""
    teacher, data, max_examples, batch_size, seed, scope = (
        o.teacher,
        o.data,
        o.max_examples,
        o.batch_size,
        o.seed,
        o.scope,
    )
    compare, tokenizer, device = o.compare, o.tokenizer, o.device
    policy = make_policy(o.policy, **{k: v for k, v in o.policy_params.items() if v is not None})
    from moekd.data.prompts import tokenize_records
    from moekd.data.records import load_records
    from moekd.models import (
        check_tokenizer_fits,
        checkpoint_sha256,
        load_causal_lm,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )

    _check_scope(scope)
    if max_examples < 1:
        raise MoekdError(f"--max-examples must be at least 1, got {max_examples}")
    if batch_size < 1:
        raise MoekdError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0 <= seed < 2**63:
        raise MoekdError(f"--seed must be in [0, 2**63), got {seed}")
    _check_policy(policy)
    trained = read_router_file(compare, "--compare") if compare is not None else None
    resolved = resolve_device(device)
    tokenizer_flag = "--tokenizer" if tokenizer else "--teacher"
    loaded_tokenizer = load_tokenizer(tokenizer or teacher, tokenizer_flag)
    loaded = load_records(data, o.fields, o.skip_invalid)
    report = tokenize_records(
        loaded.records[:max_examples],
        loaded.source_index[:max_examples],
        loaded_tokenizer,
        o.max_prompt_len,
        o.max_len,
        o.chat_template,
        o.skip_invalid,
    )
    model = load_causal_lm(teacher, resolve_dtype(o.dtype, resolved), resolved)
    check_tokenizer_fits(loaded_tokenizer, model, tokenizer_flag)
    if trained is not None:
        check_router_file(trained[1], model, str(teacher), checkpoint_sha256(teacher), compare, "--compare")
    return compute_routing_stats(
        model,
        report.examples,
        policy,
        loaded_tokenizer.pad_token_id,
        batch_size,
        seed,
        scope,
        trained[0] if trained else None,
        str(compare) if compare else None,
    )


def render_table(stats: RoutingStats):
    """A rich Table with one row per MoE layer."""
    from rich.table import Table

    table = Table(
        title=f"Routing of {stats.router_class} (N={stats.num_experts}, k={stats.top_k}), --policy {stats.policy}, "
        f"{stats.tokens} {stats.scope} tokens",
        caption="activated/other: mean gate mass of the activated/other experts; experts: activated per token; "
        "load CV: coefficient of variation of the expert load; entropy: gate entropy in nats"
        + (
            f"; KL: mean KL(original || trained gates) in nats, trained = {stats.trained_routers}"
            if stats.trained_routers
            else ""
        ),
    )
    table.add_column("layer", no_wrap=True)
    columns = ("activated", "other", "experts", "load CV", "entropy") + (("KL",) if stats.trained_routers else ())
    for column in columns:
        table.add_column(column, justify="right")
    for s in stats.layers:
        kl = (f"{s.kl_to_trained:.3g}",) if stats.trained_routers else ()
        table.add_row(
            s.layer,
            f"{s.activated_mass:.3f}",
            f"{s.dormant_mass:.3f}",
            f"{s.mean_activated:.2f}",
            f"{s.load_cv:.3f}",
            f"{s.gate_entropy:.3f}",
            *kl,
        )
    return table


def plot_stats(stats: RoutingStats, path: str | Path) -> None:
    """Per-layer activated vs non-activated gate mass (stacked bars) and load CV, saved as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(stats.layers))
    activated = [s.activated_mass for s in stats.layers]
    fig, (mass_ax, cv_ax) = plt.subplots(1, 2, figsize=(10, 4))
    mass_ax.bar(x, activated, label="activated")
    mass_ax.bar(x, [s.dormant_mass for s in stats.layers], bottom=activated, label="non-activated")
    mass_ax.set(xlabel="MoE layer", ylabel="mean gate mass", ylim=(0, 1), title=f"Gate mass (--policy {stats.policy})")
    mass_ax.legend(loc="lower right")
    cv_ax.plot(x, [s.load_cv for s in stats.layers], marker="o")
    cv_ax.set(xlabel="MoE layer", ylabel="CV of expert load", title="Load imbalance")
    cv_ax.set_ylim(bottom=0)
    for ax in (mass_ax, cv_ax):
        ax.set_xticks(x)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    plt.close(fig)
