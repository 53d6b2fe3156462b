"""`moekd demo`: the whole pipeline on the built-in suite."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moekd.cli.app import app, console


@app.command("demo")
def demo(
    workdir: Path | None = typer.Option(
        None, help="Where the stages write (default: moekd-demo, or moekd-demo-quick with --quick)."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="A few-minute miniature of the pipeline (a smoke test; its numbers mean little)."
    ),
    jobs: int = typer.Option(
        2, help="Processes that build caches, train and evaluate side by side (the numbers do not depend on it)."
    ),
) -> None:
    """Run the whole pipeline on the built-in suite: teacher, SAR routers, caches (topk, all, ka, sar), SFT and KD students per training seed, MoE students (logit KD, Balanced Distillation), eval.

    Finished stages are reused when it is run again. Example: moekd demo --quick
    """
    from moekd.demo import DEFAULT_PLAN, QUICK_PLAN, results_table, routing_table, run_pipeline

    workdir = workdir or Path("moekd-demo-quick" if quick else "moekd-demo")
    results = run_pipeline(workdir, QUICK_PLAN if quick else DEFAULT_PLAN, console, jobs)
    wide = Console(width=max(Console().width, 160))
    wide.print(results_table(results))
    if (routing := routing_table(results)) is not None:
        wide.print(routing)
    if results.get("sar"):
        moved = ", ".join(f"{layer} {kl:.3g}" for layer, kl in results["sar"]["kl_original_trained"].items())
        console.print(
            f"SAR routers, mean KL(original || trained gates) per MoE layer on the test split: {moved}", highlight=False
        )
    console.print(f"results: {workdir / 'results.json'}, chart: {workdir / 'results.png'}", highlight=False)
