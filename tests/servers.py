"""In-process servers for end-to-end tests: a NextwordServer on a free port, its event loop on a thread."""

import asyncio
import threading
import time
from contextlib import contextmanager

from nextword.server.serve import NextwordServer, ServerConfig


@contextmanager
def running_server(**config):
    """Yields a started, warm NextwordServer (ServerConfig fields as keywords; port and metrics port free)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    srv = NextwordServer(ServerConfig(**{"port": 0, "metrics_port": 0, "grace_s": 1} | config))
    run(srv.start())
    run(srv.wait_ready())
    try:
        yield srv
    finally:
        run(srv.stop(1))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def wait_idle(srv, timeout: float = 5.0) -> int:
    """The engine's count of live sequences, once it is zero or `timeout` has passed (the engine drops
    cancelled sequences at its next step, so this polls)."""
    engine = srv.runner.engine
    deadline = time.monotonic() + timeout
    while engine.live_sequences and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.live_sequences
