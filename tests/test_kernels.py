"""Every Numba kernel against the plain float64 NumPy reference, on odd shapes."""

import numpy as np
import pytest
import reference as ref

from nextword.kernels.attention import cache_write, f32_to_f16_bits, paged_attention, rope_qk
from nextword.kernels.elementwise import add, add_bias, add_embedding, embedding, gelu_tanh, swiglu
from nextword.kernels.matmul import linear, matmul_f32
from nextword.kernels.model import KV_DTYPES
from nextword.kernels.norms import layernorm, rmsnorm
from nextword.kernels.softmax import SUM_CHUNK, exp_chunk_sums, log_softmax, softmax, token_logprobs

TOL = {"rtol": 1e-5, "atol": 1e-5}


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("T,D", [(1, 1), (3, 7), (5, 576), (2, 1001)])
def test_norms(T, D):
    rng = np.random.default_rng(T * D)
    x, w, b = randn(rng, T, D, scale=3), randn(rng, D), randn(rng, D)
    out = np.empty_like(x)
    rmsnorm(out, x, w, 1e-5)
    np.testing.assert_allclose(out, ref.rms_norm(x, w, 1e-5), **TOL)
    layernorm(out, x, w, b, 1e-5)
    np.testing.assert_allclose(out, ref.layer_norm(x, w, b, 1e-5), **TOL)


def test_norm_in_place_equals_out_of_place():
    rng = np.random.default_rng(1)
    x, w = randn(rng, 3, 13), randn(rng, 13)
    expect = ref.rms_norm(x, w, 1e-6)
    rmsnorm(x, x, w, 1e-6)
    np.testing.assert_allclose(x, expect, **TOL)


