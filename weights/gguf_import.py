"""Import a llama-architecture GGUF file into a Hugging Face model folder (float32 safetensors)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# The one naming table: blk.{i}.<key>.weight -> model.layers.{i}.<value>.weight, plus the top-level tensors.
_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

Progress = Callable[[int, int, str], None]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py), kept here for tests."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk: back to HF's rotate_half layout (first half of each head, then second)."""
    # rows of a head are stored interleaved as (half, 2); HF wants (2, half)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def import_gguf(gguf_path: str | Path, out_dir: str | Path, progress: Progress | None = None) -> None:
    """Write config, float32 safetensors and tokenizer files for a llama GGUF into out_dir.

    Args:
        gguf_path: the GGUF file.
        out_dir: destination folder; must not exist or be empty.
        progress: optional callback ``progress(done, total, hf_tensor_name)``, called once per tensor.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    reader = gguf.GGUFReader(gguf_path)
    meta = _Meta(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' can be imported")

    config = _llama_config(meta, reader)
    tokenizer = _build_tokenizer(meta)  # before the tensors: fail fast on an unsupported tokenizer
    tensors = _read_tensors(reader, config, progress)

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    # save_file creates the file 0600; give it the same permissions as the other files
    (out / "model.safetensors").chmod((out / "config.json").stat().st_mode & 0o777)
    tokenizer.save(str(out / "tokenizer.json"))
    for name, obj in _tokenizer_side_files(meta, config).items():
        _write_json(out / name, obj)


class _Meta:
    """Read-only view of the GGUF key/value metadata."""

    def __init__(self, reader: gguf.GGUFReader):
        self._fields = reader.fields

    def get(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str):
        field = self._fields.get(key)
        if field is None:
            raise ValueError(f"GGUF metadata lacks {key!r}")
        return field.contents()


def _llama_config(meta: _Meta, reader: gguf.GGUFReader) -> dict:
    hidden = int(meta.need("llama.embedding_length"))
    n_head = int(meta.need("llama.attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_head))
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise ValueError("GGUF has key_length != value_length, which HF Llama cannot express")
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("GGUF uses partial rotary embeddings, which HF Llama cannot express")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"unsupported rope scaling {meta.get('llama.rope.scaling.type')!r}")
    if meta.get("llama.expert_count"):
        raise ValueError("mixture-of-experts llama GGUFs are not supported")
    n_vocab = meta.get("llama.vocab_size") or len(meta.need("tokenizer.ggml.tokens"))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta.need("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.need("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(meta.need("llama.context_length")),
        "vocab_size": int(n_vocab),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
    }


def _f32(x: float) -> float:
    """The shortest decimal that round-trips the stored float32: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(x)))


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_MAP:
        return _TOP_MAP[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_MAP:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.weight"


def _expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF shapes, [out_features, in_features], for every tensor the model must have."""
    d, ff, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], d)
    per_layer = {
        "input_layernorm": (d,),
        "post_attention_layernorm": (d,),
        "self_attn.q_proj": (q, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q),
        "mlp.gate_proj": (ff, d),
        "mlp.up_proj": (ff, d),
        "mlp.down_proj": (d, ff),
    }
    for i in range(c["num_hidden_layers"]):
        for short, shape in per_layer.items():
            shapes[f"model.layers.{i}.{short}.weight"] = shape
    return shapes


def _read_tensors(reader: gguf.GGUFReader, config: dict, progress: Progress | None) -> dict[str, np.ndarray]:
    expected = _expected_shapes(config)
    out: dict[str, np.ndarray] = {}
    total = len(reader.tensors)
    for done, t in enumerate(reader.tensors, 1):
        name = _hf_name(t.name)
        if name not in expected or name in out:
            raise ValueError(f"unexpected or duplicate GGUF tensor {t.name!r}")
        # numpy order is GGUF's ne reversed, already HF's: (out_features, in_features), e.g. q (n_head*head_dim, dim)
        w = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if w.shape != expected[name]:
            raise ValueError(f"{t.name}: shape {w.shape}, expected {expected[name]}")
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
        if progress is not None:
            progress(done, total, name)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"GGUF lacks tensors for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return out


def _build_tokenizer(meta: _Meta) -> Tokenizer:
    """A byte-level BPE tokenizer.json equivalent to llama.cpp's reading of the GGUF vocabulary."""
    kind = meta.need("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE ('gpt2') is")
    tokens = meta.need("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ")) for m in meta.need("tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError("GGUF merges must be 'left right' pairs")

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated string (rare) encodes to its first id
    tk = Tokenizer(
        models.BPE(vocab, merges, unk_token=None, fuse_unk=False, byte_fallback=False, ignore_merges=False)
    )
    tk.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = _post_processor(meta, tokens)

    # Control tokens are matched before BPE and skipped by decode(skip_special_tokens=True).
    special = [
        AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == _USER_DEFINED
    ]
    tk.add_special_tokens(special)
    tk.add_tokens(user)
    for i, t in enumerate(types):
        if t in (_CONTROL, _USER_DEFINED) and tk.token_to_id(tokens[i]) != i:
            raise ValueError(f"added token {tokens[i]!r} did not keep its id {i}")
    return tk


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":
        # As in SmolLM2's own tokenizer.json: each digit is its own pre-token.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: smollm, gpt2, default)")


def _post_processor(meta: _Meta, tokens: list[str]) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if not (add_bos or add_eos):
        return byte_level
    # encode(..., add_special_tokens=True) must add BOS/EOS itself, as llama.cpp does
    specials, pre, post = [], [], []
    if add_bos:
        bos = int(meta.need("tokenizer.ggml.bos_token_id"))
        specials.append((tokens[bos], bos))
        pre.append(tokens[bos])
    if add_eos:
        eos = int(meta.need("tokenizer.ggml.eos_token_id"))
        specials.append((tokens[eos], eos))
        post.append(tokens[eos])
    single = " ".join([*pre, "$A", *post])
    pair = " ".join([*pre, "$A", *post, *(f"{t}:1" for t in pre), "$B:1", *(f"{t}:1" for t in post)])
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return processors.Sequence([byte_level, template])


def _tokenizer_side_files(meta: _Meta, config: dict) -> dict[str, dict]:
    tokens = meta.need("tokenizer.ggml.tokens")

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    keys = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}
    specials = {f"{hf}_token": tok(gg) for hf, gg in keys.items()}
    specials = {k: v for k, v in specials.items() if v is not None}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template
    generation = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None
    }
    return {
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": specials,
        "generation_config.json": generation,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
