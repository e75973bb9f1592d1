"""The load generator behind `nextword load`: closed-loop (N workers) or open-loop (Poisson arrivals) traffic
on one asyncio loop, with latencies measured from each request's *scheduled* send time (no coordinated
omission) and the vLLM `benchmark_serving` metric set.

    result = asyncio.run(run_load(LoadConfig(target="127.0.0.1:50051", concurrency=4, num_requests=32)))
    print(result.to_dict()["output_throughput"])

Prompts are cut from a fixed English text tokenized once by the server's Tokenize, so their lengths are exact
in tokens; they are sent as token ids. Each prompt opens with a few tokens that encode its number (after the
`shared_prefix` tokens every prompt has in common), so prompts share no prefix unless asked to. Outputs use
ignore_eos, so `output_tokens` holds exactly.

Scenarios:
    plain         every request streams to its end.
    cancel-storm  a fraction of the requests (spread evenly) is cancelled after 1-5 tokens; afterwards the
                  server must still answer health and a short request.
    typist        each worker is an editor user typing lines of the text, one keystroke every `keystroke_ms`,
                  through one Session: each keystroke sends the line so far (max_lines=1); it counts the
                  keystrokes answered (a finish other than "superseded") and superseded.

Metrics (vLLM definitions): TTFT = first token - scheduled send; ITL = every gap between consecutive tokens;
TPOT = (last token - first token) / (tokens - 1) per request; E2EL = last event - scheduled send. In closed
loop the scheduled time is when the worker became free (it sends at once); in open loop it is the arrival
time, so waiting for `max_inflight` (or for a late event loop) counts in the latency.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from nextword.client.client import DEFAULT_TARGET, AsyncClient
from nextword.client.errors import NextwordError
from nextword.client.types import SessionError, SessionReconnected

SCENARIOS = ("plain", "cancel-storm", "typist")
PROTOCOLS = ("grpc", "http")  # http: an OpenAI-compatible server (client/http_load.py)
METRICS = ("ttft", "tpot", "itl", "e2el")
# Separate HTTP/2 connections per channel: channels to one target otherwise share one subchannel (one TCP
# connection) through gRPC's global subchannel pool.
CHANNEL_OPTIONS = {"grpc.use_local_subchannel_pool": 1}
WARMUP_BASE = (
    1_000_000  # warm-up prompts are numbered from here: they never share a prefix with measured ones
)
DISTINCT_PROMPTS = 2 * WARMUP_BASE  # prompt numbers spelled without wrapping around
ARRIVAL_STREAM, REQUEST_STREAM = 0, 1  # the random streams derived from the seed
RATE_WINDOW_S = 2.0  # the progress line's tok/s is averaged over this long
DRAIN_TIMEOUT_S = 60.0  # how long a closing typist session may take to end

# The fixed text prompts are cut from (original prose; one line per typist line).
FIXED_TEXT = """\
Once upon a time, in a small village nestled between the mountains, there lived an old clockmaker.
Every morning he opened the shutters of his shop and wound the hundred clocks that lined its walls.
Children stopped at his window on their way to school to watch the tiny gears turn and click.
In the evenings he repaired broken watches and told stories about the places they had travelled.
One winter a stranger arrived with a pocket watch that had stopped at exactly seven minutes past three.
The clockmaker opened the case and found, instead of gears, a folded map drawn in faded blue ink.
The map showed a path through the forest to a lake that no one in the village had ever seen.
He closed his shop for the first time in forty years, packed bread and a lantern, and set out at dawn.
The forest was quiet except for the wind in the pines and the distant sound of running water.
By noon he reached a clearing where a wooden bridge crossed a stream as clear as window glass.
On the far side stood a tower with a great clock face, its hands frozen at seven minutes past three.
He climbed the narrow stairs, oiled the rusted wheels, and with one careful push set the pendulum free.
The bells rang out across the valley, and in the village every stopped clock began to tick again.
When he came home the children were waiting at his door, asking where he had been and what he had found.
He smiled, hung the stranger's watch in the window, and began the story from the very beginning.
"""


# ---- configuration and results ----


def _span(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """A fixed length or an inclusive (low, high) range, as (low, high)."""
    low, high = (value, value) if isinstance(value, int) else tuple(value)
    if not 1 <= low <= high:
        raise ValueError(f"{name} must be >= 1 and a range low:high with low <= high (got {value!r})")
    return int(low), int(high)


@dataclass
class LoadConfig:
    """What `run_load` does. Exactly one of `concurrency` (closed loop) and `rate` (open loop) is used;
    neither means concurrency 1. The run stops after `num_requests` measured requests or `duration` seconds,
    whichever comes first (neither: 100 requests)."""

    target: str = DEFAULT_TARGET
    protocol: str = "grpc"  # or "http": target is then an OpenAI-compatible server's HOST:PORT or base URL
    concurrency: int | None = None  # closed loop: N workers, each sends when its previous request ended
    rate: float | None = None  # open loop: Poisson arrivals, requests per second
    max_inflight: int = 256  # open loop: requests in flight at most; an arrival beyond it waits (and counts)
    num_requests: int | None = None
    duration: float | None = None  # seconds of sending; requests in flight then still finish
    warmup: int = 0  # requests sent (and waited for) before the measured run; not counted
    prompt_tokens: int | tuple[int, int] = 32  # fixed, or a uniform (low, high) range
    output_tokens: int | tuple[int, int] = 32
    temperature: float = 0.0
    seed: int | None = None  # sampling seed of every request, and of the generator's own randomness
    shared_prefix: int = 0  # every prompt starts with the same tokens (exercises the prefix cache)
    scenario: str = "plain"
    cancel_fraction: float = 0.5  # cancel-storm: the fraction of requests cancelled after 1-5 tokens
    keystroke_ms: float = 50.0  # typist: time between keystrokes
    keystroke_tokens: int = 16  # typist: max_new_tokens of each keystroke's request
    channels: int | None = None  # gRPC channels, used round-robin (default min(workers, 8))
    timeout: float | None = None  # deadline of each request, in seconds
    text: str = FIXED_TEXT
    progress_interval: float = 1.0  # seconds between progress callbacks
    security: dict = field(default_factory=dict, repr=False)  # tls_ca, tls_cert, tls_key, token: Client's

    def __post_init__(self):
        if self.concurrency is not None and self.rate is not None:
            raise ValueError("give either concurrency (closed loop) or rate (open loop), not both")
        if self.rate is None and self.concurrency is None:
            self.concurrency = 1
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of requests per second")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        if self.protocol == "http" and self.scenario == "typist":
            raise ValueError("the typist scenario needs gRPC's Session: use --protocol grpc")
        if self.scenario == "typist" and self.rate is not None:
            raise ValueError("the typist scenario is closed loop: give concurrency (the number of users)")
        if self.num_requests is None and self.duration is None:
            self.num_requests = 100
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be > 0")
        self.prompt_tokens = _span(self.prompt_tokens, "prompt_tokens")
        self.output_tokens = _span(self.output_tokens, "output_tokens")
        if not 0 <= self.shared_prefix < self.prompt_tokens[0]:
            raise ValueError("shared_prefix must be >= 0 and shorter than the shortest prompt")
        if not 0 <= self.cancel_fraction <= 1:
            raise ValueError("cancel_fraction must be in [0, 1]")
        if self.max_inflight < 1 or self.warmup < 0 or self.keystroke_ms <= 0 or self.keystroke_tokens < 1:
            raise ValueError("max_inflight and keystroke_tokens must be >= 1, warmup >= 0, keystroke_ms > 0")
        if self.channels is not None and self.channels < 1:
            raise ValueError("channels must be >= 1")

    @property
    def workers(self) -> int:
        """Closed loop: the workers; open loop: the in-flight cap."""
        return self.concurrency if self.concurrency is not None else self.max_inflight

    @property
    def num_channels(self) -> int:
        return self.channels or min(self.workers, 8)


@dataclass
class Progress:
    """A snapshot handed to the `progress` callback."""

    phase: str  # "warmup", "run" or "done"
    elapsed: float  # seconds since the phase started
    done: int  # requests ended (any way)
    total: int | None  # num_requests, when set
    duration: float | None  # the configured duration, when set
    tokens_per_s: float  # tokens received per second since the previous snapshot
    errors: int
    inflight: int


@dataclass(slots=True)
class RequestRecord:
    """One measured request (typist: one keystroke). Times are time.perf_counter() seconds."""

    index: int
    request_id: str
    scheduled: float
    prompt_tokens: int
    sent: float = math.nan
    first_event: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    end: float | None = None
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    cached_prompt_tokens: int = 0
    error: str | None = None  # a gRPC status code name
    cancelled: bool = False  # cancelled by the load generator (cancel-storm)
    replica: str = ""  # the server replica that answered (x-nextword-replica), "" when unnamed or none

    @property
    def completed(self) -> bool:
        """Ended with a finish event (not an error, not cancelled by us)."""
        return self.finish_reason is not None and self.error is None and not self.cancelled

    @property
    def answered(self) -> bool:
        return self.completed and self.finish_reason not in ("superseded", "cancelled")

    def to_dict(self, start: float) -> dict:
        """Times in ms from `start`."""

        def ms(t):
            return None if t is None or math.isnan(t) else round((t - start) * 1000, 3)

        return {
            "request_id": self.request_id,
            "scheduled_ms": ms(self.scheduled),
            "sent_ms": ms(self.sent),
            "first_token_ms": ms(self.first_token),
            "end_ms": ms(self.end),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.tokens,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "cancelled": self.cancelled,
            "replica": self.replica,
        }


def _stats(name: str, seconds: np.ndarray) -> dict[str, float | None]:
    """mean/median/std/p90/p99 of a sample in ms, vLLM key names (None for an empty sample)."""
    keys = [f"{s}_{name}_ms" for s in ("mean", "median", "std", "p90", "p99")]
    if seconds.size == 0:
        return dict.fromkeys(keys)
    ms = seconds * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    values = (ms.mean(), p50, ms.std(), p90, p99)
    return {k: round(float(v), 4) for k, v in zip(keys, values, strict=True)}


@dataclass
class LoadResult:
    config: LoadConfig
    model_id: str
    start: float  # perf_counter() when the measured run began
    duration: float  # from the start to the end of the last request
    records: list[RequestRecord]
    max_inflight_hits: int = 0  # open loop: arrivals that found max_inflight requests in flight
    unsent: int = 0  # open loop: arrivals still waiting for a slot when the duration ran out
    healthy_after: bool | None = None  # cancel-storm: health and a short request worked afterwards
    health_after: str | None = None  # the health status seen afterwards
    reconnects: int = 0  # typist: Sessions that moved to another replica (their replica drained or died)

    @property
    def completed(self) -> list[RequestRecord]:
        return [r for r in self.records if r.completed]

    @property
    def replicas(self) -> dict[str, dict[str, int]]:
        """Per replica (by the name it gives itself): the requests it answered, and how many of them then
        failed (its stream broke). Requests that failed before any response named a replica are not here."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            if r.replica:
                counts = out.setdefault(r.replica, {"requests": 0, "failed": 0})
                counts["requests"] += 1
                counts["failed"] += r.error is not None
        return dict(sorted(out.items()))

    @property
    def errors(self) -> dict[str, int]:
        return dict(Counter(r.error for r in self.records if r.error is not None).most_common())

    def count(self, what: str) -> int:
        """How many requests were "cancelled", "answered" or "superseded"."""
        if what == "cancelled":
            return sum(r.cancelled for r in self.records)
        if what == "answered":
            return sum(r.answered for r in self.records)
        return sum(r.completed and r.finish_reason == what for r in self.records)

    def samples(self, metric: str) -> np.ndarray:
        """The latency sample of "ttft", "tpot", "itl", "e2el" or "ttfe" (time to first event), in seconds.

        TTFT and ITL include requests cancelled by the load generator or superseded (their first tokens are
        real); TPOT and E2EL only requests that ran to their end (answered)."""
        rs = self.records
        if metric == "ttft":
            x = [r.first_token - r.scheduled for r in rs if r.error is None and r.first_token is not None]
        elif metric == "ttfe":
            x = [r.first_event - r.scheduled for r in rs if r.error is None and r.first_event is not None]
        elif metric == "itl":
            x = [gap for r in rs if r.error is None for gap in r.itl]
        elif metric == "tpot":
            x = [(r.last_token - r.first_token) / (r.tokens - 1) for r in rs if r.answered and r.tokens > 1]
        elif metric == "e2el":
            x = [r.end - r.scheduled for r in rs if r.answered]
        else:
            raise ValueError(f"unknown metric {metric!r}")
        return np.asarray(x, dtype=np.float64)

    def to_dict(self, detailed: bool = False) -> dict:
        """One flat JSON-ready dict, with vLLM benchmark_serving key names where they exist (`detailed` adds
        the per-request records)."""
        c = self.config
        completed = self.completed
        input_tokens = sum(r.prompt_tokens for r in completed)
        output_tokens = sum(r.tokens for r in completed)
        duration = self.duration or math.nan
        lags = np.asarray([r.sent - r.scheduled for r in self.records if not math.isnan(r.sent)])
        out = {
            "target": c.target,
            "model_id": self.model_id,
            "scenario": c.scenario,
            "concurrency": c.concurrency,
            "rate": c.rate,
            "max_inflight": c.max_inflight if c.rate is not None else None,
            "protocol": c.protocol,
            "channels": c.num_channels if c.protocol == "grpc" else None,
            "duration": round(self.duration, 4),
            "sent": len(self.records),
            "completed": len(completed),
            "failed": sum(self.errors.values()),
            "errors": self.errors,
            "replicas": self.replicas,
            "reconnects": self.reconnects,
            "cancelled": self.count("cancelled"),
            "answered": self.count("answered"),
            "superseded": self.count("superseded"),
            "total_input_tokens": input_tokens,
            "total_output_tokens": output_tokens,
            "cached_prompt_tokens": sum(r.cached_prompt_tokens for r in self.records),
            "request_throughput": round(len(completed) / duration, 4) if self.duration else 0.0,
            "output_throughput": round(output_tokens / duration, 4) if self.duration else 0.0,
            "total_token_throughput": round((input_tokens + output_tokens) / duration, 4)
            if self.duration
            else 0.0,
        }
        for metric in METRICS:
            out |= _stats(metric, self.samples(metric))
        if c.scenario == "typist":
            out |= _stats("ttfe", self.samples("ttfe"))
        out |= {
            "mean_send_lag_ms": round(float(lags.mean()) * 1000, 4) if lags.size else None,
            "max_send_lag_ms": round(float(lags.max()) * 1000, 4) if lags.size else None,
            "max_inflight_hits": self.max_inflight_hits,
            "unsent": self.unsent,
            "warmup": c.warmup,
            "prompt_tokens": list(c.prompt_tokens),
            "output_tokens": list(c.output_tokens),
            "shared_prefix": c.shared_prefix,
            "temperature": c.temperature,
            "seed": c.seed,
            "healthy_after": self.healthy_after,
        }
        if detailed:
            out["requests"] = [r.to_dict(self.start) for r in self.records]
        return out


