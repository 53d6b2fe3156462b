"""Checks of the local paths a command will write, made before any work starts."""

from __future__ import annotations

from pathlib import Path

from moekd.errors import MoekdError


def _blocking_file(path: Path) -> Path | None:
    """The existing file among `path`'s parents, which makes `path` impossible to create."""
    for parent in path.absolute().parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_output_dir(path: str | Path, flag: str) -> Path:
    """A directory a command will create or write into: not a file, not under a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MoekdError(f"{flag}: {path} is a file; give a directory path")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise MoekdError(f"{flag}: {path} cannot be created because {blocking} is a file")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file a command will write (its parent directories are created): not a directory, not under a file."""
    path = Path(path)
    if path.is_dir():
        raise MoekdError(f"{flag}: {path} is a directory; give a file path")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise MoekdError(f"{flag}: {path} cannot be created because {blocking} is a file")
    return path
