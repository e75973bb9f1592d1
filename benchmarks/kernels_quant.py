"""Quantized matmul kernels vs float32 on SmolLM2-135M's shapes: microseconds per product, effective GB/s.

    /work/venv/bin/python benchmarks/kernels_quant.py [--runs 21] [--pool-mb 256]

Cold-ish: every call uses the next of several copies of the weight (together >= --pool-mb, at least 3),
so weights stream from DRAM as in a real decode step rather than sitting in L3. Each cell is the median
of --runs calls. GB/s = weight bytes / time. A measurement script, not a test; numbers on a shared VM are
noisy (+-15% or more), so compare columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from nextword.kernels.matmul import matmul_f32
from nextword.kernels.quant import HAVE_AVX2, matmul_q4_1, matmul_q4_1_xq, matmul_q8_0, matmul_q8_0_xq
from nextword.weights.quantize import quantize_q4_1, quantize_q8_0

SHAPES = {  # name: (N, K)
    "qkv 960x576": (960, 576),
    "o 576x576": (576, 576),
    "gate_up 3072x576": (3072, 576),
    "down 576x1536": (576, 1536),
    "lm_head 49152x576": (49152, 576),
}


def timed(fn, out, x, pool, runs: int) -> float:
    """Median seconds of fn(out, x, *args), rotating through the copies in pool."""
    fn(out, x, *pool[0])  # compile / warm up
    times = []
    for r in range(runs):
        args = pool[(r + 1) % len(pool)]
        t0 = time.perf_counter()
        fn(out, x, *args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--pool-mb", type=float, default=256.0, help="bytes of weight copies to rotate through")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (default: all)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="subset of: " + ", ".join(SHAPES))
    a = ap.parse_args()
    if a.threads:
        numba.set_num_threads(a.threads)

    rng = np.random.default_rng(0)
    cols = ["f32", "q8", "q4"]
    print(
        f"AVX2 kernels: {HAVE_AVX2}; {numba.get_num_threads()} threads; median of {a.runs} calls;"
        " cells: us (GB/s of weights); 'i8': int8 activations at T=16 (the auto path uses float ones)"
    )
    header = f"{'shape':<20}" + "".join(f"{'T=1 ' + c:>16}" for c in cols)
    header += "".join(f"{'T=16 ' + c:>16}" for c in cols) + "".join(
        f"{'T=16 ' + c + ' i8':>16}" for c in cols[1:]
    )
    print(header)
    for name in a.shapes:
        n, k = SHAPES[name]
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        q8, q4 = quantize_q8_0(w), quantize_q4_1(w)
        formats = {  # name: (kernel for the auto path, int8-activation kernel, args, bytes)
            "f32": (matmul_f32, None, (w,), w.nbytes),
            "q8": (matmul_q8_0, matmul_q8_0_xq, (q8.qs, q8.d), q8.nbytes),
            "q4": (matmul_q4_1, matmul_q4_1_xq, (q4.qs, q4.d, q4.m), q4.nbytes),
        }
        row = f"{name:<20}"
        extra = ""
        for T in (1, 16):
            x = rng.standard_normal((T, k)).astype(np.float32)
            out = np.empty((T, n), np.float32)
            for fmt in cols:
                fn, fn_i8, args, nbytes = formats[fmt]
                copies = max(3, int(np.ceil(a.pool_mb * 2**20 / nbytes)))
                pool = [tuple(np.copy(arr) for arr in args) for _ in range(copies)]
                s = timed(fn, out, x, pool, a.runs)
                row += f"{s * 1e6:>9.0f} ({nbytes / s / 1e9:4.1f})"
                if T == 16 and fn_i8 is not None:
                    s = timed(fn_i8, out, x, pool, a.runs)
                    extra += f"{s * 1e6:>9.0f} ({nbytes / s / 1e9:4.1f})"
                del pool
        print(row + extra, flush=True)


if __name__ == "__main__":
    main()
