"""Training metrics: `metrics.jsonl` (one object per step), `metrics.csv`, TensorBoard when installed,
and the progress bar."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

COLUMNS = (
    "step",
    "epoch",
    "loss",
    "kd_loss",
    "ce_loss",
    "eval_loss",
    "eval_kd_loss",
    "eval_ce_loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
)


class MetricsLog:
    """Appends step records; on resume, drops the records past the checkpoint's step first.

    metrics.jsonl holds every key of a record; metrics.csv the `columns` (default: moekd train's
    COLUMNS) plus `extra_columns`."""

    def __init__(self, out: Path, keep_until_step: int, extra_columns=(), columns: tuple[str, ...] = COLUMNS):
        self.jsonl, self.csv = out / "metrics.jsonl", out / "metrics.csv"
        self.columns = (*columns, *extra_columns)
        kept = []
        if self.jsonl.exists():
            kept = [r for r in read_metrics(out) if r["step"] <= keep_until_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
        with open(self.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        self.tensorboard = _tensorboard(out)

    def write(self, record: dict) -> None:
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        with open(self.csv, "a", newline="") as fh:
            csv.DictWriter(fh, self.columns, extrasaction="ignore").writerow(record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def read_metrics(out: str | Path) -> list[dict]:
    """The logged records; a last line torn by a crash during its append is left out."""
    records = []
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def progress_bar(console: Console, label: str = "train") -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
