"""Resident memory of `nextword serve` against the weights it serves, after real work.

    python benchmarks/memory.py [--formats q4 int8 f32] [--repeats 3]

For each weight format, a fresh server (the default model) answers a 1000-token prompt with 128 tokens and
then 16 requests at once with 64 tokens each; then its /metrics gives the process's resident memory, the
bytes of its weights and the bytes of KV cache in memory (the pages written so far, from mincore), and
/proc gives the anonymous / file-backed split. The target (issue 12): resident - KV cache <= 1.5 x weights.
Prints min / median / max over the repeats.
"""

import argparse
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prompts import BATCH, BATCH_NEW_TOKENS, LONG_TEXT, MEDIUM_PROMPT, NEW_TOKENS
from serving import start_server

from nextword.client import Client

MIB = 1 << 20


def workload(target: str) -> None:
    with Client(target, timeout=600) as client:
        long_ids = client.tokenize(LONG_TEXT * 20).ids[:1000]
        client.complete(long_ids, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        prompts = [f"{i}. {MEDIUM_PROMPT}" for i in range(BATCH)]
        with ThreadPoolExecutor(BATCH) as pool:
            done = pool.map(
                lambda p: client.complete(
                    p, max_new_tokens=BATCH_NEW_TOKENS, temperature=0.0, ignore_eos=True
                ),
                prompts,
            )
            assert all(len(c.tokens) == BATCH_NEW_TOKENS for c in done)


def scrape(url: str) -> dict[str, float]:
    wanted = ("process_resident_memory_bytes", "nextword_weights_bytes", "nextword_kv_cache_resident_bytes")
    values = {}
    for line in urllib.request.urlopen(url).read().decode().splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


def smaps_rollup(pid: int) -> dict[str, float]:
    """kB fields of /proc/pid/smaps_rollup, in MiB."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return out


def measure(weights: str) -> dict[str, float]:
    proc, target, metrics_url = start_server(weights, metrics=True)
    try:
        workload(target)
        time.sleep(0.5)  # the engine returns freed buffers once idle
        m = scrape(metrics_url)
        smaps = smaps_rollup(proc.pid)
        with Client(target, timeout=60) as client:  # a cosine search reads every row of the mapped table
            client.nearest_tokens([(" king", 1.0)], top_n=5)
        after_search = scrape(metrics_url)
    finally:
        proc.terminate()
        proc.wait()
    rss, w, kv = (m[k] / MIB for k in ("process_resident_memory_bytes", "nextword_weights_bytes", "nextword_kv_cache_resident_bytes"))  # fmt: skip
    rss_search = after_search["process_resident_memory_bytes"] / MIB
    return {
        "weights": w,
        "rss": rss,
        "kv": kv,
        "rss_minus_kv": rss - kv,
        "ratio": (rss - kv) / w,
        "anon": smaps["Pss_Anon"],  # private memory: Pss = Rss
        "file": smaps["Rss"] - smaps["Pss_Anon"] - smaps["Pss_Shmem"],
        "ratio_search": (rss_search - kv) / w,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", nargs="+", default=["q4", "int8", "f32"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs = {f: [] for f in args.formats}
    for r in range(args.repeats):
        for f in args.formats:
            runs[f].append(measure(f))
            print(f"pass {r + 1} {f}: {runs[f][-1]['rss']:.0f} MiB resident", file=sys.stderr, flush=True)

    def cell(f: str, key: str, fmt: str = "{:.0f}") -> str:
        v = [run[key] for run in runs[f]]
        return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"

    rows = [
        ("weights served (MiB)", "weights", "{:.0f}"),
        ("resident (MiB)", "rss", "{:.0f}"),
        ("  of which KV cache (MiB)", "kv", "{:.0f}"),
        ("  anonymous, KV cache excluded (MiB)", "anon", "{:.0f}"),
        ("  file-backed: libraries, the mapped embedding table (MiB)", "file", "{:.0f}"),
        ("resident - KV cache (MiB)", "rss_minus_kv", "{:.0f}"),
        ("(resident - KV cache) / weights (target <= 1.5)", "ratio", "{:.2f}"),
        ("the same after NearestTokens read the whole embedding table", "ratio_search", "{:.2f}"),
    ]
    print(f"| `nextword serve`, after a 1000-token prompt and {BATCH} requests at once | " + " | ".join(args.formats) + " |")  # fmt: skip
    print("|---|" + "---|" * len(args.formats))
    for label, key, fmt in rows:
        print(f"| {label} | " + " | ".join(cell(f, key, fmt) for f in args.formats) + " |")


if __name__ == "__main__":
    main()
