"""Which units of a store this process writes: all of them, its share under torchrun, or its `--shard i/n`.

Every unit has exactly one writer (one job writes a store, or one job each shard of it: moekd/locking.py):
- `--shard i/n`: unit u belongs to shard u mod n, in every run (n independent jobs never talk to
  each other; a rerun of shard i redoes only shard i's unfinished units);
- torchrun: the ranks check the units' markers in parallel (rank r the units u with u mod W = r),
  hear each other's findings, and deal the unfinished units out round-robin. Every rank derives
  the same list, and no rank writes before all have heard it, so the deal is consistent; it
  does not depend on the world size of an earlier run that died.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moekd.distributed import Ranks
from moekd.errors import MoekdError
from moekd.store.layout import Unit
from moekd.store.writer import CacheWriter


@dataclass
class Work:
    mine: list[Unit]  # the units this process writes
    everyone: list[Unit]  # the units all ranks of this job write (progress bar)
    by: str  # who writes them, recorded in each unit's marker


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard i/n` -> (i, n)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise MoekdError(f"--shard: {text!r} is not I/N with 0 <= I < N (e.g. --shard 0/4 ... --shard 3/4)")
    return int(match[1]), int(match[2])


def split_units(writer: CacheWriter, ranks: Ranks, shard: tuple[int, int] | None) -> Work:
    if shard is not None:
        i, n = shard
        mine = writer.pending_units([u for u in writer.units if u.index % n == i])
        return Work(mine, mine, f"shard {i}/{n}")
    checked = [u.index for u in writer.pending_units(writer.units[ranks.rank :: ranks.world])]
    everyone = [writer.units[i] for i in sorted(i for found in ranks.gather(checked) for i in found)]
    return Work(everyone[ranks.rank :: ranks.world], everyone, str(ranks))
