"""`moekd train`: distil a student from a cache, or SFT on data."""

from __future__ import annotations

from rich.console import Console

from moekd.cli.app import app, console
from moekd.distill.options import TrainOptions, recorded_run
from moekd.options import command


@command(app, "train", TrainOptions, recorded=recorded_run)
def train_command(options: TrainOptions) -> None:
    """Train a student on a teacher cache (KD), or on instruction data (--loss ce).

    Example: moekd train --cache run.zarr --student ./student --out runs/kd --loss fkl --max-steps 1000 --lr 5e-5 --warmup 50

    MoE student, Balanced Distillation: moekd train --cache gates.zarr --student ./moe --out runs/bd --router-loss bdistill --expert-weight 0.1

    On several GPUs (DDP, each rank trains its share of every batch): torchrun --standalone --nproc-per-node 8 -m moekd -- train ...
    """
    from moekd.distill.train import train
    from moekd.distributed import Ranks

    s = train(options, console=Console(stderr=True))
    if not Ranks.from_env().main:
        return  # rank 0 prints the run's summary
    evals = (
        f"held-out loss {s.eval_loss_start:.4f} -> {s.eval_loss:.4f}; "
        if s.eval_loss_start is not None
        else (f"held-out loss {s.eval_loss:.4f}; " if s.eval_loss is not None else "")
    )
    console.print(
        f"[green]trained[/] {s.steps} steps, {s.tokens:,} tokens at {s.tokens_per_second:,.0f} tok/s; {evals}"
        f"model in {s.final_dir}" + (f" (resumed from {s.resumed_from})" if s.resumed_from else ""),
        highlight=False,
    )
