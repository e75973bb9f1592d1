"""examples/pixels: the 3x3 pixel symbol network.

Each hand-written kernel against a float64 NumPy reference (forward and backward, odd shapes), the whole
network's gradients against central finite differences of a float64 NumPy loss, a real training run,
the safetensors round trip through nextword.weights.tensors, accuracy on noisy pixels, and the CLIs.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from nextword.weights.tensors import load_tensors

sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "pixels"))

import network as nw
import predict
import train

SHAPES = [(1, 9, 8), (5, 7, 3), (13, 1, 11), (32, 6, 4)]  # (N samples, I inputs, O outputs)


def f32(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# float64 NumPy references, one per kernel (never calling the kernels)


def ref_dense(x, w, b):  # [N, I], [O, I], [O] -> [N, O]
    return x.astype(np.float64) @ w.astype(np.float64).T + b


def ref_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def ref_softmax(x):  # [N, K] -> [N, K]
    e = np.exp(x - x.max(axis=1, keepdims=True).astype(np.float64))
    return e / e.sum(axis=1, keepdims=True)


def ref_cross_entropy_backward(probs, labels):  # -> dlogits [N, K], mean loss
    n, probs = len(labels), probs.astype(np.float64)
    onehot = np.eye(probs.shape[1])[labels]
    return (probs - onehot) / n, -np.mean(np.log(probs[np.arange(n), labels]))


def ref_dense_backward(dout, x, w):  # -> dx [N, I], dw [O, I], db [O]
    dout, x, w = (a.astype(np.float64) for a in (dout, x, w))
    return dout @ w, dout.T @ x, dout.sum(axis=0)


def ref_loss(params, x, labels):
    """The network's mean cross-entropy in float64, written independently of the kernels."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    h1 = np.tanh(x @ p["layer1.weight"].T + p["layer1.bias"])
    h2 = 1.0 / (1.0 + np.exp(-(h1 @ p["layer2.weight"].T + p["layer2.bias"])))
    z = h2 @ p["layer3.weight"].T + p["layer3.bias"]
    log_probs = z - z.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    return -np.mean(log_probs[np.arange(len(labels)), labels])


# ---------------------------------------------------------------------------------------------------------
# forward kernels