# ---- prompts ----


class PromptMaker:
    """Token-id prompts of exact lengths, cut from the tokenized text.

    A prompt is: the tokenizer's leading special tokens (a BOS, when it adds one) and the text's first tokens
    up to `shared` tokens in all; then a few tokens that spell the prompt's number (base len(pool), least
    significant digit first, taken from the text's distinct tokens), so two prompts differ right after the
    shared part (prompts whose numbers are equal modulo len(pool) share one more token); then the text,
    continued, up to the length. The text repeats when a prompt is longer than it.
    """

    def __init__(self, lead: Sequence[int], body: Sequence[int], shared: int):
        if not body:
            raise ValueError("the prompt text tokenized to nothing")
        self.lead, self.body = list(lead), list(body)
        self.shared = max(shared, len(self.lead))  # the BOS is shared whatever `shared` says
        self.pool = list(dict.fromkeys(self.body))  # distinct ids, first occurrence first
        if len(self.pool) < 2:
            raise ValueError("the prompt text needs at least two distinct tokens")
        self.digits = math.ceil(math.log(DISTINCT_PROMPTS) / math.log(len(self.pool)))

    def text_ids(self, length: int) -> list[int]:
        """The lead and the text, repeated as needed, `length` ids."""
        ids = list(self.lead)
        while len(ids) < length:
            ids += self.body
        return ids[:length]

    def header(self, number: int) -> list[int]:
        base, out = len(self.pool), []
        for _ in range(self.digits):
            number, digit = divmod(number, base)
            out.append(self.pool[digit])
        return out

    def make(self, number: int, length: int) -> list[int]:
        text = self.text_ids(length + self.digits)
        head = text[: self.shared] + self.header(number)
        return (head + text[len(head) :])[:length]


