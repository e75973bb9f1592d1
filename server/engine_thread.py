"""The engine's own thread: it alone steps the engine, so the model and its cache have a single owner.

Request handlers on other threads (the gRPC event loop) submit and cancel through it; each sequence's
outputs come back through the `on_output` callback the handler gave, called from this thread.
"""

from __future__ import annotations

import logging
import threading

from nextword.server.engine import Engine

log = logging.getLogger("nextword.engine")


class EngineThread:
    def __init__(self, engine: Engine, on_step=None):
        self.engine = engine
        self._on_step = on_step  # called after every step, on this thread (metrics)
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nextword-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, *args, **kwargs):
        """Engine.submit (it validates and raises InvalidParameter), then wake the loop."""
        seq = self.engine.submit(*args, **kwargs)
        self._wake.set()
        return seq

    def cancel(self, seq, reason: str = "cancelled") -> None:
        self.engine.cancel(seq, reason)
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before looking for work, so a submit in between is never missed
            if not self.engine.has_work():
                self._wake.wait()
                continue
            try:
                if self.engine.step() == 0:  # only waiting requests, none admissible yet: don't spin
                    self._wake.wait(0.005)
            except Exception as e:  # a bug, not bad input: fail the live requests, keep serving
                log.exception("engine step failed")
                self.engine.fail_all(e)
            if self._on_step:
                self._on_step(self.engine)
