"""Whole-model correctness on tiny random-weight Hugging Face folders, against the float64 reference forward.

- logits of every position match tests/reference.py within 1e-4 (and the same argmax);
- decoding token by token through the KV cache equals the full-sequence forward;
- a ragged batch of 3 sequences of different lengths equals running each alone;
- float16 / bfloat16 / sharded checkpoints load to the values they store.
"""

import mmap

import numpy as np
import pytest
import reference as ref
from tiny_models import KINDS, write_tiny_model

from nextword.kernels import attention, elementwise, matmul, norms, softmax
from nextword.kernels.model import Batch, Model
from nextword.server.memory import resident_bytes
from nextword.weights.loader import load_checkpoint

BLOCK = 4  # a small block size, so that sequences cross several blocks
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 7, 31, 64, 200], [12], [8, 8, 150, 2, 77, 19]]


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    write_tiny_model(folder, request.param, seed=1)
    return folder, Model(load_checkpoint(folder))


def full_forward(model, ids, cache=None, blocks=None):
    """All-position logits of one sequence in one prefill step."""
    cache = cache or model.new_cache(num_blocks=64, block_size=BLOCK)
    blocks = blocks or list(range(-(-len(ids) // BLOCK)))
    return model.forward(cache, Batch.build([(ids, 0, blocks, "all")], BLOCK))


def test_logits_match_reference(tiny):
    folder, model = tiny
    loaded = ref.load_reference(folder)
    for ids in PROMPTS:
        expect = ref.reference_logits(loaded, ids)  # [T, V] float64
        got = full_forward(model, ids)
        assert got.shape == expect.shape
        np.testing.assert_allclose(got, expect, rtol=0, atol=1e-4)
        assert (got.argmax(-1) == expect.argmax(-1)).all()
        assert expect.std() > 0.1  # the test would be vacuous on flat logits


def test_kv_cache_decode_equals_full_forward(tiny):
    _, model = tiny
    ids = PROMPTS[0]
    expect = full_forward(model, ids)
    cache = model.new_cache(num_blocks=16, block_size=BLOCK)
    blocks = [9, 2, 14]  # deliberately out of order
    # prefill the first 4 tokens, then one token per step
    got = [model.forward(cache, Batch.build([(ids[:4], 0, blocks, "all")], BLOCK))]
    for p in range(4, len(ids)):
        got.append(model.forward(cache, Batch.build([(ids[p : p + 1], p, blocks, "last")], BLOCK)))
    np.testing.assert_allclose(np.concatenate(got), expect, rtol=0, atol=2e-5)


def test_ragged_batch_equals_one_by_one(tiny):
    _, model = tiny
    alone = [full_forward(model, ids)[-1] for ids in PROMPTS]
    cache = model.new_cache(num_blocks=32, block_size=BLOCK)
    tables = [[0, 5, 6], [1], [3, 9]]
    batch = Batch.build([(ids, 0, t, "last") for ids, t in zip(PROMPTS, tables, strict=False)], BLOCK)
    together = model.forward(cache, batch)
    np.testing.assert_allclose(together, np.stack(alone), rtol=0, atol=2e-5)
    # and a decode step for all three at once, at their different positions
    nxt = [int(x) for x in together.argmax(-1)]
    batch = Batch.build(
        [([n], len(ids), t, "last") for n, ids, t in zip(nxt, PROMPTS, tables, strict=False)], BLOCK
    )
    step = model.forward(cache, batch)
    for s, ids in enumerate(PROMPTS):
        np.testing.assert_allclose(step[s], full_forward(model, ids + [nxt[s]])[-1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tmp_path, dtype):
    write_tiny_model(tmp_path, "llama", seed=2, dtype=dtype)
    model = Model(load_checkpoint(tmp_path))
    ids = PROMPTS[0]
    np.testing.assert_allclose(
        full_forward(model, ids), ref.reference_logits(tmp_path, ids), rtol=0, atol=1e-4
    )


def test_sharded_checkpoint_equals_single_file(tmp_path):
    write_tiny_model(tmp_path / "one", "qwen2", seed=3)
    write_tiny_model(tmp_path / "two", "qwen2", seed=3, shards=2)
    assert len(list((tmp_path / "two").glob("*.safetensors"))) == 2
    a = full_forward(Model(load_checkpoint(tmp_path / "one")), PROMPTS[2])
    b = full_forward(Model(load_checkpoint(tmp_path / "two")), PROMPTS[2])
    np.testing.assert_array_equal(a, b)


def test_llama3_rope_scaling(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    write_tiny_model(tmp_path, "llama", seed=4, rope_scaling=scaling)
    model = Model(load_checkpoint(tmp_path))
    ids = list(range(3, 60, 2))  # long enough for the scaled wavelengths to matter
    np.testing.assert_allclose(
        full_forward(model, ids), ref.reference_logits(tmp_path, ids), rtol=0, atol=1e-4
    )


def test_each_kernel_compiled_once(tmp_path):
    """After a prompt and a decode step through both families (and whatever ran before in this process),
    every kernel has exactly one specialization (one per KV-cache dtype): no float64 or strided array leaked
    into a kernel and silently compiled a slower second version."""
    for kind in ("llama", "gpt2"):
        write_tiny_model(tmp_path / kind, kind, seed=1)
        model = Model(load_checkpoint(tmp_path / kind))
        cache = model.new_cache(num_blocks=8, block_size=BLOCK)
        model.forward(cache, Batch.build([(PROMPTS[2], 0, [0, 1], "last")], BLOCK))
        model.forward(cache, Batch.build([([5], len(PROMPTS[2]), [0, 1], "last")], BLOCK, 1))
    kernels = [
        getattr(module, name)
        for module in (attention, elementwise, matmul, norms, softmax)
        for name in dir(module)
        if hasattr(getattr(module, name), "signatures")
    ]
    used = [k for k in kernels if k.signatures]
    assert len(used) >= 10

    def up_to_kv_dtype(signature):  # a KV cache of float16 bits is a legitimate second version
        return tuple(str(t).replace("uint16", "float32") for t in signature)

    versions = {k.__name__: len({up_to_kv_dtype(s) for s in k.signatures}) for k in used}
    assert versions == {k.__name__: 1 for k in used}


def test_kv_cache_memory_is_resident_only_where_written(tiny):
    _, model = tiny
    cache = model.new_cache(num_blocks=4096, block_size=BLOCK)  # MiBs reserved per layer
    assert resident_bytes(cache.k + cache.v) == 0
    block_bytes = cache.k[0][0].nbytes
    model.forward(cache, Batch.build([(PROMPTS[0][:BLOCK], 0, [3000], "last")], BLOCK))
    written = 2 * len(cache.k) * block_bytes  # one block of k and v in every layer
    pages = 2 * len(cache.k) * -(-block_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
    resident = resident_bytes(cache.k + cache.v)
    assert written <= resident <= 2 * pages  # one block's pages (two if it straddles a boundary)
    assert resident < 2 * len(cache.k) * cache.k[0].nbytes / 100
