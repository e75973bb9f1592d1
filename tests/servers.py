"""In-process servers for end-to-end tests: a NextwordServer on a free port, its event loop on a thread; and
the tools that let a test decide when things happen (no test waits for wall-clock time to pass)."""

import asyncio
import threading
import time
from contextlib import contextmanager

from nextword.server.serve import NextwordServer, ServerConfig

SAFETY_S = 120  # how long a wait for an event may take before the test fails: a hang guard, not a measure
START_S = 900  # a server's start and warm-up: compiling every kernel on a loaded machine took > 120 s


@contextmanager
def event_loop_thread():
    """Yields run(coro): the coroutine's result, run on an event loop on its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro, timeout=SAFETY_S):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    try:
        yield run
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def server_config(**config) -> ServerConfig:
    return ServerConfig(**{"port": 0, "metrics_port": 0, "grace_s": 1} | config)


@contextmanager
def running_server(**config):
    """Yields a started, warm NextwordServer (ServerConfig fields as keywords; port and metrics port free)."""
    with event_loop_thread() as run:
        srv = NextwordServer(server_config(**config))
        run(srv.start())
        run(srv.wait_ready(), START_S)
        try:
            yield srv
        finally:
            run(srv.stop(1))


def wait_until(condition, what: str, timeout: float = SAFETY_S) -> None:
    """Poll `condition()` until it is true; fail naming `what` if it never becomes true (hang guard)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.002)


def wait_idle(srv) -> int:
    """The engine's count of live sequences, once it is zero (the engine drops cancelled sequences at its
    next step, so this waits for that step)."""
    engine = srv.runner.engine
    wait_until(lambda: engine.live_sequences == 0, "the engine has no live sequence")
    return engine.live_sequences


class StepGate:
    """Holds the engine thread before each step until the test allows it, so the test decides how many steps
    run between two of its actions. `allow(n)` lets n more steps run; `open()` lets every step run."""

    def __init__(self, engine):
        self.engine, self._step = engine, engine.step
        self._permits = threading.Semaphore(0)
        engine.step = self._gated

    def _gated(self) -> int:
        if not self._permits.acquire(timeout=SAFETY_S):
            raise AssertionError("the engine waited for a step the test never allowed")
        return self._step()

    def allow(self, n: int = 1) -> None:
        self._permits.release(n)

    def open(self) -> None:
        self.engine.step = self._step
        self._permits.release(1_000_000)  # whoever is waiting in _gated
