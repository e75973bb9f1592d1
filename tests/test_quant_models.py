"""Every architecture in every weight format, whole-model logits against the float64 reference.

The tiny models here have widths that are multiples of 32, so int8 and q4 quantize every matmul weight (the
odd-width models of test_model.py stay float32: that fallback is checked below too).

How the bound is derived. The format's own errors are not tolerances to fit, they are computed exactly:
- the weights: the oracle multiplies by the values the format stores, dequantized exactly in float64: Q4_1
  quantized by gguf-py (llama.cpp's reference quantizer: |w - w'| <= d / 2 with d = (max - min) / 15, plus
  d and m rounded to fp16), Q8_M by nextword's quantizer (its bounds are checked in test_quant.py);
- the decode path's activations (kernels/quant.py: "per block |err| <= 0.5 * dx * sum_j |w_j|",
  dx = absmax / 127 for Q4_1's int8 activations, absmax / 32767 for Q8_M's int16 ones): the oracle rounds
  them the same way, per 32-block, in float64.
On the prompt path what is left between the engine and the oracle is float32 arithmetic, whose bound the f32
tests establish (1e-4 on these logits, test_model.py). On the decode path, every product inside the forward is
held to the docstring's per-block bound (test_every_decode_product_within_the_documented_bound), and the
whole-model logits to the envelope derived in test_quantized_logits_match_reference.

Both paths of `linear` are checked: the prompt path (a prompt in one step: float32 activations) and the decode
path (the same tokens one step each, as decode tokens: int8 activations).
"""

import numpy as np
import pytest
import reference as ref
from tiny_models import KINDS, write_tiny_model

from nextword.kernels.matmul import linear
from nextword.kernels.model import Batch, Model
from nextword.weights.loader import load_checkpoint
from nextword.weights.quantize import Q4Weight, Q8MWeight

BLOCK = 4
IDS = [5, 17, 42, 99, 3, 250, 7, 7, 31]
F32_BOUND = 1e-4  # float32 arithmetic against float64 on these logits (test_model.py)
FORMAT_TYPES = {"int8": (Q8MWeight, Q8MWeight), "q4": (Q4Weight, Q8MWeight)}  # (layers, head)
LEVELS = {Q4Weight: 127, Q8MWeight: 32767}  # decode-path activations: int8 / int16 per 32-block


@pytest.fixture(scope="module", params=KINDS)
def aligned(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"aligned_{request.param}")
    write_tiny_model(folder, request.param, seed=5, aligned=True)
    return request.param, folder, ref.load_reference(folder)


