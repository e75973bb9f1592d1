"""What both front ends (the gRPC servicer and the OpenAI-compatible HTTP app) do with a request, free of any
wire format: refuse while the model loads or the server drains, turn a prompt into token ids, submit to the
engine thread and relay its outputs to the event loop, cancel the sequence when the caller goes away, score
long texts in windows, count and log each request.

Sampling parameters are validated in one place, `SamplingParams.validate` (and the engine's context check),
whichever front end built them. Errors are `RequestError`: a gRPC status code (the HTTP app maps it to an HTTP
status), a message, and the field under its engine-side name (`temperature`, `max_new_tokens`, `prompt`,
...): each front end renames fields into its own vocabulary.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import grpc
import numpy as np

from nextword.server.engine import Engine, Finish, QueueFull, Scores, Sequence, Step
from nextword.server.engine_thread import EngineThread
from nextword.server.metrics import Metrics
from nextword.server.sampling import InvalidParameter, SamplingParams, TokenProb

log = logging.getLogger("nextword.requests")

SCORE_WINDOWS_IN_FLIGHT = 4  # windows of one Score request submitted at a time (each is a sequence)
INLINE_TOKENIZE_CHARS = 4096  # ~1 ms of tokenizing: shorter texts are not worth a thread hop


class RequestError(Exception):
    """A request the server refuses: a gRPC status code, a message, and the offending field if any."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None, retry_after_s=None):
        super().__init__(message)
        self.code, self.message, self.field, self.retry_after_s = code, message, field, retry_after_s


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, field)


def engine_failure(error: Exception) -> RequestError:
    return RequestError(grpc.StatusCode.INTERNAL, f"engine failure: {error}")


@dataclass(frozen=True)
class ScoreResult:
    """Every scored token of a text, window after window (see Frontend.score)."""

    positions: np.ndarray  # [N] int64, index of each scored token in the prompt
    token_ids: np.ndarray  # [N] int64
    logprobs: np.ndarray  # [N] float64
    ranks: np.ndarray  # [N] int64
    top: tuple[tuple[TokenProb, ...], ...]  # [N] with top_n, else ()
    prompt_tokens: int
    window: int
    stride: int
    windows: int

    @property
    def sum_logprob(self) -> float:
        return float(self.logprobs.sum())

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprobs.mean()) if len(self.logprobs) else float("nan")


def score_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) of each window, as the usual sliding-window perplexity evaluation cuts a
    text: windows of `window` tokens starting every `stride` tokens, each scoring only the tokens no earlier
    window scored (the first token of the text, and with stride == window the first of every window, have
    no context and are not scored); the last window ends at the text's end."""
    spans, scored_to = [], 1
    for start in range(0, num_tokens - 1, stride):
        end = min(start + window, num_tokens)
        if end - scored_to >= 1 and end - start >= 2:
            spans.append((start, end, max(scored_to, start + 1)))
            scored_to = end
        if end == num_tokens:
            break
    return spans


class Generation:
    """A submitted generation: `async for step in gen.steps()`, the last step carrying the finish. A caller
    that stops iterating (done, cancelled, disconnected) or calls close() cancels the sequence, and the
    engine drops it at its next step."""

    def __init__(self, frontend: Frontend, prompt: list[int], params: SamplingParams, request_id: str):
        self.frontend, self.request_id = frontend, request_id
        self.generated = 0
        self._closed = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self.seq = frontend.submit(prompt, params, self._queue.put_nowait, request_id=request_id)

    async def steps(self) -> AsyncIterator[Step]:
        try:
            while True:
                step = await self._queue.get()
                if isinstance(step, Exception):
                    raise engine_failure(step)
                self.generated += step.token is not None
                if step.finish:
                    self.frontend.finished(self.request_id, step.finish)
                yield step
                if step.finish:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.frontend.abandon(self.seq, self.request_id, self.generated)


