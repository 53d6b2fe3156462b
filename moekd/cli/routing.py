"""`moekd routing ...`: inspect a teacher's MoE routing."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moekd.cli.app import routing_app


@routing_app.command("stats")
def routing_stats(
    teacher: str = typer.Option(..., help="Teacher checkpoint directory (Hugging Face MoE causal LM)."),
    data: Path = typer.Option(
        ..., help="Instruction data: .jsonl, .json, .parquet or a datasets save_to_disk directory."
    ),
    policy: str = typer.Option(
        "topk", help="Routing policy to measure: topk, all, ka, topp, mc (with --compare, both runs use it)."
    ),
    ka_lambda: float | None = typer.Option(None, help="ka: probability of sampling the kept experts (default 0.05)."),
    ka_drop: int | None = typer.Option(None, help="ka: experts left out per token and layer (default 1)."),
    top_p: float | None = typer.Option(None, help="topp: gate mass the selected experts must reach (default 0.9)."),
    experts: int | None = typer.Option(
        None, help="topk: activate the K experts with the largest gates (default: the router's own k)."
    ),
    scope: str = typer.Option("response", help="Tokens counted: response (the positions the cache stores) or all."),
    max_examples: int = typer.Option(64, help="Examples read from the start of --data."),
    batch_size: int = typer.Option(8, help="Examples per teacher forward."),
    max_prompt_len: int = typer.Option(256, help="Longest prompt in tokens."),
    max_len: int = typer.Option(512, help="Longest prompt+response in tokens; longer responses are truncated."),
    seed: int = typer.Option(
        0, help="Base seed of the stochastic policies (derived per example like cache build, sample 0)."
    ),
    dtype: str = typer.Option("auto", help="Teacher dtype: auto, float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    compare: Path | None = typer.Option(
        None,
        help="A router file of `moekd sar train` for this teacher: adds each layer's mean KL(original || trained gate distribution).",
    ),
    plot: Path | None = typer.Option(None, help="Also save a per-layer plot (PNG) here."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON on stdout instead of a table."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer directory, when it is not in the teacher's."),
    chat_template: bool = typer.Option(
        False, "--chat-template", help="Build prompts with the tokenizer's chat template, as cache build does."
    ),
    instruction_field: str | None = typer.Option(None, help="Field holding the instruction (default: instruction)."),
    context_field: str | None = typer.Option(
        None, help="Field holding the context (default: context or input; '' for none)."
    ),
    response_field: str | None = typer.Option(None, help="Field holding the response (default: response or output)."),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Leave out bad or over-long rows instead of stopping."
    ),
) -> None:
    """Per MoE layer: gate mass of the activated and non-activated experts, expert load CV, gate entropy.

    Example: moekd routing stats --teacher ./teacher --data train.jsonl --plot routing.png

    How far a SAR router moved: moekd routing stats --teacher ./teacher --data test.jsonl --policy all --compare router.safetensors
    """
    import json

    from moekd.paths import check_output_file
    from moekd.routing.policies import make_policy
    from moekd.routing.stats import (
        plot_stats,
        render_table,
        routing_stats_for_files,
    )

    if plot is not None:
        check_output_file(plot, "--plot")
    chosen = make_policy(policy, ka_lambda=ka_lambda, ka_drop=ka_drop, top_p=top_p, experts=experts)
    stats = routing_stats_for_files(
        teacher,
        data,
        chosen,
        max_examples=max_examples,
        batch_size=batch_size,
        max_prompt_len=max_prompt_len,
        max_len=max_len,
        seed=seed,
        scope=scope,
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        fields={"instruction": instruction_field, "context": context_field, "response": response_field},
        skip_invalid=skip_invalid,
        chat_template=chat_template,
        compare=compare,
    )
    if plot is not None:
        plot_stats(stats, plot)
    if as_json:
        typer.echo(json.dumps(stats.to_dict(), indent=2))
    else:
        Console().print(render_table(stats))


@routing_app.command("families")
def routing_families(
    family: list[str] | None = typer.Option(None, help="Only this model type (repeatable); default: every MoE family."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as Markdown (the README's) instead."),
    as_json: bool = typer.Option(False, "--json", help="Print the reports as JSON on stdout instead of a table."),
) -> None:
    """Every MoE causal-LM family of the installed transformers: router class, kind, policies, tested.

    Each family is built small from its config class and run once under every policy (well under a
    minute for all of them on a CPU). The policy weighting column says whether the policies weight
    the selected experts natively or by the published weighting (softmax over the kept experts'
    logits). Example: moekd routing families --family gpt_oss
    """
    import json

    from rich.table import Table

    from moekd.cli.app import console
    from moekd.families import COLUMNS, family_reports, markdown_table, summary, table_rows

    with console.status("building the families") as status:
        reports = family_reports(family, on_family=lambda f: status.update(f"building {f.model_type}"))
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in reports], indent=2))
        return
    if markdown:
        typer.echo(markdown_table(reports))
        typer.echo(f"\n{summary(reports)}")
        return
    table = Table(title="MoE causal-LM families of the installed transformers")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in table_rows(reports):
        table.add_row(*row)
    out = Console(width=max(Console().width, 200))
    out.print(table)
    out.print(summary(reports))
