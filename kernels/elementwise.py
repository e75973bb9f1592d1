"""Small element-wise kernels: embedding gather, residual add, bias, activations."""

import math

import numpy as np
from numba import njit

from nextword.kernels import FASTMATH


@njit(cache=True, nogil=True)
def embedding(out, table, ids):
    """out[t] = table[ids[t]].   out: [T, D]; table: [V, D]; ids: [T] int64"""
    T, D = out.shape
    for t in range(T):
        row = ids[t]
        for i in range(D):
            out[t, i] = table[row, i]


@njit(cache=True, nogil=True)
def add_embedding(out, table, ids):
    """out[t] += table[ids[t]] (GPT-2's learned positions).   out: [T, D]; table: [P, D]; ids: [T] int64"""
    T, D = out.shape
    for t in range(T):
        row = ids[t]
        for i in range(D):
            out[t, i] += table[row, i]


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def add(x, y):
    """x += y (the residual connection).   x, y: [T, D]"""
    T, D = x.shape
    for t in range(T):
        for i in range(D):
            x[t, i] += y[t, i]


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def add_bias(x, bias):
    """x[t] += bias.   x: [T, N]; bias: [N]"""
    T, N = x.shape
    for t in range(T):
        for i in range(N):
            x[t, i] += bias[i]


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def swiglu(out, gate_up):
    """out = silu(gate) * up, with gate, up = the two halves of each row.   out: [T, F]; gate_up: [T, 2F]"""
    T, F = out.shape
    for t in range(T):
        for i in range(F):
            g = gate_up[t, i]
            out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[t, F + i]


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def gelu_tanh(x):
    """x = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in place (GPT-2's gelu_new).   x: [T, F]"""
    T, F = x.shape
    c = np.float32(math.sqrt(2.0 / math.pi))
    for t in range(T):
        for i in range(F):
            v = x[t, i]
            x[t, i] = (
                np.float32(0.5) * v * (np.float32(1.0) + np.tanh(c * (v + np.float32(0.044715) * v * v * v)))
            )
