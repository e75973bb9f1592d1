"""Process memory policy (glibc malloc), so the server holds little beyond its weights and KV cache.

glibc keeps freed memory inside the process: in one arena per thread that ever allocated (the engine, gRPC
and metrics threads: ~20 MiB here), and in freed blocks between the live ones. Measured with
benchmarks/memory.py. Elsewhere than glibc both functions do nothing.
"""

from __future__ import annotations

import ctypes

M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h

try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _libc = None


def use_one_malloc_arena() -> None:
    """Let every thread allocate from the main arena. Call before threads start. The engine thread is the
    only heavy allocator (numpy buffers, once per step), so the lock this shares is seldom contended."""
    if _libc is not None:
        _libc.mallopt(M_ARENA_MAX, 1)


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS: the float32 copies of quantized weights after loading, the
    activations of a long prompt after serving it. Takes a few ms: call it when idle."""
    if _libc is not None:
        _libc.malloc_trim(0)
