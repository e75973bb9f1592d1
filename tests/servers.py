"""In-process servers for end-to-end tests: a NextwordServer on a free port, its event loop on a thread; and
the tools that let a test decide when things happen (no test waits for wall-clock time to pass)."""

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from nextword.server.serve import NextwordServer, ServerConfig

SAFETY_S = 120  # how long a wait for an event may take before the test fails: a hang guard, not a measure
START_S = 900  # a server's start and warm-up: compiling every kernel on a loaded machine took > 120 s


@contextmanager
def event_loop_thread():
    """Yields run(coro): the coroutine's result, run on an event loop on its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro, timeout=SAFETY_S):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    try:
        yield run
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def server_config(**config) -> ServerConfig:
    return ServerConfig(**{"port": 0, "metrics_port": 0, "grace_s": 1} | config)


@contextmanager
def running_server(**config):
    """Yields a started, warm NextwordServer (ServerConfig fields as keywords; port and metrics port free)."""
    with event_loop_thread() as run:
        srv = NextwordServer(server_config(**config))
        run(srv.start())
        run(srv.wait_ready(), START_S)
        try:
            yield srv
        finally:
            run(srv.stop(1))


def wait_until(condition, what: str, timeout: float = SAFETY_S) -> None:
    """Poll `condition()` until it is true; fail naming `what` if it never becomes true (hang guard)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.002)


def wait_idle(srv) -> int:
    """The engine's count of live sequences, once it is zero (the engine drops cancelled sequences at its
    next step, so this waits for that step)."""
    engine = srv.runner.engine
    wait_until(lambda: engine.live_sequences == 0, "the engine has no live sequence")
    return engine.live_sequences


class StepGate:
    """Holds the engine thread before each step until the test allows it, so the test decides how many steps
    run between two of its actions. `allow(n)` lets n more steps run; `open()` lets every step run."""

    def __init__(self, engine):
        self.engine, self._step = engine, engine.step
        self._permits = threading.Semaphore(0)
        engine.step = self._gated

    def _gated(self) -> int:
        if not self._permits.acquire(timeout=SAFETY_S):
            raise AssertionError("the engine waited for a step the test never allowed")
        return self._step()

    def allow(self, n: int = 1) -> None:
        self._permits.release(n)

    def open(self) -> None:
        self.engine.step = self._step
        self._permits.release(1_000_000)  # whoever is waiting in _gated


def serve_argv(model: Path | None, *flags: str, weights: str | None = "f32") -> list[str]:
    """The command line of a `nextword serve` child process: `model` None serves the default model, `weights`
    None its default format."""
    cmd = [sys.executable, "-m", "nextword.client.cli", "serve"]
    cmd += ["--model", str(model)] if model else []
    return cmd + (["--weights", weights] if weights else []) + list(flags)


class ServeProcess:
    """`nextword serve` as a child process on a free loopback port: a replica that a test can drain
    (SIGTERM), freeze (SIGSTOP) or kill (SIGKILL). Its output is collected by a thread (`lines`).

    `model` None serves the default model; `threads` is its kernels' thread count (NUMBA_NUM_THREADS): one by
    default, as replicas share this machine's cores (OpenMP threads of several processes on the same cores wait
    for each other at every parallel region)."""

    def __init__(self, model, name: str, *flags: str, weights: str = "f32", threads: int = 1):
        self.model, self.name, self.flags = model, name, flags
        self.weights, self.threads = weights, threads
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.lines: list[str] = []
        flags = ["--port", "0", "--metrics-port", "-1", "--replica-name", self.name, *self.flags]
        self.proc = subprocess.Popen(
            serve_argv(self.model, *flags, weights=self.weights),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "NUMBA_NUM_THREADS": str(self.threads)},
        )
        threading.Thread(target=self._collect, args=(self.proc, self.lines), daemon=True).start()
        wait_until(lambda: self._seen("listening on") or self.proc.poll() is not None, "the port is bound")
        found = re.search(r"listening on ([\d.]+:\d+)", self._seen("listening on") or "")
        assert found, f"{self.name} did not start:\n" + "".join(self.lines)
        self.address = found.group(1)

    @staticmethod
    def _collect(proc: subprocess.Popen, lines: list[str]) -> None:
        lines.extend(proc.stdout)  # line by line, as they come

    def _seen(self, text: str) -> str | None:
        return next((line for line in list(self.lines) if text in line), None)

    def wait_ready(self) -> None:
        wait_until(lambda: self._seen("ready in") or self.proc.poll() is not None, "ready", START_S)
        assert self.proc.poll() is None, f"{self.name} exited:\n" + "".join(self.lines)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait(SAFETY_S)


NGINX_CONF = Path(__file__).parent.parent / "deploy" / "nginx" / "nextword.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def nginx_proxy(binary: str, upstreams: list[str], folder: Path):
    """deploy/nginx/nextword.conf as shipped, its upstream pointed at `upstreams` (host:port) and its listen
    address at a free port, run by `binary` in a minimal nginx.conf of its own (pid, logs and temporary files
    in `folder`). Yields the proxy's host:port once it listens."""
    conf = NGINX_CONF.read_text()
    servers = "".join(f"    server {a} max_fails=1 fail_timeout=5s;\n" for a in upstreams)
    conf, n = re.subn(r"(    server 127\.0\.0\.1:\d+ [^\n]*\n)+", servers, conf)
    assert n == 1, "the upstream's server lines moved: update tests/servers.py"
    port = free_port()
    conf, n = re.subn(r"listen 127\.0\.0\.1:\d+ http2;", f"listen 127.0.0.1:{port} http2;", conf)
    assert n == 1, "the listen line moved: update tests/servers.py"
    (folder / "nextword.conf").write_text(conf)
    temp = "".join(f"    {kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy"))
    (folder / "nginx.conf").write_text(
        f"worker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\n"
        f"events {{ worker_connections 1024; }}\n"
        f"http {{\n    access_log off;\n{temp}    include {folder}/nextword.conf;\n}}\n"
    )
    proc = subprocess.Popen(
        [binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", "stderr", "-g", "daemon off;"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def listening() -> bool:
        assert proc.poll() is None, f"nginx exited: {proc.stdout.read()}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, "nginx listens")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(SAFETY_S)
