"""The kernels' thread count follows the cores other processes leave free (server/threads.py)."""

import threading

import numba

from nextword.server.threads import INTERVAL_S, KernelThreads, read_cpu


class FakeMachine:
    """CPU time as /proc/stat and os.times would count it: `others` cores kept busy by other processes and
    `ours` by this one, over each interval."""

    def __init__(self):
        self.now = self.busy = self.own = 0.0

    def run(self, others: float, ours: float = 1.0) -> None:
        self.now += INTERVAL_S
        self.busy += (others + ours) * INTERVAL_S
        self.own += ours * INTERVAL_S

    def read(self):
        return self.busy, self.own


def test_threads_follow_the_cores_others_keep_busy():
    m = FakeMachine()
    k = KernelThreads(read=m.read, clock=lambda: m.now, cores=2, most=2)
    seen = []
    for others in (0.0, 0.1, 1.0, 0.45, 0.9, 0.2, 0.5, 2.0, 0.0):
        m.run(others)
        seen.append(k.update())
    # one thread from 0.6 of a core taken by others, two again below 0.3 (in between: no change), never zero
    assert seen == [2, 2, 1, 1, 1, 2, 2, 1, 2]
    assert k.others == 0.0


def test_a_count_is_kept_between_looks_and_set_on_the_calling_thread():
    m = FakeMachine()
    k = KernelThreads(read=m.read, clock=lambda: m.now, cores=2, most=2)
    k.update()
    m.run(others=1.0)
    got = []
    thread = threading.Thread(target=lambda: got.append((k.update(), numba.get_num_threads())))
    thread.start()
    thread.join()
    assert got == [(1, 1)]
    m.busy += 10.0  # others busy again, but no interval has passed: not looked at
    m.now += INTERVAL_S / 2
    assert k.update() == 1 and k.others == 1.0


def test_without_proc_stat_every_thread_is_used():
    k = KernelThreads(read=lambda: None, cores=2, most=2)
    assert k.update() == 2 and k.update() == 2


def test_read_cpu_counts_this_process_within_the_machine():
    before = read_cpu()
    spin = 0
    for i in range(3_000_000):
        spin += i
    after = read_cpu()
    assert before is not None and after is not None  # Linux
    busy, ours = after[0] - before[0], after[1] - before[1]
    assert ours > 0.01 and busy >= ours - 0.02  # the machine was busy at least while we were (tick rounding)
