"""nextword against llama.cpp and Hugging Face transformers, on SmolLM2-135M, in one run.

    python benchmarks/bench.py [--repeats 3] [--formats q4 int8 f32] [--isa native avx2] [--no-hf]

--isa avx2 runs nextword as an AVX2-only CPU would (Numba compiles for AMD Zen 3, no AVX-512, in a cache of
its own: nextword.kernels.isa) and llama.cpp built for AVX2 only (PEERS_ISA=avx2 of ../shared/peers/setup.sh,
in --peers-avx2); --isa native avx2 runs both in the same run, alternating. Ratios are taken within one
instruction set, and every table says which one ran (from the code Numba compiled and llama.cpp's flags).

Each repeat runs every engine once, one after the other (alternating, so machine noise hits all of them),
each in a fresh process: nextword in each weight format, llama.cpp (llama-cpp-python + llama-batched-bench,
Q4_1 GGUF) and transformers (float32) when the peers' venv is installed (see ../shared/peers/setup.sh; the
peers are never nextword dependencies). Measured per pass:
- start-up: process start -> first token (nextword with its Numba cache warm; once more with an empty
  cache: "cold");
- decode tokens/s at batch 1: 128 new tokens after a 30-token prompt, after a 1000-token and a 4000-token one;
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

from nextword.kernels.isa import with_isa

HERE = Path(__file__).parent
WORKERS = HERE / "workers"
METRICS = [
    ("startup_s", "start-up to first token (s)", False),
    ("decode_short_tps", "decode, 30-token prompt (tok/s)", True),
    ("decode_long_tps", "decode, 1000-token prompt (tok/s)", True),
    ("decode_4k_tps", "decode, 4000-token prompt (tok/s)", True),
    ("prefill_512_tps", "prefill, 512 tokens (tok/s)", True),
    ("batch16_tps", "decode, 16 sequences (tok/s)", True),
    ("rss_mib", "resident memory (MiB)", False),
]


def run_pass(cmd: list[str], env: dict | None = None) -> dict:
    """Run one worker; returns its JSON plus startup_s (process start -> its FIRST_TOKEN line). A worker's
    JSON says which instruction set it ran ("isa", a string: not a measurement)."""
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
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-c",
        "4096",
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        "32",
        "-ntg",
        "64",
        "-npl",
        "16",
        "--no-repack",
    ]  # fmt: skip  (repacking picks ggml's AMX kernels where the CPU lists AMX: they segfault)
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
    ap.add_argument(
        "--peers-avx2",
        default=os.environ.get("NEXTWORD_PEERS_AVX2", str(Path.home() / ".cache/nextword-peers-avx2")),
        help="the peers built with PEERS_ISA=avx2 (llama.cpp without AVX-512), for --isa avx2",
    )
    ap.add_argument("--isa", nargs="+", default=["native"], choices=["native", "avx2"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (slow: ~1 minute a pass)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "NUMBA_NUM_THREADS": str(args.threads)}
    engines: dict[
        str, tuple[list[str], dict, str | None]
    ] = {}  # name -> command, environment, llama.cpp gguf
    for isa in args.isa:
        tag = "" if args.isa == ["native"] else f" [{isa}]"
        isa_env = with_isa(env, isa)
        for f in args.formats:
            engines[f"nextword {f}{tag}"] = (
                [sys.executable, str(WORKERS / "nextword_worker.py"), f],
                isa_env,
                None,
            )
        peers = Path(args.peers if isa == "native" else args.peers_avx2)
        peer_python = peers / "venv" / "bin" / "python"
        gguf = peers / "model" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not (peer_python.exists() and gguf.exists()):
            print(f"peers not installed under {peers}: no llama.cpp for {isa} (see ../shared/peers/setup.sh)", file=sys.stderr)  # fmt: skip
            continue
        cmd = [str(peer_python), str(WORKERS / "llama_cpp_worker.py"), str(gguf), str(args.threads)]
        engines[f"llama.cpp Q4_1{tag}"] = (cmd, env, str(gguf))
        if not args.no_hf and isa == "native" and (peers / "smollm2-hf").exists():
            engines["transformers f32"] = ([str(peer_python), str(WORKERS / "hf_worker.py"), str(peers / "smollm2-hf"), str(args.threads)], env, None)  # fmt: skip

    results: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    isas: dict[str, str] = {}
    for r in range(args.repeats):
        for name, (cmd, cmd_env, gguf) in engines.items():
            salt = str(100 + r) if name.startswith("nextword") else None
            res = run_pass(cmd + ([salt] if salt else []), cmd_env)
            isas[name] = res.pop("isa", "?")
            if gguf:
                bench = Path(gguf).parent.parent / "src/llama.cpp/build/bin/llama-batched-bench"
                res["batch16_tps"] = llama_batched_bench(bench, Path(gguf), args.threads)
            for key, value in res.items():
                if value is not None:
                    results[name].setdefault(key, []).append(value)
            print(f"[repeat {r + 1}/{args.repeats}] {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items() if v is not None), file=sys.stderr, flush=True)  # fmt: skip
    # start-up with an empty Numba cache: every kernel compiles (once per run, the first format and ISA)
    cold = next(n for n in engines if n.startswith("nextword"))
    with tempfile.TemporaryDirectory() as cache:
        cmd, cmd_env, _ = engines[cold]
        res = run_pass(cmd + ["999"], cmd_env | {"NUMBA_CACHE_DIR": cache})
    results[cold]["startup_cold_s"] = [res["startup_s"]]

    table = {name: {k: summary(v) for k, v in m.items()} for name, m in results.items()}
    print_table(table, isas)
    if args.json:
        out = {"repeats": args.repeats, "instruction_sets": isas, "results": table}
        Path(args.json).write_text(json.dumps(out, indent=1))


def print_table(table: dict, isas: dict[str, str]) -> None:
    names = list(table)
    width = max(24, *(len(n) + 2 for n in names))
    print(f"\n{'median (min-max)':<36}" + "".join(f"{n:>{width}}" for n in names))
    print(f"{'instruction set':<36}" + "".join(f"{isas.get(n, '?').split(' (')[0]:>{width}}" for n in names))
    for key, label, _ in METRICS + [("startup_cold_s", "start-up, empty Numba cache (s)", False)]:
        cells = []
        for n in names:
            s = table[n].get(key)
            cells.append(f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})" if s else "-")
        print(f"{label:<36}" + "".join(f"{c:>{width}}" for c in cells))
    for n in names:
        print(f"  {n}: {isas.get(n, '?')}")
    for base in [n for n in names if n.startswith("llama.cpp")]:
        tag = base[len("llama.cpp Q4_1") :]
        group = [n for n in names if n.endswith(tag) and not n.startswith("transformers")] if tag else names
        print(f"\nratio of medians to {base} (higher is better for speeds)")
        print(f"{'':<36}" + "".join(f"{n:>{width}}" for n in group))
        for key, label, _ in METRICS:
            ref = table[base].get(key)
            cells = [
                f"{table[n][key]['median'] / ref['median']:.2f}x" if ref and key in table[n] else "-"
                for n in group
            ]
            print(f"{label:<36}" + "".join(f"{c:>{width}}" for c in cells))


if __name__ == "__main__":
    main()
