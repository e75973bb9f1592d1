"""Matrix products against block-quantized weights: Q4_1 (4-bit) and Q8_0 (llama.cpp's formats), and Q8_M.

Weights are stored as plain arrays (see `nextword.weights.quantize`), blocks of 32 along K:
- Q8_0: `qs` int8 [N, K], `d` uint16 [N, K/32] (fp16 bits);          w = d * q
- Q4_1: `qs` uint8 [N, K/2], `d`, `m` uint16 [N, K/32] (fp16 bits);   w = d * q + m, q in 0..15; byte j of a
  block holds element j in its low nibble and element j + 16 in its high nibble.
- Q8_M: `qs` uint8 [N, K], `d`, `m` uint16 [N, K/32] (fp16 bits);     w = d * q + m, q in 0..255 (the `int8`
  format and every LM head: it holds Q4_1- and Q8_0-origin blocks exactly, where Q8_0 loses 0.55% RMS).

Two ways to compute out[T, N] = x[T, K] @ dequant(W).T:
- `*_xq` (decode): the activations are quantized per 32-block to integers, then each row is an integer dot
  per block, scaled by d * dx. Q4_1 and Q8_0 take int8 activations (dx = absmax / 127, llama.cpp's Q8
  activations; vpmaddubsw + vpmaddwd); Q8_M takes int16 ones (dx = absmax / 32767; its uint8 weights
  zero-extended to int16, vpmaddwd: as many multiply-add instructions per block as the int8 path, and 256x
  finer activation steps, which the decode path needs to stay within 0.2% of float32's perplexity). On
  AVX2 + F16C hosts each dot is an explicit-SIMD `@intrinsic` (vector accumulators, vcvtph2ps); elsewhere
  a portable numba loop. Q8_0: tokens go 4 at a time through each row (`*_x4` dots: one unpacking of the
  row, every token's float operations exactly those of the 1-token dot, so results do not depend on the
  batch), one vector accumulator per token. Q4_1 (the q4 format's layers) and Q8_M (the LM heads): all
  tokens at once through `_rows_<fmt>_xq`, XQ_ROWS rows in the vector lanes, each block's 32 products added
  in exact integers, then out += sum * (d * dx) + m * sx block after block, the same operations for every
  token: at 16 tokens a step, 1.2-1.7x the speed of 4-token row dots (whose per-row reductions and call
  overhead it spreads over 8 rows), and as fast at one token.
  The result differs from the exact product by the activation rounding: per block
  |err| <= 0.5 * dx * sum_j |w_j| (the `m` term takes the sum of the quantized x, as llama.cpp does).
- `*_xf` (prompt tokens): the activations stay float32 (matches the float64 reference to ~1e-6 relative);
  each weight byte is read once per call. On the AVX2 path (N a multiple of PANEL) the weights are
  dequantized straight into vectors of LANES rows' elements k (a dword transpose of the rows' block bytes,
  one vpshufb per element), which then either
  - multiply at most FEW_TOKENS tokens, and the LM head's rows (`tiled=False`: one row per sequence, any T;
    N a multiple of 4 * LANES), 1, 2 or 4 tokens a pass with 4 fma chains in flight: few prompt
    tokens are the editors' case, each keystroke's prompt mostly cached (3072x576 q4: ~70 us for one
    token, was ~320 through the panels);
  - or fill a transposed panel of PANEL rows for a register-tiled micro-kernel (6 tokens x PANEL rows of
    sums, one fma per k and vector), for more tokens.
  Both compute each sum with the same operations (the same rounded weight, fma(w, x, sum), k in order), so
  they agree bit for bit and a prompt's results do not depend on how it is cut into steps. Elsewhere, a
  few rows are dequantized into a buffer reused for all T tokens (4 rows x 2 tokens, along K).
Which one a token goes through is decided by `nextword.kernels.matmul.linear`: by the token's role (decode
tokens `*_xq`, prompt tokens `*_xf`), never by the batch size. Note for callers: a cached njit function that
calls a parallel=True one can segfault when loaded from the cache (numba issue #8578), so dispatch from
Python.

All arrays C-contiguous; x, out float32; K a multiple of 32. The kernels allocate only small scratch arrays.
This file is self-contained: it calls no njit function of another file.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from nextword.kernels import FASTMATH, isa

QK = 32  # elements per block
ROWS = 4  # weight rows dequantized together in the portable float-activation path
CHUNK = 16  # rows per parallel work item in the float-activation path (one scratch buffer each)
PANEL_TOKENS = 6  # tokens per pass of the float-activation micro-kernel: 6 x PANEL sums in 12 registers


# AVX2 + FMA + F16C in the code Numba generates (the host CPU, or NUMBA_CPU_NAME / NUMBA_CPU_FEATURES): the
# explicit-SIMD kernels below; else the portable ones. See nextword.kernels.isa.
HAVE_AVX2 = isa.target().avx2
# The float-activation micro-kernel's vector width: 16 floats where LLVM may use AVX-512, else 8.
LANES = 16 if isa.target().avx512 else 8
PANEL = 2 * LANES  # weight rows per panel of the micro-kernel (two vectors)
FEW_TOKENS = 4  # a call with at most this many prompt tokens takes the rows-in-lanes kernel (one pass;
# an 8-token variant was faster at 5-8 tokens but its code held 4 MiB more: the memory goal of issue 12)

# ---------------------------------------------------------------------------------------------------------
# fp16 -> fp32

_V = ir.VectorType
_i1, _i8, _i16, _i32, _f32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


@intrinsic
def _u32_as_f32(typingctx, u):
    """Reinterpret the bits of a uint32 as a float32 (plain LLVM bitcast, portable)."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@njit(cache=True, nogil=True, inline="always")
