"""`moekd routing ...`: inspect a teacher's MoE routing."""

from __future__ import annotations

import typer
from rich.console import Console

from moekd.cli.app import routing_app
from moekd.families import FamiliesOptions
from moekd.options import command
from moekd.routing.stats import StatsOptions


@command(routing_app, "stats", StatsOptions)
def routing_stats(options: StatsOptions) -> None:
    """Per MoE layer: gate mass of the activated and non-activated experts, expert load CV, gate entropy.

    Example: moekd routing stats --teacher ./teacher --data train.jsonl --plot routing.png

    How far a SAR router moved: moekd routing stats --teacher ./teacher --data test.jsonl --policy all --compare router.safetensors
    """
    import json

    from moekd.paths import check_output_file
    from moekd.routing.stats import plot_stats, render_table, routing_stats_for_files

    if options.plot is not None:
        check_output_file(options.plot, "--plot")
    stats = routing_stats_for_files(options)
    if options.plot is not None:
        plot_stats(stats, options.plot)
    if options.as_json:
        typer.echo(json.dumps(stats.to_dict(), indent=2))
    else:
        Console().print(render_table(stats))


@command(routing_app, "families", FamiliesOptions)
def routing_families(options: FamiliesOptions) -> None:
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

    family, markdown, as_json = options.family, options.markdown, options.as_json

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
