"""Prometheus metrics (text format over HTTP, prometheus-client), one registry per server."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from nextword.server.memory import resident_bytes

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


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

    def watch_memory(self, engine) -> None:
        """Once the model is loaded."""
        self.weights_bytes.set(engine.model.checkpoint.nbytes)
        self.kv_resident.set_function(lambda: resident_bytes(engine.cache.k + engine.cache.v))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP on a daemon thread; returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

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
