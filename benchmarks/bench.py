"""nextword against llama.cpp and Hugging Face transformers, on SmolLM2-135M, in one run.

    python benchmarks/bench.py [--repeats 3] [--formats q4 int8 f32] [--peers ~/.cache/nextword-peers]

Each repeat runs every engine once, one after the other (alternating, so machine noise hits all of them),
each in a fresh process: nextword in each weight format, llama.cpp (llama-cpp-python + llama-batched-bench,
Q4_1 GGUF) and transformers (float32) when the peers' venv is installed (see ../shared/peers/setup.sh; the
peers are never nextword dependencies). Measured per pass:
- start-up: process start -> first token (nextword with its Numba cache warm; once more with an empty
  cache: "cold");
- decode tokens/s at batch 1: 128 new tokens after a 30-token prompt, and after a 1000-token prompt;
- prefill tokens/s of a 512-token prompt; aggregate decode tokens/s of 16 sequences together;
- resident memory at the end of the pass.
Prints min / median / max over the repeats and the ratio of medians to llama.cpp; writes --json.
Run it alone on the machine: 2 cores, and nothing else compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
WORKERS = HERE / "workers"
METRICS = [
    ("startup_s", "start-up to first token (s)", False),
    ("decode_short_tps", "decode, 30-token prompt (tok/s)", True),
    ("decode_long_tps", "decode, 1000-token prompt (tok/s)", True),
    ("prefill_512_tps", "prefill, 512 tokens (tok/s)", True),
    ("batch16_tps", "decode, 16 sequences (tok/s)", True),
    ("rss_mib", "resident memory (MiB)", False),
]


def run_pass(cmd: list[str], env: dict | None = None) -> dict:
    """Run one worker; returns its JSON plus startup_s (process start -> its FIRST_TOKEN line)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    startup = None
    result = None
    for line in proc.stdout:
        if line.startswith("FIRST_TOKEN") and startup is None:
            startup = time.perf_counter() - started
        elif line.startswith("{"):
            result = json.loads(line)
    if proc.wait() != 0 or result is None:
        raise RuntimeError(f"{cmd[1]} failed:\n{proc.stderr.read()[-2000:]}")
    return result | {"startup_s": startup}


def llama_batched_bench(binary: Path, gguf: Path, threads: int) -> float | None:
    """llama.cpp's own batched decode: S_TG (generation tokens/s) with 16 parallel sequences."""
    if not binary.exists():
        return None
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", "4096", "-b", "2048",
           "-ub", "512", "-npp", "32", "-ntg", "64", "-npl", "16"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = [r for r in out.splitlines() if re.match(r"\|\s+32\s+\|\s+64\s+\|\s+16\s+\|", r)]
    return (
        float(rows[0].split("|")[8]) if rows else None
    )  # | PP | TG | B | N_KV | T_PP | S_PP | T_TG | S_TG |


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", nargs="+", default=["q4", "int8", "f32"])
    ap.add_argument(
        "--peers", default=os.environ.get("NEXTWORD_PEERS", str(Path.home() / ".cache/nextword-peers"))
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (slow: ~1 minute a pass)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    peers = Path(args.peers)
    peer_python = peers / "venv" / "bin" / "python"
    gguf = peers / "model" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    engines: dict[str, list[str]] = {
        f"nextword {f}": [sys.executable, str(WORKERS / "nextword_worker.py"), f] for f in args.formats
    }
    if peer_python.exists() and gguf.exists():
        engines["llama.cpp Q4_1"] = [
            str(peer_python),
            str(WORKERS / "llama_cpp_worker.py"),
            str(gguf),
            str(args.threads),
        ]
        if not args.no_hf and (peers / "smollm2-hf").exists():
            engines["transformers f32"] = [str(peer_python), str(WORKERS / "hf_worker.py"), str(peers / "smollm2-hf"), str(args.threads)]  # fmt: skip
    else:
        print(
            f"peers not installed under {peers}: nextword only (see ../shared/peers/setup.sh)",
            file=sys.stderr,
        )
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "NUMBA_NUM_THREADS": str(args.threads)}

    results: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    for r in range(args.repeats):
        for name, cmd in engines.items():
            salt = str(100 + r) if name.startswith("nextword") else None
            res = run_pass(cmd + ([salt] if salt else []), env)
            if name.startswith("llama.cpp"):
                res["batch16_tps"] = llama_batched_bench(peers / "src/llama.cpp/build/bin/llama-batched-bench", gguf, args.threads)  # fmt: skip
            for key, value in res.items():
                if value is not None:
                    results[name].setdefault(key, []).append(value)
            print(f"[repeat {r + 1}/{args.repeats}] {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items() if v is not None), file=sys.stderr, flush=True)  # fmt: skip
    # start-up with an empty Numba cache: every kernel compiles (once per run, the default format)
    cold = args.formats[0]
    with tempfile.TemporaryDirectory() as cache:
        res = run_pass(engines[f"nextword {cold}"] + ["999"], env | {"NUMBA_CACHE_DIR": cache})
    results[f"nextword {cold}"]["startup_cold_s"] = [res["startup_s"]]

    table = {name: {k: summary(v) for k, v in m.items()} for name, m in results.items()}
    print_table(table, base="llama.cpp Q4_1" if "llama.cpp Q4_1" in table else None)
    if args.json:
        Path(args.json).write_text(json.dumps({"repeats": args.repeats, "results": table}, indent=1))


def print_table(table: dict, base: str | None) -> None:
    names = list(table)
    print(f"\n{'median (min-max)':<36}" + "".join(f"{n:>24}" for n in names))
    for key, label, _ in METRICS + [("startup_cold_s", "start-up, empty Numba cache (s)", False)]:
        cells = []
        for n in names:
            s = table[n].get(key)
            cells.append(f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})" if s else "-")
        print(f"{label:<36}" + "".join(f"{c:>24}" for c in cells))
    if base:
        print(f"\nratio of medians to {base} (higher is better for speeds)")
        for key, label, _ in METRICS:
            ref = table[base].get(key)
            cells = [
                f"{table[n][key]['median'] / ref['median']:.2f}x" if ref and key in table[n] else "-"
                for n in names
            ]
            print(f"{label:<36}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
