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


TILE = 16  # query tokens of one sequence processed together: each cached K/V row is read once per tile


@njit(cache=True, nogil=True)
def _query_tiles(token_seq, positions):
    """Starts of runs of at most TILE consecutive tokens of one sequence at consecutive positions (a prompt
    chunk splits into tiles; a decode token is a tile of one), plus the end."""
    T = token_seq.shape[0]
    starts = np.empty(T + 1, dtype=np.int64)
    n, t = 0, 0
    while t < T:
        starts[n] = t
        n += 1
        first = t
        t += 1
        while (
            t < T
            and t - first < TILE
            and token_seq[t] == token_seq[first]
            and positions[t] == positions[first] + t - first
        ):
            t += 1
    starts[n] = T
    return starts[: n + 1]


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def paged_attention(
    out, qkv, k_cache, v_cache, block_tables, token_seq, positions, scale, n_heads, n_kv_heads
):
    """Causal grouped-query attention of each new token over its sequence's cached keys and values.

    out: [T, H * Dh]; qkv: [T, (H + 2 Hkv) * Dh]; k_cache, v_cache: [NB, BS, Hkv, Dh];
    block_tables: [S, max_blocks] int32 (a sequence's blocks in order); token_seq: [T] int64 (the sequence
    of each token); positions: [T] int64 (a token sees cache positions 0..positions[t]).
    One work item per (tile of up to TILE consecutive query tokens, kv head): every cached key and value row
    is read once for all the tile's tokens and for the H / Hkv query heads that share the kv head. Softmax
    subtracts the max and uses fast_exp.
    """
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    group = n_heads // n_kv_heads
    tiles = _query_tiles(token_seq, positions)
    n_tiles = tiles.shape[0] - 1
    for item in prange(n_tiles * n_kv_heads):
        tile, g = item // n_kv_heads, item % n_kv_heads
        t0, t1 = tiles[tile], tiles[tile + 1]
        rows = (t1 - t0) * group  # one row per (token, query head of the group)
        s = token_seq[t0]
        n = positions[t1 - 1] + 1  # cached positions the last token of the tile sees
        first = positions[t0]  # the tile's first token sees 0..first
        q = np.empty((rows, head_dim), dtype=np.float32)  # pre-scaled queries
        for r in range(rows):
            t, hh = t0 + r // group, r % group
            for i in range(head_dim):
                q[r, i] = qkv[t, (g * group + hh) * head_dim + i] * scale
        scores = np.empty((rows, n), dtype=np.float32)
        for j in range(n):
            b, o = block_tables[s, j // block_size], j % block_size
            r0 = max(j - first, 0) * group  # tokens before this one in the tile do not see position j
            for r in range(r0, rows):
                acc = np.float32(0.0)
                for i in range(head_dim):
                    acc += q[r, i] * k_cache[b, o, g, i]
                scores[r, j] = acc
        for r in range(rows):
            seen = first + r // group + 1
            m = scores[r, 0]
            for j in range(1, seen):
                m = max(m, scores[r, j])
            total = np.float32(0.0)
            for j in range(seen):
                e = fast_exp(scores[r, j] - m)
                scores[r, j] = e
                total += e
            inv = np.float32(1.0) / total
            for j in range(seen):
                scores[r, j] *= inv
        acc_v = np.zeros((rows, head_dim), dtype=np.float32)
        for j in range(n):
            b, o = block_tables[s, j // block_size], j % block_size
            for r in range(max(j - first, 0) * group, rows):
                w = scores[r, j]
                for i in range(head_dim):
                    acc_v[r, i] += w * v_cache[b, o, g, i]
        for r in range(rows):
            t, hh = t0 + r // group, r % group
            for i in range(head_dim):
                out[t, (g * group + hh) * head_dim + i] = acc_v[r, i]
