"""Small element-wise kernels: embedding gather, residual add, bias, activations."""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

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


@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret int32 bits as a float32 (for _exp_nonpositive's 2^n)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _exp_nonpositive(x):
    """exp(x) for x <= 0 in float32, vectorizable (np.exp is a scalar libm call per element): attention's
    fast_exp, repeated here because a kernel file calls no njit function of another file."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    scale = _bits_to_f32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    return (p * r * r + r + np.float32(1.0)) * scale


@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def swiglu(out, gate_up):
    """out = silu(gate) * up, with gate, up = the two halves of each row.   out: [T, F]; gate_up: [T, 2F]
    sigmoid(g) from e = exp(-|g|) (never overflows): 1 / (1 + e) for g >= 0, e / (1 + e) below. The numpy
    error model: Python's zero-division check on every division would keep the loop from vectorizing."""
    T, F = out.shape
    for t in range(T):
        for i in range(F):
            g = gate_up[t, i]
            e = _exp_nonpositive(-abs(g))
            sig = (np.float32(1.0) if g >= 0 else e) / (np.float32(1.0) + e)
            out[t, i] = g * sig * gate_up[t, F + i]


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
