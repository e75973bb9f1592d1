"""Q8_0 / Q4_1 weights: the quantizers byte for byte against gguf-py (llama.cpp's reference quantizers); Q8_M
(nextword's 8-bit format with a block minimum): its quantizer against its error bounds; and every kernel
against a float64 NumPy product with the same dequantized weights."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

from nextword.kernels import quant as kq
from nextword.weights.quantize import (
    Q4Weight,
    Q8MWeight,
    Q8Weight,
    dequantize,
    from_gguf_blocks,
    quantize_q4_1,
    quantize_q8_0,
    quantize_q8_m,
    to_gguf_blocks,
)

QUANTIZERS = {
    "Q8_0": (quantize_q8_0, GT.Q8_0),
    "Q4_1": (quantize_q4_1, GT.Q4_1),
    "Q8_M": (quantize_q8_m, None),
}
KINDS = ["Q8_0", "Q4_1", "Q8_M"]


def weight(rng, n, k, special=True):
    """[n, k] float32 with per-row scales and, if special, blocks that hit the edge cases of the quantizers."""
    w = rng.standard_normal((n, k)) * np.exp(rng.uniform(-4, 1, size=(n, 1)))
    if special and k >= 32:
        kinds = [
            np.zeros(32),  # d = 0 (Q8_0 and Q4_1)
            np.full(32, -0.75),  # constant block: Q4_1 d = 0, m = x
            np.arange(32) - 15.5,  # Q8_0 ties: x / d lands on .5 (roundf rounds away from zero)
            np.r_[127.0, np.arange(31) + 0.5],  # d = 1 exactly, every x a tie
            rng.standard_normal(32) * 1e-6,  # fp16 subnormal scales
            rng.uniform(-6e4, 6e4, 32),  # scales near the top of the fp16 range
            np.abs(rng.standard_normal(32)) + 2.0,  # all positive: Q4_1 m > 0
        ]
        for i in range(min(n, len(kinds))):
            w[i, (i % (k // 32)) * 32 : (i % (k // 32)) * 32 + 32] = kinds[i]
    return w.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Quantizers


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
@pytest.mark.parametrize("n", [1, 3, 65])
@pytest.mark.parametrize("k", [32, 96, 576])
def test_quantizer_bit_exact_with_gguf(kind, n, k):
    quantize, gtype = QUANTIZERS[kind]
    w = weight(np.random.default_rng(n * 1000 + k), n, k)
    ours = quantize(w)
    expect = gguf.quants.quantize(w, gtype)  # uint8 [n, k/32 * block bytes]
    np.testing.assert_array_equal(to_gguf_blocks(ours), expect)
    np.testing.assert_array_equal(dequantize(ours), gguf.quants.dequantize(expect, gtype))
    assert ours.shape == (n, k)
    assert dequantize(ours).dtype == np.float32


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
def test_from_gguf_blocks_round_trip(kind):
    quantize, gtype = QUANTIZERS[kind]
    w = weight(np.random.default_rng(7), 9, 160)
    raw = gguf.quants.quantize(w, gtype)
    for k in (kind, gtype):  # a name or the gguf enum
        got = from_gguf_blocks(raw, k)
        expect = quantize(w)
        assert type(got) is type(expect)
        for name in ("qs", "d", "m"):
            if hasattr(expect, name):
                a, b = getattr(got, name), getattr(expect, name)
                assert a.dtype == b.dtype and a.flags.c_contiguous
                np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(to_gguf_blocks(got), raw)


def test_from_gguf_blocks_keeps_nan_and_inf_bits():
    """No float round trip: arbitrary fp16 bit patterns (NaN payloads, inf, -0) come through unchanged."""
    raw = np.random.default_rng(3).integers(0, 256, size=(4, 3 * 20), dtype=np.uint8)
    raw[0, 0:2] = [0x01, 0x7E]  # a NaN with payload
    raw[1, 2:4] = [0x00, 0xFC]  # -inf as m
    w = from_gguf_blocks(raw, "Q4_1")
    assert w.d[0, 0] == 0x7E01 and w.m[1, 0] == 0xFC00
    np.testing.assert_array_equal(to_gguf_blocks(w), raw)


def test_sizes_and_validation():
    w8, w4 = quantize_q8_0(np.ones((3, 64), np.float32)), quantize_q4_1(np.ones((3, 64), np.float32))
    assert w8.shape == w4.shape == (3, 64)
    assert w8.nbytes == 3 * 64 + 3 * 2 * 2  # 1.0625 bytes per weight
    assert w4.nbytes == 3 * 32 + 2 * 3 * 2 * 2  # 0.625
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_q8_0(np.ones((2, 48), np.float32))
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_q4_1(np.ones((2, 33), np.float32))
    with pytest.raises(ValueError, match="unsupported block format"):
        from_gguf_blocks(np.zeros((1, 34), np.uint8), "Q4_0")
    with pytest.raises(ValueError, match="not a multiple"):
        from_gguf_blocks(np.zeros((1, 35), np.uint8), "Q8_0")
    with pytest.raises(ValueError, match="do not match"):
        Q8Weight(qs=np.zeros((2, 64), np.int8), d=np.zeros((2, 3), np.uint16))
    with pytest.raises(ValueError, match="uint8"):
        Q4Weight(qs=np.zeros((2, 32), np.int8), d=np.zeros((2, 2), np.uint16), m=np.zeros((2, 2), np.uint16))


def rms(e):
    return np.sqrt((np.asarray(e, np.float64) ** 2).mean())


def fp16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


@pytest.mark.parametrize("n, k", [(1, 32), (9, 96), (65, 576)])
def test_q8_m_quantizer_bounds(n, k):
    """Every block: m = fp16(min), q in 0..255, and no worse (squared error) than the plain 255-level grid
    d = fp16((max - min) / 255), q = round((x - m) / d) computed here in float64; each value within half a
    step of its block's grid, plus m's fp16 rounding."""
    w = weight(np.random.default_rng(n * 7 + k), n, k)
    q = quantize_q8_m(w)
    assert q.shape == (n, k) and q.qs.dtype == np.uint8 and q.nbytes == n * k + 2 * n * (k // 32) * 2
    x = w.astype(np.float64).reshape(n, k // 32, 32)
    got = dequantize(q).astype(np.float64).reshape(x.shape)
    d, m = (
        q.d.view(np.float16).astype(np.float64)[..., None],
        q.m.view(np.float16).astype(np.float64)[..., None],
    )
    lo, hi = x.min(axis=2, keepdims=True), x.max(axis=2, keepdims=True)
    np.testing.assert_array_equal(m, fp16(lo))
    np.testing.assert_array_equal(got, (d * q.qs.reshape(x.shape) + m).astype(np.float32))
    step = np.asarray((hi - lo) / 255, np.float32).astype(np.float16)
    step = np.where(step.astype(np.float64) * 255 < hi - lo, np.nextafter(step, np.float16(np.inf)), step)
    step = step.astype(np.float64)  # the smallest fp16 step that spans the block in 255
    with np.errstate(divide="ignore", invalid="ignore"):
        plain_q = np.clip(np.round(np.where(step > 0, (x - m) / step, 0)), 0, 255)
    plain = ((step * plain_q + m - x) ** 2).sum(axis=2)
    err = ((got - x) ** 2).sum(axis=2)
    assert np.all(err <= plain * (1 + 1e-4) + 1e-12 * (hi - lo)[..., 0] ** 2)
    assert np.all(np.abs(got - x) <= d / 2 * 1.001 + np.abs(m - lo) + 1e-6 * np.abs(x))


@pytest.mark.parametrize("origin", ["Q4_1", "Q8_0"])
def test_q8_m_keeps_an_already_quantized_model(origin):
    """Weights that went through Q4_1 (this project's default model: a Q4_1 GGUF) come back exactly; through
    Q8_0 (its LM head) up to a constant per block: m's fp16 rounding, |m - min| <= 2^-11 |min|."""
    w = weight(np.random.default_rng(4), 40, 576, special=False)
    w = dequantize(QUANTIZERS[origin][0](w))
    got = dequantize(quantize_q8_m(w))
    if origin == "Q4_1":
        np.testing.assert_array_equal(got, w)
    else:
        lo = w.reshape(40, -1, 32).min(axis=2, keepdims=True).astype(np.float64)
        diff = (got - w).reshape(40, -1, 32).astype(np.float64)
        assert np.all(np.abs(diff - diff.mean(axis=2, keepdims=True)) <= 1e-6 * np.abs(lo))  # a constant
        assert np.all(np.abs(diff) <= 2.0**-11 * np.abs(lo) * 1.001)
        # Q8_0 itself, requantizing values it did not produce, errs ~10x more
        fresh = weight(np.random.default_rng(5), 40, 576, special=False)
        assert rms(got - w) / rms(w) * 5 < rms(dequantize(quantize_q8_0(fresh)) - fresh) / rms(fresh)


def test_q8_m_validation():
    with pytest.raises(ValueError, match="do not match"):
        Q8MWeight(
            qs=np.zeros((2, 64), np.uint8), d=np.zeros((2, 2), np.uint16), m=np.zeros((2, 1), np.uint16)
        )
    with pytest.raises(ValueError, match="uint8"):
        Q8MWeight(qs=np.zeros((2, 64), np.int8), d=np.zeros((2, 2), np.uint16), m=np.zeros((2, 2), np.uint16))
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_q8_m(np.ones((2, 48), np.float32))


# ---------------------------------------------------------------------------------------------------------
# Kernels


def kernel_args(w):
    return w.blocks


KERNELS = {  # format: (integer activations, integer activations portable, float activations)
    "Q8_0": (kq.matmul_q8_0_xq, kq.matmul_q8_0_xq_portable, kq.matmul_q8_0_xf),
    "Q4_1": (kq.matmul_q4_1_xq, kq.matmul_q4_1_xq_portable, kq.matmul_q4_1_xf),
    "Q8_M": (kq.matmul_q8_m_xq, kq.matmul_q8_m_xq_portable, kq.matmul_q8_m_xf),
}


def levels(w):
    """The decode path's activations: int8 (127 levels a side), int16 for Q8_M."""
    return 32767 if isinstance(w, Q8MWeight) else 127


def activations(rng, t, k):
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[:, :: max(1, k // 5)] *= 20  # outliers: coarse int8 steps in their blocks
    return x


def int8_error_bound(x, w):
    """Bound on |x @ W.T - (integer-activation result)|: with dx = absmax(x_block) / L (L = 127, or 32767 for
    Q8_M) the activations move by at most dx / 2, so per block |err| <= dx / 2 * sum_j |w_j| (Q4_1 and Q8_M
    too: their m term takes the quantized sum of x, so m is multiplied by the rounded activations like the
    rest of w)."""
    t, k = x.shape
    amax = np.abs(x.astype(np.float64)).reshape(t, k // 32, 32).max(axis=2)  # [T, nb]
    dq = dequantize(w).astype(np.float64)
    wsum = np.abs(dq).reshape(dq.shape[0], k // 32, 32).sum(axis=2)  # [N, nb]
    return 0.5 * (amax / levels(w)) @ wsum.T  # [T, N]


def rounded_activations(x, w):
    """x as the decode path quantizes it for w's kernel (float32 scale, round half up), in float64."""
    L = np.float32(levels(w))
    b = x.reshape(len(x), -1, 32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, L / amax, np.float32(0)).astype(np.float32)
    return (np.floor(b * inv + np.float32(0.5)) * (amax / L).astype(np.float64)).reshape(x.shape)


def check_kernels(kind, t, n, k, seed):
    rng = np.random.default_rng(seed)
    w = QUANTIZERS[kind][0](weight(rng, n, k, special=False))
    x = activations(rng, t, k)
    xq, xq_portable, xf = KERNELS[kind]
    wd = dequantize(w).astype(np.float64)
    ref = x.astype(np.float64) @ wd.T
    scale = np.abs(x.astype(np.float64)) @ np.abs(wd).T  # the size of the sum, for float tolerances
    bound = int8_error_bound(x, w) * 1.0001 + 1e-5 * scale

    outs = {}
    for name, fn, extra in (
        ("xq", xq, ()),
        ("xq_portable", xq_portable, ()),
        ("xf", xf, (True,)),  # tiled: the micro-kernel's panels where N is a multiple of PANEL (n = 64, 96)
        ("xf_rows", xf, (False,)),
    ):
        out = np.full((t, n), np.nan, np.float32)
        fn(out, x, *kernel_args(w), *extra)
        outs[name] = out
    # float activations: the exact product up to float32 rounding
    for name in ("xf", "xf_rows"):
        assert np.all(np.abs(outs[name] - ref) <= 1e-5 * scale), name
    # int8 activations: within the activation-rounding bound, and both implementations agree
    for name in ("xq", "xq_portable"):
        err = np.abs(outs[name] - ref)
        assert np.all(err <= bound), f"{name}: max excess {(err - bound).max()}"
    np.testing.assert_allclose(outs["xq"], outs["xq_portable"], rtol=0, atol=1e-5 * scale.max())
    return outs, ref, scale


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [1, 2, 5, 17])
@pytest.mark.parametrize("n", [1, 7, 64, 96])
@pytest.mark.parametrize("k", [32, 64, 576])
def test_kernels_match_reference(kind, t, n, k):
    check_kernels(kind, t, n, k, seed=t * 10000 + n * 100 + k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [96, 288, 512, 544, 1536])
def test_kernels_block_loop_tails(kind, k):
    """Blocks per row: 3 (a pair + odd block), 9 (8 + odd), 16 (loop only), 17 (8 + 8 + odd), 48."""
    check_kernels(kind, 3, 5, k, seed=k)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_path_really_quantizes_activations(kind):
    """Not exact by accident: the integer path is the product with the activations rounded as documented
    (nearer it than the exact product; for int8 also off the exact one by more than float rounding),
    while staying inside its bound (check_kernels)."""
    outs, ref, scale = check_kernels(kind, 1, 64, 576, seed=5)
    rng = np.random.default_rng(5)  # the same draws as check_kernels
    w = QUANTIZERS[kind][0](weight(rng, 64, 576, special=False))
    x = activations(rng, 1, 576)
    rounded = rounded_activations(x, w) @ dequantize(w).astype(np.float64).T
    assert rms(outs["xq"] - rounded) < 0.2 * rms(outs["xq"] - ref)
    if levels(w) == 127:
        assert np.abs(outs["xq"] - ref).max() > 1e-4 * scale.max()
    assert np.abs(outs["xf"] - ref).max() < 1e-6 * scale.max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, k", [(37, 96), (13, 544), (29, 576), (3, 32), (11, 1504)])
def test_int8_path_results_do_not_depend_on_the_batch(kind, n, k):
    """Every token's output must be bit for bit what a T=1 call gives, whatever else is in its call (the
    engine's batch independence): Q8_0 takes tokens 4 at a time plus a 1-token remainder; the AVX2 kernels
    of Q4_1 and Q8_M work one way for one token and another for several (k = 544, 576, 1504: blocks in 8s
    and after them), and N not a multiple of their 8 rows redoes the last rows."""
    rng = np.random.default_rng(n * 1000 + k)
    w = QUANTIZERS[kind][0](weight(rng, n, k))
    x = activations(rng, 13, k)
    xq, xq_portable = KERNELS[kind][:2]
    for fn in (xq, xq_portable):
        full = np.full((13, n), np.nan, np.float32)
        fn(full, x, *kernel_args(w))
        single = np.full((13, n), np.nan, np.float32)
        for t in range(13):
            fn(single[t : t + 1], x[t : t + 1], *kernel_args(w))
        np.testing.assert_array_equal(full, single)
        for t0 in range(0, 13, 5):  # and as part of other batches
            part = np.full((13 - t0, n), np.nan, np.float32)
            fn(part, np.ascontiguousarray(x[t0:]), *kernel_args(w))
            np.testing.assert_array_equal(part, single[t0:])


def test_portable_4_token_dot_matches_1_token_dot():
    """The portable 4-token Q8_0 dot (what non-AVX2 hosts run for groups of 4) against the portable 1-token
    one (Q4_1 and Q8_M have no 4-token dot: their AVX2 kernels take every token at once, their portable ones
    one token at a time)."""
    rng = np.random.default_rng(3)
    n, k, T = 5, 544, 6
    w = QUANTIZERS["Q8_0"][0](weight(rng, n, k))
    x = activations(rng, T, k)
    xq = np.empty((T, k), np.int8)
    dx, sx = np.empty((T, k // 32), np.float32), np.empty((T, k // 32), np.float32)
    kq.quantize_activations(xq, dx, sx, x)
    for i in range(n):
        for t in range(T - 3):
            got = kq._dot_q8_portable_x4(w.qs, w.d, i, xq, dx, t)
            want = [kq._dot_q8_portable(w.qs, w.d, i, xq, dx, t + j) for j in range(4)]
            np.testing.assert_array_equal(np.array(got, np.float32), np.array(want, np.float32))


def test_quantize_activations_orders():
    rng = np.random.default_rng(11)
    x = activations(rng, 2, 160)  # 5 blocks: two pairs and an odd one
    shape, nb = x.shape, x.shape[1] // 32
    xq, xq2 = np.empty(shape, np.int8), np.empty(shape, np.int8)
    dx, sx = np.empty((2, nb), np.float32), np.empty((2, nb), np.float32)
    kq.quantize_activations(xq, dx, sx, x)
    np.testing.assert_allclose(dx, np.abs(x).reshape(2, nb, 32).max(axis=2) / 127, rtol=1e-6)
    np.testing.assert_allclose(sx, (xq * np.repeat(dx, 32, axis=1)).reshape(2, nb, 32).sum(axis=2), rtol=1e-6)
    assert np.all(np.abs(xq * np.repeat(dx, 32, axis=1) - x) <= 0.5 * np.repeat(dx, 32, axis=1) * 1.0001)
    sx_natural = sx.copy()
    kq.quantize_activations_paired(xq2, dx, sx, x)
    np.testing.assert_array_equal(sx, sx_natural)
    b = xq.reshape(2, nb, 32)
    pairs = [
        np.concatenate([b[:, p, :16], b[:, p + 1, :16], b[:, p, 16:], b[:, p + 1, 16:]], axis=1)
        for p in (0, 2)
    ]
    np.testing.assert_array_equal(xq2, np.concatenate([*pairs, b[:, 4]], axis=1))


@pytest.mark.parametrize("kind", KINDS)
def test_a_prompt_tokens_sums_do_not_depend_on_how_many_tokens_share_the_call(kind):
    """The float-activation path has two AVX2 micro-kernels (a transposed panel for many tokens, the rows in
    the lanes, 1, 2 or 4 tokens a pass, for at most FEW_TOKENS and for the LM head): a prompt token's
    products must be the same bit for bit whichever runs, or a prompt's results would depend on how it was
    cut into steps. Also the portable path, which has one kernel."""
    rng = np.random.default_rng(3)
    n = 4 * kq.PANEL
    w = QUANTIZERS[kind][0](weight(rng, n, 576, special=False))
    xf = KERNELS[kind][2]
    x = activations(rng, 40, 576)
    many = np.full((40, n), np.nan, np.float32)
    xf(many, x, *kernel_args(w), True)
    for t in (1, 2, 3, 4, 5, 8, 9, kq.FEW_TOKENS, kq.FEW_TOKENS + 1):
        for tiled in (True, False):
            few = np.full((t, n), np.nan, np.float32)
            xf(few, np.ascontiguousarray(x[5 : 5 + t]), *kernel_args(w), tiled)
            np.testing.assert_array_equal(few, many[5 : 5 + t], err_msg=f"{t} tokens, tiled={tiled}")


def test_shape_errors():
    w = quantize_q8_0(np.ones((4, 64), np.float32))
    with pytest.raises(ValueError, match="32 \\* number of blocks"):
        kq.matmul_q8_0_xq(np.empty((1, 4), np.float32), np.ones((1, 32), np.float32), w.qs, w.d)
    with pytest.raises(ValueError, match="out must be"):
        kq.matmul_q8_0_xf(np.empty((2, 3), np.float32), np.ones((2, 64), np.float32), w.qs, w.d, True)


def test_one_compilation_per_kernel():
    """No float64 or layout leak: after running every kernel (here and above), each has one signature."""
    check_kernels("Q8_0", 2, 8, 64, seed=1)
    check_kernels("Q4_1", 1, 8, 64, seed=1)
    check_kernels("Q8_M", 1, 8, 64, seed=1)
    x = activations(np.random.default_rng(1), 2, 64)  # the activation quantizers, called as the kernels do
    dx, sx = np.empty((2, 2), np.float32), np.empty((2, 2), np.float32)
    quantizers = [(kq.quantize_activations, np.int8), (kq.quantize_activations_paired, np.int8),
                  (kq.quantize_activations_i16, np.int16)]  # fmt: skip
    for quantize, dtype in quantizers:
        quantize(np.empty((2, 64), dtype), dx, sx, x)
    kernels = [*KERNELS["Q8_0"], *KERNELS["Q4_1"], *KERNELS["Q8_M"], *(q for q, _ in quantizers)]
    assert {k.py_func.__name__: len(k.signatures) for k in kernels} == {
        k.py_func.__name__: 1 for k in kernels
    }


def test_portable_fp16_conversion_all_bit_patterns():
    """The integer-only fp16 -> fp32 of the portable kernels, bit for bit against NumPy on all 65536 values."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = np.array([kq._f16_to_f32(h) for h in bits], dtype=np.float32)
    expect = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expect)  # (signalling NaNs get quieted on the way back to Python: compare NaN-ness only)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expect[~nan].view(np.uint32))
