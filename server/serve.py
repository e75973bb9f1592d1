"""`nextword serve`: the grpc.aio server around the engine thread.

Start-up order: bind the port at once (health NOT_SERVING, RPCs UNAVAILABLE), load the model and compile/warm
the kernels on a worker thread, start the engine thread, then go SERVING and print one ready line.
Shutdown (SIGINT/SIGTERM): NOT_SERVING, refuse new requests (UNAVAILABLE; the port stays open), let in-flight
ones finish within the grace period (then they are cancelled: streams end with FINISH_REASON_CANCELLED), stop
the engine thread, exit 0. A second signal exits at once (status 1).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nextword.client.client import is_loopback_host
from nextword.kernels import isa
from nextword.server.engine import Engine
from nextword.server.engine_thread import EngineThread
from nextword.server.frontend import Frontend
from nextword.server.guard import MAX_METADATA_BYTES, RequestGuard
from nextword.server.interceptors import AccessLog, ReplicaName, TokenAuth
from nextword.server.metrics import Metrics
from nextword.server.sampling import SamplingParams
from nextword.server.service import SERVICE_NAME, InferenceService
from nextword.v1 import nextword_pb2_grpc

if TYPE_CHECKING:
    from nextword.server.http_api import HTTPServer

log = logging.getLogger("nextword.serve")


@dataclass(frozen=True)
class ServerConfig:
    model: Path | None  # None: the default model, fetched and imported on first use (after the port is bound)
    weights: str = "q4"  # f32 | int8 | q4: q4 decodes 4x faster than f32 at +0.2% perplexity (benchmarks/)
    host: str = "127.0.0.1"
    port: int = 50051
    kv_cache_tokens: int = 16384
    kv_cache_dtype: str = "auto"  # f32 | f16 | auto: f16 with quantized weights, f32 with f32 weights
    max_batch_tokens: int = 1024
    max_step_ms: float | None = 200  # a step's work, in time: how long a decoding stream may wait for others
    max_context: int | None = None  # default: the model's
    max_top_n: int = 20
    max_queue: int = 256
    max_request_bytes: int = 1 << 20
    grace_s: float = 10.0
    handshake_timeout_s: float = 10.0  # for a new connection to send its HTTP/2 preface
    metrics_port: int | None = 9464  # Prometheus /metrics; None = off, 0 = any free port
    http_port: int | None = None  # the OpenAI-compatible HTTP API; None = off, 0 = any free port
    metrics_host: str = "127.0.0.1"  # loopback whatever `host` is: metrics are not for the public
    tls_cert: Path | None = None  # PEM certificate chain and key: serve TLS instead of plaintext
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA: clients must present a certificate it signed (mutual TLS)
    token: str | None = field(default=None, repr=False)  # every RPC but health needs it as a bearer token
    reflection: bool = True  # gRPC server reflection (grpcurl and friends list the services)
    replica: str | None = None  # the name sent as x-nextword-replica; None: HOSTNAME:PORT (once bound)

    def describe(self) -> str:
        """The start-up configuration line (the token itself is never printed)."""
        shown = {k: v for k, v in vars(self).items() if k != "token"}
        shown["token"] = "set" if self.token else "none"
        shown["model"] = self.model or "default"  # fetched and imported once the port is bound
        shown["replica"] = self.replica or "HOSTNAME:PORT"
        return ", ".join(f"{k}={v}" for k, v in shown.items())

    @property
    def exposed_in_clear(self) -> bool:
        """Listening beyond this machine without both TLS and a token."""
        return not is_loopback_host(self.host) and not (self.tls_cert and self.token)


class StartupError(Exception):
    """A cause the server can name, and the flag to change: printed as one line, no traceback."""


def _read_pem(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise StartupError(f"cannot read {flag} {path}: {e.strerror}") from e


def _server_credentials(c: ServerConfig) -> grpc.ServerCredentials | None:
    if not (c.tls_cert or c.tls_key or c.tls_client_ca):
        return None
    if not (c.tls_cert and c.tls_key):
        raise StartupError("TLS needs both --tls-cert and --tls-key")
    cert, key = _read_pem(c.tls_cert, "--tls-cert"), _read_pem(c.tls_key, "--tls-key")
    ca = _read_pem(c.tls_client_ca, "--tls-client-ca") if c.tls_client_ca else None
    # Check the files here: gRPC only logs "Invalid cert chain file" and fails the bind.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(c.tls_cert, c.tls_key, password=lambda: "")  # no prompt
    except ssl.SSLError as e:
        raise StartupError(
            f"--tls-cert {c.tls_cert} / --tls-key {c.tls_key}: not a PEM certificate and its key ({e.reason or e})"
        ) from e
    try:
        if ca:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    except ssl.SSLError as e:
        raise StartupError(
            f"--tls-client-ca {c.tls_client_ca}: not a PEM CA certificate ({e.reason or e})"
        ) from e
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class NextwordServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.frontend = Frontend(self.metrics)  # what the gRPC servicer and the HTTP app share
        self.service = InferenceService(self.frontend, config.max_request_bytes)
        self.metrics_port: int | None = None
        self.health = health.aio.HealthServicer()
        self.runner: EngineThread | None = None
        self.ready = asyncio.Event()
        self.port: int | None = None
        self.replica = ReplicaName()  # its name is set once the port is bound
        self.http_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._http: HTTPServer | None = None
        self._http_socket: socket.socket | None = None
        self._http_loop: asyncio.Task | None = None
        self.loading: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and start answering (NOT_SERVING); the model loads in the background. Returns the port."""
        c = self.config
        interceptors = (
            [AccessLog()]
            + ([TokenAuth(c.token)] if c.token else [])
            + [RequestGuard(self.service), self.replica]
        )
        credentials = _server_credentials(c)
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                # a connection that never completes its HTTP/2 handshake is closed after this
                ("grpc.server_handshake_timeout_ms", int(c.handshake_timeout_s * 1000)),
                ("grpc.max_receive_message_length", c.max_request_bytes),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            ],
        )
        nextword_pb2_grpc.add_InferenceServicer_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if c.reflection:
            names = (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, self._server)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{c.host}:{c.port}"
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio: "Failed to bind to address ..."
            self.port = 0
        if not self.port:
            raise StartupError(
                f"cannot listen on {address} (in use by another process, or not an address of this machine):"
                " choose another --port (0 = any free port) or --host"
            )
        self.replica.name = c.replica or f"{socket.gethostname()}:{self.port}"
        if c.metrics_port is not None:  # before start(): a failure here leaves nothing running
            try:
                self.metrics_port = await self.metrics.serve(c.metrics_port, c.metrics_host)
            except OSError as e:
                reason = "in use" if e.errno == errno.EADDRINUSE else e.strerror
                raise StartupError(
                    f"cannot serve metrics on {c.metrics_host}:{c.metrics_port} ({reason}): choose another "
                    "--metrics-port (0 = any free port, -1 = no metrics) or --metrics-host"
                ) from e
        await self._server.start()
        if c.http_port is not None:
            await self._start_http()
        self.loading = asyncio.create_task(self._load())
        return self.port

    async def _start_http(self) -> None:
        """The OpenAI-compatible API: uvicorn on this event loop (no signal handlers of its own: serve()
        owns SIGINT/SIGTERM), on a socket bound here so that port 0 reports the port it got."""
        import uvicorn  # FastAPI and uvicorn take 0.3 s to import: only a server with --http-port pays it

        from nextword.server.http_api import HTTPServer, create_app

        c = self.config
        family = socket.AF_INET6 if ":" in c.host else socket.AF_INET
        self._http_socket = socket.create_server((c.host, c.http_port), family=family)
        self.http_port = self._http_socket.getsockname()[1]
        app = create_app(self.frontend, c.max_request_bytes, c.token)  # the token of gRPC, as a bearer
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,  # serve() logs one line per request itself
            log_config=None,
            log_level="warning",
            timeout_graceful_shutdown=c.grace_s,
            # the gRPC server's TLS (client certificates required with --tls-client-ca)
            ssl_certfile=c.tls_cert,
            ssl_keyfile=c.tls_key,
            ssl_ca_certs=c.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if c.tls_client_ca else ssl.CERT_NONE,
        )
        self._http = HTTPServer(config)
        self._http_loop = asyncio.create_task(self._http.serve(sockets=[self._http_socket]))
        while not self._http.started and not self._http_loop.done():
            await asyncio.sleep(0.005)
        if self._http_loop.done():
            self._http_loop.result()  # its start-up failed: raise that

    async def _stop_http(self, grace_s: float) -> None:
        """Stop accepting, let open responses finish within grace_s, then cancel them (freeing their
        sequences)."""
        if self._http is None:
            return
        self._http.config.timeout_graceful_shutdown = grace_s
        self._http.should_exit = True
        await self._http_loop

    async def _load(self) -> None:
        started = time.perf_counter()
        engine = await asyncio.to_thread(self._load_engine)  # no kernel runs here: see _warm
        self.metrics.watch_memory(engine)
        runner = EngineThread(engine, on_step=self.metrics.observe_step)
        self.metrics.watch_threads(runner.kernel_threads)
        runner.start()
        await asyncio.wrap_future(runner.call(lambda: _warm(engine)))
        self.runner = self.frontend.runner = runner
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        c = engine.config
        print(
            f"nextword: serving {engine.model_id} ({c.model_type}, {engine.weights_format} weights, {c.num_layers} "
            f"layers, vocab {c.vocab_size}, "
            f"context {engine.max_context}) on {self.config.host}:{self.port} with {isa.target().kernels} kernels; "
            f"ready in {time.perf_counter() - started:.1f} s",
            flush=True,
        )

    def _load_engine(self) -> Engine:
        c = self.config
        return Engine.load(
            c.model or _default_model(),
            weights=c.weights,
            kv_cache_tokens=c.kv_cache_tokens,
            kv_cache_dtype=c.kv_cache_dtype,
            max_batch_tokens=c.max_batch_tokens,
            max_step_s=None if c.max_step_ms is None else c.max_step_ms / 1000,
            max_context=c.max_context,
            max_top_n=c.max_top_n,
            max_queue=c.max_queue,
        )

    async def wait_ready(self) -> None:
        await asyncio.wait(
            {asyncio.ensure_future(self.ready.wait()), self.loading}, return_when="FIRST_COMPLETED"
        )
        if self.loading.done() and self.loading.exception():
            raise self.loading.exception()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, as the proto says: health NOT_SERVING and new requests UNAVAILABLE while the port stays
        open (clients and load balancers see why), in-flight requests run for up to the grace period, then
        the engine cancels the rest, whose streams end with a FINISH_REASON_CANCELLED event; then the
        server stops and the engine thread with it."""
        loop = asyncio.get_running_loop()
        until = loop.time() + (self.config.grace_s if grace_s is None else grace_s)
        await self.health.enter_graceful_shutdown()
        self.service.drain()  # both front ends: the draining flag is the Frontend's
        # Clients that watch health (round_robin with health checks) take a moment to move away; meanwhile
        # their calls still come here, are refused UNAVAILABLE and retried elsewhere. Stopping the server in
        # that moment instead cancelled calls it had just received (CANCELLED, which nobody retries).
        await asyncio.sleep(min(DRAIN_NOTICE_S, max(until - loop.time(), 0.0)))
        if self.loading and not self.loading.done():
            self.loading.cancel()
        runner = self.runner
        if runner:
            while _in_flight(runner) and loop.time() < until:
                await asyncio.sleep(DRAIN_POLL_S)
            if _in_flight(runner):
                runner.cancel_all("cancelled")
                cancelled_by = loop.time() + CANCEL_WAIT_S
                while _in_flight(runner) and loop.time() < cancelled_by:
                    await asyncio.sleep(DRAIN_POLL_S)
        # the handlers deliver their last events, then every call is closed
        await asyncio.gather(self._server.stop(FINAL_EVENTS_S), self._stop_http(FINAL_EVENTS_S))
        self.metrics.close()
        if runner:
            await asyncio.to_thread(runner.stop)


def _default_model() -> Path:
    """Fetch and import the default model if needed (minutes on a first start): clients meanwhile see
    NOT_SERVING / UNAVAILABLE on the bound port, not "connection refused"."""
    from nextword.weights.default_model import ensure_default_model

    return ensure_default_model(progress=lambda line: print(line, file=sys.stderr, flush=True))


DRAIN_POLL_S = 0.05
DRAIN_NOTICE_S = 0.5  # refusing new calls before stopping, while clients see NOT_SERVING
CANCEL_WAIT_S = 5.0  # cancelled sequences leave at the next engine step: one step, well under this
FINAL_EVENTS_S = 1.0  # for handlers to send the final events of their finished sequences


def _in_flight(runner: EngineThread) -> bool:
    return runner.engine.live_sequences > 0 or runner.pending_calls > 0


def _warm(engine: Engine) -> None:
    """One tiny generation: compiles (or loads from the on-disk cache) every kernel before the first client.

    It runs on the engine thread, like every later step: OpenMP (Numba's threading layer) keeps a pool of
    worker threads per thread that starts parallel kernels, and once two pools share 2 cores it stops
    spinning between kernels and sleeps, which tripled the decode time per token here (3.3 -> 9.5 ms)."""
    for _ in engine.generate([0, 1], SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True)):
        pass
    engine.forget_step_costs()  # compiling is not what a step costs


async def serve(config: ServerConfig) -> int:
    server = NextwordServer(config)
    await server.start()
    metrics = (
        f", metrics on http://{config.metrics_host}:{server.metrics_port}/metrics"
        if server.metrics_port
        else ""
    )
    if server.http_port:
        metrics += f", OpenAI-compatible HTTP on http://{config.host}:{server.http_port}/v1"
    print(
        f"nextword: listening on {config.host}:{server.port}{' with TLS' if config.tls_cert else ''}{metrics}, "
        f"loading {config.model or 'the default model'} ...",
        flush=True,
    )
    if config.exposed_in_clear:
        missing = " and ".join(
            m for m, given in (("TLS", config.tls_cert), ("a token", config.token)) if not given
        )
        print(
            f"nextword: warning: listening on {config.host}, reachable from other machines, without {missing}:"
            " anyone who reaches the port can use the model and read what others send. Add --tls-cert/--tls-key"
            " and --token-file (docs/security.md)",
            file=sys.stderr,
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal():
        if stop.is_set():  # a second signal: the user does not want to wait for the drain
            print("nextword: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(1)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    waiting = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiting, server.loading}, return_when="FIRST_COMPLETED")
    if server.loading.done() and server.loading.exception():
        error = server.loading.exception()
        log.debug("model load failed", exc_info=error)
        print(
            f"nextword: error: cannot load the model from {config.model}: {error} (check --model)",
            file=sys.stderr,
        )
        await server.stop(0)
        return 1
    await waiting
    print(f"nextword: shutting down (grace {config.grace_s:.0f} s)", flush=True)
    await server.stop()
    print("nextword: stopped", flush=True)
    return 0
