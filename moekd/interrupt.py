"""Stopping a long command on SIGINT (Ctrl-C) or SIGTERM with one line instead of a traceback.

`main` turns SIGTERM into `Terminated`, a KeyboardInterrupt, so both signals unwind the same way;
`resumable` words where a run stopped and the exact command that continues it (`Interrupted`, still a
KeyboardInterrupt for Python callers); the command layer turns that into `Stopped`, which `main` prints
as one line with exit code 130 or 143. Loader worker processes ignore both signals (`quiet_worker`) so
that only the main process reacts, and it stops them cleanly.
"""

from __future__ import annotations

import shlex
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report it


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by `signal`; the message says where and how to resume (still a KeyboardInterrupt to
    code that calls moekd from Python)."""

    def __init__(self, message: str, signal: signal.Signals):
        super().__init__(message)
        self.signal = signal


class Stopped(Exception):
    """What the command line reports of a KeyboardInterrupt (typer would turn one into a silent exit)."""

    def __init__(self, message: str, signal: signal.Signals):
        super().__init__(message)
        self.signal = signal

    @classmethod
    def of(cls, e: KeyboardInterrupt) -> Stopped:
        if isinstance(e, Interrupted):
            return cls(str(e), e.signal)
        return cls("finished units and checkpoints are kept; rerun with --resume to continue", signal_of(e))


def signal_of(e: KeyboardInterrupt) -> signal.Signals:
    return signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT


def raise_on_sigterm() -> None:
    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def quiet_worker(_worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn: the main process handles the signals and shuts the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resume_command(*args: str) -> str:
    """`moekd ARGS...`, quoted so that it can be pasted into a shell."""
    return shlex.join(["moekd", *args])


@contextmanager
def resumable(where: Callable[[], str], command: str) -> Iterator[None]:
    """Turn a signal inside the block into `Interrupted`: "<where()>; resume with: <command>"."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt as e:
        raise Interrupted(f"{where()}; resume with: {command}", signal_of(e)) from None
