"""Attention kernels over a paged KV cache, for a ragged batch of tokens.

The projections arrive fused: each token's row of `qkv` is [q heads | k heads | v heads], each head Dh wide.
The KV cache of one layer is a pool of blocks, `k_cache[block, slot_in_block, kv_head, :]`; a sequence owns a
list of blocks (its row of `block_tables`), so sequences grow without copying and share nothing by accident.
The cache holds float32 or float16 bits (uint16: half of what long-context attention reads; converted by F16C
on the AVX2 path, as they are written by `cache_write` and read by attention).
Order within a layer: `rope_qk` -> `cache_write` (the new tokens' k/v land in their slots) -> `paged_attention`
(each new token attends to every cached position of its sequence up to its own).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from nextword.kernels import FASTMATH, isa

HAVE_F16C = isa.target().avx2  # F16C comes with the AVX2 path (nextword.kernels.isa)
LANES = 16 if isa.target().avx512 else 8  # floats per vector of the prompt tiles' micro-kernel
ROWS_PER_PASS = 6  # rows of a prompt tile per pass of the micro-kernel (12 vector accumulators)


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
    """Copy each token's k and v heads into its cache slot (slot = block * block_size + offset), in the cache's
    dtype (float16 rounded to nearest even, as NumPy's astype).

    k_cache, v_cache: [NB, BS, Hkv, Dh] float32 or uint16; qkv: [T, (H + 2 Hkv) * Dh] float32; slots: [T] int64
    """
    block_size = k_cache.shape[1]
    k0 = n_heads * head_dim
    v0 = k0 + n_kv_heads * head_dim
    for t in range(qkv.shape[0]):
        b, o = slots[t] // block_size, slots[t] % block_size
        for g in range(n_kv_heads):
            for i in range(head_dim):
                k_cache[b, o, g, i] = _entry(qkv[t, k0 + g * head_dim + i], k_cache)
                v_cache[b, o, g, i] = _entry(qkv[t, v0 + g * head_dim + i], v_cache)


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


def _entry(x, cache):
    """The float32 x as `cache` holds it: float32, or float16 bits (uint16)."""


@overload(_entry, inline="always")
def _entry_overload(x, cache):
    if cache.dtype == types.float32:
        return lambda x, cache: x
    if cache.dtype == types.uint16:
        return (lambda x, cache: _f32_to_f16_bits(x)) if HAVE_F16C else (lambda x, cache: f32_to_f16_bits(x))
    raise TypingError(f"a KV cache holds float32 or float16 bits (uint16), not {cache.dtype}")


@intrinsic
def _f32_to_f16_bits(typingctx, x):
    """float32 -> fp16 bits by LLVM fptrunc (vcvtps2ph with F16C, round to nearest even; vectorizes)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _f32_to_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(cache=True, nogil=True, inline="always")
def f32_to_f16_bits(x):
    """float32 -> fp16 bits with integer ops, rounding to nearest even (no F16C: LLVM's fptrunc would call a
    runtime function). NaN stays NaN, with the top of its payload."""
    u = _f32_to_bits(x)
    sign = np.uint16((u >> np.uint32(16)) & np.uint32(0x8000))
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):  # NaN
        return sign | np.uint16(0x7E00) | np.uint16((a >> np.uint32(13)) & np.uint32(0x3FF))
    if a >= np.uint32(0x477FF000):  # 65520 and up round to infinity
        return sign | np.uint16(0x7C00)
    if a >= np.uint32(0x38800000):  # a normal half: rebias the exponent, round off 13 mantissa bits
        h = (a - np.uint32(0x38000000)) >> np.uint32(13)
        rest = a & np.uint32(0x1FFF)
        if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000) and h & np.uint32(1)):
            h += np.uint32(1)  # a carry into the exponent is right, up to infinity
        return sign | np.uint16(h)
    if a < np.uint32(0x33000000):  # below 2**-25 (or exactly it: a tie, to even 0)
        return sign
    shift = np.uint32(126) - (a >> np.uint32(23))  # a subnormal half: units of 2**-24
    m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    h = m >> shift
    rest, half = m & ((np.uint32(1) << shift) - np.uint32(1)), np.uint32(1) << (shift - np.uint32(1))
    if rest > half or (rest == half and h & np.uint32(1)):
        h += np.uint32(1)
    return sign | np.uint16(h)


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
def _query_tiles(token_seq, positions, decode_tokens):
    """Starts of runs of at most TILE consecutive prompt tokens of one sequence at consecutive positions (a
    prompt chunk splits into tiles; a decode token, one of the first `decode_tokens`, is a tile of one), plus
    the end."""
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
            and first >= decode_tokens
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
def _work_items(tiles, positions, chunk, decode_tokens):
    """Work items of paged_attention: [tile, first chunk, end chunk] rows, every kv head in each (a cache
    block holds all kv heads of its positions: an item reads whole blocks, front to back). The tile
    of a decode token gets one item per chunk of its context, so that a long context keeps every core busy at
    batch 1; a tile of prompt tokens takes all its chunks in one item. Also returns the offset of each
    tile's chunks in the scratch of partial results, and the scratch's number of chunk slots."""
    n_tiles = tiles.shape[0] - 1
    offsets = np.empty(n_tiles + 1, dtype=np.int64)
    offsets[0] = 0
    n_items = 0
    for tile in range(n_tiles):
        nc = (positions[tiles[tile + 1] - 1] + chunk) // chunk  # chunks of positions 0..last
        offsets[tile + 1] = offsets[tile] + nc
        n_items += nc if tiles[tile] < decode_tokens else 1
    items = np.empty((n_items, 3), dtype=np.int64)
    i = 0
    for tile in range(n_tiles):
        nc = offsets[tile + 1] - offsets[tile]
        split = tiles[tile] < decode_tokens
        for c in range(nc if split else 1):
            items[i, 0] = tile
            items[i, 1], items[i, 2] = (c, c + 1) if split else (0, nc)
            i += 1
    return items, offsets