# ---- the run ----


def arrival_offsets(rate: float, entropy: int) -> Iterator[float]:
    """Poisson arrival times in seconds from the start (the first at 0), `rate` per second on average."""
    rng = np.random.default_rng([entropy, ARRIVAL_STREAM])
    t = 0.0
    while True:
        yield t
        t += float(rng.exponential(1.0 / rate))


def _draw(rng: np.random.Generator, span: tuple[int, int]) -> int:
    low, high = span
    return low if low == high else int(rng.integers(low, high + 1))


class _Runner:
    def __init__(self, config: LoadConfig, progress: Callable[[Progress], None] | None):
        self.c = config
        self.progress = progress
        # every random choice derives from (entropy, stream, number): the same seed, the same load
        self.entropy = np.random.SeedSequence(config.seed).entropy
        self.clients: list[AsyncClient] = []
        self.prompts: PromptMaker | None = None
        self.lines: list[str] = [line for line in config.text.splitlines() if line.strip()]
        self.phase = "warmup"
        self.phase_start = time.perf_counter()
        self.deadline = math.inf
        self.limit: int | None = None
        self.issued = 0  # request numbers handed out in this phase
        self.done = 0
        self.errors = 0
        self.inflight = 0
        self.tokens = 0  # tokens received (any phase): the progress line's tok/s
        self.run_tokens = 0  # tokens received in the measured run
        self.records: list[RequestRecord] = []
        self.max_inflight_hits = 0
        self.unsent = 0
        self.reconnects = 0  # typist sessions that moved to another replica

    # -- set-up --

    async def open(self) -> str:
        c = self.c
        if c.protocol == "http":
            from nextword.client.http_load import HttpClient

            self.clients = [HttpClient(c.target, connections=c.workers)]
        else:
            self.clients = [
                AsyncClient(c.target, options=CHANNEL_OPTIONS, **c.security) for _ in range(c.num_channels)
            ]
        first = self.clients[0]
        info = await first.model_info(timeout=30)
        needed = c.prompt_tokens[1] + (c.keystroke_tokens if c.scenario == "typist" else c.output_tokens[1])
        if c.scenario != "typist" and needed > info.context_length:
            raise ValueError(f"prompt + output tokens ({needed}) exceed the context ({info.context_length})")
        if c.scenario != "typist" or c.warmup:
            # the special tokens the tokenizer adds (a BOS first, maybe an EOS last) lead every prompt / go
            ids = list((await first.tokenize(c.text, timeout=30)).ids)
            special = {t.id for t in info.special_tokens}
            start = next((i for i, t in enumerate(ids) if t not in special), len(ids))
            end = len(ids)
            while end > start and ids[end - 1] in special:
                end -= 1
            self.prompts = PromptMaker(ids[:start], ids[start:end], c.shared_prefix)
        return info.model_id

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients))

    def _sampling(self) -> dict:
        return {"temperature": self.c.temperature, "seed": self.c.seed}

    def _request_rng(self, number: int) -> np.random.Generator:
        return np.random.default_rng([self.entropy, REQUEST_STREAM, number])

    # -- bookkeeping --

    def _begin(self, phase: str, limit: int | None, duration: float | None) -> None:
        self.phase, self.limit = phase, limit
        self.phase_start = time.perf_counter()
        self.deadline = self.phase_start + duration if duration else math.inf
        self.issued = self.done = self.errors = 0

    def _take_number(self) -> int | None:
        """The next request number of this phase, or None when the phase is over."""
        if (self.limit is not None and self.issued >= self.limit) or time.perf_counter() >= self.deadline:
            return None
        self.issued += 1
        return self.issued - 1

    def _cancels(self, number: int) -> bool:
        """cancel-storm: the cancelled requests are spread evenly, floor(n * fraction) of the first n."""
        f = self.c.cancel_fraction
        return self.c.scenario == "cancel-storm" and math.floor((number + 1) * f) > math.floor(number * f)

    async def _report(self) -> None:
        """A snapshot every interval; tok/s over the last RATE_WINDOW_S seconds (tokens come in bursts)."""
        window = max(RATE_WINDOW_S, self.c.progress_interval)
        samples = deque([(time.perf_counter(), self.tokens)])
        while True:
            await asyncio.sleep(self.c.progress_interval)
            now, tokens = time.perf_counter(), self.tokens
            while len(samples) > 1 and samples[1][0] <= now - window:
                samples.popleft()
            then, tokens_then = samples[0]
            samples.append((now, tokens))
            self._snapshot((tokens - tokens_then) / (now - then))

    def _snapshot(self, tokens_per_s: float, phase: str | None = None) -> None:
        elapsed = time.perf_counter() - self.phase_start
        duration = self.c.duration if self.phase == "run" else None
        self.progress(
            Progress(
                phase or self.phase,
                elapsed,
                self.done,
                self.limit,
                duration,
                tokens_per_s,
                self.errors,
                self.inflight,
            )
        )

    # -- one Generate request --

    async def _request(
        self, number: int, request_id: str, scheduled: float, record: bool, cancel: bool = False
    ) -> None:
        """One streamed request; with `cancel`, cancelled after 1-5 tokens."""
        c = self.c
        rng = self._request_rng(number)
        length = _draw(rng, c.prompt_tokens)
        max_new = _draw(rng, c.output_tokens)
        cancel_after = int(rng.integers(1, 6)) if cancel else None
        prompt = self.prompts.make(number, length)
        rec = RequestRecord(number, request_id, scheduled, length)
        if record:
            self.records.append(rec)
        client = self.clients[number % len(self.clients)]
        self.inflight += 1
        rec.sent = time.perf_counter()
        stream = client.generate(
            prompt,
            max_new_tokens=max_new,
            request_id=request_id,
            timeout=c.timeout,
            ignore_eos=True,
            **self._sampling(),
        )
        itl, last, n = rec.itl, 0.0, 0
        try:
            async for event in stream:
                now = time.perf_counter()
                if event.token is not None:
                    if n:
                        itl.append(now - last)
                    else:
                        rec.first_event = rec.first_token = now
                        rec.replica = event.replica
                    last = now
                    n += 1
                    self.tokens += 1  # as they arrive: the progress line's tok/s is live
                    if n == cancel_after:
                        rec.cancelled = True
                        break
                if event.finish is not None:
                    rec.finish_reason = event.finish.reason
                    rec.cached_prompt_tokens = event.finish.usage.cached_prompt_tokens
        except NextwordError as e:
            rec.error = e.code_name
            self.errors += 1
        finally:
            await stream.aclose()  # cancels the RPC when we left early
            rec.end = time.perf_counter()
            rec.tokens = n
            rec.last_token = last if n else None
            self.inflight -= 1
            self.done += 1

    # -- the phases --

    async def _closed_loop(self, workers: int, prefix: str, record: bool, base: int = 0) -> None:
        async def worker():
            while (number := self._take_number()) is not None:
                cancel = record and self._cancels(number)
                await self._request(base + number, f"{prefix}-{number}", time.perf_counter(), record, cancel)

        await asyncio.gather(*(worker() for _ in range(workers)))

    async def _open_loop(self) -> None:
        c = self.c
        slots = asyncio.Semaphore(c.max_inflight)
        tasks: set[asyncio.Task] = set()
        arrivals = arrival_offsets(c.rate, self.entropy)
        scheduled = self.phase_start + next(arrivals)
        number = 0
        while (c.num_requests is None or number < c.num_requests) and scheduled < self.deadline:
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots.locked():
                self.max_inflight_hits += 1
                if math.isinf(self.deadline):
                    await slots.acquire()
                else:
                    try:
                        await asyncio.wait_for(slots.acquire(), self.deadline - time.perf_counter())
                    except asyncio.TimeoutError:
                        self._count_unsent(scheduled, number, arrivals)
                        break
            else:
                await slots.acquire()
            task = asyncio.create_task(
                self._request(number, f"load-{number}", scheduled, True, self._cancels(number))
            )
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
            number += 1
            scheduled = self.phase_start + next(arrivals)
        if tasks:
            await asyncio.gather(*tasks)

    def _count_unsent(self, scheduled: float, number: int, arrivals: Iterator[float]) -> None:
        """Arrivals due before the end of the duration that never got a slot."""
        while scheduled < self.deadline and (self.c.num_requests is None or number < self.c.num_requests):
            self.unsent += 1
            number += 1
            scheduled = self.phase_start + next(arrivals)

    async def _typist(self, user: int, workers: int, start: float) -> None:
        """One editor user: types lines of the text through one Session, one keystroke per interval."""
        c = self.c
        interval = c.keystroke_ms / 1000.0
        client = self.clients[user % len(self.clients)]
        session = client.session()
        pending: dict[str, RequestRecord] = {}
        failed: list[str] = []

        async def read():
            try:
                async for item in session:
                    now = time.perf_counter()
                    if isinstance(item, SessionReconnected):
                        self.reconnects += 1
                        for request_id in item.superseded:  # as the server would have said
                            if (old := pending.get(request_id)) is not None:
                                old.finish_reason, old.end = "superseded", now
                                self._keystroke_done(pending, old)
                        if (rec := pending.get(item.request_id)) is not None:  # it starts over
                            rec.first_token = rec.last_token = None
                            rec.tokens, rec.itl = 0, []
                        continue
                    rec = pending.get(item.request_id)
                    if rec is None:
                        continue
                    if rec.first_event is None:
                        rec.first_event = now
                    if isinstance(item, SessionError):
                        rec.replica = session.replica
                        rec.error, rec.end = item.code_name, now
                        self.errors += 1
                        self._keystroke_done(pending, rec)
                        continue
                    rec.replica = item.replica
                    if item.token is not None:
                        if rec.tokens:
                            rec.itl.append(now - rec.last_token)
                        else:
                            rec.first_token = now
                        rec.last_token = now
                        rec.tokens += 1
                        self.tokens += 1
                    if item.finish is not None:
                        rec.finish_reason, rec.end = item.finish.reason, now
                        rec.prompt_tokens = item.finish.usage.prompt_tokens
                        rec.cached_prompt_tokens = item.finish.usage.cached_prompt_tokens
                        self._keystroke_done(pending, rec)
            except NextwordError as e:  # the whole session failed: every keystroke still open failed with it
                failed.append(e.code_name)
                for rec in list(pending.values()):
                    rec.error, rec.end = e.code_name, time.perf_counter()
                    self.errors += 1
                    self._keystroke_done(pending, rec)

        reader = asyncio.create_task(read())
        keystrokes = 0
        line_number = user
        try:
            while not failed:
                line = self.lines[line_number % len(self.lines)]
                context = self.lines[(line_number - 1) % len(self.lines)] + "\n" if line_number else ""
                for typed in range(1, len(line) + 1):
                    number = self._take_number()
                    if number is None or failed:
                        return
                    scheduled = start + keystrokes * interval
                    keystrokes += 1
                    delay = scheduled - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    rec = RequestRecord(number, f"typist-{user}-{keystrokes}", scheduled, 0)
                    self.records.append(rec)
                    pending[rec.request_id] = rec
                    self.inflight += 1
                    rec.sent = time.perf_counter()
                    try:
                        await session.send(
                            context + line[:typed],
                            request_id=rec.request_id,
                            max_new_tokens=c.keystroke_tokens,
                            max_lines=1,
                            **self._sampling(),
                        )
                    except (NextwordError, RuntimeError):  # the session ended: the reader reports it
                        await asyncio.wait([reader], timeout=1.0)
                        if rec.request_id in pending:
                            rec.error = failed[0] if failed else "UNKNOWN"
                            self.errors += 1
                            self._keystroke_done(pending, rec)
                        return
                line_number += workers
        finally:
            try:
                await asyncio.wait_for(session.close(), DRAIN_TIMEOUT_S)
            except NextwordError:
                pass  # the reader has counted it
            except asyncio.TimeoutError:
                session.cancel()
            await reader
            for rec in list(pending.values()):  # never answered nor superseded: counted as such
                rec.error = "NO_ANSWER"
                self.errors += 1
                self._keystroke_done(pending, rec)

    def _keystroke_done(self, pending: dict[str, RequestRecord], rec: RequestRecord) -> None:
        if pending.pop(rec.request_id, None) is not None:
            self.inflight -= 1
            self.done += 1

    async def _probe_health(self) -> tuple[bool, str]:
        """After a cancel storm: health is SERVING (or not implemented) and a 4-token request completes."""
        client = self.clients[0]
        try:
            status = await client.health(timeout=10)
        except NextwordError as e:
            status = e.code_name
        tokens = 0
        try:
            async for event in client.generate(
                self.prompts.make(WARMUP_BASE - 1, self.c.prompt_tokens[0]),
                max_new_tokens=4,
                ignore_eos=True,
                temperature=0.0,
                timeout=60,
            ):
                tokens += event.token is not None
        except NextwordError:
            return False, status
        return tokens == 4 and status in ("SERVING", "UNIMPLEMENTED"), status

    async def run(self) -> LoadResult:
        c = self.c
        reporter = None
        try:
            model_id = await self.open()
            if self.progress:
                reporter = asyncio.create_task(self._report())
            if c.warmup:
                self._begin("warmup", c.warmup, None)
                await self._closed_loop(min(c.warmup, c.workers, 8), "warmup", False, WARMUP_BASE)
            self._begin("run", c.num_requests, c.duration)
            start, tokens_before = self.phase_start, self.tokens
            if c.scenario == "typist":
                workers = c.concurrency
                await asyncio.gather(
                    *(
                        self._typist(u, workers, start + u * c.keystroke_ms / 1000 / workers)
                        for u in range(workers)
                    )
                )
            elif c.rate is not None:
                await self._open_loop()
            else:
                await self._closed_loop(c.concurrency, "load", True)
            self.run_tokens = self.tokens - tokens_before
            duration = max([start, *(r.end for r in self.records if r.end is not None)]) - start
            result = LoadResult(
                c, model_id, start, duration, self.records, self.max_inflight_hits, self.unsent
            )
            result.reconnects = self.reconnects
            if c.scenario == "cancel-storm":
                result.healthy_after, result.health_after = await self._probe_health()
        finally:
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
            await self.close()
        if self.progress:  # the last line: the whole run's average rate
            self._snapshot(self.run_tokens / max(time.perf_counter() - self.phase_start, 1e-9), "done")
        return result


