"""Wall clocks that tell the user's time: on CUDA the device is synchronised before each reading.

CUDA events would give device time only and miss the host overhead a user waits for; on CPU the
clock is `time.perf_counter`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Clock:
    """Host wall clock; on CUDA the device is synchronised first so the time is the user's."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


class Timer:
    """Median wall time in ms of `run(r)` over `repeats` calls after `warmup` untimed ones;
    `reset()` runs after every call, outside the clock. CUDA is synchronised around each call."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.clock = Clock(device)
        self.device, self.warmup, self.repeats = self.clock.device, warmup, repeats

    def __call__(self, run: Callable[[int], object], reset: Callable[[], None] = lambda: None):
        times = []
        for r in range(self.warmup + self.repeats):
            start = self.clock.now()
            run(r)
            if r >= self.warmup:
                times.append(self.clock.now() - start)
            reset()
        return 1000 * statistics.median(times)
