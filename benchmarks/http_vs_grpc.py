"""The OpenAI-compatible HTTP API against gRPC on the same server, and llama.cpp's llama-server, in one run.

    python benchmarks/http_vs_grpc.py [--concurrency 16] [--requests-per-stream 4] [--repeats 3]
        [--isa native|avx2] [--llama-server PATH] [--gguf PATH]

One `nextword serve --http-port 0` (q4 weights); `nextword load` drives it at --concurrency streams, closed
loop (30-token prompts sent as token ids, 64 output tokens with ignore_eos, greedy, 16 warm-up requests),
over gRPC (Generate) and over HTTP (streamed /v1/completions), and llama-server (--parallel = concurrency,
2 threads, continuous batching, the same Q4_1 GGUF) with the same load generator over its own
/v1/completions: both servers up together (an idle one uses no CPU), one unmeasured pass of each, then
--repeats rounds alternating the three. Prints the median of the repeats: aggregate output tokens/s, TTFT
p50 / p99, ITL p50, and each row's throughput relative to gRPC's and to llama-server's. The load generator
runs on the same cores as the servers. Run it alone on the machine. --isa avx2: nextword's kernels compiled
for an AVX2-only CPU (nextword.kernels.isa) against llama-server built for AVX2 only (PEERS_ISA=avx2 of
../shared/peers/setup.sh, in $NEXTWORD_PEERS_AVX2 or ~/.cache/nextword-peers-avx2).
"""

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

from launch import start_serve

from nextword.client.load import LoadConfig, run_load
from nextword.kernels import isa

PEERS = {
    "native": Path(os.environ.get("NEXTWORD_PEERS", Path.home() / ".cache" / "nextword-peers")),
    "avx2": Path(os.environ.get("NEXTWORD_PEERS_AVX2", Path.home() / ".cache" / "nextword-peers-avx2")),
}
LLAMA_SERVER = Path("src") / "llama.cpp" / "build" / "bin" / "llama-server"  # in a peers folder
GGUF = Path("model") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def start_nextword(kernels_isa: str) -> tuple[subprocess.Popen, str, str]:
    """`nextword serve` on free ports, its kernels for `kernels_isa`; (process, gRPC target, HTTP target) once
    it is ready."""
    flags = ["--http-port", "0", "--metrics-port", "-1", "--max-queue", "1024", "--log-level", "WARNING"]
    proc, found = start_serve(*flags, env=isa.with_isa(dict(os.environ), kernels_isa))
    return proc, found["grpc"], found["http"]


def start_llama_server(binary: Path, gguf: Path, concurrency: int, port: int = 18779) -> subprocess.Popen:
    """As ../shared/peers/bench_server.py starts it: 2 threads, one slot per stream, continuous batching."""
    cmd = [str(binary), "-m", str(gguf), "-t", "2", "-tb", "2", "-c", str(max(2048, 256 * concurrency))]
    cmd += ["--parallel", str(concurrency), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    # Weight repacking picks ggml's AMX kernels on CPUs that list amx flags; on this VM they segfault in the
    # warm-up decode (ggml_backend_amx_mul_mat). Without repacking llama-server runs its AVX-512/AVX2 kernels.
    cmd += ["--no-repack"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not become ready")


def measure(target: str, protocol: str, concurrency: int, per_stream: int) -> dict:
    config = LoadConfig(
        target=target,
        protocol=protocol,
        concurrency=concurrency,
        num_requests=concurrency * per_stream,
        warmup=16,
        prompt_tokens=30,
        output_tokens=64,
        temperature=0.0,
        seed=0,
    )
    d = asyncio.run(run_load(config)).to_dict()
    if d["failed"]:
        raise RuntimeError(f"{protocol} {target}: {d['failed']} requests failed: {d['errors']}")
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests-per-stream", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--isa", default="native", choices=list(PEERS))
    ap.add_argument("--llama-server", type=Path, help="default: the --isa peers folder's")
    ap.add_argument("--gguf", type=Path, help="default: the --isa peers folder's")
    args = ap.parse_args()
    n, per = args.concurrency, args.requests_per_stream
    args.llama_server = args.llama_server or PEERS[args.isa] / LLAMA_SERVER
    args.gguf = args.gguf or PEERS[args.isa] / GGUF

    runs: dict[str, list[dict]] = {"nextword gRPC": [], "nextword HTTP": [], "llama-server HTTP": []}
    targets = []  # (name, target, protocol)
    servers = []
    try:
        proc, grpc_target, http_target = start_nextword(args.isa)
        servers.append(lambda: (proc.send_signal(signal.SIGINT), proc.wait(30)))
        targets += [("nextword gRPC", grpc_target, "grpc"), ("nextword HTTP", http_target, "http")]
        if args.llama_server.is_file() and args.gguf.is_file():
            llama = start_llama_server(args.llama_server, args.gguf, n)
            servers.append(lambda: (os.killpg(llama.pid, signal.SIGTERM), llama.wait(30)))
            targets.append(("llama-server HTTP", "127.0.0.1:18779", "http"))
        else:
            print(f"(llama-server: {args.llama_server} or {args.gguf} missing; not run)")
        # One unmeasured pass each: a server's first requests touch its KV cache's pages for the first time
        # (and nextword's step cost model calibrates); measured, they favoured whichever protocol ran second.
        for _, target, protocol in targets:
            measure(target, protocol, n, per)
        for _ in range(args.repeats):
            for name, target, protocol in targets:
                runs[name].append(measure(target, protocol, n, per))
    finally:
        for stop in servers:
            stop()

    def median(name: str, key: str) -> float:
        return statistics.median(d[key] for d in runs[name])

    kernels = (
        isa.target() if args.isa == "native" else f"avx2 (LLVM cpu {isa.numba_env('avx2')['NUMBA_CPU_NAME']})"
    )
    print(f"nextword kernels: {kernels}; llama-server: {args.llama_server}")
    print(
        f"{n} concurrent streams, {n * per} requests of 30 prompt + 64 output tokens, median of {args.repeats}"
    )
    print(
        f"{'server, protocol':<20}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'tok/s vs gRPC':>15}"
        f"{'vs llama-server':>17}"
    )
    base = median("nextword gRPC", "output_throughput")
    peer = median("llama-server HTTP", "output_throughput") if runs["llama-server HTTP"] else float("nan")
    for name, results in runs.items():
        if not results:
            continue
        tps = median(name, "output_throughput")
        print(
            f"{name:<20}{tps:8.1f}{median(name, 'median_ttft_ms'):8.0f}ms{median(name, 'p99_ttft_ms'):8.0f}ms"
            f"{median(name, 'median_itl_ms'):7.1f}ms{tps / base:14.2f}x{tps / peer:16.2f}x"
        )


if __name__ == "__main__":
    main()
