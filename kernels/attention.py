"""Attention kernels over a paged KV cache, for a ragged batch of tokens.

The projections arrive fused: each token's row of `qkv` is [q heads | k heads | v heads], each head Dh wide.
The KV cache of one layer is a pool of blocks, `k_cache[block, slot_in_block, kv_head, :]`; a sequence owns a
list of blocks (its row of `block_tables`), so sequences grow without copying and share nothing by accident.
Order within a layer: `rope_qk` -> `cache_write` (the new tokens' k/v land in their slots) -> `paged_attention`
(each new token attends to every cached position of its sequence up to its own).
"""

import numpy as np
from numba import njit, prange

from nextword.kernels import FASTMATH


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def rope_qk(qkv, positions, cos, sin, n_heads, n_kv_heads, head_dim):
    """Rotate the q and k heads of each row in place (Hugging Face's rotate-half RoPE).

    qkv: [T, (H + 2 Hkv) * Dh]; positions: [T] int64; cos, sin: [P, Dh/2].
    Pairs (i, i + Dh/2) rotate by angle position * inv_freq[i].
    """
    T = qkv.shape[0]
    half = head_dim // 2
    for t in range(T):
        p = positions[t]
        for h in range(n_heads + n_kv_heads):  # the k heads follow the q heads
            base = h * head_dim
            for i in range(half):
                c, s = cos[p, i], sin[p, i]
                a, b = qkv[t, base + i], qkv[t, base + half + i]
                qkv[t, base + i] = a * c - b * s
                qkv[t, base + half + i] = b * c + a * s


@njit(cache=True, nogil=True)
def cache_write(k_cache, v_cache, qkv, slots, n_heads, n_kv_heads, head_dim):
    """Copy each token's k and v heads into its cache slot (slot = block * block_size + offset).

    k_cache, v_cache: [NB, BS, Hkv, Dh]; qkv: [T, (H + 2 Hkv) * Dh]; slots: [T] int64
    """
    block_size = k_cache.shape[1]
    k0 = n_heads * head_dim
    v0 = k0 + n_kv_heads * head_dim
    for t in range(qkv.shape[0]):
        b, o = slots[t] // block_size, slots[t] % block_size
        for g in range(n_kv_heads):
            for i in range(head_dim):
                k_cache[b, o, g, i] = qkv[t, k0 + g * head_dim + i]
                v_cache[b, o, g, i] = qkv[t, v0 + g * head_dim + i]


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def paged_attention(
    out, qkv, k_cache, v_cache, block_tables, token_seq, positions, scale, n_heads, n_kv_heads
):
    """Causal grouped-query attention of each new token over its sequence's cached keys and values.

    out: [T, H * Dh]; qkv: [T, (H + 2 Hkv) * Dh]; k_cache, v_cache: [NB, BS, Hkv, Dh];
    block_tables: [S, max_blocks] int32 (a sequence's blocks in order); token_seq: [T] int64 (the sequence
    of each token); positions: [T] int64 (a token sees cache positions 0..positions[t]).
    Query head h reads kv head h // (H / Hkv). One work item per (token, query head).
    """
    T = qkv.shape[0]
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    group = n_heads // n_kv_heads
    for item in prange(T * n_heads):
        t, h = item // n_heads, item % n_heads
        g = h // group
        s = token_seq[t]
        n = positions[t] + 1
        q0 = h * head_dim
        scores = np.empty(n, dtype=np.float32)
        m = np.float32(-3.0e38)
        for j in range(n):
            b, o = block_tables[s, j // block_size], j % block_size
            acc = np.float32(0.0)
            for i in range(head_dim):
                acc += qkv[t, q0 + i] * k_cache[b, o, g, i]
            acc *= scale
            scores[j] = acc
            m = max(m, acc)
        total = np.float32(0.0)
        for j in range(n):
            e = np.exp(scores[j] - m)
            scores[j] = e
            total += e
        inv = np.float32(1.0) / total
        for i in range(head_dim):
            out[t, q0 + i] = np.float32(0.0)
        for j in range(n):
            b, o = block_tables[s, j // block_size], j % block_size
            w = scores[j] * inv
            for i in range(head_dim):
                out[t, q0 + i] += w * v_cache[b, o, g, i]
