"""Process memory: the malloc policy that keeps the server to little beyond its weights and KV cache, and
how much of a lazily mapped array is resident.

glibc keeps freed memory inside the process: in one arena per thread that ever allocated (the engine, gRPC
and metrics threads: ~20 MiB here), and in freed blocks between the live ones. Worst are the large ones: by
default glibc maps a large block (128 KiB+) of its own and unmaps it when freed, but each such free raises
that threshold to the block's size (up to 32 MiB), so from then on the engine's activations (a few MiB per
step, their sizes changing with every batch) come from the heap, whose freed holes stay resident while the
engine is busy: the soak benchmark's anonymous memory climbed ~0.7 MiB/s under load (heap 168 MiB for 52
in use). A fixed threshold keeps large buffers out of the heap. Measured with benchmarks/memory.py and
benchmarks/soak.py. Without glibc the two malloc functions do nothing.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

M_MMAP_THRESHOLD = -3  # mallopt parameters, from glibc's malloc.h
M_ARENA_MAX = -8
# Blocks this large are mapped on their own and unmapped when freed: a step's activations, not one logits row.
LARGE_BLOCK_BYTES = 256 << 10

_libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already uses
_glibc = hasattr(_libc, "malloc_trim")


def use_server_malloc_policy() -> None:
    """Let every thread allocate from the main arena, and give every large block its own mapping, returned
    to the OS when freed (setting the threshold also stops glibc from raising it). Call before threads start.
    The engine thread is the only heavy allocator (numpy buffers, once per step), so the lock this shares is
    seldom contended."""
    if _glibc:
        _libc.mallopt(M_ARENA_MAX, 1)
        _libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS: the float32 copies of quantized weights after loading, the
    activations of a long prompt after serving it. Takes a few ms: call it when idle."""
    if _glibc:
        _libc.malloc_trim(0)


def resident_bytes(arrays: list[np.ndarray]) -> int:
    """Bytes of the pages of page-aligned arrays (mmaps, like the KV cache's) that are in memory, as mincore(2)
    reports: the pages written so far. Safe from any thread."""
    total = 0
    for array in arrays:
        pages = -(-array.nbytes // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(pages * mmap.PAGESIZE), vec):
            raise OSError(ctypes.get_errno(), "mincore failed")
        total += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * mmap.PAGESIZE
    return total
