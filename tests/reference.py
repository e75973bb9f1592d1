"""The test oracle: a plain float64 NumPy forward of Llama-family and GPT-2 models, picoGPT style.

One function per concept, a shape comment on each line, no cache (the full causal sequence every call).
It reads Hugging Face folders (config.json + safetensors, F32/F16/BF16, sharded or not) with its own tiny
parser. It never imports nextword. tests/test_reference.py checks it against Hugging Face transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")  # u64 header length
    header = json.loads(raw[8 : 8 + n])  # {name: {dtype, shape, data_offsets}}
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]  # relative to the end of the header
        dtype = np.dtype(_NP_DTYPES[info["dtype"]])
        x = np.frombuffer(raw, dtype, (end - begin) // dtype.itemsize, 8 + n + begin)  # flat, stored dtype
        if info["dtype"] == "BF16":
            x = (x.astype(np.uint32) << 16).view(np.float32)  # bf16 bits are the top half of a float32
        tensors[name] = x.astype(np.float64).reshape(info["shape"])
    return tensors


def load_reference(folder: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    tensors = {}
    for file in files or ["model.safetensors"]:
        tensors.update(read_safetensors(folder / file))
    return config, tensors


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # [..., n], max subtracted for stability
    return e / e.sum(axis=-1, keepdims=True)  # [..., n] -> [..., n]


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)  # [..., n]
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))  # [..., n] -> [..., n]


def silu(x):
    x = np.asarray(x, np.float64)
    return x / (1.0 + np.exp(-x))  # x * sigmoid(x)


def gelu_tanh(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))  # HF "gelu_new"


def rms_norm(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * w  # [..., d] -> [..., d]


def layer_norm(x, w, b, eps):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # [..., 1], biased like torch
    return (x - mean) / np.sqrt(var + eps) * w + b  # [..., d] -> [..., d]


def linear(x, w, b=None):
    if isinstance(w, Quantized):
        y = w.product(x)  # [..., in] -> [..., out]
    else:
        y = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T  # [..., in] @ [out, in].T -> [..., out]
    return y if b is None else y + b


def conv1d(x, w, b):
    """HF Conv1D (GPT-2): w [in, out]."""
    return linear(x, w.T, b)


def rope_inv_freq(head_dim, theta, scaling=None):
    """Inverse frequencies [head_dim/2] as HF computes them, with "linear" or "llama3" scaling."""
    inv_freq = float(theta) ** (-np.arange(0, head_dim, 2) / head_dim)  # [hd/2]
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]  # same as dividing the positions by factor
    if kind != "llama3":
        raise NotImplementedError(f"rope_type {kind!r}")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq  # [hd/2]
    smooth = (old_ctx / wavelen - low) / (high - low)  # [hd/2], in [0, 1] for the medium band
    medium = (1 - smooth) * inv_freq / factor + smooth * inv_freq  # [hd/2]
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, medium)  # low frequencies: / factor
    return np.where(wavelen < old_ctx / high, inv_freq, scaled)  # high frequencies: unchanged


def rope(x, pos, inv_freq):
    """HF "rotate_half" RoPE, pairs (i, i + hd/2): x [T, n_heads, hd], pos [T]; or [n_heads, hd], int pos."""
    x = np.asarray(x, np.float64)
    angle = np.multiply.outer(np.asarray(pos, np.float64), inv_freq)  # [T, hd/2] (or [hd/2])
    if x.ndim == 3:
        angle = angle[:, None, :]  # [T, 1, hd/2], same angle for every head
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = np.split(x, 2, axis=-1)  # [..., hd] -> 2 x [..., hd/2]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [..., hd]


def attention_weights(q, k):
    """Causal softmax weights [n_heads, T, S] of queries q [T, n_heads, hd] over keys k [S, n_kv_heads, hd]
    (query t at position S - T + t; exactly 0 on later keys), scaled by 1/sqrt(hd), GQA as in `attention`."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    (T, n_heads, hd), S = q.shape, k.shape[0]
    k = np.repeat(k, n_heads // k.shape[1], axis=1)  # [S, n_kv, hd] -> [S, n_heads, hd]
    scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd)  # [n_heads, T, S]
    future = np.arange(S)[None, :] > (S - T + np.arange(T))[:, None]  # [T, S], True above the diagonal
    return softmax(np.where(future, -np.inf, scores))  # [n_heads, T, S]


