"""The engine's own thread: it alone steps the engine, so the model and its cache have a single owner.

Request handlers on other threads (the gRPC event loop) submit and cancel through it; each sequence's
outputs come back through the `on_output` callback the handler gave, called from this thread. Other work on the
model (inspection: embeddings, attention weights) goes through `call(fn)`: fn runs on this thread and its
result comes back in a Future. Long work is written as a generator of chunks (inspect.forward_chunks: one layer
per chunk); the thread runs such calls' chunks in turn between two engine steps, for at most the engine's step
time budget, so a decoding stream waits about one step budget for a chunked call, never the whole call. A
call whose Future is cancelled (its client gone or past its deadline) stops at its next chunk.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future

from nextword.server.engine import Engine
from nextword.server.memory import release_freed_memory
from nextword.server.threads import KernelThreads

log = logging.getLogger("nextword.engine")

# Freed memory is returned to the OS when the engine goes idle, and at least this often while it is busy (a
# server under steady load may never be idle): malloc_trim takes a few ms.
RELEASE_EVERY_S = 10.0


class EngineThread:
    def __init__(self, engine: Engine, on_step=None, kernel_threads: KernelThreads | None = None):
        self.engine = engine
        self._on_step = on_step  # called after every step, on this thread (metrics)
        self.kernel_threads = kernel_threads or KernelThreads()  # fewer when other processes take cores
        self._wake = threading.Event()
        self._stopping = False
        self._calls: queue.SimpleQueue[tuple[Callable, Future]] = queue.SimpleQueue()
        self._chunked: deque[tuple[Generator, Future]] = deque()  # calls in progress, run in turn
        self._cancel_calls = False  # set by cancel_all()
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

    def pause(self, seq) -> None:
        self.engine.pause(seq)

    def resume(self, seq) -> None:
        if seq.paused_at is not None:
            self.engine.resume(seq)
            self._wake.set()

    def cancel_all(self, reason: str = "cancelled") -> None:
        """Every live sequence ends at the next step with `reason`; calls not yet done fail."""
        self.engine.cancel_all(reason)
        self._cancel_calls = True
        self._wake.set()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on this thread between two steps; the Future gets its result or exception. When fn
        returns a generator, it is run a chunk at a time between steps and the Future gets its return value.
        A Future cancelled before the work ends (by an awaiting handler that was cancelled) stops it."""
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

    @property
    def pending_calls(self) -> int:
        """Calls queued or in progress."""
        return self._calls.qsize() + len(self._chunked)

    def _run(self) -> None:
        busy = False  # work was done since the engine was last idle
        released_at = self.engine.clock()
        while not self._stopping:
            self._wake.clear()  # before looking for work, so a submit in between is never missed
            called = self._run_calls()
            busy |= called
            if not self.engine.has_work():
                if not called:
                    if busy:  # going idle: the buffers of the last steps are free, return them
                        self.engine.release_buffers()
                        release_freed_memory()
                        busy, released_at = False, self.engine.clock()
                    self._wake.wait()
                continue
            busy = True
            if self.engine.clock() - released_at >= RELEASE_EVERY_S:  # busy for long: don't wait for idle
                release_freed_memory()
                released_at = self.engine.clock()
            self.kernel_threads.update()
            try:
                if self.engine.step() == 0:  # only waiting requests, none admissible yet: don't spin
                    self._wake.wait(0.005)
            except Exception as e:  # a bug, not bad input: fail the live requests, keep serving
                log.exception("engine step failed")
                self.engine.fail_all(e)
            if self._on_step:
                self._on_step(self.engine)
        self._fail_queued_calls()

    def _run_calls(self) -> bool:
        """Run calls between two steps for up to one step's time budget (max_step_s; exactly one unit of work
        when the engine is untimed): a unit is a queued call started, or one chunk of a chunked call, taken in
        turn. True when there was any call."""
        if self._cancel_calls:
            self._cancel_calls = False
            self._fail_queued_calls(RuntimeError("cancelled: the server is shutting down"))
        clock = self.engine.clock
        until = clock() + (self.engine.max_step_s or 0.0)
        ran = False
        while not self._stopping and (self._chunked or not self._calls.empty()):
            ran = True
            if not self._calls.empty():
                self._start_call(*self._calls.get())
            else:
                self._run_chunk()
            if clock() >= until:
                break
        return ran

    def _start_call(self, fn: Callable[[], object], future: Future) -> None:
        if future.cancelled():
            return
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 (whatever fn raised is its caller's to handle)
            _settle(future, error=e)
            return
        if inspect.isgenerator(result):
            self._chunked.append((result, future))
        else:
            _settle(future, result)

    def _run_chunk(self) -> None:
        """One chunk of the oldest chunked call, which then goes to the back of the line."""
        chunks, future = self._chunked[0]
        if future.cancelled():  # pending while its chunks run, so a caller's cancel() lands
            self._chunked.popleft()
            chunks.close()
            return
        try:
            next(chunks)
        except StopIteration as done:
            self._chunked.popleft()
            _settle(future, done.value)
        except Exception as e:  # noqa: BLE001
            self._chunked.popleft()
            _settle(future, error=e)
        else:
            self._chunked.rotate(-1)

    def _fail_queued_calls(self, stopped: Exception | None = None) -> None:
        """Calls still queued or in progress will never end (stopped, or cancelled by a drain)."""
        stopped = stopped or RuntimeError("the engine thread has stopped")
        while self._chunked:
            _settle(self._chunked.popleft()[1], error=stopped)
        while not self._calls.empty():
            _settle(self._calls.get()[1], error=stopped)


def _settle(future: Future, result=None, error: Exception | None = None) -> None:
    """Give a (still pending) Future its result or exception, unless it was cancelled."""
    if future.set_running_or_notify_cancel():
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
