"""Block-quantized weight formats, bit-exact with llama.cpp (and GGUF files): Q8_0 and Q4_1.

Blocks are 32 consecutive elements along K (the input dimension) of a [N, K] weight. The blocks are kept as
plain arrays (structure of arrays) so the kernels in `nextword.kernels.quant` can stream them:

- Q8_0: value = d * q, q int8 in -127..127; `d` = absmax / 127 stored as fp16 bits (uint16).
- Q4_1: value = d * q + m, q in 0..15; `d` = (max - min) / 15 and `m` = min, both fp16 bits. Byte j of a
  block holds element j in its low nibble and element j + 16 in its high nibble (llama.cpp's order).

The quantizers follow ggml's quantize_row_q8_0_ref / quantize_row_q4_1_ref step by step in float32 (the same
operations as gguf-py's `gguf.quants`, which tests/test_quant.py checks byte for byte).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

QK = 32  # elements per block
Q8_0_BLOCK_BYTES = 2 + QK  # GGUF: fp16 d, 32 x int8
Q4_1_BLOCK_BYTES = 2 + 2 + QK // 2  # GGUF: fp16 d, fp16 m, 16 bytes of nibbles


@dataclass(frozen=True)
class Q8Weight:
    qs: np.ndarray  # int8 [N, K]
    d: np.ndarray  # uint16 [N, K//32] fp16 bits

    def __post_init__(self):
        _need(self.qs, np.int8, "qs")
        _need(self.d, np.uint16, "d")
        n, k = self.qs.shape
        if k % QK or self.d.shape != (n, k // QK):
            raise ValueError(f"Q8Weight: qs {self.qs.shape} and d {self.d.shape} do not match")

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape

    @property
    def blocks(self) -> tuple[np.ndarray, ...]:
        """The arrays a kernel takes after (out, x)."""
        return (self.qs, self.d)

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes


@dataclass(frozen=True)
class Q4Weight:
    qs: np.ndarray  # uint8 [N, K//2], llama.cpp nibble order per 32-block
    d: np.ndarray  # uint16 [N, K//32] fp16 bits
    m: np.ndarray  # uint16 [N, K//32] fp16 bits

    def __post_init__(self):
        _need(self.qs, np.uint8, "qs")
        _need(self.d, np.uint16, "d")
        _need(self.m, np.uint16, "m")
        n, half = self.qs.shape
        if half % (QK // 2) or self.d.shape != (n, half * 2 // QK) or self.m.shape != self.d.shape:
            raise ValueError(f"Q4Weight: qs {self.qs.shape}, d {self.d.shape}, m {self.m.shape} do not match")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qs.shape[0], self.qs.shape[1] * 2)

    @property
    def blocks(self) -> tuple[np.ndarray, ...]:
        """The arrays a kernel takes after (out, x)."""
        return (self.qs, self.d, self.m)

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes + self.m.nbytes


@dataclass(frozen=True)
class Q8MWeight:
    """8-bit blocks with a minimum (nextword's own format, no GGUF type): w = d * q + m, q uint8 in 0..255."""

    qs: np.ndarray  # uint8 [N, K]
    d: np.ndarray  # uint16 [N, K//32] fp16 bits
    m: np.ndarray  # uint16 [N, K//32] fp16 bits

    def __post_init__(self):
        _need(self.qs, np.uint8, "qs")
        _need(self.d, np.uint16, "d")
        _need(self.m, np.uint16, "m")
        n, k = self.qs.shape
        if k % QK or self.d.shape != (n, k // QK) or self.m.shape != self.d.shape:
            raise ValueError(
                f"Q8MWeight: qs {self.qs.shape}, d {self.d.shape}, m {self.m.shape} do not match"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape

    @property
    def blocks(self) -> tuple[np.ndarray, ...]:
        """The arrays a kernel takes after (out, x)."""
        return (self.qs, self.d, self.m)

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes + self.m.nbytes


def _need(a: np.ndarray, dtype, name: str) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 2 or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous 2-D {np.dtype(dtype).name} array")


def _blocks(w: np.ndarray) -> np.ndarray:
    """[N, K] -> float32 [N, K/32, 32]."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {w.shape}")
    n, k = w.shape
    if k % QK:
        raise ValueError(f"K = {k} is not a multiple of the block size {QK}")
    return np.ascontiguousarray(w, dtype=np.float32).reshape(n, k // QK, QK)


def _fp16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bits, round to nearest even (GGML_FP32_TO_FP16)."""
    return np.ascontiguousarray(x.astype(np.float16).view(np.uint16))


def _fp16_value(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float16).astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    """id = d ? 1/d : 0, in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0.0), np.float32(1.0) / d).astype(np.float32)


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exact in float32 (floor(2 * frac) decides the rounding)."""
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + np.floor(np.float32(2.0) * (a - f)))


def quantize_q8_0(w: np.ndarray) -> Q8Weight:
    """llama.cpp quantize_row_q8_0_ref: d = absmax / 127, q = roundf(x * (1 / d)).   w: float32 [N, K]"""
    x = _blocks(w)
    n, nb, _ = x.shape
    d = np.abs(x).max(axis=2, keepdims=True) / np.float32(127.0)  # float32 [N, nb, 1]
    q = _roundf(x * _inverse(d))
    return Q8Weight(qs=q.astype(np.int8).reshape(n, nb * QK), d=_fp16_bits(d.reshape(n, nb)))


def quantize_q4_1(w: np.ndarray) -> Q4Weight:
    """llama.cpp quantize_row_q4_1_ref: d = (max - min) / 15, q = min(15, (int)((x - min) * (1 / d) + 0.5f))."""
    x = _blocks(w)
    n, nb, _ = x.shape
    lo = x.min(axis=2, keepdims=True)
    d = (x.max(axis=2, keepdims=True) - lo) / np.float32(15.0)
    q = np.trunc((x - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8)
    q = np.minimum(q, np.uint8(15))
    qs = q[:, :, : QK // 2] | (q[:, :, QK // 2 :] << np.uint8(4))  # [N, nb, 16]
    return Q4Weight(
        qs=np.ascontiguousarray(qs.reshape(n, nb * QK // 2)),
        d=_fp16_bits(d.reshape(n, nb)),
        m=_fp16_bits(lo.reshape(n, nb)),
    )


def _q8m_fit(x: np.ndarray, lo16: np.ndarray, levels):
    """Q8_M blocks of x [B, 32] with m = lo16 [B, 1] and (max - min) split into `levels` steps:
    (d fp16 bits [B, 1], q uint8 [B, 32], squared error [B, 1])."""
    span = x.max(axis=1, keepdims=True) - x.min(axis=1, keepdims=True)
    d16 = _fp16_bits(span / levels)
    d16 += (_fp16_value(d16) * levels < span).astype(np.uint16)  # rounded up: the max never needs a q > L
    d = _fp16_value(d16)
    q = np.clip(np.rint((x - lo16) * _inverse(d)), 0, 255)
    return d16, q.astype(np.uint8), ((d * q + lo16 - x) ** 2).sum(axis=1, keepdims=True)


def quantize_q8_m(w: np.ndarray) -> Q8MWeight:
    """8 bits with a block minimum: m = min, d = (max - min) / L (the fp16 at or above), q = rint((x - m) / d).

    L = 255 (the finest grid), unless the block already lies on a coarser grid that this one misses: steps
    of the smallest gap between its distinct values divided by 1, 2, ... (while the span fits in 255 of
    them) are tried too, and the L with the smallest error kept. So blocks that come from Q4_1 (d4 * q + m: L = 15, or 255 = 15 * 17) or
    Q8_0 (d * q: L = its q range) are stored as they were, up to fp16 rounding of m: a model imported from
    a quantized GGUF loses nothing more here."""
    n, nb, _ = _blocks(w).shape
    x = _blocks(w).reshape(n * nb, QK)
    lo16 = _fp16_value(_fp16_bits(x.min(axis=1, keepdims=True)))
    d16, q, err = _q8m_fit(x, lo16, np.float32(255.0))
    gaps = np.diff(np.sort(x, axis=1), axis=1)
    gap = np.where(gaps > 0, gaps, np.inf).min(axis=1)  # inf for a constant block
    steps = (x.max(axis=1) - x.min(axis=1)) / gap  # span in units of that gap (a whole number on a grid)
    for k in range(1, 256):  # the grid's step may be the gap / k
        levels = np.round(steps * k)
        (idx,) = np.nonzero((levels >= 1) & (levels <= 255))
        if not len(idx):
            break
        levels = levels[idx].astype(np.float32)[:, None]
        d16k, qk, errk = _q8m_fit(x[idx], lo16[idx], levels)
        better = (errk < err[idx])[:, 0]
        idx = idx[better]
        d16[idx], q[idx], err[idx] = d16k[better], qk[better], errk[better]
    return Q8MWeight(
        qs=np.ascontiguousarray(q.reshape(n, nb * QK)),
        d=np.ascontiguousarray(d16.reshape(n, nb)),
        m=_fp16_bits(lo16.reshape(n, nb)),
    )


def dequantize(w: Q8Weight | Q4Weight | Q8MWeight) -> np.ndarray:
    """The reference dequantization, float32 [N, K] (bit-identical to gguf-py's for Q8_0 and Q4_1)."""
    if isinstance(w, Q8Weight):
        n, k = w.shape
        x = w.qs.reshape(n, k // QK, QK).astype(np.float32) * _fp16_value(w.d)[:, :, None]
        return x.reshape(n, k)
    if isinstance(w, Q4Weight):
        n, k = w.shape
        packed = w.qs.reshape(n, k // QK, QK // 2)
        q = np.concatenate([packed & np.uint8(15), packed >> np.uint8(4)], axis=2).astype(np.float32)
        x = _fp16_value(w.d)[:, :, None] * q + _fp16_value(w.m)[:, :, None]
        return x.reshape(n, k)
    if isinstance(w, Q8MWeight):
        n, k = w.shape
        q = w.qs.reshape(n, k // QK, QK).astype(np.float32)
        return (_fp16_value(w.d)[:, :, None] * q + _fp16_value(w.m)[:, :, None]).reshape(n, k)
    raise TypeError(f"not a quantized weight: {type(w).__name__}")


def _kind_name(kind) -> str:
    """'Q8_0' / 'Q4_1' from a string or a gguf.GGMLQuantizationType member."""
    name = getattr(kind, "name", kind)
    if name not in ("Q8_0", "Q4_1"):
        raise ValueError(f"unsupported block format {kind!r} (supported: Q8_0, Q4_1)")
    return name


def from_gguf_blocks(raw: np.ndarray, kind) -> Q8Weight | Q4Weight:
    """Split GGUF/ggml blocks into the arrays above, byte for byte (no float round trip).

    raw: uint8 [N, nblocks * block_bytes], as `gguf.GGUFReader` exposes a quantized tensor's data
    (Q8_0 block = fp16 d + 32 int8; Q4_1 block = fp16 d + fp16 m + 16 bytes). kind: "Q8_0" / "Q4_1" or the
    matching `gguf.GGMLQuantizationType`."""
    name = _kind_name(kind)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"raw must be a 2-D uint8 array, got {raw.dtype} {raw.shape}")
    size = Q8_0_BLOCK_BYTES if name == "Q8_0" else Q4_1_BLOCK_BYTES
    n, nbytes = raw.shape
    if nbytes % size:
        raise ValueError(f"{name}: {nbytes} bytes per row is not a multiple of the block size {size}")
    blocks = raw.reshape(n, nbytes // size, size)
    nb = blocks.shape[1]

    def u16(lo: int) -> np.ndarray:  # little-endian fp16 bits at byte offset lo of each block
        return np.ascontiguousarray(blocks[:, :, lo : lo + 2]).view("<u2").reshape(n, nb).astype(np.uint16)

    if name == "Q8_0":
        qs = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(n, nb * QK)
        return Q8Weight(qs=qs, d=u16(0))
    qs = np.ascontiguousarray(blocks[:, :, 4:]).reshape(n, nb * QK // 2)
    return Q4Weight(qs=qs, d=u16(0), m=u16(2))


def to_gguf_blocks(w: Q8Weight | Q4Weight) -> np.ndarray:
    """The inverse of `from_gguf_blocks`: uint8 [N, nblocks * block_bytes] in GGUF's block layout."""
    n, k = w.shape
    nb = k // QK

    def u8(bits: np.ndarray) -> np.ndarray:
        return bits.astype("<u2").view(np.uint8).reshape(n, nb, 2)

    if isinstance(w, Q8Weight):
        parts = [u8(w.d), w.qs.view(np.uint8).reshape(n, nb, QK)]
    elif isinstance(w, Q4Weight):
        parts = [u8(w.d), u8(w.m), w.qs.reshape(n, nb, QK // 2)]
    else:
        raise TypeError(f"not a quantized weight: {type(w).__name__}")
    return np.concatenate(parts, axis=2).reshape(n, -1)


FORMATS = ("f32", "int8", "q4")  # what --weights accepts
# Bump when what a format's quantization produces changes (a quantizer, the LM head's format...): cached
# quantized weights (nextword.weights.quant_cache) of another version are rewritten.
QUANTIZER_VERSION = 2  # 2: int8 and the LM head are Q8_M (were Q8_0)
_QUANTIZERS = {"int8": quantize_q8_m, "q4": quantize_q4_1}


MATRICES = ("qkv", "o", "gate_up", "down", "fc", "proj")  # the layer fields that are matmul weights


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")


def quantize_matrix(w: np.ndarray, fmt: str):
    """A layer's matmul weight [N, K] in format `fmt`; it stays float32 when K is not a multiple of 32."""
    if fmt == "f32" or w.shape[1] % QK:
        return w
    return _QUANTIZERS[fmt](w)


def quantize_layer(layer, fmt: str):
    """A layer (LlamaLayer or GPT2Layer) with its matmul weights in format `fmt`."""
    changes = {name: quantize_matrix(getattr(layer, name), fmt) for name in MATRICES if hasattr(layer, name)}
    return replace(layer, **changes)


def quantize_head(lm_head: np.ndarray, fmt: str):
    """The LM head in format `fmt`, never below 8 bits (Q8_M): in 4 bits it alone costs several percent of
    perplexity (llama.cpp's 4-bit files keep it at 6-8 bits too). Embedding rows are looked up, not
    multiplied, so the embedding table stays float32; with tied embeddings the head becomes a quantized copy."""
    if fmt == "f32" or lm_head.shape[1] % QK:
        return lm_head
    return quantize_q8_m(lm_head)


def quantize_checkpoint(checkpoint, fmt: str):
    """The checkpoint with every matmul weight (the layers' projections and the LM head) in format `fmt`."""
    check_format(fmt)
    layers = tuple(quantize_layer(layer, fmt) for layer in checkpoint.layers)
    return replace(checkpoint, layers=layers, lm_head=quantize_head(checkpoint.lm_head, fmt))