async def run_load(config: LoadConfig, progress: Callable[[Progress], None] | None = None) -> LoadResult:
    """Run the load described by `config` against `config.target` and return what was measured.

    `progress`, when given, is called with a Progress snapshot every `config.progress_interval` seconds and
    once at the end (phase "done"). Failed requests are counted by gRPC status code, never raised; a server
    that cannot be reached for ModelInfo / Tokenize raises its NextwordError.
    """
    return await _Runner(config, progress).run()


# ---- reporting ----


def format_progress(p: Progress) -> str:
    """One progress line: requests done / total (or elapsed / duration), tok/s, errors, in flight."""
    if p.total is not None:
        done = f"{p.done}/{p.total} requests"
    else:
        done = f"{p.done} requests"
    if p.duration is not None:
        done += f", {min(p.elapsed, p.duration):.0f}/{p.duration:.0f} s"
    else:
        done += f", {p.elapsed:.0f} s"
    return f"[{p.phase}] {done}  {p.tokens_per_s:.1f} tok/s  {p.errors} errors  {p.inflight} in flight"


def format_result(d: dict) -> str:
    """The final table, from `LoadResult.to_dict()`."""
    if d["rate"] is not None:
        load = f"open loop, {d['rate']:g} req/s (Poisson), at most {d['max_inflight']} in flight"
    else:
        load = f"closed loop, concurrency {d['concurrency']}"
    requests = f"{d['sent']} sent, {d['completed']} completed, {d['failed']} failed"
    if d["scenario"] == "cancel-storm":
        requests += f", {d['cancelled']} cancelled"
    if d["scenario"] == "typist":
        requests += f", {d['answered']} answered, {d['superseded']} superseded"
    tokens = f"{d['total_input_tokens']} input ({d['cached_prompt_tokens']} cached)"
    tokens += f", {d['total_output_tokens']} output"
    header = f"target {d['target']}  model {d['model_id']}  scenario {d['scenario']}  {load}"
    lines = [
        f"{header}  " + (f"{d['channels']} channel(s)" if d["channels"] else d["protocol"]),
        f"{'duration':<24}{d['duration']:.2f} s",
        f"{'requests':<24}{requests}",
        f"{'request throughput':<24}{d['request_throughput']:.2f} req/s",
        f"{'output throughput':<24}{d['output_throughput']:.1f} tok/s",
        f"{'tokens':<24}{tokens}",
    ]
    if d["max_inflight_hits"] or d["unsent"]:
        lines.append(f"{'max-inflight hits':<24}{d['max_inflight_hits']} ({d['unsent']} never sent)")
    if d["mean_send_lag_ms"] is not None:
        lines.append(
            f"{'send lag':<24}mean {d['mean_send_lag_ms']:.2f} ms, max {d['max_send_lag_ms']:.2f} ms"
        )
    if d["errors"]:
        lines.append(f"{'errors':<24}" + ", ".join(f"{code} {n}" for code, n in d["errors"].items()))
    if len(d["replicas"]) > 1:  # several replicas answered: how the load spread over them
        spread = ", ".join(
            f"{name} {n['requests']}" + (f" ({n['failed']} failed)" if n["failed"] else "")
            for name, n in d["replicas"].items()
        )
        lines.append(f"{'requests per replica':<24}{spread}")
    if d["reconnects"]:
        lines.append(f"{'session reconnects':<24}{d['reconnects']}")
    if d["healthy_after"] is not None:
        lines.append(f"{'healthy afterwards':<24}{'yes' if d['healthy_after'] else 'NO'}")
    columns = ("mean", "median", "p90", "p99", "std")
    lines.append(f"{'(ms)':<8}" + "".join(f"{c:>10}" for c in columns))
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E", "ttfe": "TTFE"}
    for metric in (*METRICS, "ttfe"):
        if f"mean_{metric}_ms" not in d:
            continue
        cells = (d[f"{c}_{metric}_ms"] for c in columns)
        lines.append(
            f"{names[metric]:<8}" + "".join(f"{'-':>10}" if v is None else f"{v:>10.2f}" for v in cells)
        )
    return "\n".join(lines)