def attention(q, k, v, pos=None, trace=None):
    """Causal GQA attention, scaled by 1/sqrt(hd); q head h reads kv head h // (n_heads / n_kv_heads).

    q [T, n_heads, hd], k and v [S, n_kv_heads, hd]: query t sits at position S - T + t. For one decode step,
    q [n_heads, hd] sits at `pos` (default S - 1) and reads keys 0..pos. With a `trace` dict, the weights
    [n_heads, T, S] are appended to trace["attention"].
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    if q.ndim == 2:
        n = k.shape[0] if pos is None else pos + 1
        return attention(q[None], k[:n], v[:n])[0]  # [1, n_heads, hd] -> [n_heads, hd]
    n_heads = q.shape[1]
    v = np.repeat(v, n_heads // v.shape[1], axis=1)  # [S, n_kv, hd] -> [S, n_heads, hd]
    weights = attention_weights(q, k)  # [n_heads, T, S]
    if trace is not None:
        trace["attention"].append(weights)
    return np.einsum("hts,shd->thd", weights, v)  # [T, n_heads, hd]


def params(tensors, prefix):
    return {name[len(prefix) :]: x for name, x in tensors.items() if name.startswith(prefix)}


def proj(x, p, name):
    return linear(x, p[name + ".weight"], p.get(name + ".bias"))  # HF nn.Linear, bias when stored


def llama_block(x, p, config, inv_freq, trace=None):
    T, H, KV = x.shape[0], config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps = config.get("head_dim") or x.shape[1] // H, config["rms_norm_eps"]
    h = rms_norm(x, p["input_layernorm.weight"], eps)  # [T, d]
    q = proj(h, p, "self_attn.q_proj").reshape(T, H, hd)  # [T, d] -> [T, H, hd]
    k = proj(h, p, "self_attn.k_proj").reshape(T, KV, hd)  # [T, d] -> [T, KV, hd]
    v = proj(h, p, "self_attn.v_proj").reshape(T, KV, hd)  # [T, d] -> [T, KV, hd]
    pos = np.arange(T)  # [T], no cache: positions 0..T-1
    a = attention(rope(q, pos, inv_freq), rope(k, pos, inv_freq), v, trace=trace)  # [T, H, hd]
    x = x + proj(a.reshape(T, H * hd), p, "self_attn.o_proj")  # [T, H*hd] -> [T, d]
    h = rms_norm(x, p["post_attention_layernorm.weight"], eps)  # [T, d]
    h = silu(proj(h, p, "mlp.gate_proj")) * proj(h, p, "mlp.up_proj")  # SwiGLU: [T, d] -> [T, inter]
    return x + proj(h, p, "mlp.down_proj")  # [T, inter] -> [T, d]


def llama(ids, config, tensors, trace=None):
    if config.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(config["hidden_act"])
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window and len(ids) > window:
        raise NotImplementedError("sliding-window attention")
    rope_params = config.get("rope_parameters") or config.get("rope_scaling") or {}  # v5 name, then v4 name
    theta = rope_params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = {"original_max_position_embeddings": config.get("max_position_embeddings"), **rope_params}
    hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    inv_freq = rope_inv_freq(hd, theta, scaling)  # [hd/2]
    embed = tensors["model.embed_tokens.weight"]  # [vocab, d]
    x = embed[ids]  # [T] -> [T, d]
    _record(trace, "hidden", x)
    for i in range(config["num_hidden_layers"]):
        x = llama_block(x, params(tensors, f"model.layers.{i}."), config, inv_freq, trace)  # [T, d] -> [T, d]
        _record(trace, "hidden", x)
    x = rms_norm(x, tensors["model.norm.weight"], config["rms_norm_eps"])  # [T, d]
    _record(trace, "final", x)
    return linear(x, tensors.get("lm_head.weight", embed))  # [T, d] -> [T, vocab], embed when tied


def gpt2_block(x, p, n_head, eps, trace=None):
    (T, d), hd = x.shape, x.shape[1] // n_head
    h = layer_norm(x, p["ln_1.weight"], p["ln_1.bias"], eps)  # [T, d]
    qkv = conv1d(h, p["attn.c_attn.weight"], p["attn.c_attn.bias"])  # [T, d] -> [T, 3d]
    q, k, v = (m.reshape(T, n_head, hd) for m in np.split(qkv, 3, axis=-1))  # 3 x [T, n_head, hd]
    a = attention(q, k, v, trace=trace).reshape(T, d)  # [T, n_head, hd] -> [T, d]
    x = x + conv1d(a, p["attn.c_proj.weight"], p["attn.c_proj.bias"])  # [T, d] -> [T, d]
    h = layer_norm(x, p["ln_2.weight"], p["ln_2.bias"], eps)  # [T, d]
    h = gelu_tanh(conv1d(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"]))  # [T, d] -> [T, 4d]
    return x + conv1d(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])  # [T, 4d] -> [T, d]


def gpt2(ids, config, tensors, trace=None):
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise NotImplementedError(config["activation_function"])
    t = params(tensors, "transformer.") if "transformer.wte.weight" in tensors else tensors  # both HF namings
    eps = config.get("layer_norm_epsilon", 1e-5)
    _record(trace, "hidden", t["wte.weight"][ids])  # [T, d] the token rows, before the positions
    x = t["wte.weight"][ids] + t["wpe.weight"][np.arange(len(ids))]  # [T, d] token + position embeddings
    for i in range(config["n_layer"]):
        x = gpt2_block(x, params(t, f"h.{i}."), config["n_head"], eps, trace)  # [T, d] -> [T, d]
        _record(trace, "hidden", x)
    x = layer_norm(x, t["ln_f.weight"], t["ln_f.bias"], eps)  # [T, d]
    _record(trace, "final", x)
    return linear(x, tensors.get("lm_head.weight", t["wte.weight"]))  # [T, d] -> [T, vocab], tied to wte


FORWARDS = {"llama": llama, "mistral": llama, "qwen2": llama, "gpt2": gpt2}


def reference_logits(folder_or_loaded, token_ids) -> np.ndarray:
    """Full causal forward: a folder (or load_reference's (config, tensors)), T ids -> float64 [T, vocab]."""
    loaded = folder_or_loaded if isinstance(folder_or_loaded, tuple) else load_reference(folder_or_loaded)
    config, tensors = loaded
    return FORWARDS[config["model_type"]](np.asarray(token_ids, np.int64), config, tensors)


def reference_trace(folder_or_loaded, token_ids) -> dict:
    """The full causal forward with its insides: {"hidden": [L + 1] x [T, d] (0: the token embedding rows,
    k: after layer k), "attention": [L] x [n_heads, T, T], "final": [T, d] after the final norm,
    "logits": [T, vocab]}, all float64."""
    loaded = folder_or_loaded if isinstance(folder_or_loaded, tuple) else load_reference(folder_or_loaded)
    config, tensors = loaded
    trace = {"hidden": [], "attention": [], "final": []}
    logits = FORWARDS[config["model_type"]](np.asarray(token_ids, np.int64), config, tensors, trace)
    return {**trace, "final": trace["final"][0], "logits": logits}


# ---- block-quantized weight formats (llama.cpp's Q4_1, nextword's Q8_M), as the serving engine runs them ----

QK = 32  # elements per block, along a weight's input dimension
HEAD_FORMAT = {"int8": "Q8_M", "q4": "Q8_M"}  # the LM head is never below 8 bits
LAYER_FORMAT = {"int8": "Q8_M", "q4": "Q4_1"}
ACTIVATION_LEVELS = {"Q8_0": 127, "Q4_1": 127, "Q8_M": 32767}  # decode path: int8 or int16 activations
LLAMA_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class Quantized:
    """A weight [out, in] as a block format stores it (the values its blocks decode to). With `round_inputs`,
    products go the decode way (kernels/quant.py): the activations are rounded per 32-block of the input as
    llama.cpp's Q8 activations, dx = absmax / L, q = round(x * (L / absmax)) in float32, L = `levels` (127:
    int8, 32767: int16); "last": only the last token's (one decode token after a prompt)."""

    def __init__(self, values, round_inputs: bool | str, levels: int = 127):
        self.values, self.round_inputs, self.levels = values, round_inputs, levels

    @property
    def T(self):
        return Quantized(self.values.T, self.round_inputs, self.levels)

    def product(self, x):
        x = np.asarray(x, np.float64)  # [T, in]
        y = x @ self.values.T  # [T, out]
        if not self.round_inputs:
            return y
        rows = slice(-1, None) if self.round_inputs == "last" else slice(None)
        b = x[rows].reshape(len(x[rows]), -1, QK).astype(np.float32)  # [t, in/32, 32] as the engine has them
        amax = np.abs(b).max(axis=-1, keepdims=True)  # [t, in/32, 1]
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(self.levels) / amax, np.float32(0))
        q = np.floor(b * inv + np.float32(0.5))  # [t, in/32, 32] the integer activations
        dx = (amax / np.float32(self.levels)).astype(np.float64)  # [t, in/32, 1]
        y[rows] = (q.astype(np.float64) * dx).reshape(len(b), -1) @ self.values.T
        return y


