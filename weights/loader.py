"""Load a Hugging Face model folder (config.json + *.safetensors) into plain float32 arrays.

All Hugging Face tensor naming lives in the two name tables below. Every tensor is checked for presence,
shape and dtype against the config before anything runs, so a bad checkpoint fails here with the tensor and
the file named, never deep inside a kernel. Weights are fused where the kernels want one matmul instead of
several (q/k/v, gate/up), and kept C-contiguous float32. The token embedding table is mapped from its file
rather than copied: a step looks up a few of its rows, so the rest never takes memory.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from nextword.weights.config import ModelConfig, ModelError, read_config
from nextword.weights.quant_cache import QuantizedMatrices
from nextword.weights.quantize import check_format

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # BF16: widened by hand (numpy has no bf16)


@dataclass(frozen=True)
class LlamaLayer:
    attn_norm: np.ndarray  # [D]
    qkv: np.ndarray  # [q_dim + 2*kv_dim, D]  q, k and v projections stacked
    qkv_bias: np.ndarray | None  # [q_dim + 2*kv_dim] (qwen2)
    o: np.ndarray  # [D, q_dim]
    mlp_norm: np.ndarray  # [D]
    gate_up: np.ndarray  # [2F, D]  gate then up projection
    down: np.ndarray  # [D, F]


@dataclass(frozen=True)
class GPT2Layer:
    ln1_weight: np.ndarray  # [D]
    ln1_bias: np.ndarray  # [D]
    qkv: np.ndarray  # [3D, D]  (Conv1D weights transposed to [out, in])
    qkv_bias: np.ndarray  # [3D]
    o: np.ndarray  # [D, D]
    o_bias: np.ndarray  # [D]
    ln2_weight: np.ndarray  # [D]
    ln2_bias: np.ndarray  # [D]
    fc: np.ndarray  # [F, D]
    fc_bias: np.ndarray  # [F]
    proj: np.ndarray  # [D, F]
    proj_bias: np.ndarray  # [D]


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    embed: np.ndarray  # [V, D]
    layers: tuple  # LlamaLayer or GPT2Layer, one per layer
    final_norm: np.ndarray  # [D]
    lm_head: np.ndarray  # [V, D]  (the same array as `embed` when tied)
    positions: np.ndarray | None = None  # [P, D]  learned positions (gpt2)
    final_norm_bias: np.ndarray | None = None  # [D] (gpt2)

    @property
    def nbytes(self) -> int:
        """Bytes of all weights as stored (quantized matrices count their blocks)."""
        arrays = [self.embed, self.final_norm, self.positions, self.final_norm_bias]
        if self.lm_head is not self.embed:
            arrays.append(self.lm_head)
        arrays += [a for layer in self.layers for a in vars(layer).values()]
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def num_parameters(self) -> int:
        c = self.config
        tied = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
        layers = [a for layer in self.layers for a in vars(layer).values() if a is not None]
        extra = [self.embed, self.final_norm, self.positions, self.final_norm_bias]
        return tied + sum(int(np.prod(a.shape)) for a in layers + [e for e in extra if e is not None])


def llama_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> expected shape, for the Llama family."""
    D, F = c.hidden_size, c.intermediate_size
    names = {"model.embed_tokens.weight": (c.vocab_size, D), "model.norm.weight": (D,)}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = (c.vocab_size, D)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        names |= {
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (c.q_dim, D),
            p + "self_attn.k_proj.weight": (c.kv_dim, D),
            p + "self_attn.v_proj.weight": (c.kv_dim, D),
            p + "self_attn.o_proj.weight": (D, c.q_dim),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        }
        if c.qkv_bias:
            names |= {
                p + "self_attn.q_proj.bias": (c.q_dim,),
                p + "self_attn.k_proj.bias": (c.kv_dim,),
                p + "self_attn.v_proj.bias": (c.kv_dim,),
            }
    return names


