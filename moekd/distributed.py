"""The ranks of a `torchrun` job, shared by `cache build` and `train` (torch.distributed).

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in each; without torchrun there is one rank and nothing here talks to anything.
The helpers are small on purpose: rank 0 decides and tells the others (`share`), every rank
reports and all hear (`gather`), and a `Counter` lets ranks that do different amounts of work
add to one number without a collective (progress bars).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moekd.errors import MoekdError, ReportedByRankZero

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world}"

    @classmethod
    def from_env(cls) -> Ranks:
        """This process's rank as torchrun set it (rank 0 of 1 outside torchrun)."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            rank, world, local = (int(os.environ.get(name, "0")) for name in ENV)
        except ValueError:
            raise MoekdError(
                f"torchrun environment: {', '.join(f'{n}={os.environ.get(n)!r}' for n in ENV)} are not integers"
            ) from None
        if not 0 <= rank < world:
            raise MoekdError(f"torchrun environment: RANK {rank} is outside WORLD_SIZE {world}")
        return cls(rank, world, local)

    def start(self, backend: str = "gloo", timeout: timedelta = timedelta(minutes=30)) -> None:
        """Join the job's process group (nothing to do for a single rank)."""
        if self.world > 1 and not dist.is_initialized():
            for name in ("MASTER_ADDR", "MASTER_PORT"):
                if name not in os.environ:
                    raise MoekdError(f"WORLD_SIZE is {self.world} but {name} is not set: start moekd with torchrun")
            dist.init_process_group(backend, rank=self.rank, world_size=self.world, timeout=timeout)

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def device(self, device: torch.device) -> torch.device:
        """`cuda` without an index means this rank's own GPU (cuda:LOCAL_RANK)."""
        if device.type == "cuda" and device.index is None and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def share(self, decide):
        """`decide()` runs on rank 0; every rank returns its result. A MoekdError it raises is raised on
        every rank (as ReportedByRankZero on the others, so that the message is printed once)."""
        if self.world == 1:
            return decide()
        payload = [None]
        if self.main:
            try:
                payload = [("ok", decide())]
            except MoekdError as e:
                payload = [("error", str(e))]
                dist.broadcast_object_list(payload, src=0)
                raise
        dist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "error":
            raise ReportedByRankZero(value)
        return value

    def barrier(self) -> None:
        """Wait until every rank is here: at the end of a job, so that no rank tears the process group down
        (closing its gloo connections) while rank 0 still writes the outputs."""
        if self.world > 1:
            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def counter(self, name: str) -> Counter:
        if self.world == 1:
            return Counter(None, name)
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=60),
            wait_for_workers=False,
        )
        # one key space per (re)start of the job: torchrun keeps its store across restarts
        return Counter(store, f"moekd/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}")


class Counter:
    """An integer that every rank adds to; any rank reads the sum."""

    def __init__(self, store, key: str):
        self.store, self.key, self.local = store, key, 0

    def add(self, n: int) -> int:
        if self.store is None:
            self.local += n
            return self.local
        return int(self.store.add(self.key, n))

    def value(self) -> int:
        return self.add(0)

    def wait_until(self, target: int, on_poll=lambda value: None, interval: float = 0.2) -> None:
        """Block until the sum reaches `target`, calling `on_poll(sum)` meanwhile."""
        while (value := self.value()) < target:
            on_poll(value)
            time.sleep(interval)
        on_poll(value)
