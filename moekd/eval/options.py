"""The settings of `moekd eval`: each flag's default and help, written once."""

from __future__ import annotations

from dataclasses import dataclass

from moekd.errors import MoekdError
from moekd.options import option
from moekd.routing.policies import POLICY_PARAM_PARTS

DEFAULT_SEEDS = (10, 20, 30, 40, 50)


def parse_seeds(text: str) -> tuple[int, ...]:
    """'10,20,30' -> (10, 20, 30)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        seeds = tuple(int(p) for p in parts)
    except ValueError:
        raise MoekdError(f"--seeds: expected comma-separated integers such as 10,20,30,40,50, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise MoekdError(f"--seeds: {text!r} repeats a seed")
    if any(s < 0 for s in seeds):
        raise MoekdError(f"--seeds: seeds must be non-negative, got {text!r}")
    return seeds


@dataclass
class EvalOptions:
    model: str = option(help="Model checkpoint directory (saved with save_pretrained, tokenizer included).")
    data: list[str] = option(help="Test data in Dolly or Alpaca form; repeat --data for several datasets.")
    seeds: tuple[int, ...] = option(
        DEFAULT_SEEDS, "Comma-separated sampling seeds; one generation per prompt per seed.", parse=parse_seeds
    )
    max_new_tokens: int = option(256, "Longest response in tokens.")
    max_prompt_len: int = option(256, "Longest prompt in tokens; a longer prompt is an error.")
    max_len: int = option(
        512, "--nll/--teacher: longest prompt+reference in tokens (longer references are truncated, as in training)."
    )
    batch_size: int = option(16, "Prompts per generate() call (left padded); part of what makes a run reproducible.")
    json_out: str | None = option(
        None, "Write scores here and generations to <stem>.generations.jsonl beside it.", flag="--json"
    )
    limit: int | None = option(None, "Use only the first N rows of each dataset.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    chat_template: bool = option(
        False, "Build prompts with the tokenizer's chat template (as a cache built with --chat-template)."
    )
    greedy: bool = option(
        False,
        "Greedy decoding (argmax) instead of sampling: one generation per prompt (--seeds unused), scored by ROUGE-L and exact match.",
    )
    rouge: bool = option(
        True, "Sample and score ROUGE-L (--no-rouge: only the teacher-forced scores).", flag="--rouge/--no-rouge"
    )
    nll: bool = option(
        False, "Also the teacher-forced NLL of the reference responses (nats per response token, deterministic)."
    )
    teacher: str | None = option(
        None,
        "Also the exact KL(teacher || model) on the reference responses, the teacher routed natively (implies --nll).",
    )
    policy: str | None = option(
        None,
        "Route the evaluated MoE model by a policy (topk, all, ka, topp, mc, sar) for generation and scoring; sar: all experts under the routers of --router.",
    )
    router: str | None = option(
        None,
        "--policy sar: the router file of `moekd sar train --out` for this --model (checked against it), loaded into its routers.",
    )
    policy_params: dict = option(default_factory=dict, help="--policy's parameters", parts=POLICY_PARAM_PARTS)
    routing_seed: int = option(
        0, "Base seed of a stochastic --policy (one draw per data row, derived as in cache build)."
    )