def block_quantized(w, kind: str, round_inputs: bool | str = False) -> Quantized:
    """w [out, in] in `kind`, dequantized exactly, float64 [out, in]: llama.cpp's "Q8_0" / "Q4_1" quantized
    from float32 by gguf-py (llama.cpp's reference quantizers); nextword's "Q8_M" (no GGUF type) from the
    blocks nextword's quantizer chooses (its choices are held to their bounds in test_quant.py), decoded
    here independently: d * q + m in float64."""
    levels = ACTIVATION_LEVELS[kind]
    if kind == "Q8_M":
        from nextword.weights.quantize import quantize_q8_m

        b = quantize_q8_m(np.ascontiguousarray(w, np.float32))
        n, k = b.shape
        d = b.d.view(np.float16).astype(np.float64)[:, :, None]
        m = b.m.view(np.float16).astype(np.float64)[:, :, None]
        values = d * b.qs.reshape(n, k // QK, QK).astype(np.float64) + m
        return Quantized(values.reshape(n, k), round_inputs, levels)
    import gguf

    t = getattr(gguf.GGMLQuantizationType, kind)
    raw = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), t)  # uint8 [out, in/32 * block bytes]
    return Quantized(gguf.quants.dequantize(raw, t).astype(np.float64).reshape(w.shape), round_inputs, levels)


