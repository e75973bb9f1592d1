"""Matrix products against weight matrices: the entry point `linear` and one kernel per weight format.

`linear(out, x, w)` is what the forward passes call; it dispatches on the weight's format so that model code
never changes when a new format (int8, 4-bit blocks) is added. Weights are [N, K] (Hugging Face's
[out_features, in_features]); activations are [T, K], one row per token.
"""

import numpy as np
from numba import njit, prange

from nextword.kernels import FASTMATH

ROWS = 4  # weight rows per work item: each row is read once for all tokens of the step


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def matmul_f32(out, x, w):
    """out[t, n] = dot(x[t], w[n]).   out: [T, N]; x: [T, K]; w: [N, K] float32"""
    T, K = x.shape
    N = w.shape[0]
    for blk in prange((N + ROWS - 1) // ROWS):
        for n in range(blk * ROWS, min(N, blk * ROWS + ROWS)):
            for t in range(T):
                acc = np.float32(0.0)
                for k in range(K):
                    acc += x[t, k] * w[n, k]
                out[t, n] = acc


def linear(out: np.ndarray, x: np.ndarray, w) -> None:
    """out = x @ w.T for a weight in any supported format.   out: [T, N]; x: [T, K]; w: [N, K]"""
    if isinstance(w, np.ndarray) and w.dtype == np.float32:
        matmul_f32(out, x, w)
    else:
        raise TypeError(f"no matmul kernel for weight {type(w).__name__} {getattr(w, 'dtype', '')}")
