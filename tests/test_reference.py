"""Make the oracle trustworthy on its own: tests/reference.py against transformers' golden logits, plus
internal consistency checks (causality, GQA, stored dtypes, shards) that need no transformers."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import tiny_models
from safetensors.numpy import load_file

GOLDEN = json.loads((Path(__file__).resolve().parent / "golden" / "tiny_logits.json").read_text())
IDS = [1, 17, 299, 42, 256, 3, 150, 77, 0, 201, 2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One float32 folder per kind, written once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        kind: (root / kind, tiny_models.write_tiny_model(root / kind, kind)) for kind in tiny_models.KINDS
    }


def weights_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


# --- (a) the oracle matches Hugging Face transformers -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN["models"]))
def test_reference_matches_transformers_golden(name, tmp_path):
    entry = GOLDEN["models"][name]
    tiny_models.write_tiny_model(tmp_path, **entry["write_tiny_model"])
    assert weights_sha256(tmp_path) == entry["weights_sha256"], (
        "tiny_models.py writes different weights now: rerun tests/golden/make_tiny_golden.py (needs torch)"
    )
    logits = ref.reference_logits(tmp_path, entry["token_ids"])[-3:]  # [3, vocab]
    golden = np.array(entry["logits_last3"])  # [3, vocab], transformers float32, 6 significant digits
    np.testing.assert_allclose(logits, golden, rtol=0, atol=1e-4)
    assert (logits.argmax(-1) == golden.argmax(-1)).all()


def test_golden_covers_every_kind_and_dtype():
    written = [m["write_tiny_model"] for m in GOLDEN["models"].values()]
    assert {w["kind"] for w in written} == set(tiny_models.KINDS)
    assert {w["dtype"] for w in written} == set(tiny_models.DTYPES)
    assert {
        (w["rope_scaling"] or {}).get("rope_type", (w["rope_scaling"] or {}).get("type")) for w in written
    } >= {
        None,
        "llama3",
        "linear",
    }


# --- (b) internal consistency, no transformers needed ----------------------------------------------------


@pytest.mark.parametrize("kind", tiny_models.KINDS)
def test_logits_vary_and_config_is_complete(kind, folders):
    folder, config = folders[kind]
    assert json.loads((folder / "config.json").read_text()) == config
    assert config["vocab_size"] == tiny_models.tokenizer_vocab_size() == 300
    logits = ref.reference_logits(folder, np.random.default_rng(1).integers(0, config["vocab_size"], 9))
    assert logits.shape == (9, 300) and logits.dtype == np.float64
    assert logits.std(-1).min() > 0.5  # far from uniform, so argmax comparisons mean something


@pytest.mark.parametrize("kind", tiny_models.KINDS)
def test_causal_later_tokens_do_not_change_earlier_logits(kind, folders):
    loaded = ref.load_reference(folders[kind][0])
    full = ref.reference_logits(loaded, IDS)  # [T, vocab]
    changed = ref.reference_logits(loaded, IDS[:6] + [5, 6, 7, 8, 9])  # same prefix, different suffix
    np.testing.assert_allclose(changed[:6], full[:6], rtol=0, atol=1e-12)
    assert np.abs(changed[6:] - full[6:]).max() > 1e-3
    np.testing.assert_allclose(ref.reference_logits(loaded, IDS[:4]), full[:4], rtol=0, atol=1e-12)


def test_gqa_model_equals_mha_with_repeated_kv_heads(folders):
    config, tensors = ref.load_reference(folders["llama"][0])  # 6 query heads share 2 kv heads
    group, hd = config["num_attention_heads"] // config["num_key_value_heads"], config["head_dim"]
    mha = dict(tensors)
    for name, x in tensors.items():  # kv head j becomes query heads j*group .. (j+1)*group - 1
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # [KV*hd, d] -> [H*hd, d]
            mha[name] = np.repeat(x.reshape(-1, hd, x.shape[1]), group, axis=0).reshape(-1, x.shape[1])
    mha_config = dict(config, num_key_value_heads=config["num_attention_heads"])
    np.testing.assert_allclose(
        ref.reference_logits((mha_config, mha), IDS), ref.reference_logits((config, tensors), IDS)
    )


def test_attention_matches_per_head_loops():
    rng = np.random.default_rng(0)
    T, S, H, KV, hd = 3, 5, 6, 2, 4
    q, k, v = (
        rng.standard_normal((T, H, hd)),
        rng.standard_normal((S, KV, hd)),
        rng.standard_normal((S, KV, hd)),
    )
    want = np.zeros((T, H, hd))
    for t in range(T):
        p = S - T + t  # absolute position of query t
        for h in range(H):
            kv = h // (H // KV)
            s = np.array([q[t, h] @ k[j, kv] / math.sqrt(hd) for j in range(p + 1)])
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            want[t, h] = sum(w[j] * v[j, kv] for j in range(p + 1))
    np.testing.assert_allclose(ref.attention(q, k, v), want, rtol=1e-12, atol=1e-12)
    decode = ref.attention(q[1], k, v, pos=3)  # one query [H, hd] at position 3
    np.testing.assert_allclose(decode, want[1], rtol=1e-12, atol=1e-12)


def test_rope_rotate_half_and_inv_freq():
    inv = ref.rope_inv_freq(8, 10000.0)  # [4]
    np.testing.assert_allclose(inv, [1.0, 0.1, 0.01, 0.001])
    x = np.random.default_rng(0).standard_normal((2, 3, 8))  # [T, heads, hd]
    y = ref.rope(x, np.array([0, 5]), inv)
    np.testing.assert_array_equal(y[0], x[0])  # position 0 is the identity
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))  # a rotation
    a = 5 * inv[1]  # pair (1, 5) rotates by pos * inv_freq[1]
    np.testing.assert_allclose(
        y[1, :, [1, 5]],
        [
            x[1, :, 1] * math.cos(a) - x[1, :, 5] * math.sin(a),
            x[1, :, 5] * math.cos(a) + x[1, :, 1] * math.sin(a),
        ],
    )
    np.testing.assert_allclose(ref.rope(x[1], 5, inv), y[1])  # single-position form
    np.testing.assert_allclose(ref.rope_inv_freq(8, 1e4, {"type": "linear", "factor": 4.0}), inv / 4)
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 100,
    }  # wavelengths 6.3 (kept), 63 (smoothed), 628, 6283 (/8)
    smooth = (100 / (2 * math.pi / 0.1) - 1) / 3
    np.testing.assert_allclose(
        ref.rope_inv_freq(8, 1e4, llama3), [1.0, (1 - smooth) * 0.1 / 8 + smooth * 0.1, 0.01 / 8, 0.001 / 8]
    )


def test_small_functions():
    x = np.random.default_rng(0).standard_normal((4, 7)).astype(np.float32)
    np.testing.assert_allclose(ref.softmax(x).sum(-1), 1.0)
    np.testing.assert_allclose(ref.log_softmax(x), np.log(ref.softmax(x)))
    np.testing.assert_allclose(ref.silu(x), x / (1 + np.exp(-x.astype(np.float64))))
    np.testing.assert_allclose(ref.gelu_tanh([0.0, 1.0, -1.0]), [0.0, 0.841191990607, -0.158808009393])
    w, b = np.arange(7.0), np.ones(7)
    np.testing.assert_allclose(
        ref.rms_norm(x, w, 0.0), x / np.sqrt((x.astype(np.float64) ** 2).mean(-1))[:, None] * w
    )
    ln = ref.layer_norm(x, np.ones(7), np.zeros(7), 0.0)
    np.testing.assert_allclose(ln.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(ln.std(-1), 1)
    np.testing.assert_allclose(ref.layer_norm(x, w, b, 1e-5), ref.layer_norm(x, 1, 0, 1e-5) * w + b)
    assert all(f(x).dtype == np.float64 for f in (ref.softmax, ref.log_softmax, ref.silu, ref.gelu_tanh))


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 value (ties to even), by a route independent of tiny_models' bit trick."""
    x = x.astype(np.float32)
    down = (x.view(np.uint32) & 0xFFFF0000).view(np.float32).astype(np.float64)  # truncated toward zero
    up = ((x.view(np.uint32) & 0xFFFF0000) + 0x10000).view(np.float32).astype(np.float64)  # next bf16 away
    d_down, d_up = np.abs(x - down), np.abs(up - x)
    down_even = ((x.view(np.uint32) >> 16) & 1) == 0
    return np.where((d_down < d_up) | ((d_down == d_up) & down_even), down, up)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_folders_load_as_the_rounded_values(kind, dtype, folders, tmp_path):
    _, f32 = ref.load_reference(folders[kind][0])
    config = tiny_models.write_tiny_model(tmp_path, kind, dtype=dtype)
    assert config["torch_dtype"] == dtype
    _, half = ref.load_reference(tmp_path)
    assert half.keys() == f32.keys()
    for name, x in f32.items():
        want = x.astype(np.float16).astype(np.float64) if dtype == "float16" else bf16_round(x)
        np.testing.assert_array_equal(half[name], want, err_msg=name)
    assert max(np.abs(half[n] - f32[n]).max() for n in f32) > 0  # really rounded
    logits = ref.reference_logits((config, half), IDS)
    assert np.abs(logits - ref.reference_logits(folders[kind][0], IDS)).max() < 0.2  # close, not equal


