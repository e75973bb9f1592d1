"""The model configuration: one frozen dataclass read from a Hugging Face `config.json`.

Hugging Face spells the same quantity differently per architecture (`hidden_size` vs `n_embd`); this module
is the one place that knows the spellings. Everything downstream sees `ModelConfig` only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# model_type -> the forward pass family that runs it
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}


class ModelError(ValueError):
    """A model folder that cannot be loaded: the message says which file and what is wrong."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # as in config.json: llama, mistral, qwen2, gpt2
    vocab_size: int
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # Hkv (< H with grouped-query attention)
    head_dim: int  # Dh
    intermediate_size: int  # F, the feed-forward width
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # qwen2 (and gpt2) add biases to q/k/v
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, object], ...] = ()  # config.json's rope_scaling dict, frozen
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise ModelError(
                f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
            )
        try:
            if model_type == "gpt2":
                return cls._from_gpt2(d)
            return cls._from_llama(d)
        except KeyError as e:
            raise ModelError(f"{source}: missing key {e.args[0]!r} for model_type {model_type!r}") from None

    @classmethod
    def _from_llama(cls, d: dict) -> ModelConfig:
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        scaling = d.get("rope_scaling") or {}
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("default", "linear", "llama3"):
                raise ModelError(f"config.json: unsupported rope_scaling type {kind!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ModelError(f"config.json: unsupported hidden_act {d['hidden_act']!r} (only silu)")
        return cls(
            model_type=d["model_type"],
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=d["intermediate_size"],
            norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=d["model_type"] == "qwen2" or bool(d.get("attention_bias", False)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=tuple(sorted(scaling.items())),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_ids(d.get("eos_token_id")),
        )

    @classmethod
    def _from_gpt2(cls, d: dict) -> ModelConfig:
        dim, heads = d["n_embd"], d["n_head"]
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ModelError(f"config.json: unsupported activation_function {d['activation_function']!r}")
        return cls(
            model_type="gpt2",
            vocab_size=d["vocab_size"],
            hidden_size=dim,
            num_layers=d["n_layer"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=dim // heads,
            intermediate_size=d.get("n_inner") or 4 * dim,
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            max_position_embeddings=d.get("n_positions", 1024),
            tie_word_embeddings=True,
            qkv_bias=True,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_ids(d.get("eos_token_id")),
        )


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def read_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()), source=str(path))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON: {e}") from None


def rope_tables(config: ModelConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: float32 [max_positions, head_dim / 2] for Hugging Face's rotate-half RoPE.

    Computed in float64 and rounded once, so the tables are as exact as float32 allows.
    """
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-np.arange(half, dtype=np.float64) * 2 / config.head_dim)  # [half]
    inv_freq = _scale_frequencies(inv_freq, dict(config.rope_scaling))
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)  # [P, half]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _scale_frequencies(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return np.where(
            wavelen > old_context / low,
            inv_freq / factor,
            np.where(wavelen < old_context / high, inv_freq, blended),
        )
    return inv_freq