def _f16_to_f32(h):
    """fp16 bits (uint16) -> float32 with integer ops only (portable: no F16C, no libcall)."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if e == 0:  # zero or subnormal: mant * 2**-24, exact in float32
        v = np.float32(mant) * np.float32(5.9604644775390625e-08)
        return -v if sign else v
    if e == 31:  # inf / nan
        return _u32_as_f32(sign | np.uint32(0x7F800000) | (mant << np.uint32(13)))
    return _u32_as_f32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13)))


@intrinsic
def _f16_to_f32_f16c(typingctx, h):
    """fp16 bits (uint16) -> float32 by LLVM fpext (one vcvtph2ps with F16C; only used when HAVE_AVX2)."""

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


# ---------------------------------------------------------------------------------------------------------
# AVX2 row dots (llvmlite IR). Each returns one float32: row i of the weight against token t of the
# int8-quantized activations.


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _c_array(ty, dtype, ndim):
    return isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"


def _check_types(name, pairs):
    for ty, dtype in pairs:
        if not _c_array(ty, dtype, 2):
            raise TypingError(f"{name}: expected a C-contiguous 2-D {dtype} array, got {ty}")


def _row_ptr(context, builder, aryty, ary, row):
    """Pointer to the first element of row `row` of a C-contiguous 2-D array, and its row length."""
    a = context.make_array(aryty)(context, builder, ary)
    ncol = cgutils.unpack_tuple(builder, a.shape, 2)[1]
    return builder.gep(a.data, [builder.mul(row, ncol)]), ncol


def _splat(builder, value, n):
    vty = _V(value.type, n)
    v = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, None), ir.Constant(_V(_i32, n), [0] * n))


def _lane(builder, vec, k):
    """Broadcast lane k of a float vector to <8 x float>."""
    return builder.shuffle_vector(vec, ir.Constant(vec.type, None), ir.Constant(_V(_i32, 8), [k] * 8))


def _load_vec(builder, ptr, offset, vty, align):
    return builder.load(builder.bitcast(builder.gep(ptr, [offset]), vty.as_pointer()), align=align)


def _halfn_to_f32(builder, ptr, offset, n):
    """Load n consecutive fp16 (uint16) values and widen them to <n x float> (one vcvtph2ps)."""
    return _halves_to_f32(builder, _load_vec(builder, ptr, offset, _V(_i16, n), 2))


def _half_to_f32(builder, ptr, offset):
    return builder.fpext(builder.bitcast(builder.load(builder.gep(ptr, [offset])), ir.HalfType()), _f32)


_STEP = 8  # blocks per main-loop iteration (one 8-wide scale vector)
_PREFETCH = 2048  # bytes ahead of the weight stream to prefetch (0: off)


def _prefetch(builder, ptr, offset, nlines):
    """Software prefetch of nlines cache lines, _PREFETCH bytes after ptr + offset (harmless past the end)."""
    if not _PREFETCH:
        return
    pf = _fn(builder, "llvm.prefetch.p0", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
    base = builder.bitcast(ptr, _i8.as_pointer())
    for k in range(nlines):
        off = builder.add(offset, ir.Constant(offset.type, _PREFETCH + 64 * k))
        p = builder.gep(base, [off])  # no inbounds: may point past the array, prefetch never faults
        builder.call(pf, [p, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])


def _block_loop(builder, nb, step, body, tail):
    """for u in range(nb // step): body(step * u); then tail(start) once for the remaining blocks."""
    c = ir.Constant(nb.type, step)
    nu = builder.udiv(nb, c)
    with cgutils.for_range(builder, nu) as loop:
        body(builder.mul(loop.index, c))
    tail(builder.mul(nu, c))


def _strict(instr):
    """Mark a float op so numba's fastmath pass (which only flags flag-less ops) leaves it alone: no
    reassociation or contraction, so every token's sum is the same sequence of roundings in the 1-token and
    the 4-token kernels. (arcp only concerns divisions: it does not change an fadd or fmul.)"""
    instr.flags.append("arcp")
    return instr


def _hsum(builder, v, n):
    s = builder.extract_element(v, ir.Constant(_i32, 0))
    for k in range(1, n):
        s = _strict(builder.fadd(s, builder.extract_element(v, ir.Constant(_i32, k))))
    return s


def _result(context, builder, sig, vals):
    return vals[0] if len(vals) == 1 else context.make_tuple(builder, sig.return_type, vals)


# Multi-token row dots: `*_x4(..., t)` returns the row's dots with tokens t .. t+3, each computed by exactly
# the float operations of the 1-token dot (per-token accumulators, same order): only the weight loads, the
# unpacking and the fp16 scale conversions are shared. Results never depend on how tokens are grouped.
NTOK = 4


def _q8_codegen(nt):
    def codegen(context, builder, sig, args):
        b = builder
        row, _ = _row_ptr(context, b, sig.args[0], args[0], args[2])
        drow, nb = _row_ptr(context, b, sig.args[1], args[1], args[2])
        toks = [b.add(args[5], ir.Constant(args[5].type, k)) for k in range(nt)]
        xrows = [_row_ptr(context, b, sig.args[3], args[3], t)[0] for t in toks]
        dxrows = [_row_ptr(context, b, sig.args[4], args[4], t)[0] for t in toks]
        vabs = _fn(b, "llvm.abs.v32i8", _V(_i8, 32), [_V(_i8, 32), _i1])
        psign = _fn(b, "llvm.x86.avx2.psign.b", _V(_i8, 32), [_V(_i8, 32), _V(_i8, 32)])
        maddubs = _fn(b, "llvm.x86.avx2.pmadd.ub.sw", _V(_i16, 16), [_V(_i8, 32), _V(_i8, 32)])
        maddwd = _fn(b, "llvm.x86.avx2.pmadd.wd", _V(_i32, 8), [_V(_i16, 16), _V(_i16, 16)])
        fma = _fn(b, "llvm.fma.v8f32", _V(_f32, 8), [_V(_f32, 8)] * 3)
        ones = ir.Constant(_V(_i16, 16), [1] * 16)
        accs = [cgutils.alloca_once_value(b, ir.Constant(_V(_f32, 8), [0.0] * 8)) for _ in range(nt)]
        c32 = ir.Constant(nb.type, QK)

        def add_block(blk, dv_blk):  # dv_blk: the block's weight scale in 8 lanes
            off = b.mul(blk, c32)
            w = _load_vec(b, row, off, _V(_i8, 32), 1)
            aw = b.call(vabs, [w, ir.Constant(_i1, 0)])
            for k in range(nt):
                xv = _load_vec(b, xrows[k], off, _V(_i8, 32), 1)
                p16 = b.call(maddubs, [aw, b.call(psign, [xv, w])])
                dot = b.sitofp(b.call(maddwd, [p16, ones]), _V(_f32, 8))
                sc = _strict(b.fmul(dv_blk, _splat(b, b.load(b.gep(dxrows[k], [blk])), 8)))
                b.store(b.call(fma, [dot, sc, b.load(accs[k])]), accs[k])

        def body(base):
            _prefetch(b, row, b.mul(base, c32), _STEP * QK // 64)
            dv = _halfn_to_f32(b, drow, base, _STEP)
            for u in range(_STEP):
                add_block(b.add(base, ir.Constant(nb.type, u)), _lane(b, dv, u))

        def tail(start):
            with cgutils.for_range_slice(b, start, nb, ir.Constant(nb.type, 1)) as (blk, _):
                add_block(blk, _splat(b, _half_to_f32(b, drow, blk), 8))

        _block_loop(b, nb, _STEP, body, tail)
        return _result(context, b, sig, [_hsum(b, b.load(accs[k]), 8) for k in range(nt)])

    return codegen


def _q8_types(name, qs, d, xq, dx):
    _check_types(name, [(qs, types.int8), (d, types.uint16), (xq, types.int8), (dx, types.float32)])
    return (qs, d, types.intp, xq, dx, types.intp)


@intrinsic
def _dot_q8_avx2(typingctx, qs, d, i, xq, dx, t):
    """sum_b d[i,b] * dx[t,b] * sum_j qs[i, 32b+j] * xq[t, 32b+j]   (AVX2: |w| (x) sign(x, w) via pmaddubsw)"""
    return types.float32(*_q8_types("_dot_q8_avx2", qs, d, xq, dx)), _q8_codegen(1)


@intrinsic
def _dot_q8_avx2_x4(typingctx, qs, d, i, xq, dx, t):
    """`_dot_q8_avx2` for tokens t .. t+3 (a tuple of 4), each bit-identical to the 1-token dot."""
    sig = types.UniTuple(types.float32, NTOK)(*_q8_types("_dot_q8_avx2_x4", qs, d, xq, dx))
    return sig, _q8_codegen(NTOK)


# ---------------------------------------------------------------------------------------------------------
# Block dequantization into a float32 buffer, in target-independent LLVM vector IR (numba's own loops for
# this stay scalar: the unrolled 32-element body does not SLP-vectorize). Legal on any LLVM target: the
# portable float-activation path.


@intrinsic
def _dequant_q8_block(typingctx, buf, r, qs, i, b, s):
    """buf[r, 32b : 32b+32] = float(qs[i, 32b : 32b+32]) * s"""
    _check_types("_dequant_q8_block", [(buf, types.float32), (qs, types.int8)])
    sig = types.void(buf, types.intp, qs, types.intp, types.intp, types.float32)

    def codegen(context, builder, sig, args):
        b = builder
        out, _ = _row_ptr(context, b, sig.args[0], args[0], args[1])
        row, _ = _row_ptr(context, b, sig.args[2], args[2], args[3])
        off = b.mul(args[4], ir.Constant(args[4].type, QK))
        q = b.sitofp(_load_vec(b, row, off, _V(_i8, QK), 1), _V(_f32, QK))
        v = b.fmul(q, _splat(b, args[5], QK))
        b.store(v, b.bitcast(b.gep(out, [off]), _V(_f32, QK).as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _dequant_q4_block(typingctx, buf, r, qs, i, b, s, mn):
    """buf[r, 32b + j] = s * q_j + mn for the 32 nibbles of block b of row i (llama.cpp order)"""
    _check_types("_dequant_q4_block", [(buf, types.float32), (qs, types.uint8)])
    sig = types.void(buf, types.intp, qs, types.intp, types.intp, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        b = builder
        out, _ = _row_ptr(context, b, sig.args[0], args[0], args[1])
        row, _ = _row_ptr(context, b, sig.args[2], args[2], args[3])
        H = QK // 2
        packed = _load_vec(b, row, b.mul(args[4], ir.Constant(args[4].type, H)), _V(_i8, H), 1)
        off = b.mul(args[4], ir.Constant(args[4].type, QK))
        s, mn = _splat(b, args[5], H), _splat(b, args[6], H)
        lo = b.and_(packed, ir.Constant(_V(_i8, H), [0x0F] * H))  # elements 0..15
        hi = b.lshr(packed, ir.Constant(_V(_i8, H), [4] * H))  # elements 16..31
        for half, q in ((0, lo), (H, hi)):
            v = b.fadd(b.fmul(b.uitofp(q, _V(_f32, H)), s), mn)
            dst = b.gep(out, [b.add(off, ir.Constant(off.type, half))])
            b.store(v, b.bitcast(dst, _V(_f32, H).as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _dequant_q8m_block(typingctx, buf, r, qs, i, b, s, mn):
    """buf[r, 32b : 32b+32] = s * float(qs[i, 32b : 32b+32]) + mn   (qs uint8)"""
    _check_types("_dequant_q8m_block", [(buf, types.float32), (qs, types.uint8)])
    sig = types.void(buf, types.intp, qs, types.intp, types.intp, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        b = builder
        out, _ = _row_ptr(context, b, sig.args[0], args[0], args[1])
        row, _ = _row_ptr(context, b, sig.args[2], args[2], args[3])
        off = b.mul(args[4], ir.Constant(args[4].type, QK))
        q = b.uitofp(_load_vec(b, row, off, _V(_i8, QK), 1), _V(_f32, QK))
        v = b.fadd(b.fmul(q, _splat(b, args[5], QK)), _splat(b, args[6], QK))
        b.store(v, b.bitcast(b.gep(out, [off]), _V(_f32, QK).as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------------------
# Portable row dots (same contract as the AVX2 ones): plain numba, int32 sums per block.


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _dot_q8_portable(qs, d, i, xq, dx, t):
    nb = d.shape[1]
    bs = qs.shape[1] // nb  # runtime block size: a literal 32 would be unrolled and not vectorized
    q = qs[i]
    xr = xq[t]
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * bs  # (range(o, o + bs) here made LLVM give up vectorizing: 6x slower)
        s = np.int32(0)
        for j in range(bs):
            s += np.int32(q[o + j]) * np.int32(xr[o + j])
        acc += _f16_to_f32(d[i, b]) * dx[t, b] * np.float32(s)
    return acc


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _dot_q4_portable(qs, d, m, i, xq, dx, sx, t):
    nb = d.shape[1]
    half = qs.shape[1] // nb
    q = qs[i]
    xr = xq[t]
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * half
        x0 = 2 * o
        s = np.int32(0)
        for j in range(half):
            byte = np.int32(q[o + j])
            s += (byte & np.int32(15)) * np.int32(xr[x0 + j]) + (byte >> np.int32(4)) * np.int32(
                xr[x0 + half + j]
            )
        acc += _f16_to_f32(d[i, b]) * dx[t, b] * np.float32(s) + _f16_to_f32(m[i, b]) * sx[t, b]
    return acc


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _dot_q8m_portable(qs, d, m, i, xq, dx, sx, t):
    nb = d.shape[1]
    bs = qs.shape[1] // nb
    q = qs[i]
    xr = xq[t]
    acc = np.float32(0.0)
    for b in range(nb):
        o = b * bs
        s = np.int32(0)
        for j in range(bs):
            s += np.int32(q[o + j]) * np.int32(xr[o + j])
        acc += _f16_to_f32(d[i, b]) * dx[t, b] * np.float32(s) + _f16_to_f32(m[i, b]) * sx[t, b]
    return acc


@njit(cache=True, nogil=True)
def _dot_q8_portable_x4(qs, d, i, xq, dx, t):
    return (
        _dot_q8_portable(qs, d, i, xq, dx, t),
        _dot_q8_portable(qs, d, i, xq, dx, t + 1),
        _dot_q8_portable(qs, d, i, xq, dx, t + 2),
        _dot_q8_portable(qs, d, i, xq, dx, t + 3),
    )


_dot_q8 = _dot_q8_avx2 if HAVE_AVX2 else _dot_q8_portable
_dot_q8_x4 = _dot_q8_avx2_x4 if HAVE_AVX2 else _dot_q8_portable_x4
_h2f = _f16_to_f32_f16c if HAVE_AVX2 else _f16_to_f32

# ---------------------------------------------------------------------------------------------------------
# Activation quantization (llama.cpp's Q8 activations: per 32-block, dx = absmax / 127, q = round(x / dx))


@intrinsic
def _block_absmax(typingctx, x, t, b):
    """max_j |x[t, 32b + j]| for a C-contiguous 2-D float32 x. Compared as integers (a float without its sign
    bit orders as its bits do): plain vector IR that LLVM lowers to vpand + vpmaxsd on x86, and portable.
    Numba leaves a scalar loop's float max unvectorized, which made quantizing a 16-token batch cost more
    than a third of its q4 matmul."""
    if not _c_array(x, types.float32, 2):
        raise TypingError(f"_block_absmax: expected a C-contiguous 2-D float32 array, got {x}")

    def codegen(context, builder, sig, args):
        b = builder
        row, _ = _row_ptr(context, b, sig.args[0], args[0], args[1])
        base = b.mul(args[2], ir.Constant(args[2].type, QK))
        v8 = _V(_i32, 8)
        m = None
        for k in range(QK // 8):
            bits = b.bitcast(
                _load_vec(b, row, b.add(base, ir.Constant(base.type, 8 * k)), _V(_f32, 8), 4), v8
            )
            bits = b.and_(bits, ir.Constant(v8, [0x7FFFFFFF] * 8))
            m = bits if m is None else b.select(b.icmp_signed(">", bits, m), bits, m)
        for half in (4, 2, 1):  # fold the lanes: the upper `half` onto the lower
            other = b.shuffle_vector(m, ir.Constant(v8, None), ir.Constant(v8, [j + half for j in range(8)]))
            m = b.select(b.icmp_signed(">", other, m), other, m)
        return b.bitcast(b.extract_element(m, ir.Constant(_i32, 0)), _f32)

    return types.float32(x, types.intp, types.intp), codegen


@njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _act_scale(dx, x, t, b, top):
    """dx[t, b] = absmax of block b of token t / top; returns top / dx (0 for an all-zero block)."""
    amax = _block_absmax(x, t, b)
    dx[t, b] = amax / top
    return top / amax if amax > np.float32(0.0) else np.float32(0.0)


@njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _round(v, inv):
    return np.int32(np.floor(v * inv + np.float32(0.5)))


@njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _quantize_halves(lo, hi, blk, inv):
    """lo[j] = round(blk[j] * inv), hi[j] = round(blk[16 + j] * inv) for j < 16 (1-D slices: contiguous,
    so the loop vectorizes); returns the sum of the 32 integers."""
    s = np.int32(0)
    for j in range(QK // 2):
        q0, q1 = _round(blk[j], inv), _round(blk[QK // 2 + j], inv)
        lo[j], hi[j] = q0, q1
        s += q0 + q1
    return s


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def quantize_activations(xq, dx, sx, x):
    """dx[t, b] = max_j |x[t, 32b+j]| / 127; xq = round(x / dx) (int8); sx[t, b] = dx * sum_j xq[t, 32b+j].
    xq: [T, K] int8; dx, sx: [T, K/32] float32; x: [T, K] float32

    sx is the block sum of the *quantized* activations (llama.cpp's Q8_1 `s`), for the Q4_1 term m * sum(x):
    then a Q4_1 dot's error is sum_j w_j (x^_j - x_j), where the exact sum of x would leave
    sum_j (w_j - m) (x^_j - x_j): several times larger, |m| being of the order of the block's largest |w|
    (measured: +1.3% perplexity on the q4 decode path instead of +0.4%)."""
    _quantize_rows(xq, dx, sx, x, np.float32(127.0), False)


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def quantize_activations_paired(xq, dx, sx, x):
    """`quantize_activations` with xq in the order `_rows_q4_1_xq` reads: within each pair of blocks
    (2p, 2p+1) the 64 values are [2p: 0..15, 2p+1: 0..15, 2p: 16..31, 2p+1: 16..31]; an odd last block
    stays in natural order. Then the 32 packed bytes of a pair of Q4_1 blocks give, unchanged, the low nibbles
    (elements 0..15 of both blocks) and the high nibbles (elements 16..31) in the activations' order."""
    _quantize_rows(xq, dx, sx, x, np.float32(127.0), True)


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def quantize_activations_i16(xq, dx, sx, x):
    """`quantize_activations` to int16: dx[t, b] = max_j |x[t, 32b+j]| / 32767, xq = round(x / dx) (int16),
    sx[t, b] = dx * sum_j xq[t, 32b+j].   xq: [T, K] int16; dx, sx: [T, K/32] float32; x: [T, K] float32
    (for the 8-bit weights: 256x finer steps than int8 for the same vpmaddwd count per block)."""
    _quantize_rows(xq, dx, sx, x, np.float32(32767.0), False)


@njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _quantize_rows(xq, dx, sx, x, top, paired):
    T, K = x.shape
    nb = K // QK
    H = QK // 2
    for t in range(T):
        xr, qr = x[t], xq[t]
        for b in range(nb):
            inv = _act_scale(dx, x, t, b, top)
            lo = b * QK
            hi = lo + H
            if paired and (b | 1) < nb:  # b belongs to a complete pair
                lo = (b >> 1) * 2 * QK + (b & 1) * H  # where elements 0..15 go; 16..31 go QK further
                hi = lo + QK
            s = _quantize_halves(qr[lo : lo + H], qr[hi : hi + H], xr[b * QK : b * QK + QK], inv)
            sx[t, b] = dx[t, b] * np.float32(s)


@njit(cache=True, nogil=True)
def _check(out, x, n, nb):
    T, K = x.shape
    if K != nb * QK:
        raise ValueError("x.shape[1] must equal 32 * number of blocks of the weight")
    if out.shape[0] != T or out.shape[1] != n:
        raise ValueError("out must be [T, N]")


# ---------------------------------------------------------------------------------------------------------
# Float-activation path (see the module docstring): on AVX2 the rows-in-lanes kernel for few tokens and the
# LM head, else a transposed panel of PANEL rows and the micro-kernel over the tokens; elsewhere ROWS rows
# dequantized into a buffer, then a 4 rows x 2 tokens register-blocked product along K.


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _rows_times_x(out, x, buf, i0, nr):
    """out[t, i0 + r] = dot(x[t], buf[r]) for r < nr.   buf: [ROWS, K] float32"""
    T, K = x.shape
    if nr == 4:
        # Tokens two at a time; an odd last token is paired with itself, so that every token's sums come
        # from the same instructions whatever its neighbours: results never depend on the batch.
        for t in range(0, T, 2):
            u = min(t + 1, T - 1)
            a00 = a01 = a02 = a03 = np.float32(0.0)
            a10 = a11 = a12 = a13 = np.float32(0.0)
            for k in range(K):
                x0 = x[t, k]
                x1 = x[u, k]
                w0, w1, w2, w3 = buf[0, k], buf[1, k], buf[2, k], buf[3, k]
                a00 += x0 * w0
                a01 += x0 * w1
                a02 += x0 * w2
                a03 += x0 * w3
                a10 += x1 * w0
                a11 += x1 * w1
                a12 += x1 * w2
                a13 += x1 * w3
            out[t, i0], out[t, i0 + 1], out[t, i0 + 2], out[t, i0 + 3] = a00, a01, a02, a03
            out[u, i0], out[u, i0 + 1], out[u, i0 + 2], out[u, i0 + 3] = a10, a11, a12, a13
    else:
        for r in range(nr):
            for t in range(T):
                acc = np.float32(0.0)
                for k in range(K):
                    acc += x[t, k] * buf[r, k]
                out[t, i0 + r] = acc


@intrinsic
def _panel_times_x_avx2(typingctx, out, x, panel, i0, t0):
    """out[t, i0 + r] = sum_k x[t, k] * panel[k, r] for r < PANEL and tokens t0 .. t0+5 (a token past the
    last one repeats the last): a register-tiled micro-kernel, 6 tokens x PANEL rows of sums in 12 vector
    registers, each k adding one broadcast activation times two panel vectors per token (fma). Every token's
    sums run over k in order with the same instructions, whichever tokens share its pass: results never
    depend on the batch.   out: [T, N]; x: [T, K]; panel: [K, PANEL], the rows i0.. transposed."""
    _check_types("_panel_times_x_avx2", [(out, types.float32), (x, types.float32), (panel, types.float32)])
    sig = types.void(out, x, panel, types.intp, types.intp)
    vty = _V(_f32, LANES)

    def codegen(context, builder, sig, args):
        b = builder
        T, K = cgutils.unpack_tuple(b, context.make_array(sig.args[1])(context, b, args[1]).shape, 2)
        last = b.sub(T, ir.Constant(T.type, 1))
        toks = []
        for k in range(PANEL_TOKENS):
            t = b.add(args[4], ir.Constant(T.type, k))
            toks.append(b.select(b.icmp_signed("<", t, T), t, last))
        xrows = [_row_ptr(context, b, sig.args[1], args[1], t)[0] for t in toks]
        prow, _ = _row_ptr(context, b, sig.args[2], args[2], ir.Constant(T.type, 0))
        fma = _fn(b, f"llvm.fma.v{LANES}f32", vty, [vty] * 3)
        zero = ir.Constant(vty, [0.0] * LANES)
        accs = [[cgutils.alloca_once_value(b, zero) for _ in range(2)] for _ in range(PANEL_TOKENS)]
        width = ir.Constant(K.type, PANEL)
        with cgutils.for_range(b, K) as loop:
            k = loop.index
            w = [_load_vec(b, prow, b.add(b.mul(k, width), ir.Constant(K.type, LANES * h)), vty, 4)
                 for h in range(2)]  # fmt: skip
            for t in range(PANEL_TOKENS):
                xs = _splat(b, b.load(b.gep(xrows[t], [k])), LANES)
                for h in range(2):
                    b.store(b.call(fma, [w[h], xs, b.load(accs[t][h])]), accs[t][h])
        for t in range(PANEL_TOKENS):
            orow, _ = _row_ptr(context, b, sig.args[0], args[0], toks[t])
            for h in range(2):
                dst = b.gep(orow, [b.add(args[3], ir.Constant(T.type, LANES * h))])
                b.store(b.load(accs[t][h]), b.bitcast(dst, vty.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _dword_columns(builder, quads):
    """LANES rows of 4 dwords (quads: LANES values <4 x i32>) as 4 <LANES x i32>: vector j holds dword j of
    every row, row l in lane l. Rows g, g+4, g+8.. share vector g, one per 128-bit lane; then a 4 x 4
    transpose inside each 128-bit lane (unpack dwords, then quadwords: what LLVM makes of these masks)."""
    b, n = builder, len(quads)

    def shuffle(a, c, mask):
        return b.shuffle_vector(a, c, ir.Constant(_V(_i32, len(mask)), mask))

    def concat(vs):
        while len(vs) > 1:
            w = 2 * vs[0].type.count
            vs = [shuffle(vs[i], vs[i + 1], list(range(w))) for i in range(0, len(vs), 2)]
        return vs[0]

    def per_lane(a, c, picks):  # in each 128-bit lane q: the (vector, index) picks, index within the lane
        return shuffle(a, c, [v * n + 4 * q + i for q in range(n // 4) for v, i in picks])

    y = [concat([quads[g + 4 * q] for q in range(n // 4)]) for g in range(4)]
    lo, hi = [(0, 0), (1, 0), (0, 1), (1, 1)], [(0, 2), (1, 2), (0, 3), (1, 3)]
    b01, b23 = (
        (per_lane(y[0], y[1], lo), per_lane(y[0], y[1], hi)),
        (per_lane(y[2], y[3], lo), per_lane(y[2], y[3], hi)),
    )
    qlo, qhi = [(0, 0), (0, 1), (1, 0), (1, 1)], [(0, 2), (0, 3), (1, 2), (1, 3)]
    return [per_lane(b01[h], b23[h], picks) for h in (0, 1) for picks in (qlo, qhi)]


_FEW_ROW_VECTORS = {1: 4, 2: 2, 4: 1}  # tokens a pass: row vectors a pass (4 * LANES rows a call)
_FEW_FORMATS = {  # format: (weight dtype, bytes per row and block, has a min `m`)
    "q8_0": (types.int8, QK, False),
    "q4_1": (types.uint8, QK // 2, True),
    "q8_m": (types.uint8, QK, True),
}


def _few_rows_typer(fmt):
    """`_few_rows_<fmt>(out, x, qs, d, [m,] i0, t0)`: out[t, i0 + l] = sum_k x[t, k] * w[i0 + l, k] for
    l < 4 * LANES and the tokens t0 .. min(t0 + 4, T) - 1, 1, 2 or 4 tokens a pass (3 run as 4, the last
    repeated). The rows in the vector lanes (_FEW_ROW_VECTORS[nt] vectors a pass), dequantized straight
    from their blocks (a dword transpose of LANES rows' block bytes), k in order: per sum exactly the
    operations of `_panel_times_x_avx2` (the same rounded weight, fma(w, x, sum) from k = 0), so few prompt
    tokens cost no panel and give the same bits."""
    wdtype, _, has_min = _FEW_FORMATS[fmt]

    def check(out, x, qs, d, m):
        _check_types(
            f"_few_rows_{fmt}",
            [(out, types.float32), (x, types.float32), (qs, wdtype)] + [(a, types.uint16) for a in (d, *m)],
        )
        passes = {nt: _few_rows_codegen(fmt, nt) for nt in _FEW_ROW_VECTORS}

        def codegen(context, builder, sig, args):  # the pass for the tokens left from t0
            b = builder
            T = cgutils.unpack_tuple(b, context.make_array(sig.args[1])(context, b, args[1]).shape, 2)[0]
            left = b.sub(T, args[-1])
            more, two = (b.icmp_signed(op, left, ir.Constant(T.type, 2)) for op in (">", "=="))
            with b.if_else(more) as (four, fewer):
                with four:
                    passes[4](context, b, sig, args)
                with fewer, b.if_else(two) as (two_left, one_left):
                    with two_left:
                        passes[2](context, b, sig, args)
                    with one_left:
                        passes[1](context, b, sig, args)
            return context.get_dummy_value()

        return types.void(out, x, qs, d, *m, types.intp, types.intp), codegen

    if has_min:

        def typer(typingctx, out, x, qs, d, m, i0, t0):
            return check(out, x, qs, d, [m])

    else:

        def typer(typingctx, out, x, qs, d, i0, t0):
            return check(out, x, qs, d, [])

    return typer


def _few_rows_codegen(fmt, nt):
    """Codegen of `_few_rows_<fmt>` (nt tokens a pass), or with nt = 0 of `_dequant_panel_<fmt>`: the same
    dequantized weight vectors, stored into a panel instead of multiplied."""
    _, row_bytes, has_min = _FEW_FORMATS[fmt]
    vty, ivty = _V(_f32, LANES), _V(_i32, LANES)
    panel = nt == 0
    nvec = 2 if panel else _FEW_ROW_VECTORS[nt]  # row vectors a pass
    per_call = PANEL if panel else 4 * LANES  # weight rows a call
    qarg = 1 if panel else 2  # the argument index of qs (d and m follow)

    def codegen(context, builder, sig, args):
        b = builder
        aty = sig.args
        i0 = args[qarg + 2 + has_min]  # then t0
        ity = i0.type

        def const(v):
            return ir.Constant(ity, v)

        def lanes(v):
            return ir.Constant(ivty, [v] * LANES)

        if panel:
            pbase, _ = _row_ptr(context, b, aty[0], args[0], const(0))
        else:
            t0 = args[qarg + 3 + has_min]
            T = cgutils.unpack_tuple(b, context.make_array(aty[1])(context, b, args[1]).shape, 2)[0]
            toks = []
            for k in range(nt):
                t = b.add(t0, const(k))
                toks.append(b.select(b.icmp_signed("<", t, T), t, b.sub(T, const(1))))
            xrows = [_row_ptr(context, b, aty[1], args[1], t)[0] for t in toks]
        d_shape = context.make_array(aty[qarg + 1])(context, b, args[qarg + 1]).shape
        nb = cgutils.unpack_tuple(b, d_shape, 2)[1]  # blocks per row
        fma = _fn(b, f"llvm.fma.v{LANES}f32", vty, [vty] * 3)

        def byte(col, p, top):
            """Byte p of each dword lane, alone in the lane's low (or top) byte: one vpshufb."""
            nbytes = 4 * LANES
            v = b.bitcast(col, _V(_i8, nbytes))
            zero = nbytes  # an index into the second (all-zero) operand
            picks = [[4 * r + p, zero, zero, zero][:: -1 if top else 1] for r in range(LANES)]
            mask = ir.Constant(_V(_i32, nbytes), [i for pick in picks for i in pick])
            return b.bitcast(b.shuffle_vector(v, ir.Constant(v.type, [0] * nbytes), mask), ivty)

        def element(col, p):  # the weights' integer q of each lane's row
            if fmt == "q8_0":  # signed: the byte on top, then an arithmetic shift down
                return b.ashr(byte(col, p, True), lanes(24))
            return byte(col, p, False)

        def weights(q, s, mn):  # q * s (+ mn), as _dequant_*_block: q * s is exact (q has at most 8 bits,
            qf = b.sitofp(q, vty)  # s 11), so fused into an fma or not, one rounding: the same bits
            w = _strict(b.fmul(qf, s))
            return _strict(b.fadd(w, mn)) if has_min else w

        def columns(ptrs, off, g):  # the 16 bytes at off of each row as dword columns, in k order
            cols = _dword_columns(b, [_load_vec(b, p, off, _V(_i32, 4), 1) for p in ptrs])
            if fmt != "q4_1":
                return [(cols[j], p, 16 * g + 4 * j + p) for j in range(4) for p in range(4)]
            nib = lanes(0x0F0F0F0F)  # byte j: element j in its low nibble, j + 16 in its high one
            halves = [[b.and_(c, nib) for c in cols], [b.and_(b.lshr(c, lanes(4)), nib) for c in cols]]
            return [(halves[h][j], p, 16 * h + 4 * j + p) for h in (0, 1) for j in range(4) for p in range(4)]

        pf = _fn(b, "llvm.prefetch.p0", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
        after = b.add(i0, const(per_call))  # the next call's rows (prange gives a thread consecutive ones)

        def prefetch_next_rows(blk):
            """While block blk of these rows is computed, a 1/nb share of the next rows' qs, d and m: their
            rows are contiguous, and so many interleaved streams defeat the hardware prefetcher (cold
            weights took 2x as long). Past the array's end is harmless: a prefetch never faults."""
            for a, nbytes in ((qarg, row_bytes), (qarg + 1, 2), (qarg + 2, 2))[: 2 + has_min]:
                base = b.bitcast(_row_ptr(context, b, aty[a], args[a], after)[0], _i8.as_pointer())
                share = per_call * nbytes  # bytes of the next rows per block
                for line in range(0, share, 64):
                    p = b.gep(base, [b.add(b.mul(blk, const(share)), const(line))])
                    b.call(pf, [p, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])

        for first in range(0, per_call, LANES * nvec):  # nvec row vectors a pass
            vecs = []  # per row vector: its rows' pointers into qs, d, m
            for v in range(first, first + LANES * nvec, LANES):
                rows = [b.add(i0, const(v + r)) for r in range(LANES)]
                vecs.append(
                    [
                        [_row_ptr(context, b, aty[a], args[a], r)[0] for r in rows]
                        for a in range(qarg, qarg + 2 + has_min)
                    ]
                )
            accs = [
                [cgutils.alloca_once_value(b, ir.Constant(vty, [0.0] * LANES)) for _ in range(nt)]
                for _ in vecs
            ]
            with cgutils.for_range(b, nb) as loop:
                blk = loop.index
                if first == 0:
                    prefetch_next_rows(blk)
                sc = [[_gather_halves(b, ptrs[1], blk), _gather_halves(b, ptrs[2], blk) if has_min else None]
                      for ptrs in vecs]  # fmt: skip
                for g in range(row_bytes // 16):
                    off = b.add(b.mul(blk, const(row_bytes)), const(16 * g))
                    order = [columns(ptrs[0], off, g) for ptrs in vecs]
                    for step in range(len(order[0])):
                        xk = b.add(b.mul(blk, const(QK)), const(order[0][step][2]))  # this step's k
                        if panel:
                            prow = b.gep(pbase, [b.mul(xk, const(PANEL))])
                        else:
                            xs = [_splat(b, b.load(b.gep(xr, [xk])), LANES) for xr in xrows]
                        for v in range(len(vecs)):
                            col, p, _ = order[v][step]
                            w = weights(element(col, p), *sc[v])
                            if panel:
                                dst = b.gep(prow, [const(first + LANES * v)])
                                b.store(w, b.bitcast(dst, vty.as_pointer()), align=4)
                            for t in range(nt):
                                b.store(b.call(fma, [w, xs[t], b.load(accs[v][t])]), accs[v][t])
            for v in range(len(vecs)):
                for t in range(nt):
                    orow, _ = _row_ptr(context, b, aty[0], args[0], toks[t])
                    dst = b.gep(orow, [b.add(i0, const(first + LANES * v))])
                    b.store(b.load(accs[v][t]), b.bitcast(dst, vty.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


def _dequant_panel_typer(fmt):
    """`_dequant_panel_<fmt>(panel, qs, d, [m,] i0)`: panel[k, r] = w[i0 + r, k] for r < PANEL, every k:
    the panels' dequantization and transposition in one, with the rows-in-lanes kernel's weight vectors
    (the same bits). panel: [K, PANEL] float32."""
    wdtype, _, has_min = _FEW_FORMATS[fmt]

    def check(panel, qs, d, m):
        _check_types(
            f"_dequant_panel_{fmt}",
            [(panel, types.float32), (qs, wdtype)] + [(a, types.uint16) for a in (d, *m)],
        )
        return types.void(panel, qs, d, *m, types.intp), _few_rows_codegen(fmt, 0)

    if has_min:

        def typer(typingctx, panel, qs, d, m, i0):
            return check(panel, qs, d, [m])

    else:

        def typer(typingctx, panel, qs, d, i0):
            return check(panel, qs, d, [])

    return typer


_few_rows_q8_0 = intrinsic(_few_rows_typer("q8_0"))
_few_rows_q4_1 = intrinsic(_few_rows_typer("q4_1"))
_few_rows_q8_m = intrinsic(_few_rows_typer("q8_m"))
_dequant_panel_q8_0 = intrinsic(_dequant_panel_typer("q8_0"))
_dequant_panel_q4_1 = intrinsic(_dequant_panel_typer("q4_1"))
_dequant_panel_q8_m = intrinsic(_dequant_panel_typer("q8_m"))


def _transpose_8x8_i16(builder, rows):
    """8 vectors <8n x i16> (rows; n 128-bit lanes, each its own 8 x 8 matrix) as their 8 columns: three
    rounds of interleaving within 128-bit lanes (16-, 32-, then 64-bit units: vpunpck*wd, *dq, *qdq)."""
    b = builder
    count = rows[0].type.count

    def interleave(a, c, unit, high):
        per_lane = 128 // unit  # units in a 128-bit lane
        n = count * 16 // unit
        a, c = (b.bitcast(v, _V(ir.IntType(unit), n)) for v in (a, c))
        mask = []
        for lane in range(0, n, per_lane):
            first = lane + (per_lane // 2 if high else 0)
            mask += [i for k in range(first, first + per_lane // 2) for i in (k, n + k)]
        return b.bitcast(b.shuffle_vector(a, c, ir.Constant(_V(_i32, n), mask)), _V(_i16, count))

    # after round 1, vector (pair p, half h) holds elements 4h..4h+3 of rows 2p, 2p+1 as 32-bit pairs
    r1 = {(p, h): interleave(rows[2 * p], rows[2 * p + 1], 16, h) for p in range(4) for h in (0, 1)}
    # round 2: elements 4h+2g, 4h+2g+1 of rows 4q..4q+3
    r2 = {(q, h, g): interleave(r1[(2 * q, h)], r1[(2 * q + 1, h)], 32, g) for q in (0, 1) for h in (0, 1)
          for g in (0, 1)}  # fmt: skip
    # round 3: element 4h + 2g + e of all 8 rows
    return [interleave(r2[(0, h, g)], r2[(1, h, g)], 64, e) for h in (0, 1) for g in (0, 1) for e in (0, 1)]


def _halves_to_f32(builder, h):
    """A vector of fp16 bits (<n x i16>) as <n x float>."""
    return builder.fpext(builder.bitcast(h, _V(ir.HalfType(), h.type.count)), _V(_f32, h.type.count))


def _gather_halves(builder, ptrs, idx):
    """Element idx of each fp16 (uint16) row at ptrs, as <len(ptrs) x float>: one row in each lane (the
    scales of a block of rows, stored row by row)."""
    h = ir.Constant(_V(_i16, len(ptrs)), None)
    for r, p in enumerate(ptrs):
        h = builder.insert_element(h, builder.load(builder.gep(p, [idx])), ir.Constant(_i32, r))
    return _halves_to_f32(builder, h)


XQ_ROWS = 8  # weight rows a call of the rows-in-lanes decode kernel: one int32 lane each of a 256-bit vector


def _transpose_8x8_i32(builder, rows):
    """8 vectors <8 x i32> (rows) as their 8 columns: interleave dwords, then quadwords (within 128-bit
    lanes), then swap 128-bit halves (vpunpck*dq, vpunpck*qdq, vperm2i128)."""
    b = builder

    def shuffle(a, c, mask):
        return b.shuffle_vector(a, c, ir.Constant(_V(_i32, 8), mask))

    def interleave(a, c, unit, high):  # within each 128-bit lane, the low (or high) units of a and c
        n = 4 // unit  # units per 128-bit lane
        mask = []
        for lane in (0, 4):
            for k in range(n // 2):
                src = lane + (n // 2 if high else 0) * unit + k * unit
                mask += list(range(src, src + unit)) + list(range(8 + src, 8 + src + unit))
        return shuffle(a, c, mask)

    # round 1: (rows 2p, 2p+1) elements {0,1 | 4,5} and {2,3 | 6,7} interleaved
    r1 = [interleave(rows[2 * p], rows[2 * p + 1], 1, h) for p in range(4) for h in (0, 1)]
    # round 2: rows 4q..4q+3, element e and e + 4 (one per 128-bit lane)
    r2 = {}
    for q in (0, 1):
        for h in (0, 1):
            a, c = r1[2 * (2 * q) + h], r1[2 * (2 * q + 1) + h]
            r2[(q, 2 * h)], r2[(q, 2 * h + 1)] = interleave(a, c, 2, False), interleave(a, c, 2, True)
    # round 3: element e of rows 0-3 and of rows 4-7 (low halves), element e + 4 (high halves)
    cols = [None] * 8
    for e in range(4):
        cols[e] = shuffle(r2[(0, e)], r2[(1, e)], [0, 1, 2, 3, 8, 9, 10, 11])
        cols[e + 4] = shuffle(r2[(0, e)], r2[(1, e)], [4, 5, 6, 7, 12, 13, 14, 15])
    return cols


def _rows_xq_codegen(fmt):
    """Codegen of `_rows_<fmt>_xq` (q4_1 or q8_m): see its docstring."""
    R = XQ_ROWS
    fty, ity, bty = _V(_f32, R), _V(_i32, R), _V(_i8, 4 * R)
    row_bytes = QK // 2 if fmt == "q4_1" else QK  # weight bytes per row and block

    def codegen(context, builder, sig, args):
        b = builder
        aty = sig.args
        i0 = args[7]

        def const(v):
            return ir.Constant(i0.type, v)

        T = cgutils.unpack_tuple(b, context.make_array(aty[1])(context, b, args[1]).shape, 2)[0]
        nb = cgutils.unpack_tuple(b, context.make_array(aty[5])(context, b, args[5]).shape, 2)[1]
        rows = [b.add(i0, const(r)) for r in range(R)]
        qp, dp, mp = ([_row_ptr(context, b, aty[a], args[a], r)[0] for r in rows] for a in (4, 5, 6))
        maddubs = _fn(b, "llvm.x86.avx2.pmadd.ub.sw", _V(_i16, 16), [bty, bty])
        maddwd = _fn(b, "llvm.x86.avx2.pmadd.wd", ity, [_V(_i16, 16), _V(_i16, 16)])
        phaddw = _fn(b, "llvm.x86.avx2.phadd.w", _V(_i16, 16), [_V(_i16, 16), _V(_i16, 16)])
        phaddd = _fn(b, "llvm.x86.avx2.phadd.d", ity, [ity, ity])
        fma = _fn(b, f"llvm.fma.v{R}f32", fty, [fty] * 3)
        ones = ir.Constant(_V(_i16, 16), [1] * 16)
        nib = ir.Constant(bty, [0x0F] * 4 * R)
        scratch = cgutils.alloca_once(b, ir.ArrayType(fty, 16))  # a block of 8's scales (0..7), mins (8..15)
        pf = _fn(b, "llvm.prefetch.p0", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
        after = b.add(i0, const(R))  # the next call's rows (prange gives a thread consecutive ones)

        def row(a, t):
            return _row_ptr(context, b, aty[a], args[a], t)[0]

        def out_ptr(t):
            return b.bitcast(b.gep(row(0, t), [i0]), fty.as_pointer())

        def contribution(dots, scale, dxs, mins, sxs):
            """A block's share of out: sum * (d * dx) + m * sx, elementwise, so that rows in the lanes (several
            tokens) and blocks in the lanes (one token) give the same bits."""
            return b.call(fma, [b.sitofp(dots, fty), _strict(b.fmul(scale, dxs)), _strict(b.fmul(mins, sxs))])

        def accumulate(t, blk, dots, dv, mv):  # out[t, i0..] += the block's contribution, every token's ops
            dxt, sxt = (_splat(b, b.load(b.gep(row(a, t), [blk])), R) for a in (2, 3))
            dst = out_ptr(t)
            b.store(_strict(b.fadd(b.load(dst, align=4), contribution(dots, dv, dxt, mv, sxt))), dst, align=4)

        def prefetch(blk, nblocks):  # the next rows' share of nblocks blocks from blk (as _few_rows)
            for a, nbytes in ((4, row_bytes), (5, 2), (6, 2)):
                base = b.bitcast(row(a, after), _i8.as_pointer())
                for line in range(0, nblocks * R * nbytes, 64):
                    p = b.gep(base, [b.add(b.mul(blk, const(R * nbytes)), const(line))])
                    b.call(pf, [p, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])

        def scale_slot(k):
            return b.gep(scratch, [const(0), k])

        def x_words(
            t, word0
        ):  # token t's activation dwords from dword word0: f(j, vty), dword j in every lane
            x32 = b.bitcast(row(1, t), _i32.as_pointer())
            return lambda j, vty: b.bitcast(
                _splat(b, b.load(b.gep(x32, [b.add(word0, const(j))]), align=1), R), vty
            )

        def q4_1_sums(blk):
            """f(t): the block's integer sums of token t. The rows' 16 bytes as dword columns, split into
            nibbles once; per token 8 vpmaddubsw against broadcast activation dwords, added in int16."""
            cols = _dword_columns(
                b, [_load_vec(b, p, b.mul(blk, const(row_bytes)), _V(_i32, 4), 1) for p in qp]
            )
            cols = [b.bitcast(c, bty) for c in cols]
            lo = [b.and_(c, nib) for c in cols]  # elements 4j .. 4j+3 of each row
            hi = [b.and_(b.lshr(c, ir.Constant(bty, [4] * 4 * R)), nib) for c in cols]  # 16 + 4j ..
            paired = b.icmp_signed("<", b.or_(blk, const(1)), nb)  # the activations' order (paired)
            lo_off = b.select(
                paired, b.add(b.mul(b.lshr(blk, const(1)), const(2 * QK)), b.mul(b.and_(blk, const(1)), const(16))),
                b.mul(blk, const(QK)),
            )  # fmt: skip
            hi_off = b.add(lo_off, b.select(paired, const(QK), const(QK // 2)))

            def sums(t):
                xlo, xhi = x_words(t, b.lshr(lo_off, const(2))), x_words(t, b.lshr(hi_off, const(2)))
                p = None
                for j in range(4):
                    for wv, xv in ((lo[j], xlo(j, bty)), (hi[j], xhi(j, bty))):
                        prod = b.call(maddubs, [wv, xv])
                        p = prod if p is None else b.add(p, prod)
                return b.call(maddwd, [p, ones])

            return sums

        def q8_m_sums(blk):
            """f(t): the block's integer sums of token t. The rows' 32 bytes as dword columns, each widened
            into two vectors of int16 pairs once; per token 16 vpmaddwd against broadcast pairs of int16
            activations, added in int32 (<= 16 * 2 * 255 * 32767 < 2^31)."""
            off = b.mul(blk, const(row_bytes))
            zero = ir.Constant(bty, [0] * 4 * R)
            pairs = []  # (weights, activation dword): elements 2c, 2c + 1 of each row, zero-extended to int16
            for h in (0, 1):
                quads = [_load_vec(b, p, b.add(off, const(16 * h)), _V(_i32, 4), 1) for p in qp]
                for j, col in enumerate(_dword_columns(b, quads)):
                    col = b.bitcast(col, bty)
                    for e in (0, 1):
                        mask = [i for r in range(R) for i in (4 * r + 2 * e, 4 * R, 4 * r + 2 * e + 1, 4 * R)]
                        widened = b.shuffle_vector(col, zero, ir.Constant(_V(_i32, 4 * R), mask))
                        pairs.append((b.bitcast(widened, _V(_i16, 2 * R)), 8 * h + 2 * j + e))

            def sums(t):
                xw = x_words(t, b.mul(blk, const(QK // 2)))
                p = None
                for wv, j in pairs:
                    prod = b.call(maddwd, [wv, xw(j, _V(_i16, 2 * R))])
                    p = prod if p is None else b.add(p, prod)
                return p

            return sums

        def transposed_block(blk, u):
            """Block blk for every token, the weights transposed; its scales in scratch slots u, 8 + u."""
            sums = (q4_1_sums if fmt == "q4_1" else q8_m_sums)(blk)
            dv, mv = b.load(scale_slot(u)), b.load(scale_slot(b.add(u, const(8))))
            with cgutils.for_range(b, T) as tl:
                accumulate(tl.index, blk, sums(tl.index), dv, mv)

        def q4_1_row_sums(rp, base, xrow):
            """<8 x i32>: one Q4_1 row's block sums for blocks base .. base+7 (one token): per pair of blocks, the
            packed bytes' low and high nibbles against the paired activations (vpmaddubsw); vphaddw twice adds
            neighbours within 128-bit halves, leaving each block's 32 products in two int16 lanes (<= 4 * 7620
            < 2^15), vpmaddwd adds those."""
            sums = []
            for p in range(4):
                blk = b.add(base, const(2 * p))
                packed = _load_vec(b, rp, b.mul(blk, const(QK // 2)), bty, 1)
                lo, hi = b.and_(packed, nib), b.and_(b.lshr(packed, ir.Constant(bty, [4] * 4 * R)), nib)
                xa = _load_vec(b, xrow, b.mul(blk, const(QK)), bty, 1)
                xb = _load_vec(b, xrow, b.add(b.mul(blk, const(QK)), const(QK)), bty, 1)
                sums.append(b.add(b.call(maddubs, [lo, xa]), b.call(maddubs, [hi, xb])))
            h = b.call(phaddw, [b.call(phaddw, sums[:2]), b.call(phaddw, sums[2:])])
            order = ir.Constant(
                _V(_i32, 8), [0, 4, 1, 5, 2, 6, 3, 7]
            )  # vphaddw leaves blocks 0 2 4 6 1 3 5 7
            return b.shuffle_vector(b.call(maddwd, [h, ones]), ir.Constant(ity, None), order)

        def q8_m_row_sums(rp, base, xrow):
            """<8 x i32>: one Q8_M row's block sums for blocks base .. base+7 (one token): per block the 32
            weights widened to int16 against the activations (vpmaddwd); the 8 blocks' 8 partial sums added
            across by vphaddd within 128-bit halves, then the halves added."""
            parts = []
            for u in range(8):
                off = b.mul(b.add(base, const(u)), const(QK))
                w = _load_vec(b, rp, off, bty, 1)
                halves = [b.zext(b.shuffle_vector(w, w, ir.Constant(_V(_i32, 16), list(range(h, h + 16)))),
                                 _V(_i16, 16)) for h in (0, 16)]  # fmt: skip
                xs = [_load_vec(b, xrow, b.add(off, const(h)), _V(_i16, 16), 2) for h in (0, 16)]
                parts.append(b.add(b.call(maddwd, [halves[0], xs[0]]), b.call(maddwd, [halves[1], xs[1]])))
            quads = [b.call(phaddd, [parts[2 * i], parts[2 * i + 1]]) for i in range(4)]
            a, c = b.call(phaddd, quads[:2]), b.call(phaddd, quads[2:])  # blocks 0-3 | 0-3, 4-7 | 4-7
            lo = b.shuffle_vector(a, c, ir.Constant(_V(_i32, 8), [0, 1, 2, 3, 8, 9, 10, 11]))
            hi = b.shuffle_vector(a, c, ir.Constant(_V(_i32, 8), [4, 5, 6, 7, 12, 13, 14, 15]))
            return b.add(lo, hi)

        row_sums = q4_1_row_sums if fmt == "q4_1" else q8_m_row_sums

        with cgutils.for_range(b, T) as loop:  # out is the accumulator
            b.store(ir.Constant(fty, [0.0] * R), out_ptr(loop.index), align=4)
        groups = b.udiv(nb, const(8))
        one = b.icmp_signed("==", T, const(1))
        with cgutils.for_range(b, groups) as loop:
            base = b.mul(loop.index, const(8))
            prefetch(base, 8)
            with b.if_else(one) as (one_token, tokens):
                with one_token:  # each row's 8 blocks' contributions, blocks in the lanes, then transposed
                    dxs, sxs = (_load_vec(b, row(a, const(0)), base, fty, 4) for a in (2, 3))
                    contributions = [
                        contribution(row_sums(rp, base, row(1, const(0))), _halfn_to_f32(b, pd, base, R), dxs,
                                     _halfn_to_f32(b, pm, base, R), sxs)
                        for rp, pd, pm in zip(qp, dp, mp, strict=True)
                    ]  # fmt: skip
                    cols = _transpose_8x8_i32(b, [b.bitcast(c, ity) for c in contributions])
                    dst = out_ptr(const(0))
                    acc = b.load(dst, align=4)
                    for col in cols:  # block after block, as the other way
                        acc = _strict(b.fadd(acc, b.bitcast(col, fty)))
                    b.store(acc, dst, align=4)
                with tokens:
                    # each row's 8 scales and 8 mins in one vector (two 128-bit lanes): both transposed at once
                    both = [
                        b.shuffle_vector(_load_vec(b, pd, base, _V(_i16, 8), 2), _load_vec(b, pm, base, _V(_i16, 8), 2),
                                         ir.Constant(_V(_i32, 16), list(range(16))))
                        for pd, pm in zip(dp, mp, strict=True)
                    ]  # fmt: skip
                    for k, col in enumerate(_transpose_8x8_i16(b, both)):
                        for h in (0, 1):
                            half = b.shuffle_vector(
                                col, col, ir.Constant(_V(_i32, 8), list(range(8 * h, 8 * h + 8)))
                            )
                            b.store(_halves_to_f32(b, half), scale_slot(const(8 * h + k)))
                    with cgutils.for_range(b, const(8)) as inner:
                        transposed_block(b.add(base, inner.index), inner.index)
        with cgutils.for_range_slice(b, b.mul(groups, const(8)), nb, const(1)) as (blk, _):
            prefetch(blk, 1)
            u = b.and_(blk, const(7))
            for h, ptrs in enumerate((dp, mp)):
                b.store(_gather_halves(b, ptrs, blk), scale_slot(b.add(const(8 * h), u)))
            transposed_block(blk, u)
        return context.get_dummy_value()

    return codegen


def _rows_xq_typer(fmt, xq_dtype):
    def typer(typingctx, out, xq, dx, sx, qs, d, m, i0):
        pairs = [(out, types.float32), (xq, xq_dtype), (dx, types.float32), (sx, types.float32),
                 (qs, types.uint8), (d, types.uint16), (m, types.uint16)]  # fmt: skip
        _check_types(f"_rows_{fmt}_xq", pairs)
        return types.void(out, xq, dx, sx, qs, d, m, types.intp), _rows_xq_codegen(fmt)

    typer.__doc__ = _ROWS_XQ_DOC.format(fmt=fmt)
    return typer


_ROWS_XQ_DOC = """`_rows_{fmt}_xq(out, xq, dx, sx, qs, d, m, i0)` (AVX2):
    out[t, i0 + l] = sum_b d[i0+l, b] * dx[t, b] * sum_j q[i0+l, 32b+j] * xq[t, 32b+j] + m[i0+l, b] * sx[t, b]
    for l < XQ_ROWS and every token t. Q4_1: int8 xq in the pair-interleaved order of
    quantize_activations_paired; Q8_M: int16 xq in natural order.
    out[t, i0..] += each block's contribution sum * (d * dx) + m * sx, block after block; every contribution
    elementwise, so that the two ways below give the same bits, and every token's operations are the same
    whatever the others (results do not depend on the batch). The block sums are exact integers:
    - several tokens: the rows in the vector lanes. A block's bytes of the 8 rows are transposed into dword
      columns (as in `_few_rows_*`) and unpacked once for all the tokens (Q4_1: nibbles, 8 vpmaddubsw per
      token against broadcast activation dwords, int16 sums <= 8 * 2 * 15 * 127 < 2^15; Q8_M: int16 pairs,
      16 vpmaddwd per token); the scales and mins transposed 8 blocks at a time;
    - one token (transposing the weights for a single token cost ~30% more): 8 blocks of each row as in a
      row dot, the blocks in the lanes, their contributions computed there with contiguous scales, then
      the 8 rows' contributions transposed.
    Blocks past the last whole 8 go the first way."""
_rows_q4_1_xq = intrinsic(_rows_xq_typer("q4_1", types.int8))
_rows_q8_m_xq = intrinsic(_rows_xq_typer("q8_m", types.int16))


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def _matmul_q4_1_xq_rows(out, x, qs, d, m):
    """`matmul_q4_1_xq` on AVX2: XQ_ROWS rows a call of the rows-in-lanes kernel, every token."""
    N, nb = d.shape
    _check(out, x, N, nb)
    T, K = x.shape
    xq = np.empty((T, K), np.int8)
    dx = np.empty((T, nb), np.float32)
    sx = np.empty((T, nb), np.float32)
    if N < XQ_ROWS:  # fewer rows than a call takes: the portable dots
        quantize_activations(xq, dx, sx, x)
        for i in range(N):
            for t in range(T):
                out[t, i] = _dot_q4_portable(qs, d, m, i, xq, dx, sx, t)
        return
    quantize_activations_paired(xq, dx, sx, x)
    for g in prange(N // XQ_ROWS):
        _rows_q4_1_xq(out, xq, dx, sx, qs, d, m, XQ_ROWS * g)
    if N % XQ_ROWS:  # the last rows again, overlapping the last call's: the same values
        _rows_q4_1_xq(out, xq, dx, sx, qs, d, m, N - XQ_ROWS)


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def matmul_q8_0_xf(out, x, qs, d, tiled):
    """out = x @ dequant(qs, d).T with float32 activations (tiled: through the micro-kernel's panels).   out: [T, N]; x: [T, K]; qs: int8 [N, K]; d: uint16 [N, K/32]"""
    N, nb = d.shape
    _check(out, x, N, nb)
    T, K = x.shape
    if HAVE_AVX2 and N % (4 * LANES) == 0 and (T <= FEW_TOKENS or not tiled):  # rows in lanes, no panels
        for c in prange(N // (4 * LANES)):
            for t0 in range(0, T, 4):
                _few_rows_q8_0(out, x, qs, d, 4 * LANES * c, t0)
        return
    if tiled and HAVE_AVX2 and N % PANEL == 0:
        for c in prange(N // PANEL):
            panel = np.empty((K, PANEL), np.float32)
            _dequant_panel_q8_0(panel, qs, d, PANEL * c)
            for t0 in range(0, T, PANEL_TOKENS):
                _panel_times_x_avx2(out, x, panel, PANEL * c, t0)
        return
    for c in prange((N + CHUNK - 1) // CHUNK):
        buf = np.empty((ROWS, K), np.float32)
        for i0 in range(c * CHUNK, min(N, c * CHUNK + CHUNK), ROWS):
            nr = min(ROWS, N - i0)
            for r in range(nr):
                for b in range(nb):
                    _dequant_q8_block(buf, r, qs, i0 + r, b, _h2f(d[i0 + r, b]))
            _rows_times_x(out, x, buf, i0, nr)


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def matmul_q4_1_xf(out, x, qs, d, m, tiled):
    """out = x @ dequant(qs, d, m).T with float32 activations (tiled: through the micro-kernel's panels).   qs: uint8 [N, K/2]; d, m: uint16 [N, K/32]"""
    N, nb = d.shape
    _check(out, x, N, nb)
    T, K = x.shape
    if HAVE_AVX2 and N % (4 * LANES) == 0 and (T <= FEW_TOKENS or not tiled):  # rows in lanes, no panels
        for c in prange(N // (4 * LANES)):
            for t0 in range(0, T, 4):
                _few_rows_q4_1(out, x, qs, d, m, 4 * LANES * c, t0)
        return
    if tiled and HAVE_AVX2 and N % PANEL == 0:
        for c in prange(N // PANEL):
            panel = np.empty((K, PANEL), np.float32)
            _dequant_panel_q4_1(panel, qs, d, m, PANEL * c)
            for t0 in range(0, T, PANEL_TOKENS):
                _panel_times_x_avx2(out, x, panel, PANEL * c, t0)
        return
    for c in prange((N + CHUNK - 1) // CHUNK):
        buf = np.empty((ROWS, K), np.float32)
        for i0 in range(c * CHUNK, min(N, c * CHUNK + CHUNK), ROWS):
            nr = min(ROWS, N - i0)
            for r in range(nr):
                for b in range(nb):
                    _dequant_q4_block(buf, r, qs, i0 + r, b, _h2f(d[i0 + r, b]), _h2f(m[i0 + r, b]))
            _rows_times_x(out, x, buf, i0, nr)


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def matmul_q8_m_xf(out, x, qs, d, m, tiled):
    """out = x @ dequant(qs, d, m).T with float32 activations (tiled: through the micro-kernel's panels).   qs: uint8 [N, K]; d, m: uint16 [N, K/32]"""
    N, nb = d.shape
    _check(out, x, N, nb)
    T, K = x.shape
    if HAVE_AVX2 and N % (4 * LANES) == 0 and (T <= FEW_TOKENS or not tiled):  # rows in lanes, no panels
        for c in prange(N // (4 * LANES)):
            for t0 in range(0, T, 4):
                _few_rows_q8_m(out, x, qs, d, m, 4 * LANES * c, t0)
        return
    if tiled and HAVE_AVX2 and N % PANEL == 0:
        for c in prange(N // PANEL):
            panel = np.empty((K, PANEL), np.float32)
            _dequant_panel_q8_m(panel, qs, d, m, PANEL * c)
            for t0 in range(0, T, PANEL_TOKENS):
                _panel_times_x_avx2(out, x, panel, PANEL * c, t0)
        return
    for c in prange((N + CHUNK - 1) // CHUNK):
        buf = np.empty((ROWS, K), np.float32)
        for i0 in range(c * CHUNK, min(N, c * CHUNK + CHUNK), ROWS):
            nr = min(ROWS, N - i0)
            for r in range(nr):
                for b in range(nb):
                    _dequant_q8m_block(buf, r, qs, i0 + r, b, _h2f(d[i0 + r, b]), _h2f(m[i0 + r, b]))
            _rows_times_x(out, x, buf, i0, nr)


# ---------------------------------------------------------------------------------------------------------
# Integer-activation path (decode). Each row is read once for all T tokens (it stays in L1 between tokens).


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def matmul_q8_0_xq(out, x, qs, d):
    """out ~= x @ dequant(qs, d).T with int8-quantized activations (AVX2 when available)."""
    N, nb = d.shape
    _check(out, x, N, nb)
    T, K = x.shape
    xq = np.empty((T, K), np.int8)
    dx = np.empty((T, nb), np.float32)
    sx = np.empty((T, nb), np.float32)
    quantize_activations(xq, dx, sx, x)
    if T < NTOK:  # a loop of its own: next to the 4-token dot, the 1-token one compiles ~15% slower (Q4_1)
        for i in prange(N):
            for t in range(T):
                out[t, i] = _dot_q8(qs, d, i, xq, dx, t)
    else:
        T4 = T - T % NTOK
        for i in prange(N):
            for t in range(0, T4, NTOK):  # NTOK tokens per pass over the row, each as in the 1-token dot
                out[t, i], out[t + 1, i], out[t + 2, i], out[t + 3, i] = _dot_q8_x4(qs, d, i, xq, dx, t)
            for t in range(T4, T):
                out[t, i] = _dot_q8(qs, d, i, xq, dx, t)


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def matmul_q8_0_xq_portable(out, x, qs, d):
    """`matmul_q8_0_xq` without the AVX2 intrinsic (what non-AVX2 hosts run)."""
    N, nb = d.shape
    _check(out, x, N, nb)
    T, K = x.shape
    xq = np.empty((T, K), np.int8)
    dx = np.empty((T, nb), np.float32)
    sx = np.empty((T, nb), np.float32)
    quantize_activations(xq, dx, sx, x)
    for i in prange(N):
        for t in range(T):
            out[t, i] = _dot_q8_portable(qs, d, i, xq, dx, t)


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def matmul_q4_1_xq_portable(out, x, qs, d, m):
    """`matmul_q4_1_xq` without the AVX2 intrinsic (what non-AVX2 hosts run)."""
    N, nb = d.shape
    _check(out, x, N, nb)
    T, K = x.shape
    xq = np.empty((T, K), np.int8)
    dx = np.empty((T, nb), np.float32)
    sx = np.empty((T, nb), np.float32)
    quantize_activations(xq, dx, sx, x)
    for i in prange(N):
        for t in range(T):
            out[t, i] = _dot_q4_portable(qs, d, m, i, xq, dx, sx, t)


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def _matmul_q8_m_xq_rows(out, x, qs, d, m):
    """`matmul_q8_m_xq` on AVX2: XQ_ROWS rows a call of the rows-in-lanes kernel, every token."""
    N, nb = d.shape
    _check(out, x, N, nb)
    T, K = x.shape
    xq = np.empty((T, K), np.int16)
    dx = np.empty((T, nb), np.float32)
    sx = np.empty((T, nb), np.float32)
    quantize_activations_i16(xq, dx, sx, x)
    if N < XQ_ROWS:  # fewer rows than a call takes: the portable dots
        for i in range(N):
            for t in range(T):
                out[t, i] = _dot_q8m_portable(qs, d, m, i, xq, dx, sx, t)
        return
    for g in prange(N // XQ_ROWS):
        _rows_q8_m_xq(out, xq, dx, sx, qs, d, m, XQ_ROWS * g)
    if N % XQ_ROWS:  # the last rows again, overlapping the last call's: the same values
        _rows_q8_m_xq(out, xq, dx, sx, qs, d, m, N - XQ_ROWS)


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def matmul_q8_m_xq_portable(out, x, qs, d, m):
    """`matmul_q8_m_xq` without the AVX2 intrinsic (what non-AVX2 hosts run)."""
    N, nb = d.shape
    _check(out, x, N, nb)
    T, K = x.shape
    xq = np.empty((T, K), np.int16)
    dx = np.empty((T, nb), np.float32)
    sx = np.empty((T, nb), np.float32)
    quantize_activations_i16(xq, dx, sx, x)
    for i in prange(N):
        for t in range(T):
            out[t, i] = _dot_q8m_portable(qs, d, m, i, xq, dx, sx, t)


# out ~= x @ dequant(qs, d, m).T with int8-quantized activations (Q4_1 weights: the q4 format's layers).
matmul_q4_1_xq = _matmul_q4_1_xq_rows if HAVE_AVX2 else matmul_q4_1_xq_portable
# ... and with Q8_M weights (the int8 format, every LM head), int16-quantized activations.
matmul_q8_m_xq = _matmul_q8_m_xq_rows if HAVE_AVX2 else matmul_q8_m_xq_portable
