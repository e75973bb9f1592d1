"""Numba kernels: leaf functions that write into preallocated outputs (output first), and the forward passes
composed from them in Python.

Conventions: every array is C-contiguous float32 (ids and positions int64; a KV cache may hold float16 bits); `FASTMATH` is the flag subset that
lets reductions vectorize without assuming away NaN/inf; a kernel file never calls an njit function of another
file (Numba's cache would not notice when that file changes).
"""

FASTMATH = {"reassoc", "contract", "arcp"}
