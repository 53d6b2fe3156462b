"""`moekd data synth`: the built-in instruction suite."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from moekd.cli.app import data_app
from moekd.data.options import SynthOptions
from moekd.options import command


@command(data_app, "synth", SynthOptions)
def data_synth(options: SynthOptions) -> None:
    """Write the built-in instruction suite: short Dolly-form tasks from 16 task families, disjoint splits.

    Example: moekd data synth --out data/synth --seed 0 --n-train 2000
    """
    from rich.table import Table

    from moekd.data.synth import write_suite

    out, seed = Path(options.out), options.seed
    info = write_suite(out, seed=seed, n_train=options.n_train, n_valid=options.n_valid, n_test=options.n_test)
    splits = list(info["counts"])
    table = Table(title=f"moekd data synth -> {out} (seed {seed})")
    table.add_column("family")
    for split in splits:
        table.add_column(split, justify="right")
    for family in info["families"]:
        table.add_row(family, *(str(info["counts_per_family"][split].get(family, 0)) for split in splits))
    table.add_row("total", *(str(info["counts"][split]) for split in splits), style="bold")
    Console().print(table)
