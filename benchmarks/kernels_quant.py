"""Quantized matmul kernels vs float32 on SmolLM2-135M's shapes: microseconds per product, effective GB/s.

    python benchmarks/kernels_quant.py [--runs 21] [--pool-mb 256] [--isa avx2]

Cold-ish: every call uses the next of several copies of the weight (together >= --pool-mb, at least 3),
so weights stream from DRAM as in a real decode step rather than sitting in L3. Each cell is the median
of --runs calls. GB/s = weight bytes / time. Columns: "dec" the decode path (integer activations: int8 for
Q8_0 and Q4_1, int16 for Q8_M), "pr" the prompt path (float32 activations), at T tokens. A measurement
script, not a test; numbers on a shared VM are noisy (+-15% or more), so compare columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import functools
import time

import numba
import numpy as np

from nextword.kernels import quant as kq
from nextword.kernels.isa import ISAS, reexec_as, target
from nextword.kernels.matmul import matmul_f32
from nextword.weights.quantize import quantize_q4_1, quantize_q8_0, quantize_q8_m

SHAPES = {  # name: (N, K)
    "qkv 960x576": (960, 576),
    "o 576x576": (576, 576),
    "gate_up 3072x576": (3072, 576),
    "down 576x1536": (576, 1536),
    "lm_head 49152x576": (49152, 576),
}
FORMATS = {  # name: (quantizer, decode kernel, prompt kernel)
    "q8_0": (quantize_q8_0, kq.matmul_q8_0_xq, kq.matmul_q8_0_xf),
    "q8_m": (quantize_q8_m, kq.matmul_q8_m_xq, kq.matmul_q8_m_xf),
    "q4_1": (quantize_q4_1, kq.matmul_q4_1_xq, kq.matmul_q4_1_xf),
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
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), help="subset of: " + ", ".join(FORMATS))
    ap.add_argument(
        "--isa", choices=ISAS, help="compile the kernels for this instruction set (default: host)"
    )
    a = ap.parse_args()
    if a.isa:
        reexec_as(a.isa)
    if a.threads:
        numba.set_num_threads(a.threads)

    rng = np.random.default_rng(0)
    print(
        f"kernels for {target()}; {numba.get_num_threads()} threads; median of {a.runs} calls; cells: us (GB/s)"
    )
    cols = ["T=1 f32", "T=16 f32"]
    for fmt in a.formats:
        cols += [f"T=1 {fmt} dec", f"T=16 {fmt} dec", f"T=16 {fmt} pr"]
    print(f"{'shape':<20}" + "".join(f"{c:>18}" for c in cols))
    for name in a.shapes:
        n, k = SHAPES[name]
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        cases = [(matmul_f32, (w,), 1), (matmul_f32, (w,), 16)]
        for fmt in a.formats:
            quantize, dec, prompt = FORMATS[fmt]
            blocks = quantize(w).blocks
            tiled = functools.partial(prompt, tiled=True)  # as linear() runs prompt tokens
            cases += [(dec, blocks, 1), (dec, blocks, 16), (tiled, blocks, 16)]
        row = f"{name:<20}"
        for fn, args, T in cases:
            nbytes = sum(arr.nbytes for arr in args)
            x = rng.standard_normal((T, k)).astype(np.float32)
            out = np.empty((T, n), np.float32)
            copies = max(3, int(np.ceil(a.pool_mb * 2**20 / nbytes)))
            pool = [tuple(np.copy(arr) for arr in args) for _ in range(copies)]
            s = timed(fn, out, x, pool, a.runs)
            row += f"{s * 1e6:>11.0f} ({nbytes / s / 1e9:4.1f})"
            del pool
        print(row, flush=True)


if __name__ == "__main__":
    main()