def prompt_path(model, ids):
    """All positions' logits from one prefill step (float32 activations)."""
    cache = model.new_cache(num_blocks=16, block_size=BLOCK)
    return model.forward(cache, Batch.build([(ids, 0, list(range(-(-len(ids) // BLOCK))), "all")], BLOCK))


def decode_path(model, ids):
    """Each position's logits as a decode token (int8 activations in every quantized product) after the
    tokens before it went through as a prompt: one decode step per position, in a fresh cache."""
    rows = []
    for t in range(1, len(ids)):
        cache = model.new_cache(num_blocks=16, block_size=BLOCK)
        blocks = list(range(-(-(t + 1) // BLOCK)))
        model.forward(cache, Batch.build([(ids[:t], 0, blocks, "none")], BLOCK))
        rows.append(model.forward(cache, Batch.build([([ids[t]], t, blocks, "last")], BLOCK, 1))[0])
    return np.stack(rows)


def decode_reference(loaded, fmt, ids):
    """decode_path's oracle: each position's logits with the last token's activations rounded."""
    q = ref.quantized_reference(loaded, fmt, round_inputs="last")
    return np.stack([ref.reference_logits(q, ids[: t + 1])[-1] for t in range(1, len(ids))])


@pytest.mark.parametrize("fmt", ["int8", "q4"])
def test_quantized_logits_match_reference(aligned, fmt):
    _, folder, loaded = aligned
    ckpt = load_checkpoint(folder, fmt)
    layer_type, head_type = FORMAT_TYPES[fmt]
    matrices = [
        w for layer in ckpt.layers for w in vars(layer).values() if isinstance(w, Q4Weight | Q8MWeight)
    ]
    assert len(matrices) == len(ckpt.layers) * 4  # every matmul weight
    assert all(type(w) is layer_type for w in matrices) and type(ckpt.lm_head) is head_type
    model = Model(ckpt)

    exact = ref.reference_logits(loaded, IDS)  # float64, unquantized
    expect = ref.reference_logits(ref.quantized_reference(loaded, fmt), IDS)
    got = prompt_path(model, IDS)
    np.testing.assert_allclose(got, expect, rtol=0, atol=F32_BOUND)
    assert np.abs(expect - exact).max() > 20 * F32_BOUND  # the format's error is real, not a float fallback

    # Decode path. The oracle rounds the decode token's activations as the kernel does (per 32-block,
    # dx = absmax / 127 or 32767; the docstring's per-block error 0.5 * dx * sum_j |w_j|), which moves each
    # logit by R (its distance from the unrounded products, computed per position). The engine's float32
    # activations differ from the oracle's by ~1e-6, enough to round some of them the other way, one step
    # dx each; through the following layers that makes the engine's rounding a second draw of the same size
    # R, not a copy. So the engine is within R (its own rounding) + R (the oracle's) + the f32 bound; a
    # wrong nibble, scale, offset or rounding mode is off by far more (test_quant.py pins each kernel).
    expect = decode_reference(loaded, fmt, IDS)
    unrounded = ref.reference_logits(ref.quantized_reference(loaded, fmt), IDS)[1:]
    got = decode_path(model, IDS)
    rounding = np.abs(expect - unrounded).max(-1)  # [positions]
    if fmt == "q4":  # int8 activations: rounded well beyond float32 noise, the envelope is not vacuous
        assert rounding.min() > 20 * F32_BOUND
    # (int16 activations (Q8_M, every int8 matrix) move these logits by about the f32 bound only: that
    # they are rounded at all is checked product by product in test_every_decode_product_within...)
    bound = F32_BOUND + 2 * rounding  # [positions]
    assert (np.abs(got - expect).max(-1) <= bound).all()
    top2 = np.sort(expect, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * bound  # no error within the bound can swap the top two there
    assert (got.argmax(-1)[clear] == expect.argmax(-1)[clear]).all()


def test_f32_matches_reference(aligned):
    _, folder, loaded = aligned
    model = Model(load_checkpoint(folder, "f32"))
    expect = ref.reference_logits(loaded, IDS)
    np.testing.assert_allclose(prompt_path(model, IDS), expect, rtol=0, atol=F32_BOUND)
    np.testing.assert_allclose(decode_path(model, IDS), expect[1:], rtol=0, atol=F32_BOUND)


def test_odd_widths_stay_float32(tmp_path):
    """A matrix whose input width is not a multiple of 32 cannot be block-quantized: it stays float32 and
    the model still matches the unquantized reference."""
    write_tiny_model(tmp_path, "llama", seed=5)  # hidden 48, intermediate 80
    ckpt = load_checkpoint(tmp_path, "q4")
    assert all(w.dtype == np.float32 for w in vars(ckpt.layers[0]).values() if w is not None)
    assert isinstance(ckpt.lm_head, np.ndarray)
    np.testing.assert_allclose(
        decode_path(Model(ckpt), IDS), ref.reference_logits(tmp_path, IDS)[1:], rtol=0, atol=F32_BOUND
    )


@pytest.mark.parametrize("fmt", ["int8", "q4"])
def test_every_decode_product_within_the_documented_bound(aligned, fmt, monkeypatch):
    """Each quantized product of the decode path, inside the real forward of each model kind, against its
    exact float64 value: within kernels/quant.py's per-block bound 0.5 * dx * sum_j |w_j| (dx = the block's
    activation absmax / 127, or / 32767 for Q8_M's int16 activations), plus float32 accumulation
    (K * 2^-24 of sum |x * w|)."""
    from nextword.kernels import gpt2, llama
    from nextword.weights.quantize import dequantize

    _, folder, _ = aligned
    products = []

    def recording_linear(out, x, w, decode_rows=0, tiled=True):
        linear(out, x, w, decode_rows, tiled)
        if decode_rows and isinstance(w, Q4Weight | Q8MWeight):
            products.append((out[:decode_rows].copy(), x[:decode_rows].copy(), w))

    for module in (llama, gpt2):
        monkeypatch.setattr(module, "linear", recording_linear)
    decode_path(Model(load_checkpoint(folder, fmt)), IDS[:6])
    assert len(products) == 5 * (len(load_checkpoint(folder, fmt).layers) * 4 + 1)  # every layer and the head
    for out, x, w in products:
        values = dequantize(w).astype(np.float64)  # [N, K]
        x64 = x.astype(np.float64)  # [T, K]
        dx = np.abs(x64).reshape(len(x), -1, 32).max(axis=2) / LEVELS[type(w)]  # [T, K/32]
        block_sums = np.abs(values).reshape(len(values), -1, 32).sum(axis=2)  # [N, K/32]
        bound = 0.5 * dx @ block_sums.T  # [T, N]
        rounding = x.shape[1] * 2.0**-24 * (np.abs(x64) @ np.abs(values).T)
        assert (np.abs(out - x64 @ values.T) <= bound + rounding).all()
        # The activations were rounded, as documented: the result is nearer the product with the activations
        # rounded per block (float32 scale, round half up) than the exact one. (Only int8's rounding also
        # stands far above the float32 accumulation bound.)
        levels = np.float32(LEVELS[type(w)])
        b = x.reshape(len(x), -1, 32)
        amax = np.abs(b).max(axis=2, keepdims=True)
        inv = np.where(amax > 0, levels / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
        xr = (np.floor(b * inv + np.float32(0.5)) * (amax / levels).astype(np.float64)).reshape(x.shape)
        exact_err, rounded_err = out - x64 @ values.T, out - xr @ values.T
        assert np.sqrt((rounded_err**2).mean()) < 0.5 * np.sqrt((exact_err**2).mean())
        if LEVELS[type(w)] == 127:
            assert np.abs(exact_err).max() > 10 * rounding.max()