class _Outbox:
    """Outputs handed from the engine thread to one event loop, a step's outputs (one a stream) in one go: the
    first schedules their delivery, the others join it. One call_soon_threadsafe an output wrote to the loop's
    self-pipe every time: a system call each, ~1% of the engine thread at 16 streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[Callable, object]] = []
        self._lock = threading.Lock()

    def put(self, deliver: Callable, output) -> None:
        """From any thread: deliver(output) on the loop, after the outputs put before it."""
        with self._lock:
            first = not self._pending
            self._pending.append((deliver, output))
        if first:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nothing will take these, keep none of them
                with self._lock:
                    self._pending.clear()
                raise

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for deliver, output in pending:
            try:
                deliver(output)
            except Exception as e:  # noqa: BLE001 (as the loop treats a failing callback: reported, the rest run)
                self.loop.call_exception_handler({"message": "delivering an output failed", "exception": e})


class Frontend:
    def __init__(self, metrics: Metrics | None = None):
        self.runner: EngineThread | None = None  # set once the model is loaded and warm
        self.draining = False
        self.metrics = metrics or Metrics()
        # One thread: big texts are tokenized one after another, beside the engine, never on the event loop.
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="nextword-tokenize")
        self._outboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> _Outbox

    def engine(self) -> Engine:
        """The engine, or UNAVAILABLE while loading or draining."""
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down", retry_after_s=1.0)
        if self.runner is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the model is still loading", retry_after_s=1.0)
        return self.runner.engine

    # ---- prompts ----

    async def encode_text(self, text: str, field: str) -> list[int]:
        if not text:
            raise invalid(field, f"{field} is empty")
        return await self.off_loop(len(text), self.engine().tokenizer.encode, text)

    async def encode_chat(
        self,
        messages: list[dict],
        field: str,
        add_generation_prompt: bool = True,
        special_tokens_in_content: bool = False,
    ) -> list[int]:
        """Render {"role", "content"} messages with the model's chat template and tokenize them (see
        Tokenizer.encode_chat)."""
        tok = self.engine().tokenizer
        if not tok.chat_template:
            raise invalid(field, "this model has no chat template")
        if not messages:
            raise invalid(field, "no chat messages")
        for i, m in enumerate(messages):
            if not m.get("role"):
                raise invalid(f"{field}[{i}].role", f"message {i} has no role")
        size = sum(len(m.get("content") or "") for m in messages)
        encode = partial(tok.encode_chat, messages, add_generation_prompt, special_tokens_in_content)
        try:
            return await self.off_loop(size, encode)
        except ValueError as e:  # the template refused the conversation (raise_exception in the template)
            raise invalid(field, f"the chat template failed: {e}") from None

    async def off_loop(self, size: int, fn, *args):
        """fn(*args) inline when `size` (characters) is small, else on the tokenizing thread: a 1 MB text
        takes ~0.5 s to tokenize, which would stall every stream and health check on this event loop."""
        if size <= INLINE_TOKENIZE_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    def check_ids(self, ids, field: str) -> list[int]:
        V = self.engine().config.vocab_size
        if not ids:
            raise invalid(field, f"{field} is empty")
        bad = next((i for i in ids if not 0 <= i < V), None)
        if bad is not None:
            raise invalid(field, f"{field}: token id {bad} is outside the vocabulary [0, {V})")
        return list(ids)

    # ---- the engine ----

    def submit(self, prompt: list[int], params: SamplingParams, deliver: Callable, **kwargs) -> Sequence:
        """Engine.submit through the engine thread; deliver(output) is called on the running event loop."""
        loop = asyncio.get_running_loop()
        outbox = self._outboxes.get(loop) or self._outboxes.setdefault(loop, _Outbox(loop))
        runner = self.runner
        self.engine()
        try:
            return runner.submit(prompt, params, partial(outbox.put, deliver), **kwargs)
        except InvalidParameter as e:
            raise invalid(e.field, str(e)) from None
        except QueueFull as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_after_s=1.0) from None

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        self.runner.cancel(seq, reason)

    def generate(self, prompt: list[int], params: SamplingParams, request_id: str) -> Generation:
        """Submit a generation now (raising RequestError if it is refused); iterate its steps later."""
        return Generation(self, prompt, params, request_id)

    async def next_output(self, prompt: list[int], params: SamplingParams, **kwargs):
        """Submit a request and await its first output (all a probabilities or scoring request gives)."""
        queue: asyncio.Queue = asyncio.Queue()
        seq = self.submit(prompt, params, queue.put_nowait, **kwargs)
        try:
            out = await queue.get()
        finally:
            if not seq.finished:
                self.runner.cancel(seq)
        if isinstance(out, Exception):
            raise engine_failure(out)
        return out

    async def score(self, prompt: list[int], top_n: int = 0, window: int = 0, stride: int = 0) -> ScoreResult:
        """The log-probability of every token of `prompt` given the ones before it (window = 0: the
        context length; stride = 0: the window, i.e. no overlap). Windows run as scoring sequences in the
        normal batching, a few at a time; one failing cancels the rest."""
        engine = self.engine()
        window = window or engine.max_context
        stride = stride or window
        if not 2 <= window <= engine.max_context:
            raise invalid("window", f"window must be in [2, {engine.max_context}] tokens, got {window}")
        if not 1 <= stride <= window:
            raise invalid("stride", f"stride must be in [1, window = {window}], got {stride}")
        if len(prompt) < 2:
            raise invalid("prompt", "scoring needs at least 2 tokens (the first has no context)")
        params = SamplingParams(top_n=top_n)
        try:
            params.validate(engine.config.vocab_size, engine.max_top_n)
        except InvalidParameter as e:
            raise invalid(e.field, str(e)) from None
        spans = score_windows(len(prompt), window, stride)
        gate = asyncio.Semaphore(SCORE_WINDOWS_IN_FLIGHT)

        async def one(start: int, end: int, first: int) -> Scores:
            async with gate:
                out = await self.next_output(prompt[start:end], params, score_from=first - start)
            if isinstance(out, Step):  # finished without scores: cancelled on the server's side
                raise RequestError(grpc.StatusCode.CANCELLED, "the server cancelled the request")
            self.metrics.observe_finish(out.finish)
            return out

        tasks = [asyncio.ensure_future(one(*span)) for span in spans]
        try:
            results = await asyncio.gather(*tasks)
        finally:  # one window refused or failed, or the caller gone: the others stop too
            for task in tasks:
                task.cancel()
        cat = np.concatenate
        return ScoreResult(
            positions=cat([np.arange(first, end) for _, end, first in spans]),
            token_ids=cat([s.token_ids for s in results]),
            logprobs=cat([s.logprobs for s in results]),
            ranks=cat([s.ranks for s in results]),
            top=tuple(t for s in results for t in s.top),
            prompt_tokens=len(prompt),
            window=window,
            stride=stride,
            windows=len(spans),
        )

    # ---- bookkeeping ----

    def finished(self, request_id: str, finish: Finish) -> None:
        self.metrics.observe_finish(finish)
        rate = 1 / finish.mean_itl_s if finish.mean_itl_s else 0.0
        log.info(
            "request %s: %d prompt + %d generated tokens, finish=%s, ttft=%.0f ms, %.1f tokens/s",
            request_id,
            finish.prompt_tokens,
            finish.generated_tokens,
            finish.reason,
            finish.ttft_s * 1000,
            rate,
        )

    def abandon(self, seq: Sequence | None, request_id: str, generated: int) -> None:
        """The caller is gone: a sequence still live is cancelled (the engine drops it at its next step)."""
        if seq is not None and not seq.finished:
            self.runner.cancel(seq)
            self.metrics.observe_error("CANCELLED")
            log.info("request %s: cancelled by the client after %d tokens", request_id, generated)