@pytest.mark.parametrize("n,i,o", SHAPES)
def test_dense_forward(n, i, o):
    rng = np.random.default_rng(n * 100 + i * 10 + o)
    x, w, b = f32(rng, n, i), f32(rng, o, i), f32(rng, o)
    out = np.full((n, o), np.nan, dtype=np.float32)
    nw.dense_forward(out, x, w, b)
    np.testing.assert_allclose(out, ref_dense(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,o", [(1, 1), (5, 7), (3, 11)])
def test_tanh_and_sigmoid_forward(n, o):
    rng = np.random.default_rng(n + o)
    x = f32(rng, n, o, scale=4.0)
    x[0, 0] = -100.0  # exp(100) overflows float32: sigmoid must still give 0, not NaN
    out = np.full_like(x, np.nan)
    nw.tanh_forward(out, x)
    np.testing.assert_allclose(out, np.tanh(x.astype(np.float64)), rtol=1e-5, atol=1e-6)
    nw.sigmoid_forward(out, x)
    np.testing.assert_allclose(out, ref_sigmoid(x), rtol=1e-5, atol=1e-6)
    assert out[0, 0] == 0.0


@pytest.mark.parametrize("n,k", [(1, 4), (6, 3), (5, 13)])
def test_softmax_forward(n, k):
    rng = np.random.default_rng(n * k)
    x = f32(rng, n, k, scale=3.0)
    x[0] += 90.0  # exp(90) overflows float32: the row maximum must be subtracted first
    if k > 1:
        x[-1, :2] = x[-1].max() + 1.0  # a tie for the maximum
    out = np.full_like(x, np.nan)
    nw.softmax_forward(out, x)
    np.testing.assert_allclose(out, ref_softmax(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# backward kernels


@pytest.mark.parametrize("n,i,o", SHAPES)
def test_dense_backward(n, i, o):
    rng = np.random.default_rng(n * 7 + i * 3 + o)
    dout, x, w = f32(rng, n, o), f32(rng, n, i), f32(rng, o, i)
    dx, dw, db = (np.full(s, np.nan, dtype=np.float32) for s in ((n, i), (o, i), (o,)))
    nw.dense_backward(dx, dw, db, dout, x, w)
    for got, want in zip((dx, dw, db), ref_dense_backward(dout, x, w), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,o", [(1, 1), (5, 7), (3, 11)])
def test_tanh_and_sigmoid_backward(n, o):
    rng = np.random.default_rng(n * o + 1)
    x, dout = f32(rng, n, o, scale=2.0), f32(rng, n, o)
    y, dx = np.tanh(x), np.full_like(x, np.nan)
    nw.tanh_backward(dx, dout, y)
    np.testing.assert_allclose(dx, dout * (1.0 - y.astype(np.float64) ** 2), rtol=1e-5, atol=1e-6)
    in_place = dout.copy()
    nw.tanh_backward(in_place, in_place, y)  # dx may be dout
    np.testing.assert_array_equal(in_place, dx)
    s = ref_sigmoid(x).astype(np.float32)
    nw.sigmoid_backward(dx, dout, s)
    np.testing.assert_allclose(dx, dout * s.astype(np.float64) * (1.0 - s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k", [(1, 4), (7, 4), (5, 9)])
def test_cross_entropy_backward(n, k):
    rng = np.random.default_rng(n + 10 * k)
    probs = ref_softmax(f32(rng, n, k, scale=2.0)).astype(np.float32)
    labels = rng.integers(0, k, size=n)  # int64
    dlogits = np.full_like(probs, np.nan)
    loss = nw.cross_entropy_backward(dlogits, probs, labels)
    want_dlogits, want_loss = ref_cross_entropy_backward(probs, labels)
    np.testing.assert_allclose(dlogits, want_dlogits, rtol=1e-5, atol=1e-7)
    assert loss == pytest.approx(want_loss, rel=1e-6)


def test_sgd_update():
    rng = np.random.default_rng(3)
    param, grad = f32(rng, 163), f32(rng, 163)
    want = param.astype(np.float64) - 0.3 * grad
    nw.sgd_update(param, grad, 0.3)
    np.testing.assert_allclose(param, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# the whole network


@pytest.mark.parametrize("sizes", [nw.SIZES, (9, 5, 3, 4)])
def test_gradients_match_finite_differences(sizes):
    """Back-propagation through all the kernels (float32) against central differences of the float64 loss."""
    rng = np.random.default_rng(11)
    net = nw.Network.random(rng, sizes)
    for b in (v for k, v in net.params.items() if k.endswith(".bias")):
        b[...] = rng.uniform(-0.5, 0.5, size=b.shape)  # nonzero biases, so their gradients are tested too
    x, labels = nw.training_set(8, rng)
    probs = net.forward(x)
    loss = net.backward(labels)
    params64 = {k: v.astype(np.float64) for k, v in net.params.items()}
    assert loss == pytest.approx(ref_loss(params64, x, labels), rel=1e-5)

    h = 1e-6
    for name, p in params64.items():
        numeric = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            saved = p[idx]
            p[idx] = saved + h
            up = ref_loss(params64, x, labels)
            p[idx] = saved - h
            down = ref_loss(params64, x, labels)
            p[idx] = saved
            numeric[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(net.grads[name], numeric, rtol=1e-4, atol=1e-7, err_msg=name)
    assert probs.shape == (8, 4)


def test_training_reaches_every_clean_symbol_and_is_deterministic():
    net = nw.train(seed=0)  # 20 epochs x 64 mini-batches of 32 fresh noisy samples
    labels = np.arange(4)
    assert net.accuracy(nw.PATTERNS, labels) == 1.0
    assert np.all(net.forward(nw.PATTERNS)[labels, labels] > 0.9)  # confident, not just right
    np.testing.assert_array_equal(nw.train(seed=0).flat, net.flat)
    assert not np.array_equal(nw.train(seed=1, epochs=1).flat, nw.train(seed=0, epochs=1).flat)


def test_accuracy_degrades_gracefully_with_flipped_pixels():
    """Measured (seed 0): 100 / 97.2 / 86.6 / 66.5 / 44.8 % at p = 0 / .1 / .2 / .3 / .4."""
    rows = nw.noise_table(nw.train(seed=0))
    accuracy = {p: acc for p, acc, _, _ in rows}
    assert accuracy[0.0] == 1.0
    assert accuracy[0.2] > 0.75
    for p, acc, ideal, exact in rows:
        assert acc > ideal - 0.05, f"p={p}: {acc:.3f}, nearest-symbol classifier {ideal:.3f}"
        assert abs(ideal - exact) < 0.03  # 2000 samples estimate the exact figure
    assert all(a >= b for a, b in zip(list(accuracy.values()), list(accuracy.values())[1:], strict=False))


def test_best_possible_accuracy_is_exact():
    assert nw.best_possible_accuracy(0.0) == 1.0
    assert nw.best_possible_accuracy(0.5) == pytest.approx(0.25)  # pure noise: a guess among 4
    rng = np.random.default_rng(5)
    x, labels = nw.noisy_symbols(40_000, 0.25, rng)
    assert nw.ideal_accuracy(x, labels) == pytest.approx(nw.best_possible_accuracy(0.25), abs=0.01)


def test_save_and_load_round_trip(tmp_path):
    net = nw.train(seed=2, epochs=3)
    net.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "pixels"
    assert config["sizes"] == [9, 8, 6, 4] and config["symbols"] == ["X", "O", "-", "|"]

    tensors = load_tensors(tmp_path)
    assert {k: v.shape for k, v in tensors.items()} == nw.tensor_shapes(nw.SIZES)
    assert tensors["layer1.weight"].shape == (8, 9)  # [out, in]
    for name, t in tensors.items():
        assert t.dtype == np.float32 and t.flags.c_contiguous
        np.testing.assert_array_equal(t, net.params[name])

    again = nw.Network.load(tmp_path)
    x, _ = nw.noisy_symbols(500, 0.3, np.random.default_rng(0))
    np.testing.assert_array_equal(again.forward(x), net.forward(x).copy())


def test_load_rejects_a_wrong_folder(tmp_path):
    nw.train(seed=0, epochs=1).save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"sizes": [9, 7, 6, 4]}))
    with pytest.raises(ValueError, match="layer1.weight has shape"):
        nw.Network.load(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# nextword.weights.tensors.load_tensors


def test_load_tensors_reads_every_file_as_float32(tmp_path):
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    b = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    save_file({"a": a}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": b}, tmp_path / "model-00002-of-00002.safetensors")
    # BF16, which safetensors' NumPy loader cannot read, written by hand: 1.0, -2.5 and 3.0
    header = json.dumps({"c": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    bits = np.array([0x3F80, 0xC020, 0x4040], dtype="<u2").tobytes()
    (tmp_path / "z.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bits)
    tensors = load_tensors(tmp_path)
    assert sorted(tensors) == ["a", "b", "c"]
    assert all(t.dtype == np.float32 for t in tensors.values())
    np.testing.assert_array_equal(tensors["a"], a.astype(np.float32))
    np.testing.assert_array_equal(tensors["b"], b)
    np.testing.assert_array_equal(tensors["c"], [1.0, -2.5, 3.0])


def test_load_tensors_errors(tmp_path):
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_tensors(tmp_path)
    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "1.safetensors")
    save_file({"a": np.ones(2, np.float32)}, tmp_path / "2.safetensors")
    with pytest.raises(ValueError, match="also stored"):
        load_tensors(tmp_path)
    (tmp_path / "2.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_tensors(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# notation and command lines


def test_pattern_notation():
    np.testing.assert_array_equal(nw.parse_pattern("X.X/.X./X.X"), nw.PATTERNS[0])
    np.testing.assert_array_equal(nw.parse_pattern("###/#.#/###"), nw.PATTERNS[1])
    assert nw.draw(nw.PATTERNS[2]) == "...\n###\n..."
    for bad in ("#.#/.#.", "#.#/.#./#.", "#.#/.o./#.#"):
        with pytest.raises(ValueError):
            nw.parse_pattern(bad)
    distances = (nw.PATTERNS[:, None] != nw.PATTERNS[None]).sum(axis=2)
    assert distances[~np.eye(4, dtype=bool)].min() == 4  # any two symbols differ in at least 4 pixels


def test_train_and_predict_command_lines(tmp_path, capsys):
    assert train.main(["--out", str(tmp_path), "--epochs", "3", "--log-every", "64"]) == 0
    out = capsys.readouterr().out
    assert "clean symbols: 4/4 correct (100%)" in out and "outputs identical" in out
    assert "epoch   1  step    64  loss" in out
    assert predict.main([str(tmp_path), "#.#/.#./#.#", "###/#.#/###"]) == 0
    out = capsys.readouterr().out
    assert "  X  " in out and out.count("<-") == 2
    lines = out.splitlines()
    first_row = lines[lines.index("#.#/.#./#.#") + 4]  # after the pattern and its 3 drawn rows
    assert first_row.startswith("  X") and first_row.endswith("<-")


def test_each_kernel_compiled_once_for_float32():
    """Every call above used one signature per kernel: C-contiguous float32 arrays (int64 labels)."""
    nw.warm_up()
    for kernel in nw.KERNELS:
        assert len(kernel.signatures) == 1, (kernel.__name__, kernel.signatures)
        arrays = [t for t in kernel.signatures[0] if hasattr(t, "dtype") and hasattr(t, "layout")]
        assert all(t.layout == "C" for t in arrays), kernel.__name__
        assert {str(t.dtype) for t in arrays} <= {"float32", "int64"}, kernel.__name__
