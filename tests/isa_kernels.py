"""Run by test_isa.py in a process whose Numba compiles for another CPU (nextword.kernels.isa.numba_env):
checks that the process really compiles for it, then runs the quantized kernels against the float64
reference (test_quant.check_kernels). Not a test module: its kernels must never share a process with the
suite's own. Usage: python tests/isa_kernels.py avx2|portable"""

import sys
from pathlib import Path

import numba

sys.path.insert(0, str(Path(__file__).parent))

from test_quant import KERNELS, check_kernels

from nextword.kernels import isa
from nextword.kernels import quant as kq


def main(expected: str) -> None:
    target = isa.target()
    assert target.isa == {"avx2": "avx2", "portable": "baseline"}[expected], target
    assert target.kernels == {"avx2": "avx2", "portable": "portable"}[expected], target
    assert kq.HAVE_AVX2 == (expected == "avx2")
    # The kernels (cases of test_kernels_match_reference and test_kernels_block_loop_tails): 1 and 5 tokens
    # (the 1-token and the 4-token row dots), blocks per row 1, 17 and 18.
    for kind in ("Q8_0", "Q4_1"):
        for t, n, k in [(1, 7, 32), (5, 7, 544), (5, 9, 576), (1, 64, 576)]:
            check_kernels(kind, t, n, k, seed=t * 10000 + n * 100 + k)
    # What LLVM emitted for one kernel (compiled afresh: cached code has no assembly to show).
    fresh = numba.njit(kq.matmul_q4_1_xq.py_func, parallel=True, fastmath=True)
    fresh.compile(KERNELS["Q4_1"][0].signatures[0])
    asm = fresh.inspect_asm(fresh.signatures[0])
    assert not isa.uses_avx512(asm), "AVX-512 instructions in code compiled for an AVX2-only CPU"
    assert ("vpmaddubsw" in asm) == (expected == "avx2")
    print(f"ok: {target}")


if __name__ == "__main__":
    main(sys.argv[1])
