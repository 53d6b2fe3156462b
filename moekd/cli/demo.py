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
    config: Path | None = typer.Option(
        None,
        help="A plan of your own as YAML (teacher, caches, student rows, seeds ...); start from a built-in one: "
        "moekd/demo/plans/default.yaml or quick.yaml.",
    ),
) -> None:
    """Run the whole pipeline on the built-in suite: teacher, SAR routers, caches (topk, all, ka, sar), SFT and KD students per training seed, MoE students (logit KD, Balanced Distillation), eval.

    Finished stages are reused when it is run again. Example: moekd demo --quick
    """
    from moekd.demo import DEFAULT_PLAN, QUICK_PLAN, results_table, routing_table, run_pipeline
    from moekd.demo.plan import load_plan
    from moekd.errors import MoekdError

    if config is not None and quick:
        raise MoekdError("--config gives the whole plan, --quick the built-in miniature's: pass one of them")
    plan = load_plan(config) if config is not None else QUICK_PLAN if quick else DEFAULT_PLAN
    workdir = workdir or Path(f"moekd-demo-{config.stem}" if config else "moekd-demo-quick" if quick else "moekd-demo")
    results = run_pipeline(workdir, plan, console, jobs)
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