def gpt2_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name (without the optional `transformer.` prefix) -> expected shape, for GPT-2."""
    D, F = c.hidden_size, c.intermediate_size
    names = {
        "wte.weight": (c.vocab_size, D),
        "wpe.weight": (c.max_position_embeddings, D),
        "ln_f.weight": (D,),
        "ln_f.bias": (D,),
    }
    for i in range(c.num_layers):
        p = f"h.{i}."
        names |= {
            p + "ln_1.weight": (D,),
            p + "ln_1.bias": (D,),
            p + "attn.c_attn.weight": (D, 3 * D),  # Conv1D: [in, out]
            p + "attn.c_attn.bias": (3 * D,),
            p + "attn.c_proj.weight": (D, D),
            p + "attn.c_proj.bias": (D,),
            p + "ln_2.weight": (D,),
            p + "ln_2.bias": (D,),
            p + "mlp.c_fc.weight": (D, F),
            p + "mlp.c_fc.bias": (F,),
            p + "mlp.c_proj.weight": (F, D),
            p + "mlp.c_proj.bias": (D,),
        }
    return names


class TensorFiles:
    """The tensors of one or several safetensors files, by name, with their headers validated."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{folder}: no *.safetensors files")
        self.where: dict[str, Path] = {}
        self.info: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (dtype, shape)
        self.mapped: dict[Path, mmap.mmap] = {}
        for path in files:
            try:
                with safe_open(path, framework="numpy") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        s = f.get_slice(name)
                        self.where[name] = path
                        self.info[name] = (s.get_dtype(), tuple(s.get_shape()))
            except (SafetensorError, OSError) as e:
                raise ModelError(f"{path}: not a readable safetensors file ({e})") from None

    def check(self, expected: dict[str, tuple[int, ...]], rename: Callable[[str], str]) -> None:
        for name, shape in expected.items():
            stored = rename(name)
            if stored not in self.info:
                raise ModelError(f"missing tensor {stored!r} (expected shape {list(shape)})")
            dtype, actual = self.info[stored]
            if actual != shape:
                raise ModelError(
                    f"tensor {stored!r} in {self.where[stored].name} has shape {list(actual)}, "
                    f"expected {list(shape)} from config.json"
                )
            if dtype not in DTYPES:
                raise ModelError(
                    f"tensor {stored!r} in {self.where[stored].name} has unsupported dtype {dtype}"
                )

    def read(self, name: str) -> np.ndarray:
        """The tensor as C-contiguous float32."""
        path, (dtype, shape) = self.where[name], self.info[name]
        if dtype == "BF16":
            return read_bf16(path, name, shape)
        with safe_open(path, framework="numpy") as f:
            return np.ascontiguousarray(f.get_tensor(name), dtype=np.float32)

    def map(self, name: str) -> np.ndarray:
        """The tensor mapped from its file instead of copied, when it is stored as aligned float32 (else as
        `read` gives it). Its pages are read on first use and stay reclaimable page cache: a table used a few
        rows at a time (token embeddings) keeps its untouched rows out of memory."""
        path, (dtype, shape) = self.where[name], self.info[name]
        if dtype != "F32":
            return self.read(name)
        start, end = data_span(path, name)
        if start % 4:
            return self.read(name)
        if path not in self.mapped:
            with open(path, "rb") as f:  # private (copy-on-write) mapping: a writable array for the kernels
                self.mapped[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return np.frombuffer(self.mapped[path], dtype="<f4", count=(end - start) // 4, offset=start).reshape(
            shape
        )

    def drop_resident_pages(self) -> None:
        """Forget the mapped pages read so far (quantizing a tied head reads the whole table): only what is
        used from now on comes back, from the page cache. Nothing writes to mapped tensors, so nothing is lost."""
        for mapping in self.mapped.values():
            mapping.madvise(mmap.MADV_DONTNEED)


def data_span(path: Path, name: str) -> tuple[int, int]:
    """Byte offsets [start, end) of a tensor's data in its safetensors file (the header was validated)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        start, end = json.loads(f.read(header_len))[name]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + end


def read_bf16(path: Path, name: str, shape: tuple[int, ...]) -> np.ndarray:
    # bfloat16 is the top half of a float32: widen the raw bits.
    start, end = data_span(path, name)
    with open(path, "rb") as f:
        f.seek(start)
        bits = np.frombuffer(f.read(end - start), dtype="<u2")
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def load_checkpoint(folder: str | Path, weights: str = "f32") -> Checkpoint:
    """Read and validate a Hugging Face model folder, its matmul weights in format `weights` (f32, int8 or
    q4: see nextword.weights.quantize). Quantized weights come from the folder's cache of them when it is
    valid (nextword.weights.quant_cache: mapped, no float32 matrix read); otherwise each matrix is quantized
    as soon as it is read, so the float32 copy of the whole model never exists at once, and the cache is
    written. Raises ModelError naming what is wrong."""
    check_format(weights)
    folder = Path(folder)
    config = read_config(folder)
    files = TensorFiles(folder)
    matrices = QuantizedMatrices(folder, weights, sorted(set(files.where.values())))
    try:
        load = _load_gpt2 if config.family == "gpt2" else _load_llama
        checkpoint = load(config, files, matrices)
    except ModelError as e:
        raise ModelError(f"{folder}: {e}") from None
    matrices.save()
    files.drop_resident_pages()
    return checkpoint


def _load_llama(c: ModelConfig, files: TensorFiles, matrices: QuantizedMatrices) -> Checkpoint:
    files.check(llama_tensors(c), rename=lambda n: n)
    t = files.read

    def layer(i: int) -> LlamaLayer:
        p = f"model.layers.{i}."
        m = lambda name, read: matrices.get(f"layers.{i}.{name}", read)
        bias = None
        if c.qkv_bias:
            bias = np.concatenate([t(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        return LlamaLayer(
            attn_norm=t(p + "input_layernorm.weight"),
            qkv=m("qkv", lambda: np.concatenate([t(p + f"self_attn.{x}_proj.weight") for x in "qkv"])),
            qkv_bias=bias,
            o=m("o", lambda: t(p + "self_attn.o_proj.weight")),
            mlp_norm=t(p + "post_attention_layernorm.weight"),
            gate_up=m(
                "gate_up",
                lambda: np.concatenate([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")]),
            ),
            down=m("down", lambda: t(p + "mlp.down_proj.weight")),
        )

    embed = files.map("model.embed_tokens.weight")  # looked up by rows: mapped, not copied
    head = (lambda: embed) if c.tie_word_embeddings else (lambda: t("lm_head.weight"))
    return Checkpoint(
        config=c,
        embed=embed,
        layers=tuple(layer(i) for i in range(c.num_layers)),
        final_norm=t("model.norm.weight"),
        lm_head=matrices.get("lm_head", head, head=True),
    )


def _load_gpt2(c: ModelConfig, files: TensorFiles, matrices: QuantizedMatrices) -> Checkpoint:
    prefixed = "transformer.wte.weight" in files.info

    def rename(name: str) -> str:
        return "transformer." + name if prefixed else name

    files.check(gpt2_tensors(c), rename)

    def t(name: str) -> np.ndarray:
        return files.read(rename(name))

    def conv1d(name: str) -> np.ndarray:  # Conv1D stores [in, out]; kernels want [out, in]
        return np.ascontiguousarray(t(name).T)

    def layer(i: int) -> GPT2Layer:
        p = f"h.{i}."
        m = lambda name, read: matrices.get(f"layers.{i}.{name}", read)
        return GPT2Layer(
            ln1_weight=t(p + "ln_1.weight"),
            ln1_bias=t(p + "ln_1.bias"),
            qkv=m("qkv", lambda: conv1d(p + "attn.c_attn.weight")),
            qkv_bias=t(p + "attn.c_attn.bias"),
            o=m("o", lambda: conv1d(p + "attn.c_proj.weight")),
            o_bias=t(p + "attn.c_proj.bias"),
            ln2_weight=t(p + "ln_2.weight"),
            ln2_bias=t(p + "ln_2.bias"),
            fc=m("fc", lambda: conv1d(p + "mlp.c_fc.weight")),
            fc_bias=t(p + "mlp.c_fc.bias"),
            proj=m("proj", lambda: conv1d(p + "mlp.c_proj.weight")),
            proj_bias=t(p + "mlp.c_proj.bias"),
        )

    embed = files.map(rename("wte.weight"))  # looked up by rows: mapped, not copied
    return Checkpoint(
        config=c,
        embed=embed,
        layers=tuple(layer(i) for i in range(c.num_layers)),
        final_norm=t("ln_f.weight"),
        final_norm_bias=t("ln_f.bias"),
        lm_head=matrices.get("lm_head", lambda: embed, head=True),
        positions=t("wpe.weight"),
    )
