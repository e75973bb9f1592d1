"""Prometheus metrics (text format over HTTP, prometheus-client), one registry per server.

/metrics is answered on the server's event loop (prometheus-client's own server starts a thread per
connection: 400 idle connections made 413 threads): at most MAX_CONNECTIONS at once, each closed after one
answer or after IDLE_TIMEOUT_S without a complete request.
"""

from __future__ import annotations

import asyncio

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from nextword.server.memory import resident_bytes

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
MAX_CONNECTIONS = 256  # each an idle coroutine at most; past it, new ones are closed at once
IDLE_TIMEOUT_S = 5.0


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("nextword_time_to_first_token_seconds", "Request arrival to first token", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("nextword_inter_token_latency_seconds", "Mean time between tokens, per request", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_time = Histogram("nextword_queue_time_seconds", "Wait before the first engine step", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.waiting = Gauge("nextword_waiting_requests", "Requests queued for admission", registry=r)
        self.running = Gauge("nextword_running_sequences", "Sequences admitted and generating", registry=r)
        self.batch_tokens = Histogram("nextword_batch_tokens", "Tokens per engine step", buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.batch_sequences = Histogram("nextword_batch_sequences", "Sequences per engine step", buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.kv_used = Gauge("nextword_kv_cache_used_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.prefix_hits = Counter("nextword_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", registry=r)  # fmt: skip
        self.prompt_tokens = Counter("nextword_prompt_tokens", "Prompt tokens of finished requests", registry=r)  # fmt: skip
        self.generated = Counter("nextword_generated_tokens", "Tokens generated", registry=r)
        self.requests = Counter("nextword_requests", "Requests by outcome: a finish reason or a status code", ["outcome"], registry=r)  # fmt: skip
        self.continued = Counter("nextword_session_continued", "Session requests answered by the live generation they continue (typed as suggested)", registry=r)  # fmt: skip
        self._seen = (0, 0)  # engine totals at the last step, to turn them into counter increments
        # Memory: process_resident_memory_bytes (ProcessCollector) against what the model needs.
        ProcessCollector(registry=r)
        self.weights_bytes = Gauge(
            "nextword_weights_bytes", "Bytes of the served weights, as stored", registry=r
        )
        self.kv_resident = Gauge("nextword_kv_cache_resident_bytes", "Bytes of the KV cache in memory (pages written so far)", registry=r)  # fmt: skip
        self.kernel_threads = Gauge("nextword_kernel_threads", "Threads the kernels run on: fewer while other processes keep cores busy", registry=r)  # fmt: skip

    def watch_memory(self, engine) -> None:
        """Once the model is loaded."""
        self.weights_bytes.set(engine.model.checkpoint.nbytes)
        self.kv_resident.set_function(lambda: resident_bytes(engine.cache.k + engine.cache.v))

    def watch_threads(self, kernel_threads) -> None:
        """Once the engine thread exists (server.threads.KernelThreads)."""
        self.kernel_threads.set_function(lambda: kernel_threads.threads)

    async def serve(self, port: int, host: str = "127.0.0.1", idle_timeout_s: float = IDLE_TIMEOUT_S) -> int:
        """Expose /metrics over HTTP on the running event loop; returns the port."""
        slots = asyncio.Semaphore(MAX_CONNECTIONS)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if slots.locked():  # full: close at once rather than queue
                writer.close()
                return
            async with slots:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle_timeout_s)
                    method, path = (head.split(b" ", 2) + [b"", b""])[:2]
                    if method == b"GET" and path.split(b"?")[0] in (b"/metrics", b"/"):
                        body, status = generate_latest(self.registry), b"200 OK"
                    else:
                        body, status = b"not found\n", b"404 Not Found"
                    writer.write(
                        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + CONTENT_TYPE_LATEST.encode()
                        + b"\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\nConnection: close\r\n\r\n" + body
                    )  # fmt: skip
                    await asyncio.wait_for(writer.drain(), idle_timeout_s)
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    pass  # idle, cut short or too long: closed
                finally:
                    writer.close()

        self._http = await asyncio.start_server(answer, host, port, limit=16 << 10)
        return self._http.sockets[0].getsockname()[1]

    def close(self) -> None:
        if getattr(self, "_http", None):
            self._http.close()

    def observe_step(self, engine) -> None:
        """After each engine step (engine thread)."""
        sequences, tokens = engine.last_batch
        if tokens:
            self.batch_tokens.observe(tokens)
            self.batch_sequences.observe(sequences)
        self.waiting.set(engine.waiting_sequences)
        self.running.set(engine.running_sequences)
        self.kv_used.set(engine.blocks.used_blocks / engine.blocks.num_blocks)
        hits, generated = engine.prefix_hit_tokens, engine.generated_tokens
        self.prefix_hits.inc(hits - self._seen[0])
        self.generated.inc(generated - self._seen[1])
        self._seen = (hits, generated)

    def observe_finish(self, finish) -> None:
        """A request finished (event loop), with the engine's Finish record."""
        self.requests.labels(finish.reason).inc()
        self.prompt_tokens.inc(finish.prompt_tokens)
        self.queue_time.observe(finish.queue_s)
        if finish.generated_tokens:
            self.ttft.observe(finish.ttft_s)
        if finish.generated_tokens > 1:
            self.itl.observe(finish.mean_itl_s)

    def observe_error(self, code_name: str) -> None:
        self.requests.labels(code_name).inc()
