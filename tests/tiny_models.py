"""Tiny random-weight Hugging Face model folders for tests (no download, no torch).

`write_tiny_model(folder, kind)` writes config.json, safetensors weights (F32, F16 or hand-written BF16,
optionally in 2 shards with an index), a tiny byte-level BPE tokenizer.json, tokenizer_config.json (ChatML
template) and generation_config.json. Everything is deterministic for a given (kind, seed, dtype): the weights
come from `np.random.default_rng(seed)` in a fixed order, and tests/golden/tiny_logits.json pins the bytes by
sha256, so the golden logits made with transformers stay valid.

This module never imports nextword: with tests/reference.py it is the independent oracle.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

KINDS = ("llama", "llama_tied", "qwen2", "mistral", "gpt2")
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_POSITIONS = 128

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
TOKENIZER_VOCAB_SIZE = 300
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! This is a tiny tokenizer for tests.",
    "A language model predicts the next word, one token at a time.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    "The server streams tokens and their probabilities over gRPC.",
    "Once upon a time, there was a small model that lived on a CPU.",
]

# Per kind: the HF architecture and the sizes from which config.json and the tensors are built.
_LLAMA = {
    "hidden": 48,
    "layers": 3,
    "heads": 6,
    "kv_heads": 2,
    "head_dim": 8,
    "inter": 80,
    "theta": 1e4,
    "tied": False,
}
_SPECS = {
    "llama": dict(_LLAMA, model_type="llama", arch="LlamaForCausalLM"),
    "llama_tied": dict(
        _LLAMA,
        model_type="llama",
        arch="LlamaForCausalLM",
        heads=4,
        kv_heads=4,
        head_dim=12,
        theta=5e5,
        tied=True,
    ),
    "qwen2": dict(
        _LLAMA, model_type="qwen2", arch="Qwen2ForCausalLM", heads=6, kv_heads=3, theta=1e6, tied=True
    ),
    "mistral": dict(_LLAMA, model_type="mistral", arch="MistralForCausalLM"),
    "gpt2": {
        "model_type": "gpt2",
        "arch": "GPT2LMHeadModel",
        "hidden": 48,
        "layers": 2,
        "heads": 4,
        "tied": True,
    },
}


# The same kinds with every matmul's input width a multiple of 32 (llama.cpp's block), so that the int8 and q4
# formats quantize every matrix; the sizes above stay odd on purpose (the float32 fallback, and the goldens).
_ALIGNED = {"hidden": 64, "heads": 4, "head_dim": 16, "inter": 128}
_ALIGNED_SPECS = {
    "llama": dict(_SPECS["llama"], **_ALIGNED, kv_heads=2),
    "llama_tied": dict(_SPECS["llama_tied"], **_ALIGNED, kv_heads=4),
    "qwen2": dict(_SPECS["qwen2"], **_ALIGNED, kv_heads=2),
    "mistral": dict(_SPECS["mistral"], **_ALIGNED, kv_heads=2),
    "gpt2": dict(_SPECS["gpt2"], hidden=64, heads=4),
}


@functools.cache
def tiny_tokenizer_json() -> str:
    """Train (once per process) the tiny byte-level BPE and return its tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    return tok.to_str(pretty=True)


def tokenizer_vocab_size() -> int:
    return len(json.loads(tiny_tokenizer_json())["model"]["vocab"])


