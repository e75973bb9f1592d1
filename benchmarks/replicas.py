"""Replicas: `nextword load` at 16 and 64 streams against 1, 2 and 3 `nextword serve` replicas (the default
model, q4) reached through one gRPC target (`ipv4:a:p,b:p,...`, the client balancing per call), and against 2
replicas through nginx (deploy/nginx/nextword.conf) beside the same 2 direct: the proxy's cost in TTFT and
tokens/s. Prints one table; `--json FILE` also writes the figures.

    python benchmarks/replicas.py                      # about 5 minutes
    python benchmarks/replicas.py --replicas 1 2 --concurrency 16 --requests-per-stream 1

On one machine the replicas share its cores (each gets cores / replicas kernel threads), so this measures
correctness and overhead (the spread over replicas, errors, what the proxy adds), not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the replica and nginx launchers the tests use

from servers import ServeProcess, nginx_proxy

from nextword.client.load import format_result


def load(target: str, concurrency: int, requests: int, args) -> dict:
    """One `nextword load` run, as a user runs it; its --json summary."""
    cmd = [sys.executable, "-m", "nextword.client.cli", "load", "--target", target, "--json"]
    cmd += ["--concurrency", str(concurrency), "--num-requests", str(requests), "--warmup", str(concurrency)]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise SystemExit(f"nextword load failed:\n{done.stderr}")
    return json.loads(done.stdout)


def resident_mib(proc: ServeProcess) -> float:
    """process_resident_memory_bytes from the replica's /metrics, in MiB."""
    url = next(
        m.group(1) for line in proc.lines if (m := re.search(r"metrics on (http://\S+/metrics)", line))
    )
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("process_resident_memory_bytes "):
                return float(line.split()[1]) / 2**20
    return float("nan")


def row(setup: str, n: int, c: int, d: dict) -> dict:
    spread = "/".join(str(v["requests"]) for v in d["replicas"].values()) or "-"
    errors = sum(d["errors"].values())
    return {
        "setup": setup,
        "replicas": n,
        "concurrency": c,
        "completed": d["completed"],
        "errors": errors,
        "spread": spread,
        "tok_s": d["output_throughput"],
        "ttft_median_ms": d["median_ttft_ms"],
        "ttft_p99_ms": d["p99_ttft_ms"],
        "tpot_median_ms": d["median_tpot_ms"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument(
        "--requests-per-stream", type=int, default=2, help="measured requests = this x concurrency"
    )
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--proxy-replicas", type=int, default=2, help="replicas behind nginx (0: no proxy runs)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    nginx = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    cores = len(os.sched_getaffinity(0))
    rows, memory, report = [], {}, None
    for n in sorted(set(args.replicas) | ({args.proxy_replicas} if args.proxy_replicas else set())):
        threads = max(1, cores // n)
        print(f"starting {n} replica(s), {threads} kernel thread(s) each ...", file=sys.stderr, flush=True)
        procs = [
            ServeProcess(None, f"r{i}", "--metrics-port", "0", weights="q4", threads=threads)
            for i in range(n)
        ]
        try:
            for proc in procs:
                proc.wait_ready()
            direct = "ipv4:" + ",".join(proc.address for proc in procs)
            for c in args.concurrency:
                print(f"  {n} replica(s), {c} streams, direct ...", file=sys.stderr, flush=True)
                summary = load(direct, c, c * args.requests_per_stream, args)
                rows.append(row("direct", n, c, summary))
                report = report or (n > 1 and (direct, summary))  # shown as `nextword load` prints it
                if n == args.proxy_replicas and nginx:
                    with (
                        tempfile.TemporaryDirectory() as folder,
                        nginx_proxy(nginx, [proc.address for proc in procs], Path(folder)) as proxy,
                    ):
                        print(f"  {n} replica(s), {c} streams, nginx ...", file=sys.stderr, flush=True)
                        rows.append(row("nginx", n, c, load(proxy, c, c * args.requests_per_stream, args)))
            memory[n] = [round(resident_mib(proc)) for proc in procs]
        finally:
            for proc in procs:
                proc.stop()
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {cores} cores")
    head = f"{'setup':<8}{'replicas':>9}{'streams':>8}{'done':>6}{'errors':>7}  {'per replica':<14}"
    head += f"{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}"
    print(head)
    for r in rows:
        print(
            f"{r['setup']:<8}{r['replicas']:>9}{r['concurrency']:>8}{r['completed']:>6}{r['errors']:>7}  "
            f"{r['spread']:<14}{r['tok_s']:>8.1f}{r['ttft_median_ms']:>10.0f}{r['ttft_p99_ms']:>10.0f}"
            f"{r['tpot_median_ms']:>10.1f}"
        )
    for c in args.concurrency:
        pair = {r["setup"]: r for r in rows if r["replicas"] == args.proxy_replicas and r["concurrency"] == c}
        if "nginx" in pair and "direct" in pair:
            d, x = pair["direct"], pair["nginx"]
            print(
                f"nginx vs direct, {args.proxy_replicas} replicas, {c} streams: TTFT p50 "
                f"{x['ttft_median_ms'] - d['ttft_median_ms']:+.0f} ms, tok/s {x['tok_s'] / d['tok_s'] - 1:+.1%}"
            )
    print(
        "resident memory after the runs (MiB): "
        + "; ".join(f"{n} replica(s): {m}" for n, m in memory.items())
    )
    if report:
        target, summary = report
        print(f"\nnextword load --target {target} ... prints:\n{format_result(summary)}")
    if not nginx:
        print("nginx is not installed (apt-get install nginx-light): no proxy rows")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "resident_mib": memory}, indent=2) + "\n")


if __name__ == "__main__":
    main()
