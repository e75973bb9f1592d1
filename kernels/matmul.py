"""Matrix products against weight matrices: the entry point `linear` and one kernel per weight format.

`linear(out, x, w)` is what the forward passes call; it dispatches on the weight's format so that model code
never changes when a new format (int8, 4-bit blocks) is added. Weights are [N, K] (Hugging Face's
[out_features, in_features]); activations are [T, K], one row per token.
"""

import numpy as np
from numba import njit, prange

from nextword.kernels import FASTMATH
from nextword.kernels.quant import matmul_q4_1, matmul_q8_0
from nextword.weights.quantize import Q4Weight, Q8Weight


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def matmul_f32(out, x, w):
    """out[t, n] = dot(x[t], w[n]).   out: [T, N]; x: [T, K]; w: [N, K] float32

    Work items are blocks of 4 weight rows; within one, tokens go two at a time, so each loaded weight value
    feeds 2 products and each activation 4 (8 running sums: compute-bound at ~2x the plain dot product).
    With one token (decode) it is 4 plain row dots: bandwidth-bound, every weight read once.
    """
    T, K = x.shape
    N = w.shape[0]
    for blk in prange((N + 3) // 4):
        n0 = blk * 4
        t = 0
        if n0 + 4 <= N:
            while t + 2 <= T:
                a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = np.float32(0.0)
                for k in range(K):
                    x0, x1 = x[t, k], x[t + 1, k]
                    w0, w1, w2, w3 = w[n0, k], w[n0 + 1, k], w[n0 + 2, k], w[n0 + 3, k]
                    a00 += w0 * x0
                    a01 += w0 * x1
                    a10 += w1 * x0
                    a11 += w1 * x1
                    a20 += w2 * x0
                    a21 += w2 * x1
                    a30 += w3 * x0
                    a31 += w3 * x1
                out[t, n0], out[t + 1, n0] = a00, a01
                out[t, n0 + 1], out[t + 1, n0 + 1] = a10, a11
                out[t, n0 + 2], out[t + 1, n0 + 2] = a20, a21
                out[t, n0 + 3], out[t + 1, n0 + 3] = a30, a31
                t += 2
        for tt in range(t, T):  # the odd token, and the last rows when N is not a multiple of 4
            for n in range(n0, min(N, n0 + 4)):
                acc = np.float32(0.0)
                for k in range(K):
                    acc += x[tt, k] * w[n, k]
                out[tt, n] = acc


def linear(out: np.ndarray, x: np.ndarray, w) -> None:
    """out = x @ w.T for a weight in any supported format.   out: [T, N]; x: [T, K]; w: [N, K]"""
    if isinstance(w, np.ndarray) and w.dtype == np.float32:
        matmul_f32(out, x, w)
    elif isinstance(w, Q4Weight):
        matmul_q4_1(out, x, w.qs, w.d, w.m)
    elif isinstance(w, Q8Weight):
        matmul_q8_0(out, x, w.qs, w.d)
    else:
        raise TypeError(f"no matmul kernel for weight {type(w).__name__} {getattr(w, 'dtype', '')}")
