"""The Typer app and its command groups; the commands themselves live in the sibling modules."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    help="Distil Mixture-of-Experts teachers into students from an offline, shareable teacher cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Build, inspect and verify teacher caches.", no_args_is_help=True)
routing_app = typer.Typer(help="Inspect a teacher's MoE routing.", no_args_is_help=True)
data_app = typer.Typer(help="Built-in instruction data.", no_args_is_help=True)
sar_app = typer.Typer(
    help="Student-Aware Router: train the teacher's routers with the student's feedback.", no_args_is_help=True
)
app.add_typer(cache_app, name="cache")
app.add_typer(routing_app, name="routing")
app.add_typer(data_app, name="data")
app.add_typer(sar_app, name="sar")

console = Console(stderr=True)  # messages and errors; tables and JSON go to stdout
