"""The engine: owns the model and its KV cache, and advances every live sequence one step at a time.

Each `step()` admits waiting requests, runs one forward pass over all scheduled sequences together (prompt
chunks and single decode tokens in one ragged batch), samples per sequence, checks the stop conditions and
hands each sequence its output. A step's size is set in time (max_step_s, from the measured costs), since
every decoding stream waits for the whole step; sequences whose reader is behind are paused. Callers on
other threads `submit()` requests and `cancel()` them; only the thread that calls `step()` touches the
model. A scoring request (`submit(..., score_from=N)`) is a prompt pass that asks for the logits of every
position and returns each prompt token's log-probability: no sampling. `generate()`,
`next_token_probabilities()` and `score()` are the in-process conveniences: submit, then step until done.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nextword.kernels.model import Batch, Model
from nextword.kernels.softmax import log_softmax, token_logprobs
from nextword.server.kv_cache import BlockPool, block_keys
from nextword.server.memory import release_freed_memory
from nextword.server.sampling import (
    InvalidParameter,
    SampledToken,
    Sampler,
    SamplingParams,
    TokenProb,
    sample_rows,
    top_n_probs,
)
from nextword.server.tokenizer import IncrementalDecoder, Tokenizer
from nextword.weights.loader import load_checkpoint


@dataclass(frozen=True)
class Finish:
    """How a generation ended, with its usage counts and timings (seconds)."""

    reason: str  # length | eos | stop (a stop string) | stop_token | time | lines | cancelled | superseded
    # | scored (a scoring request)
    stop: str | None  # the matched stop string, or the text of the stop token
    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose K/V came from the prefix cache
    seed: int
    queue_s: float  # submitted -> first scheduled
    prefill_s: float  # first scheduled -> prompt processed
    ttft_s: float  # submitted -> first token
    mean_itl_s: float  # mean time between tokens after the first


@dataclass(frozen=True)
class Step:
    """One generated token (or, for a cancelled generation, none) and the text it completes."""

    token: SampledToken | None
    text: str  # text delta; empty while a UTF-8 character is incomplete or a stop string may be starting
    finish: Finish | None = None  # set on the last step


@dataclass(frozen=True)
class Distribution:
    """The next-token distribution after a prompt (no sampling)."""

    top: tuple[TokenProb, ...]  # the top-N, most likely first
    logprobs: np.ndarray  # [V] float32, the whole vocabulary
    prompt_tokens: int


@dataclass(frozen=True)
class Scores:
    """The log-probability of each prompt token from `first` on, given the tokens before it (no sampling)."""

    first: int  # index in the prompt of the first scored token (>= 1: the first token has no context)
    token_ids: np.ndarray  # [N] int64, prompt_ids[first:]
    logprobs: np.ndarray  # [N] float64, log p(token | the tokens before it), plain softmax of the logits
    ranks: np.ndarray  # [N] int64, 1 + the number of tokens the model found more likely
    top: tuple[tuple[TokenProb, ...], ...]  # per scored token its top-N alternatives, when top_n > 0
    finish: Finish  # reason "scored": usage and timings


@dataclass(eq=False)
class Sequence:
    """A request as the engine tracks it."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler | None  # None for a probabilities-only or scoring request
    on_output: Callable[[Step | Distribution | Scores | Exception], None] | None  # None once finished
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    num_cached: int = 0  # leading tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # prefix keys of the full blocks registered so far
    cached_prompt_tokens: int = 0
    decoder: IncrementalDecoder | None = None
    text: str = ""  # generated text so far (stop strings already cut off)
    emitted: int = 0  # characters of `text` handed out
    score_from: int = 0  # > 0: a scoring request; the index of the first prompt token to score
    scored: list = field(default_factory=list)  # scoring: (logprobs, ranks, tops) per step
    cancelled: str | None = None  # set (to the finish reason) by cancel(), acted on at the next step
    queued: bool = False  # counted against max_queue: submitted, not yet admitted nor cancelled
    paused_at: float | None = (
        None  # set by pause(): not scheduled until resume(), cancelled if paused too long
    )
    finished: bool = False
    submitted_at: float = 0.0
    scheduled_at: float | None = None
    prefilled_at: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)


