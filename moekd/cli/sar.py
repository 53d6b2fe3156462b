"""`moekd sar ...`: Student-Aware Router training."""

from __future__ import annotations

from rich.console import Console

from moekd.cli.app import console, sar_app
from moekd.options import command
from moekd.sar.options import SarOptions, recorded_run


@command(sar_app, "train", SarOptions, recorded=recorded_run)
def sar_train(options: SarOptions) -> None:
    """Train the teacher's routers (all experts active, everything else frozen) so the student learns from it more easily.

    Example: moekd sar train --teacher ./teacher --student ./student --data train.jsonl --out router.safetensors --steps 200

    Then: moekd cache build --teacher ./teacher --data train.jsonl --out sar.zarr --policy sar --router router.safetensors
    """
    from moekd.sar.train import train_router

    s = train_router(options, console=Console(stderr=True))
    student_note = f"; co-trained student in {s.student_out}" if s.student_out else ""
    console.print(
        f"[green]trained[/] the routers for {s.steps} steps, {s.tokens:,} teacher tokens at {s.tokens_per_second:,.0f} tok/s; "
        f"teacher loss on the probe batch {s.loss_start:.4f} -> {s.loss_end:.4f}; router file {s.out}{student_note}"
        + (f" (resumed from {s.resumed_from})" if s.resumed_from else ""),
        highlight=False,
    )
