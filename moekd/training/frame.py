"""The step frame every training loop shares (`moekd train`, `moekd sar train`).

A loop computes its steps; the frame does the rest the same way for all of them: it writes the
run's config.json, appends one metrics record per step (metrics.jsonl/.csv, TensorBoard), keeps the
progress bar and the token rate, saves a checkpoint every N steps while still holding the run's
lock, and words the error that stops a diverged run. On ranks other than 0 it writes nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console

from moekd.errors import MoekdError
from moekd.fsio import atomic_write
from moekd.locking import WriterLock
from moekd.training.checkpoint import RUN_CONFIG, latest_checkpoint
from moekd.training.metrics import COLUMNS, MetricsLog, progress_bar


class StepFrame:
    """Context of a loop from `step` (0, or the resumed checkpoint's) to `total` steps; see the module docstring."""

    def __init__(
        self,
        run: Path,
        config: dict,
        console: Console,
        lock: WriterLock,
        *,
        label: str,
        total: int,
        step: int = 0,
        tokens: int = 0,
        resumed: bool = False,
        columns: tuple[str, ...] = COLUMNS,
        extra_columns: tuple[str, ...] = (),
        main: bool = True,
    ):
        self.run, self.console, self.lock = run, console, lock
        self.label, self.total, self.step, self.tokens, self.main = label, total, step, tokens, main
        self.session_tokens = 0
        self.log = None
        if main:
            run.mkdir(parents=True, exist_ok=True)
            atomic_write(run / RUN_CONFIG, json.dumps(config, indent=2, default=str).encode())
            self.log = MetricsLog(
                run, keep_until_step=step if resumed else -1, columns=columns, extra_columns=extra_columns
            )

    def __enter__(self) -> StepFrame:
        self._progress = progress_bar(self.console, self.label)
        self._progress.__enter__()
        self._task = self._progress.add_task(self.label, total=self.total, completed=self.step, loss="-", rate="-")
        self._clock = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)
        if self.log is not None:
            self.log.close()

    @property
    def elapsed(self) -> float:
        """Seconds since the loop started (this session only)."""
        return time.perf_counter() - self._clock

    @property
    def tokens_per_second(self) -> float:
        return self.session_tokens / max(self.elapsed, 1e-9)

    def where(self) -> str:
        """Where the run stands, for the line of an interrupted run: its step and last complete checkpoint."""
        last = latest_checkpoint(self.run)
        kept = (
            f"the last complete checkpoint is {last}" if last else "no checkpoint was saved yet (resuming starts over)"
        )
        return f"{self.label} stopped after step {self.step} of {self.total}; {kept}"

    def write(self, record: dict) -> None:
        """A metrics record outside the steps (e.g. step 0's held-out loss)."""
        if self.log is not None:
            self.log.write(record)

    def done(self, record: dict, tokens: int) -> None:
        """Step `record["step"]` is done with `tokens` trained tokens: count them, add tokens and
        tokens_per_s to its record, write it and advance the bar."""
        self.step = record["step"]
        self.tokens += tokens
        self.session_tokens += tokens
        record.update(tokens=self.tokens, tokens_per_s=self.tokens_per_second)
        self.write(record)
        self._progress.update(
            self._task, completed=self.step, loss=f"{record['loss']:.4f}", rate=f"{record['tokens_per_s']:,.0f}"
        )

    def due(self, every: int) -> bool:
        """Whether the step just done is one of every `every`-th (0: never)."""
        return bool(every) and self.step % every == 0

    def save(self, write) -> None:
        """Call `write()` (a checkpoint or the final outputs) on rank 0, after checking the lock is still ours."""
        if self.main:
            self.lock.verify()
            write()


def check_finite(value, what: str, step: int, epoch: int, index: int, examples, run: Path, advice: str) -> None:
    """Stop the run when `value` (a loss or gradient norm, tensor or float) is not finite, with one line
    naming the step, the batch (`index` of `epoch`, its `examples`), the last good checkpoint in `run`
    and what to try."""
    number = float(value.detach() if hasattr(value, "detach") else value)  # a loss tensor: no autograd warning
    if math.isfinite(number):
        return
    last = latest_checkpoint(run)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    raise MoekdError(
        f"step {step}: {what} is {number} on batch {index} of epoch {epoch} (examples {list(examples)}); "
        f"training stopped and {kept}. {advice}"
    )
