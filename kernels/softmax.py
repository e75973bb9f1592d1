"""Numerically stable softmax and log-softmax over the last axis (max subtracted first), and the float64
vocabulary passes of sampling."""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from nextword.kernels import FASTMATH


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def softmax(out, x):
    """out[r] = exp(x[r] - max) / sum(exp(x[r] - max)).   out, x: [R, N]"""
    R, N = x.shape
    for r in range(R):
        m = x[r, 0]
        for i in range(1, N):
            m = max(m, x[r, i])
        total = 0.0  # float64: the sum runs over a whole vocabulary
        for i in range(N):
            e = np.exp(x[r, i] - m)
            out[r, i] = e
            total += e
        inv = np.float32(1.0 / total)
        for i in range(N):
            out[r, i] *= inv


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def log_softmax(out, x):
    """out[r] = x[r] - max - log(sum(exp(x[r] - max))).   out, x: [R, N]"""
    R, N = x.shape
    for r in range(R):
        m = x[r, 0]
        for i in range(1, N):
            m = max(m, x[r, i])
        total = 0.0
        for i in range(N):
            total += np.exp(np.float64(x[r, i] - m))
        shift = np.float32(m + np.log(total))
        for i in range(N):
            out[r, i] = x[r, i] - shift


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def token_logprobs(out_logprob, out_rank, x, targets):
    """For each row r: out_logprob[r] = log_softmax(x[r])[targets[r]] and out_rank[r] = 1 + the number of
    entries of x[r] greater than the target's (1 = the most likely token), without writing the [R, N]
    log-probabilities.   out_logprob: [R] float64, out_rank: [R] int64, x: [R, N], targets: [R] int64"""
    R, N = x.shape
    for r in range(R):
        t = x[r, targets[r]]
        m = x[r, 0]
        above = 0
        for i in range(N):
            m = max(m, x[r, i])
            above += x[r, i] > t
        total = 0.0
        for i in range(N):
            total += np.exp(np.float64(x[r, i] - m))
        out_logprob[r] = np.float64(t) - m - np.log(total)
        out_rank[r] = 1 + above


@intrinsic
def _bits_to_f64(typingctx, bits):
    """Reinterpret int64 bits as a float64 (for _exp64's 2^n)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@njit(cache=True, nogil=True, fastmath={"contract"})
def _exp64(x):
    """exp(x) in float64 for x <= 0 (relative error ~1e-15; 0 below -708, NaN stays NaN), written so that loops
    over it vectorize: np.exp is a scalar libm call per element in Numba. exp(x) = 2^n exp(r), r = x - n ln2
    in two parts (Cody-Waite), |r| <= ln2/2, Taylor to degree 13. Compiled with its own flags, without
    `reassoc`: its callers reassociate their sums (so they vectorize), never this reduction's arithmetic."""
    xc = max(x, -708.0)  # 2^n stays a normal number; NaN passes through
    n = np.floor(xc * 1.4426950408889634 + 0.5)
    r = (xc - n * 0.6931471803691238) - n * 1.9082149292705877e-10
    p = 1.0 / 6227020800.0  # 1/13!, then Horner down to 1/0!
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = (p * r + 1.0) * r + 1.0
    e = p * _bits_to_f64((np.int64(np.int32(n)) + 1023) << 52)
    return 0.0 if x < -708.0 else e


SUM_CHUNK = 256  # entries of a row summed together by exp_chunk_sums


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def exp_chunk_sums(out, x, rows, shift, inv_temperature):
    """out[i, c] = sum_{j in chunk c} exp((x[rows[i], j] - shift[i]) * inv_temperature[i]) in float64, chunks
    of SUM_CHUNK entries, rows in parallel: a softmax's normalizer (shift = the row's max, so every term is
    <= 1) in pieces, where a draw finds the piece its cumulative mass crosses without a pass of its own. NaN if
    the row holds a NaN.   out: [n, ceil(V / SUM_CHUNK)] float64; x: [R, V] float32; rows: [n] int64; shift,
    inv_temperature: [n] float64"""
    V = x.shape[1]
    for i in prange(rows.shape[0]):
        row, m, inv_t = x[rows[i]], shift[i], inv_temperature[i]
        for c in range(out.shape[1]):
            total = 0.0
            for j in range(c * SUM_CHUNK, min(c * SUM_CHUNK + SUM_CHUNK, V)):
                total += _exp64((np.float64(row[j]) - m) * inv_t)
            out[i, c] = total
