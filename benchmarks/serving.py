"""Serving under load: `nextword load` against one `nextword serve`, at several concurrencies, in one run.

    python benchmarks/serving.py [--weights q4] [--concurrency 1 4 16 64] [--requests-per-worker 4]

Starts a server on a free port (the default model, in the given weight format), then for each concurrency
runs a closed-loop load (30-token prompts, 64 output tokens with ignore_eos, greedy) and prints aggregate
output tokens/s, its ratio to the single-stream figure of the same run, and TTFT / ITL percentiles. Then the
prefix cache: time to first token of a request with a fresh 500-token prompt against one that shares the
first 500 tokens with it. And the editor typist scenario. Run it alone on the machine.
"""

import argparse
import asyncio
import subprocess
import sys
import time

from launch import start_serve

from nextword.client import Client
from nextword.client.load import LoadConfig, run_load


def start_server(weights: str, metrics: bool = False) -> tuple[subprocess.Popen, str, str | None]:
    """A `nextword serve`; returns (process, gRPC target, metrics URL or None) once it is ready."""
    flags = ["--weights", weights, "--metrics-port", "0" if metrics else "-1", "--max-queue", "1024"]
    proc, found = start_serve(*flags, "--log-level", "WARNING")
    return proc, found["grpc"], found.get("metrics")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests-per-worker", type=int, default=4)
    args = ap.parse_args()

    proc, target, _ = start_server(args.weights)
    try:
        rows, single = [], None
        for c in args.concurrency:
            config = LoadConfig(
                target=target,
                concurrency=c,
                num_requests=max(8, c * args.requests_per_worker),
                warmup=min(c, 8),
                prompt_tokens=30,
                output_tokens=64,
            )
            r = asyncio.run(run_load(config)).to_dict()
            single = single or r["output_throughput"]
            rows.append((c, r))
            print(f"concurrency {c}: {r['output_throughput']:.0f} tok/s", file=sys.stderr, flush=True)

        print(f"\nnextword serve --weights {args.weights}: 30-token prompts, 64 output tokens, closed loop")
        head = f"{'conc.':>5}{'tok/s':>8}{'x single':>9}{'req/s':>7}"
        for m in ("ttft", "itl"):
            head += "".join(f"{m.upper() + ' ' + p + ' ms':>13}" for p in ("p50", "p90", "p99"))
        print(head)
        for c, r in rows:
            line = f"{c:5d}{r['output_throughput']:8.0f}{r['output_throughput'] / single:9.2f}{r['request_throughput']:7.2f}"
            for m in ("ttft", "itl"):
                line += "".join(f"{r[f'{p}_{m}_ms']:13.1f}" for p in ("median", "p90", "p99"))
            errors = r.get("errors") or {}
            print(line + (f"  errors {errors}" if errors else ""))

        with Client(target) as client:
            text = "The history of computing is a story of abstraction layered on abstraction. " * 45
            prefix = client.tokenize(text).ids[:500]
            times = []
            for suffix in ([11, 12, 13], [21, 22, 23]):
                started = time.perf_counter()
                done = client.complete(list(prefix) + suffix, max_new_tokens=1, temperature=0.0)
                times.append((time.perf_counter() - started, done.finish.usage.cached_prompt_tokens))
        (cold, _), (warm, cached) = times
        print(
            f"\nprefix cache: 503-token prompt, TTFT {cold * 1000:.0f} ms fresh; {warm * 1000:.0f} ms when the "
            f"first 500 tokens are shared ({cached} tokens from the cache): {warm / cold:.2f}x"
        )

        config = LoadConfig(target=target, concurrency=4, num_requests=4, scenario="typist", keystroke_ms=50)
        r = asyncio.run(run_load(config)).to_dict()
        print(
            f"typist, 4 editors at one keystroke per 50 ms: {r.get('answered')} answered, "
            f"{r.get('superseded')} superseded, TTFT p50 {r['median_ttft_ms']:.0f} ms p99 {r['p99_ttft_ms']:.0f} ms"
        )
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
