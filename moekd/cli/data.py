"""`moekd data synth`: the built-in instruction suite."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moekd.cli.app import data_app


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(
        ..., help="Directory to write train.jsonl, valid.jsonl, test.jsonl and synth_info.json into."
    ),
    seed: int = typer.Option(0, help="Generator seed; the same seed writes byte-identical files."),
    n_train: int = typer.Option(2000, help="Records in train.jsonl (families balanced)."),
    n_valid: int = typer.Option(200, help="Records in valid.jsonl."),
    n_test: int = typer.Option(400, help="Records in test.jsonl."),
) -> None:
    """Write the built-in instruction suite: short Dolly-form tasks from 16 task families, disjoint splits.

    Example: moekd data synth --out data/synth --seed 0 --n-train 2000
    """
    from rich.table import Table

    from moekd.data.synth import write_suite

    info = write_suite(out, seed=seed, n_train=n_train, n_valid=n_valid, n_test=n_test)
    splits = list(info["counts"])
    table = Table(title=f"moekd data synth -> {out} (seed {seed})")
    table.add_column("family")
    for split in splits:
        table.add_column(split, justify="right")
    for family in info["families"]:
        table.add_row(family, *(str(info["counts_per_family"][split].get(family, 0)) for split in splits))
    table.add_row("total", *(str(info["counts"][split]) for split in splits), style="bold")
    Console().print(table)
