"""The engine's own thread: it alone steps the engine, so the model and its cache have a single owner.

Request handlers on other threads (the gRPC event loop) submit and cancel through it; each sequence's
outputs come back through the `on_output` callback the handler gave, called from this thread. Other work on the
model (inspection: embeddings, attention weights) goes through `call(fn)`: fn runs on this thread between two
steps, one call per step while sequences are running, and its result comes back in a Future.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from nextword.server.engine import Engine
from nextword.server.memory import release_freed_memory

log = logging.getLogger("nextword.engine")


class EngineThread:
    def __init__(self, engine: Engine, on_step=None):
        self.engine = engine
        self._on_step = on_step  # called after every step, on this thread (metrics)
        self._wake = threading.Event()
        self._stopping = False
        self._calls: queue.SimpleQueue[tuple[Callable, Future]] = queue.SimpleQueue()
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

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on this thread between two steps; the Future gets its result or exception. A Future
        cancelled before fn starts (e.g. by an awaiting handler that was cancelled) skips it."""
        future: Future = Future()
        if self._stopping:
            future.set_exception(RuntimeError("the engine thread has stopped"))
            return future
        self._calls.put((fn, future))
        self._wake.set()
        return future

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._fail_queued_calls()

    def _run(self) -> None:
        busy = False  # work was done since the engine was last idle
        while not self._stopping:
            self._wake.clear()  # before looking for work, so a submit in between is never missed
            called = self._run_one_call()
            busy |= called
            if not self.engine.has_work():
                if not called:
                    if busy:  # going idle: the buffers of the last steps are free, return them
                        release_freed_memory()
                        busy = False
                    self._wake.wait()
                continue
            busy = True
            try:
                if self.engine.step() == 0:  # only waiting requests, none admissible yet: don't spin
                    self._wake.wait(0.005)
            except Exception as e:  # a bug, not bad input: fail the live requests, keep serving
                log.exception("engine step failed")
                self.engine.fail_all(e)
            if self._on_step:
                self._on_step(self.engine)
        self._fail_queued_calls()

    def _run_one_call(self) -> bool:
        """Run the oldest queued call, if any; True when there was one."""
        try:
            fn, future = self._calls.get_nowait()
        except queue.Empty:
            return False
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 (whatever fn raised is its caller's to handle)
                future.set_exception(e)
        return True

    def _fail_queued_calls(self) -> None:
        """Stopped: calls still queued will never run."""
        while not self._calls.empty():
            _, future = self._calls.get()
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the engine thread has stopped"))
