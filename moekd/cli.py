"""The `moekd` command line: thin typed commands; the work happens in the modules they call.

Each command group lives in its own block below. Errors a user can fix raise `MoekdError`,
which `main` prints as one red line (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from moekd.errors import MoekdError

app = typer.Typer(
    help="Distil Mixture-of-Experts teachers into students from an offline, shareable teacher cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Build, inspect and verify teacher caches.", no_args_is_help=True)
routing_app = typer.Typer(help="Inspect a teacher's MoE routing.", no_args_is_help=True)
data_app = typer.Typer(help="Built-in instruction data.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(routing_app, name="routing")
app.add_typer(data_app, name="data")

console = Console(stderr=True)


def main() -> None:
    try:
        app()
    except MoekdError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)


# ---------------------------------------------------------------- cache
