"""Peak memory of a piece of work, for the benchmarks: resident set size sampled every millisecond
on CPU (torch's allocations are invisible to tracemalloc), max_memory_allocated on CUDA."""

from __future__ import annotations

import os
import threading
import time

import torch


class PeakMemory:
    """Peak memory (MB) from start() to stop()."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.running = device, 0.0, False

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss_mb())
            time.sleep(0.001)

    def start(self) -> float:
        """Memory in use now (the baseline)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        self.running, self.peak = True, self.rss_mb()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self.peak

    def stop(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self.running = False
        self.thread.join()
        return max(self.peak, self.rss_mb())