@intrinsic
def _prefetch_block(typingctx, cache, blk):
    """Software prefetch of every cache line of block `blk` of a KV cache [NB, BS, Hkv, Dh] (one contiguous
    run of BS * Hkv * Dh entries), so that a block's lines stream in while the one before is computed on."""
    if not (isinstance(cache, types.Array) and cache.ndim == 4 and cache.layout == "C"):
        raise TypingError("_prefetch_block: cache must be a C-contiguous 4-D array")

    def codegen(context, builder, sig, args):
        b = builder
        arr = context.make_array(sig.args[0])(context, b, args[0])
        _, bs, n_kv, dh = cgutils.unpack_tuple(b, arr.shape, 4)
        ity = bs.type
        n = b.mul(b.mul(bs, n_kv), dh)  # entries a block
        start = b.mul(args[1], n)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        pf = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
        )
        itemsize = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
        step = ir.Constant(ity, 64 // itemsize)
        with cgutils.for_range_slice(b, start, b.add(start, n), step) as (i, _):
            p = b.bitcast(b.gep(arr.data, [i]), i8p)
            b.call(pf, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(cache, types.intp), codegen


VALUE_PASS = 64  # value dimensions summed a pass of `_weighted_values`: 8 vector accumulators (AVX2)


@intrinsic
def _weighted_values(typingctx, parts, scores, v_cache, table, g, r, c0, c1):
    """parts[g, r, 2 + i] = sum_{c0 <= j < c1} scores[g, r, j - c0] * v(j)[g, i] for every i < Dh, j in order
    (one fma per term, from 0): the values of cached positions c0 .. c1-1 (v_cache[table[j // BS], j % BS]),
    weighted. The sums stay in vector registers for VALUE_PASS dimensions at a time, each value row read and
    converted once per pass: the Numba loop it replaces loaded and stored its 64 sums at every position.
    parts: [Hkv, rows, 2 + Dh]; scores: [Hkv, rows, >= c1 - c0]; v_cache: [NB, BS, Hkv, Dh] float32 or float16
    bits (uint16); table: [>= blocks] int32. Dh a multiple of VALUE_PASS."""
    for name, ty, dtypes, ndim in (("parts", parts, (types.float32,), 3), ("scores", scores, (types.float32,), 3),
                                   ("v_cache", v_cache, (types.float32, types.uint16), 4),
                                   ("table", table, (types.int32,), 1)):  # fmt: skip
        if not (isinstance(ty, types.Array) and ty.dtype in dtypes and ty.ndim == ndim and ty.layout == "C"):
            raise TypingError(f"_weighted_values: {name} must be a C-contiguous {ndim}-D {dtypes[0]} array")
    half = v_cache.dtype == types.uint16
    sig = types.void(parts, scores, v_cache, table, types.intp, types.intp, types.intp, types.intp)
    f8 = ir.VectorType(ir.FloatType(), 8)

    def codegen(context, builder, sig, args):
        b = builder
        arrays = [context.make_array(ty)(context, b, a) for ty, a in zip(sig.args[:4], args[:4], strict=True)]
        pa, sc, vc, tb = arrays
        g, r, c0, c1 = args[4:]
        ity = g.type

        def const(v):
            return ir.Constant(ity, v)

        rows, width = cgutils.unpack_tuple(b, pa.shape, 3)[1:]
        span = cgutils.unpack_tuple(b, sc.shape, 3)[2]
        _, bs, n_kv, dh = cgutils.unpack_tuple(b, vc.shape, 4)
        prow = b.gep(pa.data, [b.add(b.mul(b.add(b.mul(g, rows), r), width), const(2))])
        srow = b.gep(sc.data, [b.mul(b.add(b.mul(g, rows), r), span)])
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(f8, [f8] * 3), "llvm.fma.v8f32")
        vty = ir.VectorType(ir.IntType(16) if half else ir.FloatType(), 8)
        with cgutils.for_range(b, b.udiv(dh, const(VALUE_PASS))) as passes:
            d0 = b.mul(passes.index, const(VALUE_PASS))
            accs = [cgutils.alloca_once_value(b, ir.Constant(f8, [0.0] * 8)) for _ in range(VALUE_PASS // 8)]
            first_blk, last_blk = b.sdiv(c0, bs), b.sdiv(b.sub(c1, const(1)), bs)
            with cgutils.for_range_slice(b, first_blk, b.add(last_blk, const(1)), const(1)) as (blk, _):
                block = b.sext(b.load(b.gep(tb.data, [blk])), ity)
                start = b.sub(c0, b.mul(blk, bs))
                end = b.sub(c1, b.mul(blk, bs))
                zero = const(0)
                lo = b.select(b.icmp_signed(">", start, zero), start, zero)
                hi = b.select(b.icmp_signed("<", end, bs), end, bs)
                with cgutils.for_range_slice(b, lo, hi, const(1)) as (o, _):
                    j = b.add(b.mul(blk, bs), o)
                    w = b.load(b.gep(srow, [b.sub(j, c0)]))
                    wv = b.shuffle_vector(
                        b.insert_element(ir.Constant(f8, None), w, ir.Constant(ir.IntType(32), 0)),
                        ir.Constant(f8, None), ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8),
                    )  # fmt: skip
                    base = b.add(b.mul(b.add(b.mul(block, bs), o), b.mul(n_kv, dh)), b.add(b.mul(g, dh), d0))
                    vrow = b.gep(vc.data, [base])
                    for k, acc in enumerate(accs):
                        ptr = b.bitcast(b.gep(vrow, [const(8 * k)]), vty.as_pointer())
                        v = b.load(ptr, align=2 if half else 4)
                        v = b.fpext(b.bitcast(v, ir.VectorType(ir.HalfType(), 8)), f8) if half else v
                        b.store(b.call(fma, [wv, v, b.load(acc)]), acc)
            for k, acc in enumerate(accs):
                dst = b.bitcast(b.gep(prow, [b.add(d0, const(8 * k))]), f8.as_pointer())
                b.store(b.load(acc), dst, align=4)
        return context.get_dummy_value()

    return sig, codegen


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
    last_blk = (c1 - 1) // block_size
    for blk in range(c0 // block_size, last_blk + 1):
        b = table[blk]
        if blk < last_blk:
            _prefetch_block(k_cache, table[blk + 1])
        _prefetch_block(v_cache, b)
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
    if HAVE_F16C and head_dim % VALUE_PASS == 0 and first + 1 >= c1:
        # every row sees every position of the chunk (a decode token's tile): the sums in vector registers
        for g in range(n_kv):
            for r in range(rows):
                if min(c1, first + r // group + 1) > c0:
                    _weighted_values(parts, scores, v_cache, table, g, r, c0, c1)
        return
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


@intrinsic
def _tile_gemm(typingctx, out, a, panel, n_k, t0, col0):
    """out[t, col0 + c] = sum_{k < n_k} a[t, k] * panel[k, col0 + c] for c < 2 LANES and rows t0 .. t0+5 of a
    (a row past the last repeats the last): 6 rows x 2 vectors of sums in registers, one broadcast a[t, k]
    times two panel vectors per row and k (fma), k in order. Each row's sums are the same instructions
    whichever rows share its pass.   out: [R, >= col0 + 2 LANES]; a: [R, >= n_k]; panel: [>= n_k, W]."""
    for name, ty in (("out", out), ("a", a), ("panel", panel)):
        if not (
            isinstance(ty, types.Array) and ty.dtype == types.float32 and ty.ndim == 2 and ty.layout == "C"
        ):
            raise TypingError(f"_tile_gemm: {name} must be a C-contiguous 2-D float32 array, got {ty}")
    sig = types.void(out, a, panel, types.intp, types.intp, types.intp)
    f32 = ir.FloatType()
    vty = ir.VectorType(f32, LANES)

    def row_ptr(context, builder, aryty, ary, row):
        arr = context.make_array(aryty)(context, builder, ary)
        ncol = cgutils.unpack_tuple(builder, arr.shape, 2)[1]
        return builder.gep(arr.data, [builder.mul(row, ncol)]), ncol

    def codegen(context, builder, sig, args):
        b = builder
        n_k, t0, col0 = args[3], args[4], args[5]
        n_rows = cgutils.unpack_tuple(b, context.make_array(sig.args[1])(context, b, args[1]).shape, 2)[0]
        last = b.sub(n_rows, ir.Constant(n_rows.type, 1))
        rows = []
        for k in range(ROWS_PER_PASS):
            t = b.add(t0, ir.Constant(t0.type, k))
            rows.append(b.select(b.icmp_signed("<", t, n_rows), t, last))
        arows = [row_ptr(context, b, sig.args[1], args[1], t)[0] for t in rows]
        pbase, width = row_ptr(context, b, sig.args[2], args[2], ir.Constant(t0.type, 0))
        fma = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.v{LANES}f32"
        )
        zero = ir.Constant(vty, [0.0] * LANES)
        accs = [[cgutils.alloca_once_value(b, zero) for _ in range(2)] for _ in range(ROWS_PER_PASS)]
        with cgutils.for_range(b, n_k) as loop:
            k = loop.index
            base = b.add(b.mul(k, width), col0)
            w = [b.load(b.bitcast(b.gep(pbase, [b.add(base, ir.Constant(base.type, LANES * h))]),
                                  vty.as_pointer()), align=4) for h in range(2)]  # fmt: skip
            for t in range(ROWS_PER_PASS):
                x = b.load(b.gep(arows[t], [k]))
                xs = b.insert_element(ir.Constant(vty, None), x, ir.Constant(ir.IntType(32), 0))
                xs = b.shuffle_vector(
                    xs, ir.Constant(vty, None), ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
                )
                for h in range(2):
                    b.store(b.call(fma, [w[h], xs, b.load(accs[t][h])]), accs[t][h])
        for t in range(ROWS_PER_PASS):
            orow, _ = row_ptr(context, b, sig.args[0], args[0], rows[t])
            for h in range(2):
                dst = b.gep(orow, [b.add(col0, ir.Constant(col0.type, LANES * h))])
                b.store(b.load(accs[t][h]), b.bitcast(dst, vty.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _gemm(out, a, panel, n_k, n_cols):
    """out[:, :n_cols] = a[:, :n_k] @ panel[:n_k, :n_cols] (n_cols a multiple of 2 LANES): the micro-kernel
    where it can run, else plain loops with the same per-row order of sums."""
    if HAVE_F16C:  # the AVX2 path (FMA comes with it)
        for t0 in range(0, a.shape[0], ROWS_PER_PASS):
            for c0 in range(0, n_cols, 2 * LANES):
                _tile_gemm(out, a, panel, n_k, t0, c0)
    else:
        for t in range(a.shape[0]):
            for c in range(n_cols):
                out[t, c] = np.float32(0.0)
            for k in range(n_k):
                x = a[t, k]
                for c in range(n_cols):
                    out[t, c] += x * panel[k, c]


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _chunk_softmax_prompt(parts, q, scores, kt, vc, k_cache, v_cache, table, first, group, c0, c1):
    """`_chunk_softmax` for a tile of prompt tokens, as matrix products: per kv head, the chunk's keys are
    gathered transposed into kt [Dh, n] and its values into vc [n, Dh] (n = c1 - c0 rounded up to 2 LANES,
    zero-padded), then scores = q @ kt, softmax per row (0 for the positions a row does not see), and
    parts[.., 2:] = probabilities @ vc. scores: [Hkv, rows, >= n]; kt: [Dh, >= n]; vc: [>= n, Dh rounded up
    to 2 LANES] (the columns past Dh are zeros)."""
    block_size, n_kv, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    rows = q.shape[1]
    span = 2 * LANES
    n = (c1 - c0 + span - 1) // span * span
    width = vc.shape[1]
    work = np.empty((rows, width), dtype=np.float32)
    key = np.empty(head_dim, dtype=np.float32)
    for g in range(n_kv):
        for j in range(c0, c0 + n):
            jj = j - c0
            if j < c1:
                b, o = table[j // block_size], j % block_size
                # converted in loops of their own, contiguous both sides: they vectorize (one loop with the
                # transposed store ran a scalar float16 conversion per element on AVX2: 4x slower)
                for i in range(head_dim):
                    key[i] = _kv(k_cache[b, o, g, i])
                for i in range(head_dim):
                    vc[jj, i] = _kv(v_cache[b, o, g, i])
                for i in range(head_dim):
                    kt[i, jj] = key[i]
            else:
                for i in range(head_dim):
                    kt[i, jj] = np.float32(0.0)
                    vc[jj, i] = np.float32(0.0)
            for i in range(head_dim, width):
                vc[jj, i] = np.float32(0.0)
        sg = scores[g]
        _gemm(sg, q[g], kt, head_dim, n)
        for r in range(rows):
            end = min(c1, first + r // group + 1)  # positions this row sees, in this chunk
            if end <= c0:  # a chunk after the row's token: weight 0 in the merge (m = -1e30, sum 0, values 0)
                parts[g, r, 0] = np.float32(-1e30)
                parts[g, r, 1] = np.float32(0.0)
                for jj in range(n):
                    sg[r, jj] = np.float32(0.0)
                continue
            m = sg[r, 0]
            for jj in range(1, end - c0):
                m = max(m, sg[r, jj])
            total = np.float32(0.0)
            for jj in range(end - c0):
                e = fast_exp(sg[r, jj] - m)
                sg[r, jj] = e
                total += e
            for jj in range(end - c0, n):
                sg[r, jj] = np.float32(0.0)
            parts[g, r, 0] = m
            parts[g, r, 1] = total
        _gemm(work, sg, vc, n, width)
        for r in range(rows):
            for i in range(head_dim):
                parts[g, r, 2 + i] = work[r, i]


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
    decode_tokens,
    chunk=CONTEXT_CHUNK,
):
    """Causal grouped-query attention of each new token over its sequence's cached keys and values.

    out: [T, H * Dh]; qkv: [T, (H + 2 Hkv) * Dh]; k_cache, v_cache: [NB, BS, Hkv, Dh], float32 or float16
    bits (uint16); block_tables: [S, max_blocks] int32 (a sequence's blocks in order); token_seq: [T] int64
    (the sequence of each token); positions: [T] int64 (a token sees cache positions 0..positions[t]);
    decode_tokens: the first rows are decode tokens (one per sequence), the rest prompt tokens.
    Query tokens go in tiles of up to TILE consecutive tokens of a sequence, with all their query heads:
    every cached key and value row is read once for all of them. The context is cut into chunks of `chunk`
    positions, each giving a partial softmax (its max, sum and weighted values), merged in chunk order: a
    token's result depends only on its own context, never on its batch or tile. A decode token (a tile of
    its own) spreads its chunks over the cores (a long context at batch 1) and reads the cache directly; a
    tile of prompt tokens goes through its chunks in one work item, as matrix products (`_chunk_softmax_prompt`),
    whatever its size: the path follows the token's role, so a prompt's results do not depend on how it was cut
    into steps. Softmax subtracts the max, fast_exp.
    """
    head_dim = k_cache.shape[3]
    group = n_heads // n_kv_heads
    tiles = _query_tiles(token_seq, positions, decode_tokens)
    items, offsets = _work_items(tiles, positions, chunk, decode_tokens)
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
        span = chunk + 2 * LANES  # a chunk rounded up to whole vectors
        scores = np.empty((n_kv_heads, rows, span), dtype=np.float32)
        if t0 < decode_tokens:
            for c in range(c_first, c_end):
                _chunk_softmax(parts[c - c_first], q, scores, k_cache, v_cache, block_tables[s], first, group,
                               c * chunk, min(n, c * chunk + chunk))  # fmt: skip
        else:
            kt = np.empty((head_dim, span), dtype=np.float32)
            vc = np.empty((span, (head_dim + 2 * LANES - 1) // (2 * LANES) * 2 * LANES), dtype=np.float32)
            for c in range(c_first, c_end):
                _chunk_softmax_prompt(parts[c - c_first], q, scores, kt, vc, k_cache, v_cache, block_tables[s],
                                      first, group, c * chunk, min(n, c * chunk + chunk))  # fmt: skip
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
