"""The one exception type users see: its message names the field, file or flag at fault."""


class MoekdError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""
