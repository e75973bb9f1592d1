"""Matrix products against weight matrices: the entry point `linear` and one kernel per weight format.

`linear(out, x, w)` is what the forward passes call; it dispatches on the weight's format so that model code
never changes when a new format (int8, 4-bit blocks) is added. Weights are [N, K] (Hugging Face's
[out_features, in_features]); activations are [T, K], one row per token.
"""

import numpy as np
from numba import njit, prange

from nextword.kernels import FASTMATH, quant
from nextword.weights.quantize import Q4Weight, Q8MWeight, Q8Weight


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def matmul_f32(out, x, w):
    """out[t, n] = dot(x[t], w[n]).   out: [T, N]; x: [T, K]; w: [N, K] float32

    Work items are blocks of 4 weight rows; within one, tokens go two at a time, so each loaded weight value
    feeds 2 products and each activation 4 (8 running sums: compute-bound at ~2x the plain dot product).
    An odd last token is paired with itself: every token's sums come from the same instructions whatever
    its neighbours, so a token's result never depends on the rest of the batch.
    """
    T, K = x.shape
    N = w.shape[0]
    for blk in prange((N + 3) // 4):
        n0 = blk * 4
        if n0 + 4 <= N:
            for t in range(0, T, 2):
                u = min(t + 1, T - 1)
                a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = np.float32(0.0)
                for k in range(K):
                    x0, x1 = x[t, k], x[u, k]
                    w0, w1, w2, w3 = w[n0, k], w[n0 + 1, k], w[n0 + 2, k], w[n0 + 3, k]
                    a00 += w0 * x0
                    a01 += w0 * x1
                    a10 += w1 * x0
                    a11 += w1 * x1
                    a20 += w2 * x0
                    a21 += w2 * x1
                    a30 += w3 * x0
                    a31 += w3 * x1
                out[t, n0], out[u, n0] = a00, a01
                out[t, n0 + 1], out[u, n0 + 1] = a10, a11
                out[t, n0 + 2], out[u, n0 + 2] = a20, a21
                out[t, n0 + 3], out[u, n0 + 3] = a30, a31
        else:  # the last rows when N is not a multiple of 4
            for t in range(T):
                for n in range(n0, N):
                    acc = np.float32(0.0)
                    for k in range(K):
                        acc += x[t, k] * w[n, k]
                    out[t, n] = acc


def linear(out: np.ndarray, x: np.ndarray, w, decode_rows: int = 0, tiled: bool = True) -> None:
    """out = x @ w.T for a weight in any supported format.   out: [T, N]; x: [T, K]; w: [N, K]

    Quantized weights multiply the first `decode_rows` rows (decode tokens) with integer activations (int8
    for Q4_1 and Q8_0, like llama.cpp; int16 for Q8_M): the fastest form for a few rows; and the other rows
    (prompt tokens) with float32 activations: faster for many rows, and exact. The choice follows each token's role, never the batch
    size, so a request's results do not depend on what else is in its batch. `tiled=False` keeps prompt
    rows off the register-tiled panels (on AVX2 the rows-in-lanes kernel takes them, whatever their number)
    for the LM head, whose prompt-path input is one row per sequence: too few rows to pay for a panel.
    """
    if isinstance(w, np.ndarray) and w.dtype == np.float32:
        matmul_f32(out, x, w)
    elif isinstance(w, Q4Weight | Q8Weight | Q8MWeight):
        d = decode_rows
        if d:
            _quantized(w, "xq")(out[:d], x[:d], *w.blocks)
        if d < len(x):
            _quantized(w, "xf")(out[d:], x[d:], *w.blocks, tiled)
    else:
        raise TypeError(f"no matmul kernel for weight {type(w).__name__} {getattr(w, 'dtype', '')}")


_KERNEL_NAMES = {Q4Weight: "q4_1", Q8Weight: "q8_0", Q8MWeight: "q8_m"}


def _quantized(w, path: str):
    """The kernel for weight w's format: path "xq" (integer activations) or "xf" (float32 activations)."""
    return getattr(quant, f"matmul_{_KERNEL_NAMES[type(w)]}_{path}")