MIN_MEASURED = 16  # steps of at least this many tokens measure the cost of a token
MIN_PROMPT_CHUNK = 8  # prompt tokens a step takes even when decoding alone fills its time budget
MAX_SCORE_ROWS = 256  # prompt tokens of a scoring request per step: bounds its logits ([rows, V] float32)
REUSED_LOGITS_ROWS = 64  # steps of up to this many logits rows (12 MiB at vocab 49152) reuse one buffer


class QueueFull(Exception):
    """Too many requests are waiting for admission; the caller should retry later."""


class Engine:
    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        kv_cache_tokens: int = 16384,
        kv_cache_dtype: str = "auto",
        block_size: int = 16,
        max_batch_tokens: int = 1024,
        max_step_s: float | None = 0.2,  # None: steps sized in tokens only (max_batch_tokens)
        max_top_n: int = 20,
        max_queue: int = 256,
        max_paused_s: float = 60.0,
        model_id: str = "",
        weights_format: str = "f32",
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.weights_format = weights_format  # as loaded: f32, int8 or q4
        self.config = model.config
        self.clock = clock  # seconds: timings, max_time_s deadlines, step costs (tests inject their own)
        self.max_context = model.max_positions
        self.max_batch_tokens, self.max_top_n, self.max_queue = max_batch_tokens, max_top_n, max_queue
        # A step's work is sized in time, not only in tokens: every decoding stream waits for the whole step
        # (1,024 prompt tokens are ~3 s here). The cost of a token is measured on the steps themselves.
        self.max_step_s = max_step_s
        self.max_paused_s = max_paused_s
        # Cost model of a step: step_base_s (weights read, per-step work) + tokens x seconds_per_token,
        # moving averages over small steps and over steps of at least MIN_MEASURED tokens.
        self.step_base_s = 0.0
        self.seconds_per_token: float | None = None
        self.measured_tokens = 0  # tokens of the latest step that measured seconds_per_token
        num_blocks = -(-kv_cache_tokens // block_size)
        if kv_cache_dtype == "auto":  # f16 halves what long-context attention reads (llama.cpp's default);
            # f32 weights keep an f32 cache, so that their results stay equal to transformers'
            kv_cache_dtype = "f32" if weights_format == "f32" else "f16"
        self.cache = model.new_cache(num_blocks, block_size, kv_cache_dtype)
        self.blocks = BlockPool(num_blocks, block_size)
        # running totals, read by the metrics
        self.steps = 0
        self.prefix_hit_tokens = 0
        self.generated_tokens = 0
        self.last_batch = (0, 0)  # (sequences, tokens) of the latest step
        self.steps_by_sequences: Counter[int] = Counter()  # sequences in a step -> steps that ran that many
        self.finishes: Counter[str] = Counter()  # finish reason -> sequences that ended so
        self.eos_ids = frozenset(self.config.eos_token_ids) | tokenizer.eos_token_ids
        # Submitted by other threads, taken at the next step. `_queued` counts the submitted sequences not yet
        # admitted nor cancelled: a cancelled request (a superseded Session request) frees its place at once.
        self._lock = threading.Lock()
        self._incoming: list[Sequence] = []
        self._queued = 0
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._ids = itertools.count()
        self._cancel_all: str | None = None  # set by cancel_all(), acted on at the next step
        self._logits: np.ndarray | None = None  # [rows, V] float32, reused step after step (_logits_out)

    @classmethod
    def load(cls, folder: str | Path, weights: str = "f32", **kwargs) -> Engine:
        """An engine on the Hugging Face model in `folder`, its matmul weights in format `weights`
        (f32, int8 or q4: see nextword.weights.quantize)."""
        folder = Path(folder)
        checkpoint = load_checkpoint(folder, weights)
        gc.collect()
        release_freed_memory()  # the float32 originals of quantized weights
        model = Model(checkpoint, kwargs.pop("max_context", None))
        model_id = kwargs.pop("model_id", folder.name)
        return cls(model, Tokenizer(folder), model_id=model_id, weights_format=weights, **kwargs)

    # ---- requests (any thread) ----

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[Step | Distribution | Exception], None],
        *,
        request_id: str | None = None,
        probs_only: bool = False,
        score_from: int = 0,
    ) -> Sequence:
        """Validate and queue a request; `on_output` is called from the engine thread with each output.
        `score_from` > 0 makes it a scoring request: one Scores output for prompt_ids[score_from:].
        Raises InvalidParameter for a request that can never be served, QueueFull when too many wait."""
        if score_from:
            if len(prompt_ids) < 2:
                raise InvalidParameter("prompt", "scoring needs at least 2 tokens (the first has no context)")
            if not 1 <= score_from < len(prompt_ids):
                raise InvalidParameter("score_from", f"score_from must be in [1, {len(prompt_ids)})")
        self.validate(prompt_ids, params, probs_only or bool(score_from))
        seq = Sequence(
            id=request_id or f"req-{next(self._ids)}",
            prompt_ids=list(prompt_ids),
            params=params,
            sampler=None if probs_only or score_from else Sampler(params, self.config.vocab_size, prompt_ids),
            on_output=on_output,
            tokens=list(prompt_ids),
            score_from=score_from,
            submitted_at=self.clock(),
        )
        if seq.sampler is not None:
            seq.decoder = IncrementalDecoder(self.tokenizer, prompt_ids)
        with self._lock:
            if self._queued >= self.max_queue:
                raise QueueFull(
                    f"{self._queued} requests are already waiting (the queue holds {self.max_queue})"
                )
            self._queued += 1
            seq.queued = True
            self._incoming.append(seq)
        return seq

    def validate(self, prompt_ids: list[int], params: SamplingParams, probs_only: bool = False) -> None:
        """Raise InvalidParameter naming the first field that cannot be served."""
        V = self.config.vocab_size
        if not prompt_ids:
            raise InvalidParameter("prompt", "prompt is empty: give text or at least one token id")
        bad = next((t for t in prompt_ids if not 0 <= t < V), None)
        if bad is not None:
            raise InvalidParameter("prompt", f"token id {bad} is outside the vocabulary [0, {V})")
        params.validate(V, self.max_top_n)
        new = 0 if probs_only else params.max_new_tokens
        limit = min(self.max_context, self.blocks.num_blocks * self.blocks.block_size)
        if len(prompt_ids) + new > limit:
            field_name = "prompt" if probs_only else "max_new_tokens"
            raise InvalidParameter(
                field_name,
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({new}) = {len(prompt_ids) + new} "
                f"exceeds the context of {limit} tokens",
            )

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop a sequence at the next step (safe from any thread); it finishes with `reason`."""
        seq.cancelled = seq.cancelled or reason
        self._unqueue(seq)

    def pause(self, seq: Sequence) -> None:
        """Stop scheduling a sequence (its reader is behind), keeping its cache; safe from any thread."""
        if seq.paused_at is None:
            seq.paused_at = self.clock()

    def resume(self, seq: Sequence) -> None:
        seq.paused_at = None

    @property
    def paused_sequences(self) -> int:
        return sum(s.paused_at is not None for s in self._running)

    def cancel_all(self, reason: str = "cancelled") -> None:
        """Stop every live sequence at the next step (safe from any thread): the end of a drain."""
        self._cancel_all = reason

    def _unqueue(self, seq: Sequence) -> None:
        """The sequence no longer counts against max_queue (admitted, cancelled or finished)."""
        with self._lock:
            if seq.queued:
                seq.queued = False
                self._queued -= 1

    @property
    def waiting_sequences(self) -> int:
        """Requests waiting for admission (cancelled ones excluded: they are gone at the next step)."""
        return self._queued

    @property
    def running_sequences(self) -> int:
        return len(self._running)

    @property
    def live_sequences(self) -> int:
        return len(self._running) + len(self._waiting) + len(self._incoming)

    def sequences(self) -> list[Sequence]:
        """The live sequences, running, waiting or just submitted (a snapshot, from any thread)."""
        return [*self._running, *self._waiting, *self._incoming]

    def has_work(self) -> bool:
        return self.live_sequences > 0

    # ---- the step (engine thread only) ----

    def step(self) -> int:
        """Advance every live sequence by one step; returns how many tokens went through the model."""
        self.steps += 1
        self._take_incoming()
        now = self.clock()
        cancel_all, self._cancel_all = self._cancel_all, None
        for seq in list(itertools.chain(self._running, self._waiting)):
            seq.cancelled = seq.cancelled or cancel_all
            if seq.cancelled:
                self._finish(seq, seq.cancelled, None, token=None)
            elif seq.params.max_time_s and now - seq.submitted_at >= seq.params.max_time_s:
                self._finish(seq, "time", None, token=None)
            elif seq.paused_at is not None and now - seq.paused_at >= self.max_paused_s:
                self._finish(seq, "cancelled", None, token=None)  # its client stopped reading
        self._admit()
        # Decoding sequences first (one token each), then prompt chunks within the step's budget.
        scheduled = [
            (s, 1) for s in self._running if s.num_cached >= len(s.prompt_ids) and s.paused_at is None
        ]
        decode_tokens = len(scheduled)
        budget = min(
            max(self.step_tokens() - decode_tokens, MIN_PROMPT_CHUNK), self.max_batch_tokens - decode_tokens
        )
        for seq in self._running:
            if seq.num_cached < len(seq.prompt_ids) and budget > 0:
                chunk = min(
                    len(seq.tokens) - seq.num_cached, budget, MAX_SCORE_ROWS if seq.score_from else budget
                )
                budget -= chunk
                scheduled.append((seq, chunk))
        if not scheduled:
            self.last_batch = (0, 0)
            return 0
        self.steps_by_sequences[len(scheduled)] += 1  # before any output: whoever it reaches sees it counted
        for seq, _ in scheduled:
            seq.scheduled_at = seq.scheduled_at or now
        batch = Batch.build(
            [
                (
                    seq.tokens[seq.num_cached : seq.num_cached + n],
                    seq.num_cached,
                    seq.blocks,
                    _logits_wanted(seq, n),
                )
                for seq, n in scheduled
            ],
            self.blocks.block_size,
            decode_tokens,
        )
        started = self.clock()
        logits = self.model.forward(self.cache, batch, self._logits_out(len(batch.logits_rows)))
        self._measure(self.clock() - started, len(batch.token_ids))
        row = 0
        emitting = []  # (sequence, its row of logits)
        for seq, n in scheduled:
            seq.num_cached += n
            self._register_full_blocks(seq)
            if seq.score_from:
                self._score(seq, logits[row : row + n])
                row += n
            elif seq.num_cached == len(seq.tokens):
                emitting.append((seq, row))
                row += 1
        drawing = [(seq, r) for seq, r in emitting if seq.sampler is not None]
        drawn = iter(sample_rows([seq.sampler for seq, _ in drawing], logits, [r for _, r in drawing]))
        for seq, r in emitting:
            self._emit(seq, logits[r], None if seq.sampler is None else next(drawn))
        self._running = [s for s in self._running if not s.finished]
        self.last_batch = (len(scheduled), len(batch.token_ids))
        return len(batch.token_ids)

    def _logits_out(self, rows: int) -> np.ndarray:
        """Where this step's logits go: a buffer kept while the engine is busy, for steps of up to
        REUSED_LOGITS_ROWS rows. A fresh array (3 MiB at 16 sequences) cost ~800 page faults, ~0.5 ms (2%),
        every decode step. `release_buffers` drops it."""
        if rows > REUSED_LOGITS_ROWS:
            return np.empty((rows, self.config.vocab_size), dtype=np.float32)
        if self._logits is None or len(self._logits) < rows:
            self._logits = np.empty((rows, self.config.vocab_size), dtype=np.float32)
        return self._logits[:rows]

    def release_buffers(self) -> None:
        """Drop the buffers kept from step to step (called when the engine goes idle)."""
        self._logits = None

    def step_tokens(self) -> int:
        """Tokens one step may take: as many as the measured costs fit in max_step_s, capped by
        max_batch_tokens (a cautious MIN_MEASURED * 4 until a big step has been measured). When a step's
        fixed cost alone exceeds the budget (an overloaded machine), the step still does as much token
        work as its fixed cost, so prompts progress at half efficiency or better."""
        if self.max_step_s is None:
            return self.max_batch_tokens
        if self.seconds_per_token is None:
            return min(self.max_batch_tokens, MIN_MEASURED * 4)
        work_s = max(self.max_step_s - self.step_base_s, self.step_base_s)
        # At most twice the last measured step: a token's cost learned early in a long prompt underestimates its
        # later chunks (attention grows with the position), and one oversized step stalls every stream.
        fit = min(int(work_s / self.seconds_per_token), 2 * self.measured_tokens)
        return max(1, min(self.max_batch_tokens, fit))

    def forget_step_costs(self) -> None:
        """Learn a step's costs afresh: the steps so far (a warm-up that loaded or compiled every kernel) cost
        far more than serving ones will. A fixed cost learned from them (seconds) made every later step look
        free per token, so steps doubled up to max_batch_tokens and every stream waited for them."""
        self.step_base_s, self.seconds_per_token, self.measured_tokens = 0.0, None, 0

    def _measure(self, seconds: float, tokens: int) -> None:
        if tokens < MIN_MEASURED:  # dominated by the per-step costs
            self.step_base_s = _average(self.step_base_s or seconds, seconds)
        else:
            self.measured_tokens = tokens
            self.step_base_s = min(self.step_base_s, seconds)  # a step's fixed cost is at most a whole step
            per = max(seconds - self.step_base_s, 1e-7 * tokens) / tokens  # never 0: step_tokens divides
            # up at once, down slowly: a costlier token (a longer context) must shrink the next step now
            self.seconds_per_token = max(per, _average(self.seconds_per_token or per, per))

    def _admit(self) -> None:
        # Blocks for the whole generation are taken at admission, so a running sequence never waits for cache.
        # The prompt's longest cached prefix is reused; its last token is always computed (for its logits).
        pool = self.blocks
        while self._waiting:
            seq = self._waiting[0]
            need = len(seq.prompt_ids) + (0 if seq.sampler is None else seq.params.max_new_tokens)
            keys = block_keys(seq.prompt_ids[:-1], pool.block_size)
            seq.blocks = [] if seq.score_from else pool.match(keys)
            seq.keys = keys[: len(seq.blocks)]
            seq.num_cached = len(seq.blocks) * pool.block_size
            donor, reuse = (None, 0) if seq.score_from else self._match_partial(seq)
            if donor is not None and pool.blocks_for(need) - len(seq.blocks) > pool.free_blocks:
                pool.release([donor])  # the cache is short: the donor's block may be needed itself
                donor, reuse = None, 0
            if pool.blocks_for(need) - len(seq.blocks) > pool.free_blocks:
                pool.release(seq.blocks)
                return
            pool.grow(seq.blocks, need)
            if donor is not None:  # the start of the next block: copied from a released partial block
                self.cache.copy_positions(donor, seq.blocks[len(seq.keys)], reuse)
                pool.release([donor])
                seq.num_cached += reuse
            seq.cached_prompt_tokens = seq.num_cached
            self.prefix_hit_tokens += seq.cached_prompt_tokens
            self._running.append(self._waiting.popleft())
            self._unqueue(seq)

    def _match_partial(self, seq: Sequence) -> tuple[int | None, int]:
        """A released partial block holding the prompt's next tokens after its cached full blocks (never its
        last token, which is computed for its logits), and how many of them it holds."""
        start = seq.num_cached
        parent = seq.keys[-1] if seq.keys else b""
        return self.blocks.match_partial(parent, seq.prompt_ids[start : len(seq.prompt_ids) - 1])

    def _partial_tail(self, seq: Sequence) -> tuple[int, bytes, tuple[int, ...]] | None:
        """The last block holding prompt tokens, with those computed in it (for release()): a next prompt that
        starts the same way reuses them, whatever followed (generated tokens, or a token it changed)."""
        computed = min(seq.num_cached, len(seq.prompt_ids))
        if computed == 0:
            return None
        index = (computed - 1) // self.blocks.block_size  # the last block that holds prompt tokens
        if index > len(seq.keys) or index >= len(seq.blocks):
            return None  # its predecessors are not registered (it cannot be found)
        parent = seq.keys[index - 1] if index else b""
        return seq.blocks[index], parent, tuple(seq.prompt_ids[index * self.blocks.block_size : computed])

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed blocks to the prefix cache."""
        start = len(seq.keys)
        if seq.num_cached // self.blocks.block_size > start:
            parent = seq.keys[-1] if seq.keys else b""
            new = block_keys(seq.tokens[: seq.num_cached], self.blocks.block_size, start, parent)
            self.blocks.register(seq.blocks, new, start)
            seq.keys += new

    def _emit(self, seq: Sequence, logits: np.ndarray, token: SampledToken | None) -> None:
        """Output for a sequence whose last token's logits are ready: its distribution (no sampler), or
        `token`, what its sampler drew from them."""
        now = self.clock()
        seq.prefilled_at = seq.prefilled_at or now
        if seq.sampler is None:
            logprobs = np.empty((1, len(logits)), dtype=np.float32)
            log_softmax(logprobs, logits[None, :])
            top = top_n_probs(logits, seq.params.top_n)
            seq.finished = True
            self.blocks.release(seq.blocks, self._partial_tail(seq))
            self._last_output(seq, Distribution(top, logprobs[0], len(seq.prompt_ids)))
            return
        seq.tokens.append(token.token_id)
        seq.token_times.append(now)
        self.generated_tokens += 1
        p, tid = seq.params, token.token_id
        if tid in p.stop_token_ids:
            return self._finish(seq, "stop_token", self.tokenizer.token_text(tid), token)
        if tid in self.eos_ids and not p.ignore_eos:
            return self._finish(seq, "eos", None, token)
        seq.text += seq.decoder.push(tid)
        for stop in p.stop:
            at = seq.text.find(stop, max(0, seq.emitted - len(stop)))
            if at >= 0:
                seq.text = seq.text[:at]
                return self._finish(seq, "stop", stop, token)
        if p.max_lines and seq.text.count("\n") >= p.max_lines:
            seq.text = "\n".join(seq.text.split("\n")[: p.max_lines]) + "\n"
            return self._finish(seq, "lines", None, token)
        if seq.generated >= p.max_new_tokens:
            seq.text += seq.decoder.flush()
            return self._finish(seq, "length", None, token)
        if p.max_time_s and now - seq.submitted_at >= p.max_time_s:
            return self._finish(seq, "time", None, token)
        # Hold back a tail that could be the start of a stop string.
        safe = len(seq.text) - max((_overlap(seq.text, s) for s in p.stop), default=0)
        delta, seq.emitted = seq.text[seq.emitted : safe], max(seq.emitted, safe)
        seq.on_output(Step(token, delta))

    def _score(self, seq: Sequence, logits: np.ndarray) -> None:
        """Record the log-probabilities of the tokens that the rows of this step's chunk predict."""
        end = (
            seq.num_cached
        )  # the rows are positions end - len(logits) .. end - 1; row p predicts token p + 1
        lo, hi = max(end - len(logits), seq.score_from - 1), min(end, len(seq.tokens) - 1)
        if hi > lo:
            rows = logits[lo - (end - len(logits)) : hi - (end - len(logits))]
            targets = np.asarray(seq.tokens[lo + 1 : hi + 1], dtype=np.int64)
            logprobs, ranks = np.empty(len(rows)), np.empty(len(rows), dtype=np.int64)
            token_logprobs(logprobs, ranks, rows, targets)
            top = tuple(top_n_probs(r, seq.params.top_n) for r in rows) if seq.params.top_n else ()
            seq.scored.append((logprobs, ranks, top))
        if seq.num_cached == len(seq.tokens):
            seq.prefilled_at = self.clock()
            seq.finished = True
            self.finishes["scored"] += 1
            self.blocks.release(seq.blocks)
            self._last_output(
                seq,
                Scores(
                    first=seq.score_from,
                    token_ids=np.asarray(seq.prompt_ids[seq.score_from :], dtype=np.int64),
                    logprobs=np.concatenate([s[0] for s in seq.scored]),
                    ranks=np.concatenate([s[1] for s in seq.scored]),
                    top=tuple(t for s in seq.scored for t in s[2]),
                    finish=self._finish_record(seq, "scored", None),
                ),
            )

    def _finish(self, seq: Sequence, reason: str, stop: str | None, token: SampledToken | None) -> None:
        seq.finished = True
        self.finishes[reason] += 1
        self._unqueue(seq)
        self.blocks.release(seq.blocks, self._partial_tail(seq))
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq in self._running and token is None:
            self._running.remove(seq)
        finish = self._finish_record(seq, reason, stop)
        delta = seq.text[seq.emitted :]
        seq.emitted = len(seq.text)
        self._last_output(seq, Step(token, delta, finish))

    @staticmethod
    def _last_output(seq: Sequence, output: Step | Distribution | Scores | Exception) -> None:
        """Hand a finished sequence its last output and let go of the callback. The callback holds its caller's
        request state, which holds the sequence: a reference cycle, which kept every finished request (with
        its sampler's ~1 MiB of scratch) until the garbage collector's next full pass, hundreds of requests
        later (the soak's anonymous memory rose and fell by tens of MiB with those passes)."""
        on_output, seq.on_output = seq.on_output, None
        on_output(output)

    def _finish_record(self, seq: Sequence, reason: str, stop: str | None) -> Finish:
        times = seq.token_times
        return Finish(
            reason=reason,
            stop=stop,
            prompt_tokens=len(seq.prompt_ids),
            generated_tokens=seq.generated,
            cached_prompt_tokens=seq.cached_prompt_tokens,
            seed=seq.sampler.seed if seq.sampler else 0,
            queue_s=(seq.scheduled_at or seq.submitted_at) - seq.submitted_at,
            prefill_s=(seq.prefilled_at - seq.scheduled_at) if seq.prefilled_at else 0.0,
            ttft_s=(times[0] - seq.submitted_at) if times else 0.0,
            mean_itl_s=(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
        )

    def fail_all(self, error: Exception) -> None:
        """Give every live sequence `error` as its last output and free its cache (after a failed step)."""
        self._take_incoming()
        for seq in [*self._running, *self._waiting]:
            seq.finished = True
            self._unqueue(seq)
            self.blocks.release(seq.blocks)
            self._last_output(seq, error)
        self._running.clear()
        self._waiting.clear()

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        self._waiting.extend(incoming)

    # ---- in-process conveniences (the caller's thread steps the engine) ----

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[Step]:
        """Stream the steps of one generation. Not for use while another thread runs `step()`."""
        out: deque[Step] = deque()
        seq = self.submit(self.encode_prompt(prompt), params or SamplingParams(), out.append)
        try:
            while True:
                while out:
                    step = out.popleft()
                    yield step
                    if step.finish:
                        return
                self.step()
        finally:
            if not seq.finished:  # the caller stopped iterating early
                self.cancel(seq)
                self.step()

    def next_token_probabilities(self, prompt: str | list[int], top_n: int = 10) -> Distribution:
        out: list[Distribution] = []
        self.submit(self.encode_prompt(prompt), SamplingParams(top_n=top_n), out.append, probs_only=True)
        while not out:
            self.step()
        return out[0]

    def score(self, prompt: str | list[int], top_n: int = 0, score_from: int = 1) -> Scores:
        out: list[Scores] = []
        ids = self.encode_prompt(prompt)
        self.submit(ids, SamplingParams(top_n=top_n), out.append, score_from=score_from)
        while not out:
            self.step()
        return out[0]


def _logits_wanted(seq: Sequence, n: int) -> str:
    """Which logits a chunk of n new tokens needs: every position for scoring, else the last prompt token's."""
    if seq.score_from:
        return "all"
    return "last" if seq.num_cached + n == len(seq.tokens) else "none"


def _average(old: float, new: float) -> float:
    """Exponential moving average: recent steps weigh most (the machine's load changes)."""
    return 0.7 * old + 0.3 * new


def _overlap(text: str, stop: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `stop`."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
