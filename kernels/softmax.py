"""Numerically stable softmax and log-softmax over the last axis (max subtracted first)."""

import numpy as np
from numba import njit

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
