"""Numba kernels: leaf functions that write into preallocated outputs (output first), and the forward passes
composed from them in Python.

Conventions: every array is C-contiguous float32 (ids and positions int64; a KV cache may hold float16 bits);
`FASTMATH` is the flag subset that lets reductions vectorize without assuming away NaN/inf; a kernel file never
calls an njit function of another file (Numba's cache would not notice when that file changes).
"""

import os

FASTMATH = {"reassoc", "contract", "arcp"}

# The parallel kernels run on OpenMP (GNU libgomp). At the end of each parallel region a thread spins
# waiting for the other: by default for ~300,000 iterations, which is harmless on an idle machine and ruinous
# on a busy one (the other thread is descheduled, ~150 regions a token). Measured on 2 cores, q4 decode at
# batch 1 (tok/s): idle 130 (default) / 140 (10,000) / 85 (1,000); beside one CPU-bound process 4.9 / 22 / 59
# (one thread alone: 80). 10,000 costs nothing measurable when idle. A setting of the user's wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
