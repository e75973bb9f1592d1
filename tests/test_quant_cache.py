"""Quantized weights written once beside the model and mapped at later starts (nextword.weights.quant_cache)."""

import mmap
import os

import numpy as np
import pytest
from tiny_models import write_tiny_model

from nextword.weights import quant_cache
from nextword.weights.loader import TensorFiles, load_checkpoint
from nextword.weights.quant_cache import QuantizedMatrices, cache_path
from nextword.weights.quantize import Q4Weight, Q8MWeight, quantize_q4_1, quantize_q8_m


def owner(array):
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base.obj if isinstance(array.base, memoryview) else array.base


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"float32 weights")
    return path


@pytest.mark.parametrize("fmt, quantize", [("q4", quantize_q4_1), ("int8", quantize_q8_m)])
def test_written_once_then_mapped(tmp_path, source, fmt, quantize):
    rng = np.random.default_rng(0)
    w, narrow = (
        rng.standard_normal((6, 64)).astype(np.float32),
        rng.standard_normal((3, 40)).astype(np.float32),
    )
    reads = []

    def load():
        m = QuantizedMatrices(tmp_path, fmt, [source])
        got = (
            m.get("layers.0.qkv", lambda: reads.append("qkv") or w),
            m.get("head", lambda: narrow, head=True),
        )
        m.save()
        return m, got

    first, (q, _) = load()
    assert not first.hit and reads == ["qkv"] and cache_path(tmp_path, fmt).is_file()
    second, (q2, head2) = load()
    assert second.hit and reads == ["qkv"]  # nothing read or quantized the second time
    assert type(q2) is type(q) is (Q4Weight if fmt == "q4" else Q8MWeight)
    for a, b in zip(q.blocks, q2.blocks, strict=True):
        np.testing.assert_array_equal(a, b)
        assert isinstance(owner(b), mmap.mmap) and b.flags.writeable and b.flags.c_contiguous
    for a, b in zip(q.blocks, quantize(w).blocks, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(head2, narrow)  # K = 40: stays float32, cached as such

    os.utime(source, ns=(1, 1))  # the float32 weights changed: quantized again, file rewritten
    third, _ = load()
    assert not third.hit and reads == ["qkv", "qkv"]
    assert load()[0].hit


def test_stale_version_or_damaged_file_is_rebuilt(tmp_path, source, monkeypatch):
    w = np.ones((2, 32), np.float32)
    m = QuantizedMatrices(tmp_path, "q4", [source])
    m.get("a", lambda: w)
    m.save()
    monkeypatch.setattr(quant_cache, "QUANTIZER_VERSION", quant_cache.QUANTIZER_VERSION + 1)
    assert not QuantizedMatrices(tmp_path, "q4", [source]).hit  # another quantizer version: other file
    monkeypatch.undo()
    cache_path(tmp_path, "q4").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert not QuantizedMatrices(tmp_path, "q4", [source]).hit


def test_read_only_folder_still_loads(tmp_path, source):
    (tmp_path / "nextword-quantized").write_text("a file where the cache folder would go")
    m = QuantizedMatrices(tmp_path, "q4", [source])
    q = m.get("a", lambda: np.ones((2, 32), np.float32))
    m.save()  # cannot write: no error, and nothing left behind
    assert isinstance(q, Q4Weight) and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors",
        "nextword-quantized",
    ]


def test_checkpoint_from_the_cache_equals_a_fresh_one(tmp_path, monkeypatch):
    write_tiny_model(tmp_path, "llama", seed=3)
    fresh = load_checkpoint(tmp_path, "q4")
    assert cache_path(tmp_path, "q4").is_file()
    read = []
    monkeypatch.setattr(
        TensorFiles, "read", lambda self, name, _r=TensorFiles.read: read.append(name) or _r(self, name)
    )
    cached = load_checkpoint(tmp_path, "q4")
    assert not [n for n in read if n.endswith("proj.weight")]  # no matrix read from the float32 file
    for a, b in zip(fresh.layers, cached.layers, strict=True):
        for name, value in vars(a).items():
            if value is not None:
                np.testing.assert_array_equal(
                    value if isinstance(value, np.ndarray) else value.qs,
                    getattr(b, name) if isinstance(value, np.ndarray) else getattr(b, name).qs,
                )
    np.testing.assert_array_equal(fresh.lm_head, cached.lm_head)
    assert not cache_path(tmp_path, "f32").exists()  # float32 needs no cache
