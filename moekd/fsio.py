"""Files written so that a crash never leaves a torn one, and the hashes that identify content.

- `atomic_write`: temporary file in the same directory, fsync, rename over the target, fsync the
  directory: a reader sees the old bytes or the new ones, never a mix. Temporary names carry
  the writer's pid (`.NAME.tmp-PID`), so a cleanup can tell whose they are.
- `fsync_dir`, `fsync_tree`: make renames and zarr's (unsynced) writes durable.
- `sha256_file`, `hash_arrays`: content hashes of files and of named arrays.
- `setting_differences`: the settings that differ between a recorded run or build and this one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def temporary_name(path: Path) -> Path:
    """Where `atomic_write` stages `path`: beside it, named after this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, data: bytes) -> None:
    tmp = temporary_name(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path, fsync: bool = False) -> str:
    """sha256 of a file's bytes; with `fsync` also flush it to disk."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def hash_arrays(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (zarr writes without fsync)."""
    for path in sorted(root.rglob("*"), reverse=True):
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def setting_differences(old: dict, new: dict, ignore: tuple[str, ...] = (), where: str | None = None) -> list[str]:
    """One entry per setting (but the `ignore`d) whose value differs: `key: old -> new`, or with
    `where` (e.g. "the store") `key: old in the store, new now`."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    form = "{k}: {a!r} -> {b!r}" if where is None else "{k}: {a!r} in " + where + ", {b!r} now"
    return [form.format(k=k, a=old.get(k), b=new.get(k)) for k in keys if _settled(old.get(k)) != _settled(new.get(k))]


def _settled(value):
    """A setting as compared: in a mapping, an entry set to None is one not given (`fields` from flags or not)."""
    return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value
