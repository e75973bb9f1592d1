"""Attention kernels over a paged KV cache, for a ragged batch of tokens.

The projections arrive fused: each token's row of `qkv` is [q heads | k heads | v heads], each head Dh wide.
The KV cache of one layer is a pool of blocks, `k_cache[block, slot_in_block, kv_head, :]`; a sequence owns a
list of blocks (its row of `block_tables`), so sequences grow without copying and share nothing by accident.
Order within a layer: `rope_qk` -> `cache_write` (the new tokens' k/v land in their slots) -> `paged_attention`
(each new token attends to every cached position of its sequence up to its own).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

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


@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret int32 bits as a float32 (for fast_exp's 2^n)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def fast_exp(x):
    """exp(x) for x <= 0 in float32 (relative error ~2e-7), written so that loops over it vectorize: np.exp
    is a scalar libm call per element here. exp(x) = 2^n * exp(r), |r| <= ln2/2, Cephes' polynomial for
    exp(r), and 2^n assembled from its exponent bits."""
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


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def paged_attention(
    out, qkv, k_cache, v_cache, block_tables, token_seq, positions, scale, n_heads, n_kv_heads
):
    """Causal grouped-query attention of each new token over its sequence's cached keys and values.

    out: [T, H * Dh]; qkv: [T, (H + 2 Hkv) * Dh]; k_cache, v_cache: [NB, BS, Hkv, Dh];
    block_tables: [S, max_blocks] int32 (a sequence's blocks in order); token_seq: [T] int64 (the sequence
    of each token); positions: [T] int64 (a token sees cache positions 0..positions[t]).
    One work item per (token, kv head): the query heads that share a kv head (H / Hkv of them) read each
    cached key and value row once, together. Softmax subtracts the max and uses fast_exp.
    """
    T = qkv.shape[0]
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    group = n_heads // n_kv_heads
    for item in prange(T * n_kv_heads):
        t, g = item // n_kv_heads, item % n_kv_heads
        s = token_seq[t]
        n = positions[t] + 1
        q = np.empty((group, head_dim), dtype=np.float32)  # this group's query heads, pre-scaled
        for hh in range(group):
            for i in range(head_dim):
                q[hh, i] = qkv[t, (g * group + hh) * head_dim + i] * scale
        scores = np.empty((group, n), dtype=np.float32)
        for j in range(n):
            b, o = block_tables[s, j // block_size], j % block_size
            for hh in range(group):
                acc = np.float32(0.0)
                for i in range(head_dim):
                    acc += q[hh, i] * k_cache[b, o, g, i]
                scores[hh, j] = acc
        acc_v = np.zeros((group, head_dim), dtype=np.float32)
        for hh in range(group):
            m = scores[hh, 0]
            for j in range(1, n):
                m = max(m, scores[hh, j])
            total = np.float32(0.0)
            for j in range(n):
                e = fast_exp(scores[hh, j] - m)
                scores[hh, j] = e
                total += e
            inv = np.float32(1.0) / total
            for j in range(n):
                scores[hh, j] *= inv
        for j in range(n):
            b, o = block_tables[s, j // block_size], j % block_size
            for hh in range(group):
                w = scores[hh, j]
                for i in range(head_dim):
                    acc_v[hh, i] += w * v_cache[b, o, g, i]
        for hh in range(group):
            for i in range(head_dim):
                out[t, (g * group + hh) * head_dim + i] = acc_v[hh, i]