def quantized_reference(loaded, fmt: str, round_inputs: bool | str = False):
    """(config, tensors) of a model whose matmul weights are in format `fmt` ("int8" or "q4"): every layer
    projection in LAYER_FORMAT[fmt] and the LM head (tied or not) in HEAD_FORMAT[fmt]; embeddings, norms and
    biases as stored. `round_inputs`: the activations of every quantized product rounded to int8 blocks (the
    decode path; "last": only the last token's). Only matrices whose input width is a multiple of 32 are quantized (the others stay float)."""
    config, tensors = loaded

    def q(w, kind):  # w [out, in]
        return block_quantized(w, kind, round_inputs) if w.shape[1] % QK == 0 else w

    out = dict(tensors)
    for name, w in tensors.items():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in LLAMA_MATRICES:
            out[name] = q(w, LAYER_FORMAT[fmt])
        elif name.endswith(".weight") and any(f".{m}.weight" in name for m in GPT2_MATRICES):
            out[name] = q(w.T, LAYER_FORMAT[fmt]).T  # Conv1D [in, out]
    gpt2 = config["model_type"] == "gpt2"
    head = tensors.get(
        "lm_head.weight", tensors["transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"]
    )
    out["lm_head.weight"] = q(head, HEAD_FORMAT[fmt])
    return config, out


def _record(trace, key, x):
    if trace is not None:
        trace[key].append(np.array(x, np.float64))
