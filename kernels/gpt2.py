"""The GPT-2 forward pass, composed from the kernels.

Per layer: x += c_proj(attention(c_attn(layernorm(x)))); x += proj(gelu(fc(layernorm(x)))).
Positions are learned (wpe), not rotated.
"""

import numpy as np

from nextword.kernels.attention import CONTEXT_CHUNK, cache_write, paged_attention
from nextword.kernels.elementwise import add, add_bias, add_embedding, embedding, gelu_tanh
from nextword.kernels.matmul import linear
from nextword.kernels.norms import layernorm


def forward(model, cache, batch, out=None):
    """Run the new tokens of `batch` through the model, filling `cache`; logits [R, V] for batch.logits_rows
    (written into `out` if given)."""
    ckpt, c = model.checkpoint, model.config
    H, Dh, eps = c.num_heads, c.head_dim, c.norm_eps
    T = len(batch.token_ids)
    d = batch.decode_tokens  # leading rows that are decode tokens (see linear)
    scale = np.float32(1.0 / np.sqrt(Dh))

    x = np.empty((T, c.hidden_size), dtype=np.float32)  # [T, D] the residual stream
    h = np.empty_like(x)  # [T, D]
    qkv = np.empty((T, 3 * c.hidden_size), dtype=np.float32)  # [T, 3D]
    att = np.empty((T, c.hidden_size), dtype=np.float32)  # [T, D]
    fc = np.empty((T, c.intermediate_size), dtype=np.float32)  # [T, F]

    embedding(x, ckpt.embed, batch.token_ids)
    add_embedding(x, ckpt.positions, batch.positions)
    for i, layer in enumerate(ckpt.layers):
        layernorm(h, x, layer.ln1_weight, layer.ln1_bias, eps)
        linear(qkv, h, layer.qkv, d)
        add_bias(qkv, layer.qkv_bias)
        cache_write(cache.k[i], cache.v[i], qkv, batch.slots, H, H, Dh)
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
            H,
            d,
            CONTEXT_CHUNK,
        )
        linear(h, att, layer.o, d)
        add_bias(h, layer.o_bias)
        add(x, h)
        layernorm(h, x, layer.ln2_weight, layer.ln2_bias, eps)
        linear(fc, h, layer.fc, d)
        add_bias(fc, layer.fc_bias)
        gelu_tanh(fc)
        linear(h, fc, layer.proj, d)
        add_bias(h, layer.proj_bias)
        add(x, h)

    last = np.ascontiguousarray(x[batch.logits_rows])  # [R, D]
    layernorm(last, last, ckpt.final_norm, ckpt.final_norm_bias, eps)
    logits = np.empty((len(last), c.vocab_size), dtype=np.float32) if out is None else out  # [R, V]
    linear(logits, last, ckpt.lm_head, d, tiled=False)  # decode rows first; one prompt row per sequence
    return logits