def _config(kind: str, spec: dict, vocab: int, dtype: str, rope_scaling: dict | None) -> dict:
    if kind == "gpt2":
        return {
            "architectures": [spec["arch"]],
            "model_type": "gpt2",
            "vocab_size": vocab,
            "n_embd": spec["hidden"],
            "n_head": spec["heads"],
            "n_layer": spec["layers"],
            "n_positions": MAX_POSITIONS,
            "n_ctx": MAX_POSITIONS,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "tie_word_embeddings": True,
            "torch_dtype": dtype,
        }
    config = {
        "architectures": [spec["arch"]],
        "model_type": spec["model_type"],
        "vocab_size": vocab,
        "hidden_size": spec["hidden"],
        "intermediate_size": spec["inter"],
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv_heads"],
        "head_dim": spec["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec["theta"],
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": spec["tied"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    if kind in ("llama", "llama_tied"):
        config.update(attention_bias=False, mlp_bias=False)
    if kind == "mistral":
        config["sliding_window"] = None
    if kind == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec["layers"])
    return config


def _llama_tensors(rng: np.random.Generator, spec: dict, vocab: int, bias: bool) -> dict[str, np.ndarray]:
    d, hd, inter = spec["hidden"], spec["head_dim"], spec["inter"]
    q_dim, kv_dim = spec["heads"] * hd, spec["kv_heads"] * hd

    def mat(n_out, n_in):  # HF nn.Linear layout [out, in], std 1/sqrt(fan_in) keeps activations O(1)
        return rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)

    def norm(n):
        return 1.0 + 0.1 * rng.standard_normal(n)

    t = {"model.embed_tokens.weight": 0.25 * rng.standard_normal((vocab, d))}
    for i in range(spec["layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(d)
        for name, n_out in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            t[p + f"self_attn.{name}.weight"] = mat(n_out, d)
            if bias:
                t[p + f"self_attn.{name}.bias"] = 0.1 * rng.standard_normal(n_out)
        t[p + "self_attn.o_proj.weight"] = mat(d, q_dim)
        t[p + "post_attention_layernorm.weight"] = norm(d)
        t[p + "mlp.gate_proj.weight"] = mat(inter, d)
        t[p + "mlp.up_proj.weight"] = mat(inter, d)
        t[p + "mlp.down_proj.weight"] = mat(d, inter)
    t["model.norm.weight"] = norm(d)
    if not spec["tied"]:
        t["lm_head.weight"] = mat(vocab, d)
    return t


def _gpt2_tensors(rng: np.random.Generator, spec: dict, vocab: int) -> dict[str, np.ndarray]:
    d = spec["hidden"]

    def conv1d(n_in, n_out):  # HF Conv1D layout [in, out] (transposed vs nn.Linear)
        return rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)

    def small(*shape):
        return 0.1 * rng.standard_normal(shape)

    def norm(n):
        return 1.0 + 0.1 * rng.standard_normal(n)

    t = {
        "transformer.wte.weight": 0.25 * rng.standard_normal((vocab, d)),
        "transformer.wpe.weight": small(MAX_POSITIONS, d),
    }
    for i in range(spec["layers"]):
        p = f"transformer.h.{i}."
        t[p + "ln_1.weight"], t[p + "ln_1.bias"] = norm(d), small(d)
        t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"] = conv1d(d, 3 * d), small(3 * d)
        t[p + "attn.c_proj.weight"], t[p + "attn.c_proj.bias"] = conv1d(d, d), small(d)
        t[p + "ln_2.weight"], t[p + "ln_2.bias"] = norm(d), small(d)
        t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"] = conv1d(d, 4 * d), small(4 * d)
        t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"] = conv1d(4 * d, d), small(d)
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = norm(d), small(d)
    return t


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest, ties to even (finite inputs)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _encode(x: np.ndarray, dtype: str) -> bytes:
    x32 = x.astype(np.float32)  # the float32 master copy; f16/bf16 are rounded from it
    if dtype == "float32":
        return x32.astype("<f4").tobytes()
    if dtype == "float16":
        return x32.astype("<f2").tobytes()
    return float32_to_bf16_bits(x32).astype("<u2").tobytes()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> int:
    """Write the safetensors format by hand: u64 header length, JSON header, raw little-endian data."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, x in tensors.items():
        blob = _encode(x, dtype)
        header[name] = {
            "dtype": DTYPES[dtype],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned, as the reference writer does
    Path(path).write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    return offset


def _write_weights(folder: Path, tensors: dict[str, np.ndarray], dtype: str, shards: int) -> None:
    if shards == 1:
        write_safetensors(folder / "model.safetensors", tensors, dtype)
        return
    names = list(tensors)
    bounds = np.linspace(0, len(names), shards + 1).round().astype(int)
    weight_map, total = {}, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[bounds[s] : bounds[s + 1]]}
        total += write_safetensors(folder / file, part, dtype)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_tokenizer(folder: Path, config: dict) -> None:
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json())
    bos, eos = SPECIAL_TOKENS[config["bos_token_id"]], SPECIAL_TOKENS[config["eos_token_id"]]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": eos,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))


def write_tiny_model(
    folder: str | Path,
    kind: str,
    seed: int = 0,
    dtype: str = "float32",
    shards: int = 1,
    rope_scaling: dict | None = None,
    aligned: bool = False,
    context: int = MAX_POSITIONS,
) -> dict:
    """Write a complete tiny Hugging Face model folder and return its config dict.

    Args:
        folder: Target directory (created if missing).
        kind: One of KINDS: "llama", "llama_tied", "qwen2", "mistral", "gpt2".
        seed: Seed of the weights (np.random.default_rng).
        dtype: Storage dtype of the safetensors: "float32", "float16" or "bfloat16".
        shards: 1 for model.safetensors, or N for model-0000i-of-0000N.safetensors plus an index.
        rope_scaling: Optional HF rope_scaling dict (e.g. {"rope_type": "llama3", ...}); llama family only.
        aligned: Widths that are multiples of 32 (hidden 64, intermediate 128), so that the int8 / q4 weight
            formats quantize every matrix; by default the widths are not (hidden 48: those stay float32).
        context: max_position_embeddings (llama family; GPT-2's learned positions stay MAX_POSITIONS).

    Returns:
        The dict written to config.json.
    """
    if kind not in _SPECS or dtype not in DTYPES:
        raise ValueError(f"unknown kind {kind!r} or dtype {dtype!r}")
    if rope_scaling is not None and kind == "gpt2":
        raise ValueError("gpt2 has no rope")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec, vocab = (_ALIGNED_SPECS if aligned else _SPECS)[kind], tokenizer_vocab_size()
    config = _config(kind, spec, vocab, dtype, rope_scaling)
    if kind != "gpt2":
        config["max_position_embeddings"] = context
    rng = np.random.default_rng(seed)
    if kind == "gpt2":
        tensors = _gpt2_tensors(rng, spec, vocab)
    else:
        tensors = _llama_tensors(rng, spec, vocab, bias=kind == "qwen2")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_weights(folder, tensors, dtype, shards)
    _write_tokenizer(folder, config)
    return config
