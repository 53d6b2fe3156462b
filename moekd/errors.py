"""The one exception type users see: its message names the field, file or flag at fault."""


class MoekdError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""


class ReportedByRankZero(MoekdError):
    """Raised on the other ranks of a torchrun job when rank 0 hit a MoekdError: rank 0 prints it, they exit quietly."""
