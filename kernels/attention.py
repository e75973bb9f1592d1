"""Attention kernels over a paged KV cache, for a ragged batch of tokens.

The projections arrive fused: each token's row of `qkv` is [q heads | k heads | v heads], each head Dh wide.
The KV cache of one layer is a pool of blocks, `k_cache[block, slot_in_block, kv_head, :]`; a sequence owns a
list of blocks (its row of `block_tables`), so sequences grow without copying and share nothing by accident.
The cache holds float32 or float16 bits (uint16: half of what long-context attention reads; converted to float32
as they are read, by F16C on the AVX2 path), written by `cache_write` from rows already in its dtype.
Order within a layer: `rope_qk` -> `cache_write` (the new tokens' k/v land in their slots) -> `paged_attention`
(each new token attends to every cached position of its sequence up to its own).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from nextword.kernels import FASTMATH, isa

HAVE_F16C = isa.target().avx2  # F16C comes with the AVX2 path (nextword.kernels.isa)


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


def _kv(x):
    """A cached key or value as float32: the cache holds float32, or float16 bits (uint16)."""


@overload(_kv, inline="always")
def _kv_overload(x):
    if x == types.float32:
        return lambda x: x
    if x == types.uint16:
        return (lambda x: _f16_bits_to_f32(x)) if HAVE_F16C else (lambda x: _f16_bits_to_f32_portable(x))
    raise TypingError(f"a KV cache holds float32 or float16 bits (uint16), not {x}")


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    """fp16 bits -> float32 by LLVM fpext (vcvtph2ps with F16C; vectorizes in loops)."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(cache=True, nogil=True, inline="always")
def _f16_bits_to_f32_portable(h):
    """fp16 bits -> float32 with integer ops (no F16C: LLVM's fpext would call a runtime function)."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if e == 0:  # zero or subnormal: mant * 2**-24, exact in float32
        v = np.float32(mant) * np.float32(5.9604644775390625e-08)
        return -v if sign else v
    if e == 31:  # inf / nan
        return _bits_to_f32(np.int32(sign | np.uint32(0x7F800000) | (mant << np.uint32(13))))
    return _bits_to_f32(np.int32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13))))


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


CONTEXT_CHUNK = (
    256  # cached positions per partial softmax (flash-decoding): a decode token's unit of parallel work
)


@njit(cache=True, nogil=True)
def _work_items(tiles, positions, chunk):
    """Work items of paged_attention: [tile, first chunk, end chunk] rows, every kv head in each (a cache
    block holds all kv heads of its positions: an item reads whole blocks, front to back). A one-token tile
    (a decode token, usually) gets one item per chunk of its context, so that a long context keeps every
    core busy at batch 1; a longer tile takes all its chunks in one item. Also returns the offset of each
    tile's chunks in the scratch of partial results, and the scratch's number of chunk slots."""
    n_tiles = tiles.shape[0] - 1
    offsets = np.empty(n_tiles + 1, dtype=np.int64)
    offsets[0] = 0
    n_items = 0
    for tile in range(n_tiles):
        nc = (positions[tiles[tile + 1] - 1] + chunk) // chunk  # chunks of positions 0..last
        offsets[tile + 1] = offsets[tile] + nc
        n_items += nc if tiles[tile + 1] - tiles[tile] == 1 else 1
    items = np.empty((n_items, 3), dtype=np.int64)
    i = 0
    for tile in range(n_tiles):
        nc = offsets[tile + 1] - offsets[tile]
        split = tiles[tile + 1] - tiles[tile] == 1
        for c in range(nc if split else 1):
            items[i, 0] = tile
            items[i, 1], items[i, 2] = (c, c + 1) if split else (0, nc)
            i += 1
    return items, offsets


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _chunk_softmax(parts, q, scores, k_cache, v_cache, table, first, group, c0, c1):
    """Partial attention of the tile's rows over cached positions c0 .. c1-1, for every kv head g: per row r,
    parts[g, r, 0] = the max score m it sees there, parts[g, r, 1] = sum exp(score - m),
    parts[g, r, 2:] = sum exp(score - m) * v (m = -1e30 and zeros when the row sees none of them: positions
    after its own are masked). q: [Hkv, rows, Dh], pre-scaled; scores: [Hkv, rows, >= c1 - c0] scratch."""
    block_size, n_kv, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    rows = q.shape[1]
    for g in range(n_kv):
        for r in range(rows):
            parts[g, r, 0] = np.float32(-1e30)
            for i in range(1, head_dim + 2):
                parts[g, r, i] = np.float32(0.0)
    for blk in range(c0 // block_size, (c1 - 1) // block_size + 1):
        b = table[blk]
        for o in range(max(c0 - blk * block_size, 0), min(c1 - blk * block_size, block_size)):
            j = blk * block_size + o
            r0 = max(j - first, 0) * group  # rows of tokens before position j do not see it
            for g in range(n_kv):
                for r in range(r0, rows):
                    acc = np.float32(0.0)
                    for i in range(head_dim):
                        acc += q[g, r, i] * _kv(k_cache[b, o, g, i])
                    scores[g, r, j - c0] = acc
    for g in range(n_kv):
        for r in range(rows):
            end = min(c1, first + r // group + 1)  # positions this row sees, in this chunk
            if end <= c0:
                continue
            m = scores[g, r, 0]
            for j in range(c0 + 1, end):
                m = max(m, scores[g, r, j - c0])
            total = np.float32(0.0)
            for j in range(c0, end):
                e = fast_exp(scores[g, r, j - c0] - m)
                scores[g, r, j - c0] = e
                total += e
            parts[g, r, 0] = m
            parts[g, r, 1] = total
    for blk in range(c0 // block_size, (c1 - 1) // block_size + 1):
        b = table[blk]
        for o in range(max(c0 - blk * block_size, 0), min(c1 - blk * block_size, block_size)):
            j = blk * block_size + o
            r0 = max(j - first, 0) * group
            for g in range(n_kv):
                for r in range(r0, rows):
                    w = scores[g, r, j - c0]
                    for i in range(head_dim):
                        parts[g, r, 2 + i] += w * _kv(v_cache[b, o, g, i])


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _merge_chunks(out, parts, t0, group):
    """out rows of the tile starting at token t0 from its chunks' partial results
    parts [chunks, Hkv, rows, 2 + Dh]: softmax-weighted by exp(m_c - max_c m_c), in chunk order."""
    n_chunks, n_kv, rows, width = parts.shape
    head_dim = width - 2
    acc = np.empty(head_dim, dtype=np.float32)
    for g in range(n_kv):
        for r in range(rows):
            m = parts[0, g, r, 0]
            for c in range(1, n_chunks):
                m = max(m, parts[c, g, r, 0])
            total = np.float32(0.0)
            acc[:] = 0.0
            for c in range(n_chunks):
                w = fast_exp(parts[c, g, r, 0] - m)  # 0 for a chunk the row does not see (m_c = -1e30)
                total += w * parts[c, g, r, 1]
                for i in range(head_dim):
                    acc[i] += w * parts[c, g, r, 2 + i]
            inv = np.float32(1.0) / total
            t, hh = t0 + r // group, r % group
            for i in range(head_dim):
                out[t, (g * group + hh) * head_dim + i] = acc[i] * inv


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def paged_attention(
    out,
    qkv,
    k_cache,
    v_cache,
    block_tables,
    token_seq,
    positions,
    scale,
    n_heads,
    n_kv_heads,
    chunk=CONTEXT_CHUNK,
):
    """Causal grouped-query attention of each new token over its sequence's cached keys and values.

    out: [T, H * Dh]; qkv: [T, (H + 2 Hkv) * Dh]; k_cache, v_cache: [NB, BS, Hkv, Dh], float32 or float16
    bits (uint16); block_tables: [S, max_blocks] int32 (a sequence's blocks in order); token_seq: [T] int64
    (the sequence of each token); positions: [T] int64 (a token sees cache positions 0..positions[t]).
    Query tokens go in tiles of up to TILE consecutive tokens of a sequence, with all their query heads:
    every cached key and value row is read once for all of them. The context is cut into chunks of `chunk`
    positions, each giving a partial softmax (its max, sum and weighted values), merged in chunk order: a
    token's result depends only on its own context, never on its batch or tile. A one-token tile spreads its
    chunks over the cores (a long context at batch 1); a longer tile goes through its chunks in one work
    item. Softmax subtracts the max, fast_exp.
    """
    head_dim = k_cache.shape[3]
    group = n_heads // n_kv_heads
    tiles = _query_tiles(token_seq, positions)
    items, offsets = _work_items(tiles, positions, chunk)
    # partial results of the split (one-token) tiles, merged after all their chunks are done
    split_parts = np.empty((offsets[-1], n_kv_heads, group, head_dim + 2), dtype=np.float32)
    any_split = False
    for item in range(items.shape[0]):
        if items[item, 2] - items[item, 1] == 1 and offsets[items[item, 0] + 1] - offsets[items[item, 0]] > 1:
            any_split = True
    for item in prange(items.shape[0]):
        tile, c_first, c_end = items[item, 0], items[item, 1], items[item, 2]
        t0, t1 = tiles[tile], tiles[tile + 1]
        rows = (t1 - t0) * group  # one row per (token, query head of the group)
        s = token_seq[t0]
        n = positions[t1 - 1] + 1  # cached positions the last token of the tile sees
        first = positions[t0]  # the tile's first token sees 0..first
        q = np.empty((n_kv_heads, rows, head_dim), dtype=np.float32)  # pre-scaled queries
        for g in range(n_kv_heads):
            for r in range(rows):
                t, hh = t0 + r // group, r % group
                for i in range(head_dim):
                    q[g, r, i] = qkv[t, (g * group + hh) * head_dim + i] * scale
        n_chunks = offsets[tile + 1] - offsets[tile]
        whole = c_first == 0 and c_end == n_chunks
        parts = np.empty((c_end - c_first, n_kv_heads, rows, head_dim + 2), dtype=np.float32)
        scores = np.empty((n_kv_heads, rows, chunk), dtype=np.float32)
        for c in range(c_first, c_end):
            _chunk_softmax(parts[c - c_first], q, scores, k_cache, v_cache, block_tables[s], first, group,
                           c * chunk, min(n, c * chunk + chunk))  # fmt: skip
        if whole:
            _merge_chunks(out, parts, t0, group)
        else:
            split_parts[offsets[tile] + c_first] = parts[0]
    if any_split:
        for item in prange(items.shape[0]):
            tile, c_first = items[item, 0], items[item, 1]
            n_chunks = offsets[tile + 1] - offsets[tile]
            if c_first == 0 and items[item, 2] == 1 and n_chunks > 1:  # once per split tile
                _merge_chunks(out, split_parts[offsets[tile] : offsets[tile + 1]], tiles[tile], group)
