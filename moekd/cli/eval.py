"""`moekd eval`: sample responses and score ROUGE-L."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from moekd.cli.app import app, console


@app.command("eval")
def eval_command(
    model: Path = typer.Option(..., help="Model checkpoint directory (saved with save_pretrained, tokenizer included)."),
    data: list[Path] = typer.Option(..., help="Test data in Dolly or Alpaca form; repeat --data for several datasets."),
    seeds: str = typer.Option("10,20,30,40,50", help="Comma-separated sampling seeds; one generation per prompt per seed."),
    max_new_tokens: int = typer.Option(256, help="Longest response in tokens."),
    max_prompt_len: int = typer.Option(256, help="Longest prompt in tokens; a longer prompt is an error."),
    batch_size: int = typer.Option(16, help="Prompts per generate() call (left padded); part of what makes a run reproducible."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write scores here and generations to <stem>.generations.jsonl beside it."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N rows of each dataset."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Build prompts with the tokenizer's chat template (as a cache built with --chat-template)."),
) -> None:
    """Sample responses (temperature 1, top_k 0, top_p 1) and score ROUGE-L: mean and std over seeds.

    Example: moekd eval --model runs/student --data data/synth/test.jsonl --seeds 10,20 --max-new-tokens 64 --json eval.json
    """
    from rich.table import Table

    from moekd.eval.evaluate import evaluate, parse_seeds, write_report
    from moekd.paths import check_output_file

    if json_out is not None:
        check_output_file(json_out, "--json")
    seed_list = parse_seeds(seeds)
    report = evaluate(
        model, data, seed_list, max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len, batch_size=batch_size,
        limit=limit, device=device, chat_template=chat_template, log=lambda line: console.print(line, highlight=False),
    )
    table = Table(title=f"ROUGE-L of {model} (x100, mean ± std over {len(seed_list)} seeds)")
    for column in ("dataset", "n", "mean", "std", *(f"seed {s}" for s in seed_list)):
        table.add_column(column, justify="left" if column == "dataset" else "right", overflow="fold")
    for scores in report.datasets:
        per_seed = (f"{scores.per_seed[s]:.2f}" for s in seed_list)
        table.add_row(scores.data, str(scores.n), f"{scores.mean:.2f}", f"{scores.std:.2f}", *per_seed)
    Console().print(table)
    if json_out is not None:
        json_path, gen_path = write_report(report, json_out)
        console.print(f"[green]wrote[/] {json_path} and {gen_path}", highlight=False)
