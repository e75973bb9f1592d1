"""The Llama-family forward pass (llama, mistral, qwen2), composed from the kernels.

Per layer: x += o(attention(rope(qkv(rmsnorm(x))))); x += down(swiglu(gate_up(rmsnorm(x)))).
"""

import numpy as np

from nextword.kernels.attention import CONTEXT_CHUNK, cache_write, paged_attention, rope_qk
from nextword.kernels.elementwise import add, add_bias, embedding, swiglu
from nextword.kernels.matmul import linear
from nextword.kernels.norms import rmsnorm


def forward(model, cache, batch, out=None):
    """Run the new tokens of `batch` through the model, filling `cache`; logits [R, V] for batch.logits_rows
    (written into `out` if given)."""
    ckpt, c = model.checkpoint, model.config
    H, Hkv, Dh, eps = c.num_heads, c.num_kv_heads, c.head_dim, c.norm_eps
    T = len(batch.token_ids)
    d = batch.decode_tokens  # leading rows that are decode tokens (see linear)
    scale = np.float32(1.0 / np.sqrt(Dh))

    x = np.empty((T, c.hidden_size), dtype=np.float32)  # [T, D] the residual stream
    h = np.empty_like(x)  # [T, D] normalized input / block output
    qkv = np.empty((T, c.q_dim + 2 * c.kv_dim), dtype=np.float32)  # [T, (H + 2 Hkv) Dh]
    att = np.empty((T, c.q_dim), dtype=np.float32)  # [T, H Dh]
    gate_up = np.empty((T, 2 * c.intermediate_size), dtype=np.float32)  # [T, 2F]
    act = np.empty((T, c.intermediate_size), dtype=np.float32)  # [T, F]

    embedding(x, ckpt.embed, batch.token_ids)
    for i, layer in enumerate(ckpt.layers):
        # attention block
        rmsnorm(h, x, layer.attn_norm, eps)
        linear(qkv, h, layer.qkv, d)
        if layer.qkv_bias is not None:
            add_bias(qkv, layer.qkv_bias)
        rope_qk(qkv, batch.positions, model.rope_cos, model.rope_sin, H, Hkv, Dh)
        cache_write(cache.k[i], cache.v[i], qkv, batch.slots, H, Hkv, Dh)
        paged_attention(
            att,
            qkv,
            cache.k[i],
            cache.v[i],
            batch.block_tables,
            batch.token_seq,
            batch.positions,
            scale,
            H,
            Hkv,
            d,
            CONTEXT_CHUNK,
        )
        linear(h, att, layer.o, d)
        add(x, h)
        # feed-forward block
        rmsnorm(h, x, layer.mlp_norm, eps)
        linear(gate_up, h, layer.gate_up, d)
        swiglu(act, gate_up)
        linear(h, act, layer.down, d)
        add(x, h)

    last = np.ascontiguousarray(x[batch.logits_rows])  # [R, D]
    rmsnorm(last, last, ckpt.final_norm, eps)
    logits = np.empty((len(last), c.vocab_size), dtype=np.float32) if out is None else out  # [R, V]
    linear(logits, last, ckpt.lm_head, d, tiled=False)  # decode rows first; one prompt row per sequence
    return logits
