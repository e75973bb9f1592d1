"""How many threads the kernels use: one fewer for each core that other processes keep busy.

A parallel kernel ends in a barrier: it waits for every one of its threads (~150 of them a decode step). When
another process keeps a core busy, the kernel thread that runs there loses a time slice at every barrier and the
step waits for it: beside one CPU-bound process, q4 decode at batch 1 on 2 cores fell from 140 to 22 tokens/s
with two threads; it runs at 80 with one. So the engine thread looks at the machine's CPU time twice a second
(/proc/stat, less this process's own) and runs its kernels on as many threads as the other processes leave
cores free. A kernel's results do not depend on its thread count. Without /proc, all threads, always.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numba

log = logging.getLogger("nextword.engine")

INTERVAL_S = 0.5  # how often the machine's load is looked at (between two steps)
TAKE, GIVE_BACK = (
    0.6,
    0.3,
)  # cores others use: a core counts as theirs from TAKE, and as ours again below this


def read_cpu() -> tuple[float, float] | None:
    """(CPU seconds the machine has been busy, of which this process's), or None where /proc/stat is missing.
    Busy: user, nice, system, irq and softirq time (not idle, iowait, or a hypervisor's steal)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


class KernelThreads:
    def __init__(
        self,
        read: Callable[[], tuple[float, float] | None] = read_cpu,
        clock: Callable[[], float] = time.monotonic,
        cores: int | None = None,
        most: int | None = None,
    ):
        self.cores = cores or len(os.sched_getaffinity(0))
        self.most = most or numba.config.NUMBA_NUM_THREADS  # the user's NUMBA_NUM_THREADS, or every core
        self.threads = self.most
        self.others = 0.0  # cores the other processes kept busy over the last interval
        self._taken = 0  # cores counted as the other processes'
        self._read, self._clock = read, clock
        self._last: tuple[float, float, float] | None = None  # (time, machine busy, ours)

    def update(self) -> int:
        """On the thread that runs the kernels, between two steps: every INTERVAL_S, look at the load and set
        numba's thread count for this thread. Returns the count."""
        now = self._clock()
        if self._last is not None and now - self._last[0] < INTERVAL_S:
            return self.threads
        sample = self._read()
        if sample is None:
            return self.threads
        if self._last is not None:
            when, busy, ours = self._last
            self.others = max(0.0, (sample[0] - busy) - (sample[1] - ours)) / (now - when)
            taken = self._taken
            while taken < self.cores - 1 and self.others >= taken + TAKE:
                taken += 1
            while taken > 0 and self.others < taken - 1 + GIVE_BACK:
                taken -= 1
            self._taken = taken
            threads = max(1, min(self.most, self.cores - taken))
            if threads != self.threads:
                log.info(
                    "kernels on %d thread(s): other processes keep %.1f cores busy", threads, self.others
                )
                self.threads = threads
        self._last = (now, *sample)
        numba.set_num_threads(self.threads)
        return self.threads