@pytest.mark.parametrize("T,K,N", [(1, 1, 1), (1, 576, 192), (3, 7, 5), (7, 33, 65), (17, 64, 130)])
def test_matmul(T, K, N):
    rng = np.random.default_rng(T + K + N)
    x, w = randn(rng, T, K), randn(rng, N, K)
    out = np.full((T, N), np.nan, dtype=np.float32)
    matmul_f32(out, x, w)
    np.testing.assert_allclose(out, ref.linear(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(K))
    out2 = np.empty_like(out)
    linear(out2, x, w)
    np.testing.assert_array_equal(out2, out)


def test_linear_rejects_unknown_format():
    with pytest.raises(TypeError, match="no matmul kernel"):
        linear(np.empty((1, 2), np.float32), np.ones((1, 3), np.float32), np.ones((2, 3), np.float64))


def test_embedding_and_positions():
    rng = np.random.default_rng(2)
    table, pos_table = randn(rng, 11, 5), randn(rng, 9, 5)
    ids, positions = np.array([3, 0, 10, 3], dtype=np.int64), np.array([0, 1, 2, 8], dtype=np.int64)
    out = np.empty((4, 5), dtype=np.float32)
    embedding(out, table, ids)
    np.testing.assert_array_equal(out, table[ids])
    add_embedding(out, pos_table, positions)
    np.testing.assert_allclose(out, table[ids].astype(np.float64) + pos_table[positions], **TOL)


def test_residual_bias_and_activations():
    rng = np.random.default_rng(3)
    x, y, b = randn(rng, 3, 9), randn(rng, 3, 9), randn(rng, 9)
    expect = x.astype(np.float64) + y
    add(x, y)
    np.testing.assert_allclose(x, expect, **TOL)
    expect = x.astype(np.float64) + b
    add_bias(x, b)
    np.testing.assert_allclose(x, expect, **TOL)

    gate_up = randn(rng, 4, 2 * 7, scale=4)
    out = np.empty((4, 7), dtype=np.float32)
    swiglu(out, gate_up)
    np.testing.assert_allclose(out, ref.silu(gate_up[:, :7]) * gate_up[:, 7:], **TOL)

    x = randn(rng, 4, 11, scale=4)
    expect = ref.gelu_tanh(x)
    gelu_tanh(x)
    np.testing.assert_allclose(x, expect, **TOL)


@pytest.mark.parametrize("R,N", [(1, 1), (2, 7), (3, 49152)])
def test_softmax(R, N):
    rng = np.random.default_rng(N)
    x = randn(rng, R, N, scale=8) + 100  # a large offset: only a max-subtracted form stays exact
    out = np.empty_like(x)
    softmax(out, x)
    np.testing.assert_allclose(out, ref.softmax(x), rtol=1e-5, atol=1e-7)
    log_softmax(out, x)
    np.testing.assert_allclose(out, ref.log_softmax(x), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("N", [1, 7, 300, 49152])
def test_exp_chunk_sums(N):
    rng = np.random.default_rng(N + 2)
    x = randn(rng, 4, N, scale=8) + 100
    x[2, : N // 2] = -np.inf  # no mass
    rows = np.array([3, 0, 0, 2], dtype=np.int64)  # any rows, in any order, repeated
    shift = x[rows].max(axis=1).astype(np.float64)
    inv_t = np.array([1.0, 1.0, 1 / 0.7, 1 / 3.0])
    chunks = -(-N // SUM_CHUNK)
    out = np.empty((4, chunks))
    exp_chunk_sums(out, x, rows, shift, inv_t)
    e = np.exp((x[rows].astype(np.float64) - shift[:, None]) * inv_t[:, None])  # [4, N]
    expect = np.add.reduceat(e, np.arange(0, N, SUM_CHUNK), axis=1)  # [4, chunks]
    np.testing.assert_allclose(out, expect, rtol=1e-14, atol=1e-300)


def test_exp_chunk_sums_exp_over_its_range():
    """Each term is exp in float64 to ~1e-15 (the sampler's probabilities are held to 1e-12), exactly 0 below
    -708 and for -inf, and NaN in, NaN out."""
    x = np.concatenate([-np.geomspace(1e-6, 708, 3000), [0.0, -709.0, -1e4, -np.inf, np.nan]])
    x = x.astype(np.float32)[:, None]
    out = np.empty((len(x), 1))
    exp_chunk_sums(out, x, np.arange(len(x)), np.zeros(len(x)), np.ones(len(x)))
    np.testing.assert_allclose(out[:-4, 0], np.exp(x[:-4, 0].astype(np.float64)), rtol=3e-15, atol=0)
    assert list(out[-4:-1, 0]) == [0.0, 0.0, 0.0] and np.isnan(out[-1, 0])


@pytest.mark.parametrize("R,N", [(1, 1), (3, 7), (4, 49152)])
def test_token_logprobs(R, N):
    rng = np.random.default_rng(N + 1)
    x = randn(rng, R, N, scale=8) + 100
    x[:, N // 2] = x[:, 0]  # a tie with the target: ties do not push a token down the ranking
    targets = rng.integers(0, N, R).astype(np.int64)
    targets[0] = 0
    logprob, rank = np.empty(R), np.empty(R, dtype=np.int64)
    token_logprobs(logprob, rank, x, targets)
    rows = np.arange(R)
    np.testing.assert_allclose(logprob, ref.log_softmax(x)[rows, targets], rtol=1e-6, atol=2e-5)
    expect_rank = 1 + (x.astype(np.float64) > x[rows, targets][:, None]).sum(axis=1)
    np.testing.assert_array_equal(rank, expect_rank)


@pytest.mark.parametrize("H,Hkv,Dh", [(9, 3, 64), (4, 4, 8), (6, 2, 6)])
def test_rope(H, Hkv, Dh):
    rng = np.random.default_rng(H * Dh)
    T, theta = 5, 10000.0
    positions = np.array([0, 1, 7, 30, 99], dtype=np.int64)
    qkv = randn(rng, T, (H + 2 * Hkv) * Dh)
    inv_freq = ref.rope_inv_freq(Dh, theta)
    angles = np.outer(np.arange(100), inv_freq)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    expect = qkv.astype(np.float64).copy()
    rotated = ref.rope(expect[:, : (H + Hkv) * Dh].reshape(T, H + Hkv, Dh), positions, inv_freq)
    expect[:, : (H + Hkv) * Dh] = rotated.reshape(T, -1)  # v heads untouched
    rope_qk(qkv, positions, cos, sin, H, Hkv, Dh)
    np.testing.assert_allclose(qkv, expect, **TOL)


@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
@pytest.mark.parametrize("chunk", [256, 5])
@pytest.mark.parametrize("H,Hkv,Dh,block_size", [(9, 3, 64, 16), (4, 4, 8, 4), (6, 2, 5, 3)])
def test_paged_attention_ragged_batch(H, Hkv, Dh, block_size, chunk, kv_dtype):
    """Three sequences in one batch: a long prefill chunk mid-sequence, a decode step at position 0, and a
    decode step deep in a sequence, each with shuffled, non-contiguous cache blocks. With chunk=5 the context
    is cut into many partial softmaxes: the prefill tile goes through its chunks, the deep decode token's
    chunks are spread over work items and merged afterwards. The prompt tile goes through the matrix-product
    path, the decode tokens through the direct one. Then every token again alone, in its role: bit for bit
    the same (a token's result never depends on its batch or tile). With an f16 cache, the reference attends to
    the keys and values rounded to float16 (what the cache holds)."""
    held = (lambda a: a) if kv_dtype == "f32" else (lambda a: a.astype(np.float16).astype(np.float64))
    rng = np.random.default_rng(H + Dh + block_size)
    lengths = [23, 1, 41]  # total positions per sequence after this step
    new = [9, 1, 1]  # new tokens this step (the last `new` positions)
    num_blocks = 40
    order = rng.permutation(num_blocks)
    tables, at = [], 0
    for n in lengths:
        nb = -(-n // block_size)
        tables.append(order[at : at + nb])
        at += nb
    block_tables = np.zeros((3, max(map(len, tables))), dtype=np.int32)
    for s, t in enumerate(tables):
        block_tables[s, : len(t)] = t

    k_cache = np.zeros((num_blocks, block_size, Hkv, Dh), dtype=KV_DTYPES[kv_dtype])
    v_cache = np.zeros_like(k_cache)
    width = (H + 2 * Hkv) * Dh
    full = [randn(rng, n, width) for n in lengths]  # every position's q/k/v row of each sequence
    # the earlier positions were cached by previous steps
    for s, n in enumerate(lengths):
        p = np.arange(n - new[s])
        slots = block_tables[s, p // block_size].astype(np.int64) * block_size + p % block_size
        cache_write(k_cache, v_cache, np.ascontiguousarray(full[s][: n - new[s]]), slots, H, Hkv, Dh)

    qkv = np.concatenate([full[s][lengths[s] - new[s] :] for s in range(3)])
    positions = np.concatenate([np.arange(n - k, n) for n, k in zip(lengths, new, strict=False)]).astype(
        np.int64
    )
    token_seq = np.repeat(np.arange(3), new).astype(np.int64)
    slots = (
        block_tables[token_seq, positions // block_size].astype(np.int64) * block_size
        + positions % block_size
    )
    cache_write(k_cache, v_cache, qkv, slots, H, Hkv, Dh)
    out = np.full((len(qkv), H * Dh), np.nan, dtype=np.float32)
    scale = np.float32(1 / np.sqrt(Dh))
    # the prompt tokens (sequence 0) come after the two decode tokens, as the engine orders a batch
    order = np.array([9, 10, *range(9)])
    qkv, positions, token_seq = qkv[order], positions[order], token_seq[order]
    paged_attention(out, qkv, k_cache, v_cache, block_tables, token_seq, positions, scale, H, Hkv, 2, chunk)
    inverse = np.argsort(order)
    out, qkv, positions, token_seq = out[inverse], qkv[inverse], positions[inverse], token_seq[inverse]

    for t in range(len(qkv)):  # alone, in its role: a prompt token as a tile of one, a decode token split
        alone = np.full((1, H * Dh), np.nan, dtype=np.float32)
        one = np.ascontiguousarray(qkv[t : t + 1])
        decode = int(t >= new[0])
        paged_attention(alone, one, k_cache, v_cache, block_tables, token_seq[t : t + 1], positions[t : t + 1],
                        scale, H, Hkv, decode, chunk)  # fmt: skip
        np.testing.assert_array_equal(alone, out[t : t + 1])
    row = 0
    for s, n in enumerate(lengths):
        q = full[s][n - new[s] :, : H * Dh].reshape(new[s], H, Dh)
        k = held(full[s][:, H * Dh : (H + Hkv) * Dh]).reshape(n, Hkv, Dh)
        v = held(full[s][:, (H + Hkv) * Dh :]).reshape(n, Hkv, Dh)
        expect = ref.attention(q, k, v).reshape(new[s], H * Dh)
        np.testing.assert_allclose(out[row : row + new[s]], expect, **TOL)
        row += new[s]


def test_fast_exp():
    from nextword.kernels.attention import fast_exp

    x = np.concatenate([np.linspace(-90, 0, 10001), [-1e-7, -0.5, -np.log(2)]]).astype(np.float32)
    got = np.array([fast_exp(v) for v in x], dtype=np.float64)
    expect = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(got[x > -87], expect[x > -87], rtol=5e-7, atol=0)
    assert (got[x <= -87] < 2e-38).all()  # clamped: tiny, never negative or NaN


@pytest.mark.parametrize("fmt", ["f32", "q8", "q8m", "q4"])
def test_a_tokens_result_does_not_depend_on_its_batch(fmt):
    """Each row of x @ w.T is bit-identical whether computed alone, at an odd or even offset, or among
    other rows, in every path linear() takes: the engine promises that batch mates change no result."""
    from nextword.weights.quantize import quantize_q4_1, quantize_q8_0, quantize_q8_m

    rng = np.random.default_rng(5)
    w = randn(rng, 66, 96)
    w = {"f32": w, "q8": quantize_q8_0(w), "q8m": quantize_q8_m(w), "q4": quantize_q4_1(w)}[fmt]
    x = randn(rng, 9, 96)
    for decode_rows in (0, 3):
        full = np.empty((9, 66), dtype=np.float32)
        linear(full, x, w, decode_rows)
        for start, stop in ((0, 1), (3, 4), (1, 9), (4, 7)):
            part = np.empty((stop - start, 66), dtype=np.float32)
            rows = np.ascontiguousarray(x[start:stop])
            linear(part, rows, w, max(0, min(decode_rows, stop) - start))
            np.testing.assert_array_equal(part, full[start:stop])


def float16_edge_values() -> np.ndarray:
    """float32 values around every float16 (each one, the midpoints to its neighbours and one float32 step to
    either side of them), the overflow threshold, signed zeros, infinities, NaN, and random values."""
    halves = np.arange(0x10000, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float32))
    mids = (finite[:-1].astype(np.float64) + finite[1:]) / 2  # exactly representable in float32
    values = [
        finite,
        mids.astype(np.float32),
        np.float32([65504, 65519.996, 65520, 65536, 1e30, 3e-8, 2.0**-25]),
    ]
    for v in list(values):
        values += [np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))]
    random = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * np.float32(1e3)
    specials = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan])
    return np.concatenate([*values, -np.concatenate(values), random, specials])


def test_f32_to_f16_rounds_as_numpy():
    """Both conversions into a float16 KV cache (F16C's, through cache_write, and the portable one) give
    NumPy's astype(float16) bit for bit: round to nearest even, subnormals, overflow; NaN stays NaN."""
    x = float16_edge_values()
    with np.errstate(over="ignore"):  # the values past float16's range: inf, as expected
        expect = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    portable = np.array([f32_to_f16_bits(v) for v in x], dtype=np.uint16)
    assert np.array_equal(portable[~nan], expect[~nan])
    assert np.isnan(portable[nan].view(np.float16)).all()

    k_cache = np.zeros((1, len(x), 1, 1), np.uint16)  # one head of width 1: the keys are x, the values -x
    v_cache = np.zeros_like(k_cache)
    cache_write(k_cache, v_cache, np.stack([x, -x], axis=1), np.arange(len(x)), 0, 1, 1)
    for cache, want in ((k_cache, expect), (v_cache, expect ^ np.uint16(0x8000))):
        got = cache.reshape(-1)
        assert np.array_equal(got[~nan], want[~nan])
        assert np.isnan(got[nan].view(np.float16)).all()
