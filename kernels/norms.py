"""Normalization kernels: RMSNorm (Llama family) and LayerNorm (GPT-2), one row per token."""

import numpy as np
from numba import njit

from nextword.kernels import FASTMATH


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def rmsnorm(out, x, weight, eps):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight.   out, x: [T, D]; weight: [D]"""
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        for i in range(D):
            out[t, i] = x[t, i] * inv * weight[i]


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def layernorm(out, x, weight, bias, eps):
    """out[t] = (x[t] - mean) / sqrt(var + eps) * weight + bias.   out, x: [T, D]; weight, bias: [D]"""
    T, D = x.shape
    for t in range(T):
        mean = np.float32(0.0)
        for i in range(D):
            mean += x[t, i]
        mean /= np.float32(D)
        var = np.float32(0.0)
        for i in range(D):
            d = x[t, i] - mean
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / np.float32(D) + np.float32(eps))
        for i in range(D):
            out[t, i] = (x[t, i] - mean) * inv * weight[i] + bias[i]