def test_bf16_bits_tie_to_even():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, 0.0], np.float32)
    want = np.array([1.0, 1.0, 1 + 4 * 2**-8, 1 + 2**-7, -2.5, 0.0])
    bits = tiny_models.float32_to_bf16_bits(x)
    np.testing.assert_array_equal((bits.astype(np.uint32) << 16).view(np.float32), want)
    np.testing.assert_array_equal(bf16_round(x), want)


def test_own_safetensors_parser_agrees_with_the_library(folders, tmp_path):
    tiny_models.write_tiny_model(tmp_path, "qwen2", dtype="float16")
    for path in (folders["qwen2"][0] / "model.safetensors", tmp_path / "model.safetensors"):
        lib, own = load_file(path), ref.read_safetensors(path)
        assert lib.keys() == own.keys()
        for name in lib:
            np.testing.assert_array_equal(own[name], lib[name].astype(np.float64), err_msg=name)


def test_sharded_folder_equals_unsharded(folders, tmp_path):
    tiny_models.write_tiny_model(tmp_path, "qwen2", shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(
        x.size * 4 for x in ref.load_reference(tmp_path)[1].values()
    )
    one_file = ref.load_reference(folders["qwen2"][0])
    assert index["weight_map"].keys() == one_file[1].keys()
    np.testing.assert_array_equal(ref.reference_logits(tmp_path, IDS), ref.reference_logits(one_file, IDS))


def test_writer_is_deterministic_and_seeded(folders, tmp_path):
    tiny_models.write_tiny_model(tmp_path / "again", "gpt2")
    tiny_models.write_tiny_model(tmp_path / "seed1", "gpt2", seed=1)
    for file in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "again" / file).read_bytes() == (folders["gpt2"][0] / file).read_bytes()
    assert (tmp_path / "seed1" / "model.safetensors").read_bytes() != (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()


def test_tokenizer_files(folders):
    from tokenizers import Tokenizer

    folder, config = folders["llama"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"]
    assert [tok.token_to_id(t) for t in tiny_models.SPECIAL_TOKENS] == [0, 1, 2]
    text = "def add(a, b):\n    return a + b  # ünïcode ✓"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and config["eos_token_id"] == 2
    assert tok_config["chat_template"] == tiny_models.CHAT_TEMPLATE
    gpt2_config = json.loads((folders["gpt2"][0] / "tokenizer_config.json").read_text())
    assert gpt2_config["eos_token"] == "<|endoftext|>" and folders["gpt2"][1]["eos_token_id"] == 0
