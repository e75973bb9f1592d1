"""Looking inside the model: the numbers the serving forward computes and throws away.

`forward(model, ids, ...)` runs ONE sequence through the model, all positions at once (causal), with the same
kernels as the serving forward passes, and keeps what was asked for: the residual stream after chosen layers,
the attention weights of chosen layers (computed by `attention_weights`, the one kernel of this file), the
last hidden state after the final norm, the last position's logits. There is no KV cache to manage: each
layer's keys and values go to a one-block scratch cache that the next layer reuses.

On top of it: `embed` (per-token and sentence embeddings), `attention` (one layer/head, or means over them)
and `nearest_tokens` (cosine search over the input embedding table, for word analogies).

Like the forward passes, these touch the model's weights: in the server they run on the engine thread only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numba import njit, prange

from nextword.kernels import FASTMATH
from nextword.kernels.attention import CONTEXT_CHUNK, cache_write, paged_attention, rope_qk
from nextword.kernels.elementwise import add, add_bias, add_embedding, embedding, gelu_tanh, swiglu
from nextword.kernels.matmul import linear
from nextword.kernels.norms import layernorm, rmsnorm


@njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def attention_weights(out, qkv, scale, n_heads, n_kv_heads):
    """The causal softmax weights of one layer: out[h, t, s] = softmax over s <= t of q[t, h] . k[s, h // group]
    * scale, and exactly 0 for s > t (a token never sees later ones).

    out: [H, T, T]; qkv: [T, (H + 2 Hkv) * Dh], the layer's projections (RoPE already applied).
    Row t of head h sums to 1. One work item per (head, query token).
    """
    H, T = out.shape[0], out.shape[1]
    head_dim = qkv.shape[1] // (n_heads + 2 * n_kv_heads)
    group = n_heads // n_kv_heads
    k0 = n_heads * head_dim
    for item in prange(H * T):
        h, t = item // T, item % T
        q0, kh = h * head_dim, k0 + (h // group) * head_dim
        m = np.float32(-3.0e38)
        for s in range(t + 1):
            acc = np.float32(0.0)
            for i in range(head_dim):
                acc += qkv[t, q0 + i] * qkv[s, kh + i]
            acc *= scale
            out[h, t, s] = acc
            m = max(m, acc)
        total = np.float32(0.0)
        for s in range(t + 1):
            e = np.exp(out[h, t, s] - m)
            out[h, t, s] = e
            total += e
        inv = np.float32(1.0) / total
        for s in range(t + 1):
            out[h, t, s] *= inv
        for s in range(t + 1, T):
            out[h, t, s] = np.float32(0.0)


R = TypeVar("R")


@dataclass(frozen=True)
class Inspection:
    """What one inspection forward kept."""

    hidden: dict[int, np.ndarray]  # layer k -> [T, D] the residual stream after layer k (0: embedding rows)
    final: np.ndarray | None  # [T, D] the last hidden state after the final norm (what the LM head reads)
    logits: np.ndarray | None  # [V] the next-token logits after the last position


def finish(chunks: Generator[None, None, R]) -> R:
    """Run a chunked computation (a generator, see `forward_chunks`) to its end; its return value."""
    while True:
        try:
            next(chunks)
        except StopIteration as done:
            return done.value


def forward(model, token_ids, **kwargs) -> Inspection:
    """`forward_chunks` run to its end."""
    return finish(forward_chunks(model, token_ids, **kwargs))


def forward_chunks(
    model,
    token_ids,
    *,
    hidden_layers: Iterable[int] = (),
    attention_layers: Iterable[int] = (),
    on_attention: Callable[[int, np.ndarray], None] | None = None,
    final: bool = True,
    logits: bool = False,
) -> Generator[None, None, Inspection]:
    """Run one sequence through `model` (a nextword.kernels.model.Model), keeping what is asked for.

    A generator that yields after each layer and returns the Inspection: the server's engine thread runs
    it a few layers at a time between its steps (a 1,024-token forward is seconds of work).

    Args:
        token_ids: the sequence, 1 to model.max_positions ids.
        hidden_layers: layers k (0..L) whose residual stream to keep: 0 is each token's row of the input
            embedding table (for GPT-2 before the learned position is added), k >= 1 is after layer k.
        attention_layers: layers k (1..L) whose attention weights to compute: on_attention(k, weights) is
            called with weights [H, T, T] (row = query token); the buffer is reused, copy what you keep.
        final: keep the last hidden state after the final norm. Without it (and without logits) the forward
            stops after the last layer asked for.
        logits: compute the next-token logits of the last position.
    """
    ckpt, c = model.checkpoint, model.config
    ids = np.ascontiguousarray(token_ids, dtype=np.int64)
    T, L = len(ids), c.num_layers
    if not 1 <= T <= model.max_positions:
        raise ValueError(f"{T} tokens: the inspection forward takes 1 to {model.max_positions}")
    keep, watch = set(hidden_layers), set(attention_layers)
    if not keep <= set(range(L + 1)) or not watch <= set(range(1, L + 1)):
        raise ValueError(f"layers out of range: hidden {sorted(keep)} (0..{L}), attention {sorted(watch)}")
    if watch and on_attention is None:
        raise ValueError("attention_layers needs on_attention")
    last = L if (final or logits) else max(keep | watch, default=0)

    H, Hkv, Dh = c.num_heads, c.num_kv_heads, c.head_dim
    llama = c.family == "llama"
    scale = np.float32(1.0 / np.sqrt(Dh))
    positions = np.arange(T, dtype=np.int64)  # also each token's slot in the scratch cache
    k_cache = np.empty((1, T, Hkv, Dh), dtype=np.float32)  # one block of T positions, reused by every layer
    v_cache = np.empty_like(k_cache)
    block_table = np.zeros((1, 1), dtype=np.int32)  # [S=1, 1]: the sequence owns block 0
    token_seq = np.zeros(T, dtype=np.int64)  # every token belongs to sequence 0

    x = np.empty((T, c.hidden_size), dtype=np.float32)  # [T, D] the residual stream
    h = np.empty_like(x)  # [T, D] normalized input / block output
    qkv = np.empty((T, c.q_dim + 2 * c.kv_dim), dtype=np.float32)  # [T, (H + 2 Hkv) Dh]
    att = np.empty((T, c.q_dim), dtype=np.float32)  # [T, H Dh]
    ff = np.empty((T, (2 if llama else 1) * c.intermediate_size), dtype=np.float32)  # [T, 2F] or [T, F]
    act = np.empty((T, c.intermediate_size), dtype=np.float32) if llama else None  # [T, F]
    weights = np.empty((H, T, T), dtype=np.float32) if watch else None  # [H, T, T]

    hidden = {}
    embedding(x, ckpt.embed, ids)
    if 0 in keep:
        hidden[0] = x.copy()
    if not llama:
        add_embedding(x, ckpt.positions, positions)
    for k, layer in enumerate(ckpt.layers[:last], start=1):
        # attention block: x += o(attention(qkv(norm(x))))
        if llama:
            rmsnorm(h, x, layer.attn_norm, c.norm_eps)
            linear(qkv, h, layer.qkv)
            if layer.qkv_bias is not None:
                add_bias(qkv, layer.qkv_bias)
            rope_qk(qkv, positions, model.rope_cos, model.rope_sin, H, Hkv, Dh)
        else:
            layernorm(h, x, layer.ln1_weight, layer.ln1_bias, c.norm_eps)
            linear(qkv, h, layer.qkv)
            add_bias(qkv, layer.qkv_bias)
        if k in watch:
            attention_weights(weights, qkv, scale, H, Hkv)
            on_attention(k, weights)
        cache_write(k_cache, v_cache, qkv, positions, H, Hkv, Dh)
        paged_attention(
            att, qkv, k_cache, v_cache, block_table, token_seq, positions, scale, H, Hkv, 0, CONTEXT_CHUNK
        )
        linear(h, att, layer.o)
        if not llama:
            add_bias(h, layer.o_bias)
        add(x, h)
        # feed-forward block: x += down(act(up(norm(x))))
        if llama:
            rmsnorm(h, x, layer.mlp_norm, c.norm_eps)
            linear(ff, h, layer.gate_up)
            swiglu(act, ff)
            linear(h, act, layer.down)
        else:
            layernorm(h, x, layer.ln2_weight, layer.ln2_bias, c.norm_eps)
            linear(ff, h, layer.fc)
            add_bias(ff, layer.fc_bias)
            gelu_tanh(ff)
            linear(h, ff, layer.proj)
            add_bias(h, layer.proj_bias)
        add(x, h)
        if k in keep:
            hidden[k] = x.copy()
        yield

    out_final = out_logits = None
    if final or logits:
        out_final = np.empty_like(x)  # [T, D]
        if llama:
            rmsnorm(out_final, x, ckpt.final_norm, c.norm_eps)
        else:
            layernorm(out_final, x, ckpt.final_norm, ckpt.final_norm_bias, c.norm_eps)
    if logits:
        row = np.ascontiguousarray(out_final[-1:])  # [1, D]
        out_logits = np.empty((1, c.vocab_size), dtype=np.float32)  # [1, V]
        linear(out_logits, row, ckpt.lm_head, tiled=False)  # as the engine computes a prompt's logits
        out_logits = out_logits[0]
    return Inspection(hidden, out_final if final else None, out_logits)


def embed(model, token_ids, layer: int | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Embeddings of one text: (per-token vectors [T, D] at `layer` as in `forward`'s hidden_layers, or None
    when layer is None; the sentence embedding [D]: the mean over the tokens of the last hidden state after
    the final norm, scaled to unit length)."""
    return finish(embed_chunks(model, token_ids, layer))


def embed_chunks(model, token_ids, layer: int | None = None):
    """`embed`, one layer per chunk (see `forward_chunks`)."""
    run = yield from forward_chunks(model, token_ids, hidden_layers=() if layer is None else (layer,))
    mean = run.final.mean(axis=0, dtype=np.float64)  # [D]
    norm = np.linalg.norm(mean)
    sentence = (mean / norm if norm > 0 else mean).astype(np.float32)
    return (None if layer is None else run.hidden[layer]), sentence


def attention(model, token_ids, layer: int | None = None, head: int | None = None) -> np.ndarray:
    """Attention weights [T, T] (row = query token, each row sums to 1, causal) of layer `layer` (1..L) and
    query head `head` (0..H-1); None for either means the mean over all layers / all heads."""
    return finish(attention_chunks(model, token_ids, layer, head))


def attention_chunks(model, token_ids, layer: int | None = None, head: int | None = None):
    """`attention`, one layer per chunk (see `forward_chunks`)."""
    c = model.config
    if head is not None and not 0 <= head < c.num_heads:
        raise ValueError(f"head {head} is not in 0..{c.num_heads - 1}")
    layers = range(1, c.num_layers + 1) if layer is None else (layer,)
    T = len(token_ids)
    total = np.zeros((T, T), dtype=np.float64)  # [T, T] summed in float64: 30 layers x 9 heads

    def visit(k: int, weights: np.ndarray) -> None:  # weights [H, T, T]
        if head is None:
            total[:] += weights.sum(axis=0, dtype=np.float64) / weights.shape[0]
        else:
            total[:] += weights[head]

    yield from forward_chunks(model, token_ids, attention_layers=layers, on_attention=visit, final=False)
    return (total / len(layers)).astype(np.float32)


def embedding_rows(model, token_ids) -> np.ndarray:
    """The rows of the input embedding table for these tokens: [n, D]."""
    table = model.checkpoint.embed
    ids = np.ascontiguousarray(token_ids, dtype=np.int64)
    out = np.empty((len(ids), table.shape[1]), dtype=np.float32)
    embedding(out, table, ids)
    return out


def token_sum(model, token_ids, weights) -> np.ndarray:
    """sum over i of weights[i] x the input embedding row of token_ids[i]: the query of an analogy. [D]"""
    rows = embedding_rows(model, token_ids).astype(np.float64)  # [n, D]
    return (np.asarray(weights, dtype=np.float64) @ rows).astype(np.float32)


def nearest_tokens(
    model, query: np.ndarray, top_n: int, exclude: Iterable[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """The `top_n` tokens whose input embeddings have the largest cosine similarity to `query` [D], leaving
    out `exclude`. Returns (token ids [n] int64, cosines [n] float32), most similar first."""
    table = model.checkpoint.embed  # [V, D] float32: looked up, never quantized
    q = np.ascontiguousarray(query, dtype=np.float32)[None, :]  # [1, D]
    dots = np.empty((1, table.shape[0]), dtype=np.float32)  # [1, V]
    linear(dots, q, table)
    qnorm = np.float32(np.linalg.norm(q))
    cos = dots[0] / np.maximum(_row_norms(table) * qnorm, np.float32(1e-30))  # [V]
    cos[np.fromiter(exclude, dtype=np.int64)] = -np.inf  # cos is a fresh array: the table stays untouched
    n = min(top_n, len(cos))
    best = np.argpartition(-cos, n - 1)[:n]
    best = best[np.argsort(-cos[best], kind="stable")]
    return best.astype(np.int64), cos[best]


def cosine(model, query: np.ndarray, token_ids) -> np.ndarray:
    """Cosine similarity of `query` [D] to the input embeddings of these tokens: [n] float32."""
    rows = embedding_rows(model, token_ids).astype(np.float64)  # [n, D]
    q = np.asarray(query, dtype=np.float64)
    denom = np.maximum(np.linalg.norm(rows, axis=1) * np.linalg.norm(q), 1e-30)
    return (rows @ q / denom).astype(np.float32)


_norms: dict[int, np.ndarray] = {}  # id(table) -> its row norms [V], dropped with the table


def _row_norms(table: np.ndarray) -> np.ndarray:
    key = id(table)
    if key not in _norms:
        _norms[key] = np.sqrt(np.einsum("vd,vd->v", table, table, dtype=np.float64)).astype(np.float32)
        weakref.finalize(table, _norms.pop, key, None)
    return _norms[key]
