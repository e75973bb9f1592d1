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


def compiled_asm(kernel, args) -> str:
    """The assembly of njit `kernel` compiled for `args`; it must hold no AVX-512 instruction."""
    kernel(*args)
    asm = kernel.inspect_asm(kernel.signatures[0])
    assert not isa.uses_avx512(asm), "AVX-512 instructions in code compiled for an AVX2-only CPU"
    return asm


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
    # What LLVM emitted for the kernels this target runs (compiled afresh: cached code has no assembly): the
    # decode kernels (rows in the lanes on AVX2, the portable row dots elsewhere), Q4_1's with vpmaddubsw and
    # Q8_M's (uint8 weights widened to int16, times int16 activations) with vpmaddwd; and on AVX2 the prompt
    # path's rows-in-lanes kernel, one vpshufb per weight element.
    avx2 = expected == "avx2"
    dx = np.ones((1, 2), np.float32)
    for fmt, quantize, xdtype, instruction in (("q4_1", quantize_q4_1, np.int8, "vpmaddubsw"),
                                               ("q8_m", quantize_q8_m, np.int16, "vpmaddwd")):  # fmt: skip
        w = quantize(np.ones((8, 64), np.float32))
        if avx2:
            rows_xq = getattr(kq, f"_rows_{fmt}_xq")
            kernel = numba.njit(lambda out, xq, dx, sx, qs, d, m, k=rows_xq: k(out, xq, dx, sx, qs, d, m, 0))
            args = (np.empty((1, 8), np.float32), np.ones((1, 64), xdtype), dx, dx, *w.blocks)
        else:
            dot = kq._dot_q4_portable if fmt == "q4_1" else kq._dot_q8m_portable
            kernel = numba.njit(lambda qs, d, m, xq, dx, sx, k=dot: k(qs, d, m, 0, xq, dx, sx, 0))
            args = (*w.blocks, np.ones((1, 64), xdtype), dx, dx)
        assert (instruction in compiled_asm(kernel, args)) == avx2, fmt
    if avx2:
        rows = numba.njit(lambda out, x, qs, d, m: kq._few_rows_q4_1(out, x, qs, d, m, 0, 0))
        w = quantize_q4_1(np.ones((4 * kq.LANES, 64), np.float32))
        assert "vpshufb" in compiled_asm(
            rows, (np.empty((1, 4 * kq.LANES), np.float32), np.ones((1, 64), np.float32), *w.blocks)
        )
    print(f"ok: {target}")


if __name__ == "__main__":
    main(sys.argv[1])
