"""The model as the engine sees it: weights + RoPE tables + a forward pass over a ragged batch.

A `Batch` is every new token of every scheduled sequence, flattened: a whole prompt (or a chunk of it) for a
sequence in prefill, one token for a sequence in decode. Batch size 1 is just a batch. The forward returns
logits only for the rows asked for (usually each sequence's last new token).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from nextword.weights.config import rope_tables
from nextword.weights.loader import Checkpoint


@dataclass(frozen=True)
class Batch:
    token_ids: np.ndarray  # [T] int64  new tokens, sequence after sequence
    positions: np.ndarray  # [T] int64  position of each token in its sequence
    token_seq: np.ndarray  # [T] int64  row of block_tables that each token belongs to
    slots: np.ndarray  # [T] int64  KV-cache slot (block * block_size + offset) of each token
    block_tables: np.ndarray  # [S, max_blocks] int32  each sequence's cache blocks, in order
    logits_rows: np.ndarray  # [R] int64  token rows whose next-token logits are wanted
    decode_tokens: int = 0  # the first rows are decode tokens (one per sequence), the rest prompt tokens

    @classmethod
    def build(
        cls, seqs: list[tuple[list[int], int, list[int], str]], block_size: int, decode_tokens: int = 0
    ):
        """seqs: (new token ids, position of the first one, cache blocks, logits wanted) per sequence, where
        logits wanted is "last" (the next-token distribution), "all" (every new position) or "none".
        decode_tokens: how many of the first sequences are decoding (one new token each, listed first)."""
        ids, pos, seq_of, slots, rows = [], [], [], [], []
        width = max(len(blocks) for _, _, blocks, _ in seqs)
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        row = 0  # first row of the current sequence's tokens
        for s, (new, start, blocks, wanted) in enumerate(seqs):
            tables[s, : len(blocks)] = blocks
            p = np.arange(start, start + len(new), dtype=np.int64)
            ids.append(np.asarray(new, dtype=np.int64))
            pos.append(p)
            seq_of.append(np.full(len(new), s, dtype=np.int64))
            slots.append(np.asarray(blocks, dtype=np.int64)[p // block_size] * block_size + p % block_size)
            if wanted == "all":
                rows.append(np.arange(row, row + len(new)))
            elif wanted == "last":
                rows.append(np.array([row + len(new) - 1]))
            row += len(new)
        cat = np.concatenate
        logits_rows = cat(rows).astype(np.int64) if rows else np.zeros(0, dtype=np.int64)
        return cls(cat(ids), cat(pos), cat(seq_of), cat(slots), tables, logits_rows, decode_tokens)


KV_DTYPES = {"f32": np.float32, "f16": np.uint16}  # f16: float16 bits, converted by the attention kernels


class KVCache:
    """The cache storage of every layer: a pool of `num_blocks` blocks of `block_size` positions, each holding
    its keys and values in float32 or float16 (`dtype`: f32 or f16; f16 halves what attention reads)."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype="f32"
    ):
        if dtype not in KV_DTYPES:
            raise ValueError(f"KV-cache dtype {dtype!r}: choose one of {', '.join(KV_DTYPES)}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [_lazy_zeros(shape, KV_DTYPES[dtype]) for _ in range(num_layers)]
        self.v = [_lazy_zeros(shape, KV_DTYPES[dtype]) for _ in range(num_layers)]
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype

    def copy_positions(self, src_block: int, dst_block: int, n: int) -> None:
        """Copy the keys and values of the first n positions of one block into another, in every layer."""
        for cache in (*self.k, *self.v):
            cache[dst_block, :n] = cache[src_block, :n]

    @property
    def bytes_per_token(self) -> int:
        return 2 * len(self.k) * self.k[0][0, 0].nbytes


def _lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros in fresh anonymous memory: a page becomes resident only once written, so a large cache costs
    only what is used. (np.zeros may instead reuse heap memory, which it must clear, i.e. touch.)"""
    count = int(np.prod(shape))
    nbytes = count * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=count).reshape(shape)


class Model:
    """A loaded checkpoint ready to run: `forward(cache, batch) -> logits [R, V]`."""

    def __init__(self, checkpoint: Checkpoint, max_positions: int | None = None):
        self.checkpoint = checkpoint
        self.config = c = checkpoint.config
        self.max_positions = min(max_positions or c.max_position_embeddings, c.max_position_embeddings)
        if c.family == "llama":
            from nextword.kernels import llama

            self.rope_cos, self.rope_sin = rope_tables(c, self.max_positions)
            self._forward = llama.forward
        else:
            from nextword.kernels import gpt2

            self._forward = gpt2.forward

    def new_cache(self, num_blocks: int, block_size: int, dtype: str = "f32") -> KVCache:
        c = self.config
        return KVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype)

    def forward(self, cache: KVCache, batch: Batch, out: np.ndarray | None = None) -> np.ndarray:
        """Logits [R, V] for batch.logits_rows, written into `out` [R, V] float32 if given: a caller that steps
        many times reuses one (a fresh [16, 49152] array costs ~800 page faults, ~0.5 ms, every step)."""
        return self._forward(self, cache, batch, out)
