"""Loading checkpoints: bad ones fail with a message naming what is wrong, good variants load."""

import json
import mmap

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import write_tiny_model

from nextword.weights.config import ModelConfig, ModelError, rope_tables
from nextword.weights.loader import load_checkpoint


@pytest.fixture
def llama(tmp_path):
    write_tiny_model(tmp_path, "llama", seed=0)
    return tmp_path


def rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(llama):
    rewrite(llama, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_checkpoint(llama)


def test_wrong_shape_names_tensor_file_and_shapes(llama):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]

    rewrite(llama, shrink)
    with pytest.raises(ModelError) as e:
        load_checkpoint(llama)
    message = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in message and "model.safetensors" in message
    assert "[15, 48]" in message and "expected [16, 48]" in message


def test_unsupported_dtype(llama):
    rewrite(llama, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)}))
    with pytest.raises(ModelError, match=r"'model\.norm\.weight'.*unsupported dtype I32"):
        load_checkpoint(llama)


def test_truncated_safetensors_is_named(llama):
    path = llama / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"model\.safetensors: not a readable safetensors file"):
        load_checkpoint(llama)


def test_unknown_architecture(llama):
    config = json.loads((llama / "config.json").read_text())
    config["model_type"] = "mamba"
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelError, match=r"unsupported model_type 'mamba'; supported: gpt2, llama, mistral, qwen2"
    ):
        load_checkpoint(llama)


def test_missing_config_key(llama):
    config = json.loads((llama / "config.json").read_text())
    del config["num_attention_heads"]
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"missing key 'num_attention_heads'"):
        load_checkpoint(llama)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_checkpoint(tmp_path)
    write_tiny_model(tmp_path, "gpt2")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"no \*\.safetensors files"):
        load_checkpoint(tmp_path)


def test_tied_and_untied_heads(tmp_path):
    write_tiny_model(tmp_path / "tied", "llama_tied")
    write_tiny_model(tmp_path / "untied", "llama")
    tied, untied = load_checkpoint(tmp_path / "tied"), load_checkpoint(tmp_path / "untied")
    assert tied.lm_head is tied.embed
    assert untied.lm_head is not untied.embed
    assert not np.array_equal(untied.lm_head, untied.embed)


def test_gpt2_with_and_without_transformer_prefix(tmp_path):
    write_tiny_model(tmp_path, "gpt2")
    a = load_checkpoint(tmp_path)
    rewrite(tmp_path, lambda t: t.update({k.removeprefix("transformer."): t.pop(k) for k in list(t)}))
    b = load_checkpoint(tmp_path)
    np.testing.assert_array_equal(a.layers[1].qkv, b.layers[1].qkv)
    assert a.layers[0].qkv.flags.c_contiguous  # Conv1D weights were transposed into [out, in]


def test_rope_tables_are_exact():
    c = ModelConfig.from_dict(
        {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 4, "rope_theta": 10000.0}
    )  # fmt: skip
    cos, sin = rope_tables(c, 5)
    assert cos.shape == (5, 2)
    np.testing.assert_allclose(cos[3, 1], np.cos(3 * 10000.0 ** (-2 / 4)), rtol=1e-7)
    np.testing.assert_allclose(sin[4, 0], np.sin(4.0), rtol=1e-7)


def owner(array: np.ndarray):
    """The object that owns an array's memory (None: the array itself)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base.obj if isinstance(array.base, memoryview) else array.base


@pytest.mark.parametrize("fmt", ["f32", "q4"])
def test_float32_embedding_table_is_mapped_from_its_file(tmp_path, fmt):
    write_tiny_model(tmp_path, "llama_tied")
    ckpt = load_checkpoint(tmp_path, fmt)
    stored = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(ckpt.embed, stored)
    assert isinstance(owner(ckpt.embed), mmap.mmap)  # a view of the file, not a copy
    assert ckpt.embed.flags.c_contiguous and ckpt.embed.flags.writeable and ckpt.embed.flags.aligned


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_other_dtypes_are_widened_into_memory(tmp_path, dtype):
    write_tiny_model(tmp_path / "f32", "llama", seed=4)
    write_tiny_model(tmp_path / "narrow", "llama", seed=4, dtype=dtype)
    wide, narrow = load_checkpoint(tmp_path / "f32"), load_checkpoint(tmp_path / "narrow")
    assert not isinstance(owner(narrow.embed), mmap.mmap)
    assert narrow.embed.dtype == np.float32 and narrow.embed.shape == wide.embed.shape
    np.testing.assert_allclose(narrow.embed, wide.embed, rtol=1e-2, atol=1e-3)  # the same weights, rounded
