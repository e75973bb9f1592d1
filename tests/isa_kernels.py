"""Run by test_isa.py in a process whose Numba compiles for another CPU (nextword.kernels.isa.numba_env):
checks that the process really compiles for it, then runs the quantized kernels against the float64
reference (test_quant.check_kernels), and attention over a float16 KV cache. Not a test module: its kernels must never share a process with the
suite's own. Usage: python tests/isa_kernels.py avx2|portable"""

import sys
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from test_kernels import test_paged_attention_ragged_batch
from test_quant import (
    check_kernels,
    test_a_prompt_tokens_sums_do_not_depend_on_how_many_tokens_share_the_call,
    test_int8_path_results_do_not_depend_on_the_batch,
)

from nextword.kernels import attention, isa
from nextword.kernels import quant as kq
from nextword.weights.quantize import quantize_q4_1, quantize_q8_m


def kq_inputs():
    w = quantize_q4_1(np.ones((1, 64), np.float32))
    return w, np.ones((1, 64), np.int8), np.ones((1, 2), np.float32)


def main(expected: str) -> None:
    target = isa.target()
    assert target.isa == {"avx2": "avx2", "portable": "baseline"}[expected], target
    assert target.kernels == {"avx2": "avx2", "portable": "portable"}[expected], target
    assert kq.HAVE_AVX2 == attention.HAVE_F16C == (expected == "avx2")
    # The kernels (cases of test_kernels_match_reference and test_kernels_block_loop_tails): 1 and 5 tokens
    # (the 1-token and the 4-token row dots), blocks per row 1, 17 and 18.
    for kind in ("Q8_0", "Q4_1", "Q8_M"):
        for t, n, k in [(1, 7, 32), (5, 7, 544), (5, 9, 576), (1, 64, 576)]:
            check_kernels(kind, t, n, k, seed=t * 10000 + n * 100 + k)
    for kind in ("Q4_1", "Q8_M"):  # the one-token and several-token ways agree bit for bit
        for n, k in [(13, 544), (29, 576)]:
            test_int8_path_results_do_not_depend_on_the_batch(kind, n, k)
    for kind in ("Q8_0", "Q4_1", "Q8_M"):  # the float-activation path's two micro-kernels agree bit for bit
        test_a_prompt_tokens_sums_do_not_depend_on_how_many_tokens_share_the_call(kind)
    # Attention over a float16 KV cache: F16C conversions on avx2, integer ones on portable.
    for chunk in (256, 5):
        test_paged_attention_ragged_batch(9, 3, 64, 16, chunk, "f16")
    # What LLVM emitted for the Q4_1 decode kernel this target runs (compiled afresh: cached code has no
    # assembly): the rows-in-lanes kernel on AVX2, the portable row dot elsewhere.
    w, xq, dx = kq_inputs()
    if expected == "avx2":
        q4 = numba.njit(lambda qs, d, m, xq, dx, sx: kq._rows_q4_1_xq(np.empty((1, 8), np.float32), xq, dx, sx,
                                                                      qs, d, m, 0))  # fmt: skip
        q4(*quantize_q4_1(np.ones((8, 64), np.float32)).blocks, xq, dx, dx)
    else:
        q4 = numba.njit(lambda qs, d, m, xq, dx, sx: kq._dot_q4_portable(qs, d, m, 0, xq, dx, sx, 0))
        q4(w.qs, w.d, w.m, xq, dx, dx)
    asm = q4.inspect_asm(q4.signatures[0])
    assert not isa.uses_avx512(asm), "AVX-512 instructions in code compiled for an AVX2-only CPU"
    assert ("vpmaddubsw" in asm) == (expected == "avx2")
    # and for Q8_M's (uint8 weights widened to int16, times int16 activations: vpmaddwd)
    x16 = np.ones((1, 64), np.int16)
    if expected == "avx2":
        q8m = numba.njit(lambda qs, d, m, xq, dx, sx: kq._rows_q8_m_xq(np.empty((1, 8), np.float32), xq, dx, sx,
                                                                       qs, d, m, 0))  # fmt: skip
        q8m(*quantize_q8_m(np.ones((8, 64), np.float32)).blocks, x16, dx, dx)
    else:
        q8m = numba.njit(lambda qs, d, m, xq, dx, sx: kq._dot_q8m_portable(qs, d, m, 0, xq, dx, sx, 0))
        q8m(*quantize_q8_m(np.ones((1, 64), np.float32)).blocks, x16, dx, dx)
    asm = q8m.inspect_asm(q8m.signatures[0])
    assert not isa.uses_avx512(asm), "AVX-512 instructions in code compiled for an AVX2-only CPU"
    assert ("vpmaddwd" in asm) == (expected == "avx2")
    # and for the prompt path's rows-in-lanes kernel (one vpshufb per weight element), on AVX2 only
    if expected == "avx2":
        rows = numba.njit(lambda out, x, qs, d, m: kq._few_rows_q4_1(out, x, qs, d, m, 0, 0))
        w = quantize_q4_1(np.ones((4 * kq.LANES, 64), np.float32))
        rows(np.empty((1, 4 * kq.LANES), np.float32), np.ones((1, 64), np.float32), w.qs, w.d, w.m)
        asm = rows.inspect_asm(rows.signatures[0])
        assert not isa.uses_avx512(asm), "AVX-512 instructions in code compiled for an AVX2-only CPU"
        assert "vpshufb" in asm
    print(f"ok: {target}")


if __name__ == "__main__":
    main(sys.argv[1])
