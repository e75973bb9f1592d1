"""Soak: a `nextword serve` under mixed hostile-ish load for a bounded time, its memory and threads sampled.

    python benchmarks/soak.py [--minutes 20] [--workers 6] [--warmup-minutes 2] [--weights q4]

Each worker loops over: a stream read to its end, a stream cancelled after a few tokens, a Session of
keystrokes (each request superseding the last), a NextTokenProbabilities call, and bad requests (an
oversized request_id, malformed bytes). Every 10 s the server's RSS, anonymous memory and threads
(/proc) and its KV cache's resident MiB, live sequences and KV-cache use (/metrics) are printed as a table
row. The KV cache is a shared mapping written lazily: it counts in RSS, not in anonymous memory, and grows
up to its configured size as the prefix cache fills it. At the end: anonymous
memory against its value after the warm-up (the goal: within 10%), and the request outcomes.
"""

import argparse
import random
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from serving import start_server

from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc

WORDS = [
    "the",
    "a",
    "model",
    "server",
    "token",
    "stream",
    "cancel",
    "session",
    "editor",
    "word",
    "next",
    "line",
    "code",
    "test",
]


def proc_status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    kb = lambda k: int(fields[k].split()[0])
    return {"rss": kb("VmRSS") >> 10, "anon": kb("RssAnon") >> 10, "threads": int(fields["Threads"])}


def scrape(url: str) -> dict[str, float]:
    values = {}
    for line in urllib.request.urlopen(url, timeout=30).read().decode().splitlines():
        if not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def kv_mib(metrics: dict[str, float]) -> int:
    """The KV cache's resident (written) MiB: in RSS, not in anon (a shared mapping: RssShmem)."""
    return int(metrics["nextword_kv_cache_resident_bytes"]) >> 20


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def worker(target: str, stop: threading.Event, outcomes: Counter, seed: int) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(target) as ch:
        stub = nextword_pb2_grpc.InferenceStub(ch)
        raw = ch.unary_unary("/nextword.v1.Inference/Complete")
        while not stop.is_set():
            kind = rng.choice(["stream", "cancel", "session", "probs", "bad"])
            try:
                if kind in ("stream", "cancel"):
                    request = pb.GenerateRequest(
                        prompt=pb.Prompt(text=text(rng, rng.randint(5, 200))),
                        max_new_tokens=rng.randint(8, 64),
                        top_n=rng.choice([0, 5]),
                    )
                    for i, _ in enumerate(stub.Generate(request, timeout=300)):
                        if kind == "cancel" and i == 3:
                            break
                elif kind == "session":
                    typed = text(rng, 20)
                    keystrokes = [
                        pb.GenerateRequest(
                            request_id=f"k{i}", prompt=pb.Prompt(text=typed[:i]), max_new_tokens=8
                        )
                        for i in range(5, len(typed), 3)
                    ]
                    for _ in stub.Session(iter(keystrokes), timeout=300):
                        pass
                elif kind == "probs":
                    prompt = pb.Prompt(text=text(rng, rng.randint(50, 400)))
                    stub.NextTokenProbabilities(
                        pb.NextTokenProbabilitiesRequest(prompt=prompt, top_n=5), timeout=300
                    )
                else:
                    try:
                        stub.Complete(
                            pb.GenerateRequest(request_id="x" * 100_000, prompt=pb.Prompt(text="Hi"))
                        )
                    except grpc.RpcError as e:
                        outcomes[f"bad:{e.code().name}"] += 1
                    raw(b"\x12\x10\x0a", timeout=30)
                outcomes[kind] += 1
            except grpc.RpcError as e:
                outcomes[f"{kind}:{e.code().name}"] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--warmup-minutes", type=float, default=2)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--weights", default="q4")
    args = ap.parse_args()

    proc, target, metrics_url = start_server(args.weights, metrics=True)
    stop, outcomes = threading.Event(), Counter()
    workers = [
        threading.Thread(target=worker, args=(target, stop, outcomes, i), daemon=True)
        for i in range(args.workers)
    ]
    rows, started = [], time.monotonic()
    print("| t (s) | RSS MiB | anon MiB | KV cache MiB | threads | live seqs | KV used |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for w in workers:
            w.start()
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            m, s = scrape(metrics_url), proc_status(proc.pid)
            live = m["nextword_running_sequences"] + m["nextword_waiting_requests"]
            rows.append((elapsed, s["anon"]))
            print(
                f"| {elapsed:.0f} | {s['rss']} | {s['anon']} | {kv_mib(m)} | {s['threads']} | {live:.0f} | "
                f"{m['nextword_kv_cache_used_ratio']:.0%} |",
                flush=True,
            )
            time.sleep(10)
        stop.set()
        for w in workers:
            w.join(300)
        time.sleep(2)  # idle: the engine returns freed memory
        m, s = scrape(metrics_url), proc_status(proc.pid)
        live = m["nextword_running_sequences"] + m["nextword_waiting_requests"]
        print(
            f"| idle | {s['rss']} | {s['anon']} | {kv_mib(m)} | {s['threads']} | {live:.0f} | {m['nextword_kv_cache_used_ratio']:.0%} |"
        )
    finally:
        stop.set()
        proc.terminate()
        proc.wait(60)
    warm = next((anon for t, anon in rows if t >= args.warmup_minutes * 60), rows[-1][1])
    print(
        f"\nanonymous memory: {warm} MiB after warm-up, {s['anon']} MiB at the end ({s['anon'] / warm - 1:+.1%})"
    )
    print("outcomes:", dict(sorted(outcomes.items())))


if __name__ == "__main__":
    main()
