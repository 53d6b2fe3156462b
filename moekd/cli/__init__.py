"""The `moekd` command line: thin typed commands; the work happens in the modules they call.

One module per command group (cache, routing, data, train, sar, eval, demo), all registered on the
app of `app.py`. Errors a user can fix raise `MoekdError`, which `main` prints as one red line
(exit code 2) instead of a traceback.
"""

from __future__ import annotations

import os
import sys

from moekd.cli import cache, data, demo, eval, routing, sar, train  # noqa: F401  (registers the commands)
from moekd.cli.app import app, console
from moekd.errors import MoekdError, ReportedByRankZero
from moekd.interrupt import EXIT_CODES, Stopped, raise_on_sigterm

__all__ = ["app", "main"]


def main() -> None:
    # moekd draws its own progress bars; transformers' per-load bars would only clutter them
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    raise_on_sigterm()
    try:
        app()
    except ReportedByRankZero:
        sys.exit(2)
    except MoekdError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except Stopped as e:
        # one unwrapped line, to copy the resume command from
        console.print(f"[bold red]interrupted by {e.signal.name}:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_CODES[e.signal])
