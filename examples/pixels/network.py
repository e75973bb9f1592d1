"""A tiny feed-forward network that recognises four symbols on a 3x3 pixel display, trained by hand.

This is where the explanation of nextword starts: before a language model, a network that maps 9 pixel
values to probabilities over 4 symbols. Everything a language model does at inference time is here in
miniature: matrix-vector products, squashing functions, a softmax over the possible answers.

    pixels x [9]  (-1 = black .. 1 = white)
      -> layer1: dense 9 -> 8, tanh      (squashed to -1..1)
      -> layer2: dense 8 -> 6, sigmoid   (squashed to 0..1)
      -> layer3: dense 6 -> 4, softmax   (probabilities over the 4 symbols, summing to 1)

The symbols ('#' = white, '.' = black), chosen so that any two differ in at least 4 of the 9 pixels:

    X      O      -      |
    #.#    ###    ...    .#.
    .#.    #.#    ###    .#.
    #.#    ###    ...    .#.

The forward and backward passes (back-propagation) are hand-written Numba kernels below: leaf functions that
write into preallocated float32 outputs, output arguments first, explicit loops (style.md section 4).
Python allocates the buffers, chains the kernels and runs the training loop. Weights are saved as
safetensors ([out, in] matrices, Hugging Face names `layer1.weight`, `layer1.bias`, ...) plus config.json.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

try:
    import numpy as np
    from numba import njit
    from safetensors.numpy import save_file

    from nextword.weights.tensors import load_tensors
except ModuleNotFoundError as e:  # run with a Python that lacks nextword's server install
    raise SystemExit(
        f"examples/pixels needs {e.name}, which this Python ({__import__('sys').executable}) does not have: "
        "run it with the project's venv, `make install` then `.venv/bin/python examples/pixels/train.py`"
    ) from None

FASTMATH = {"reassoc", "contract", "arcp"}  # vectorised reductions, no no-NaN/no-inf assumptions

# The four symbols as display rows, '#' = white (+1), '.' = black (-1). Index = class label.
SYMBOLS = {
    "X": "#.#/.#./#.#",
    "O": "###/#.#/###",
    "-": ".../###/...",
    "|": ".#./.#./.#.",
}
NAMES = tuple(SYMBOLS)
SIZES = (9, 8, 6, 4)  # pixels, hidden 1 (tanh), hidden 2 (sigmoid), symbols (softmax)
WHITE, BLACK = "#Xx", "."


def parse_pattern(text: str) -> np.ndarray:
    """'#.#/.#./#.#' (rows separated by '/', '#' or 'X' = white, '.' = black) -> pixels [9] float32."""
    rows = text.strip().split("/")
    if len(rows) != 3 or any(len(r) != 3 for r in rows):
        raise ValueError(f"{text!r}: expected 3 rows of 3 pixels separated by '/', e.g. '#.#/.#./#.#'")
    pixels = []
    for c in "".join(rows):
        if c not in WHITE + BLACK:
            raise ValueError(f"{text!r}: pixel {c!r} is neither white ('#' or 'X') nor black ('.')")
        pixels.append(1.0 if c in WHITE else -1.0)
    return np.array(pixels, dtype=np.float32)


def draw(pixels: np.ndarray) -> str:
    """pixels [9] -> three display rows; '#' white, '.' black, '+' grey (between -1/3 and 1/3)."""
    chars = ["#" if v > 1 / 3 else "." if v < -1 / 3 else "+" for v in pixels]
    return "\n".join("".join(chars[r * 3 : r * 3 + 3]) for r in range(3))


PATTERNS = np.stack([parse_pattern(s) for s in SYMBOLS.values()])  # [4, 9] the clean symbols


# ---------------------------------------------------------------------------------------------------------
# Kernels. Shapes: N samples per batch, I inputs, O outputs, K symbols. All arrays C-contiguous float32,
# labels int64. Outputs are overwritten, never accumulated into.


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def dense_forward(out, x, w, b):
    """out[n, j] = b[j] + sum_i w[j, i] * x[n, i].   out [N, O], x [N, I], w [O, I], b [O]"""
    N, I = x.shape
    O = w.shape[0]
    for n in range(N):
        for j in range(O):
            acc = b[j]
            for i in range(I):
                acc += w[j, i] * x[n, i]
            out[n, j] = acc


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def tanh_forward(out, x):
    """out = tanh(x), squashed to -1..1.   out, x [N, O] (out may be x)"""
    N, O = x.shape
    for n in range(N):
        for j in range(O):
            out[n, j] = np.tanh(x[n, j])


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def sigmoid_forward(out, x):
    """out = 1 / (1 + exp(-x)), squashed to 0..1.   out, x [N, O] (out may be x)"""
    one = np.float32(1.0)
    N, O = x.shape
    for n in range(N):
        for j in range(O):
            out[n, j] = one / (one + np.exp(-x[n, j]))  # exp overflow -> inf -> 0: fine without fastmath ninf


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def softmax_forward(out, x):
    """out[n] = exp(x[n] - max) / sum(exp(x[n] - max)), probabilities per row.   out, x [N, K]"""
    N, K = x.shape
    for n in range(N):
        m = x[n, 0]
        for k in range(1, K):
            m = max(m, x[n, k])
        s = np.float32(0.0)
        for k in range(K):
            e = np.exp(x[n, k] - m)
            out[n, k] = e
            s += e
        inv = np.float32(1.0) / s
        for k in range(K):
            out[n, k] *= inv


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def cross_entropy_backward(dlogits, probs, labels):
    """Gradient of the mean cross-entropy loss with respect to the logits, through the softmax:
    dlogits[n, k] = (probs[n, k] - [k == labels[n]]) / N.  Returns the mean loss -log probs[n, labels[n]].
    dlogits, probs [N, K], labels [N] int64 in 0..K-1 (not checked here)"""
    N, K = probs.shape
    inv = np.float32(1.0) / np.float32(N)
    total = 0.0  # float64 on purpose: the loss is a reported number
    for n in range(N):
        for k in range(K):
            dlogits[n, k] = probs[n, k] * inv
        dlogits[n, labels[n]] -= inv
        total -= np.log(max(probs[n, labels[n]], 1e-30))
    return total / N


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def dense_backward(dx, dw, db, dout, x, w):
    """Back-propagate through out = x @ w.T + b:  dx = dout @ w,  dw = dout.T @ x,  db = sum_n dout[n].
    dx [N, I], dw [O, I], db [O], dout [N, O], x [N, I], w [O, I]"""
    N, I = x.shape
    O = w.shape[0]
    for j in range(O):
        db[j] = 0.0
        for i in range(I):
            dw[j, i] = 0.0
    for n in range(N):
        for i in range(I):
            dx[n, i] = 0.0
        for j in range(O):
            g = dout[n, j]
            db[j] += g
            for i in range(I):
                dw[j, i] += g * x[n, i]
                dx[n, i] += g * w[j, i]


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def tanh_backward(dx, dout, y):
    """dx = dout * (1 - y**2), where y = tanh(x) from the forward pass.   dx, dout, y [N, O] (dx may be dout)"""
    one = np.float32(1.0)
    N, O = y.shape
    for n in range(N):
        for j in range(O):
            dx[n, j] = dout[n, j] * (one - y[n, j] * y[n, j])


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def sigmoid_backward(dx, dout, y):
    """dx = dout * y * (1 - y), where y = sigmoid(x) from the forward pass.   dx, dout, y [N, O]"""
    one = np.float32(1.0)
    N, O = y.shape
    for n in range(N):
        for j in range(O):
            dx[n, j] = dout[n, j] * y[n, j] * (one - y[n, j])


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def sgd_update(param, grad, lr):
    """One plain gradient-descent step, in place: param -= lr * grad.   param, grad [P] (all weights, flat)"""
    step = np.float32(lr)
    for p in range(param.shape[0]):
        param[p] -= step * grad[p]


KERNELS = (
    dense_forward,
    tanh_forward,
    sigmoid_forward,
    softmax_forward,
    cross_entropy_backward,
    dense_backward,
    tanh_backward,
    sigmoid_backward,
    sgd_update,
)


# ---------------------------------------------------------------------------------------------------------
# The model: parameters in one flat float32 array (one sgd_update call per step), named views into it.


def tensor_shapes(sizes: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Hugging Face style names -> shapes, weights [out, in]."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (n_in, n_out) in enumerate(itertools.pairwise(sizes), start=1):
        shapes[f"layer{layer}.weight"] = (n_out, n_in)
        shapes[f"layer{layer}.bias"] = (n_out,)
    return shapes


class Network:
    """9 -> tanh -> sigmoid -> softmax over 4 symbols. `forward` keeps the activations for `backward`."""

    def __init__(self, sizes: tuple[int, ...] = SIZES, names: tuple[str, ...] = NAMES):
        if len(sizes) != 4 or sizes[0] != 9 or sizes[-1] != len(names):
            raise ValueError(f"sizes {sizes}: expected (9, hidden1, hidden2, {len(names)})")
        self.sizes, self.names = tuple(sizes), tuple(names)
        self.shapes = tensor_shapes(self.sizes)
        total = sum(int(np.prod(s)) for s in self.shapes.values())
        self.flat = np.zeros(total, dtype=np.float32)  # [P] every parameter
        self.grad_flat = np.zeros(total, dtype=np.float32)  # [P] their gradients, same layout
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            self.params[name] = self.flat[offset : offset + size].reshape(shape)  # views, C-contiguous
            self.grads[name] = self.grad_flat[offset : offset + size].reshape(shape)
            offset += size
        self._buffers: dict[int, dict[str, np.ndarray]] = {}
        self._x: np.ndarray | None = None

    @classmethod
    def random(cls, rng: np.random.Generator, sizes: tuple[int, ...] = SIZES) -> Network:
        """Glorot-uniform weights, zero biases."""
        net = cls(sizes)
        for name, shape in net.shapes.items():
            if name.endswith(".weight"):
                limit = np.sqrt(6.0 / (shape[0] + shape[1]))
                net.params[name][...] = rng.uniform(-limit, limit, size=shape)
        return net

    def buffers(self, n: int) -> dict[str, np.ndarray]:
        """Activations and their gradients for a batch of n samples, allocated once per batch size."""
        if n not in self._buffers:
            _, h1, h2, k = self.sizes
            shapes = {"z1": h1, "h1": h1, "z2": h2, "h2": h2, "z3": k, "probs": k}
            shapes |= {"dz3": k, "dh2": h2, "dz2": h2, "dh1": h1, "dz1": h1, "dx": self.sizes[0]}
            self._buffers[n] = {
                name: np.zeros((n, width), dtype=np.float32) for name, width in shapes.items()
            }
        return self._buffers[n]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x [N, 9] pixels -> probabilities [N, 4] (a view of an internal buffer: copy it to keep it)."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.sizes[0])
        p, a = self.params, self.buffers(x.shape[0])
        dense_forward(a["z1"], x, p["layer1.weight"], p["layer1.bias"])  # [N, 8]
        tanh_forward(a["h1"], a["z1"])
        dense_forward(a["z2"], a["h1"], p["layer2.weight"], p["layer2.bias"])  # [N, 6]
        sigmoid_forward(a["h2"], a["z2"])
        dense_forward(a["z3"], a["h2"], p["layer3.weight"], p["layer3.bias"])  # [N, 4] logits
        softmax_forward(a["probs"], a["z3"])
        self._x = x
        return a["probs"]

    def backward(self, labels: np.ndarray) -> float:
        """After forward(x): fill self.grads with the gradient of the mean cross-entropy loss for `labels`
        [N] and return that loss."""
        x = self._x
        if x is None:
            raise RuntimeError("backward() needs a forward() first")
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if labels.shape != (x.shape[0],) or labels.min() < 0 or labels.max() >= self.sizes[-1]:
            raise ValueError(f"labels must be {x.shape[0]} class indices in 0..{self.sizes[-1] - 1}")
        p, g, a = self.params, self.grads, self.buffers(x.shape[0])
        loss = cross_entropy_backward(a["dz3"], a["probs"], labels)
        dense_backward(a["dh2"], g["layer3.weight"], g["layer3.bias"], a["dz3"], a["h2"], p["layer3.weight"])
        sigmoid_backward(a["dz2"], a["dh2"], a["h2"])
        dense_backward(a["dh1"], g["layer2.weight"], g["layer2.bias"], a["dz2"], a["h1"], p["layer2.weight"])
        tanh_backward(a["dz1"], a["dh1"], a["h1"])
        dense_backward(a["dx"], g["layer1.weight"], g["layer1.bias"], a["dz1"], x, p["layer1.weight"])
        return loss

    def train_step(self, x: np.ndarray, labels: np.ndarray, lr: float) -> float:
        self.forward(x)
        loss = self.backward(labels)
        sgd_update(self.flat, self.grad_flat, float(lr))
        return loss

    def predict(self, x: np.ndarray) -> np.ndarray:
        """x [N, 9] -> predicted symbol index [N]."""
        return np.argmax(self.forward(x), axis=1)

    def accuracy(self, x: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == labels))

    def save(self, folder: str | Path) -> Path:
        """folder/model.safetensors + folder/config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self.params.items()}, folder / "model.safetensors")
        config = {
            "model_type": "pixels",
            "sizes": list(self.sizes),
            "symbols": list(self.names),
            "patterns": [SYMBOLS[n] for n in self.names],
            "activations": ["tanh", "sigmoid", "softmax"],
        }
        lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in config.items()]
        (folder / "config.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Network:
        """Read a folder written by save(), through nextword.weights.tensors.load_tensors."""
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "pixels":
            raise ValueError(
                f"{folder}/config.json: model_type {config.get('model_type')!r}, expected 'pixels'"
            )
        net = cls(tuple(config["sizes"]), tuple(config["symbols"]))
        tensors = load_tensors(folder)
        if set(tensors) != set(net.shapes):
            raise ValueError(f"{folder}: tensors {sorted(tensors)}, expected {sorted(net.shapes)}")
        for name, shape in net.shapes.items():
            if tensors[name].shape != shape:
                raise ValueError(
                    f"{folder}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)}"
                )
            net.params[name][...] = tensors[name]
        return net


# ---------------------------------------------------------------------------------------------------------
# Data: the clean symbols and noisy copies of them.


def flip(x: np.ndarray, p: float | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each pixel turned to its opposite (white <-> black) with probability p."""
    return np.where(rng.random(x.shape) < p, -x, x).astype(np.float32)


def gaussian(x: np.ndarray, sigma: float | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of standard deviation sigma added to each pixel, clipped back to [-1, 1]."""
    return np.clip(x + sigma * rng.standard_normal(x.shape), -1.0, 1.0).astype(np.float32)


def noisy_symbols(n: int, p: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n samples (n/4 of each symbol), each pixel flipped with probability p -> (x [n, 9], labels [n])."""
    labels = np.arange(n, dtype=np.int64) % len(PATTERNS)
    return flip(PATTERNS[labels], p, rng), labels


def training_set(n: int, rng: np.random.Generator, max_flip: float = 0.25, max_sigma: float = 0.6):
    """n samples, labels in turn: half with pixels flipped (probability drawn from 0..max_flip per sample),
    half with Gaussian noise (sigma drawn from 0..max_sigma). Noise level 0 gives the clean symbols."""
    labels = np.arange(n, dtype=np.int64) % len(PATTERNS)
    clean = PATTERNS[labels]
    flipped = flip(clean, rng.uniform(0.0, max_flip, size=(n, 1)), rng)
    blurred = gaussian(clean, rng.uniform(0.0, max_sigma, size=(n, 1)), rng)
    x = np.where(rng.random((n, 1)) < 0.5, flipped, blurred).astype(np.float32)
    return np.ascontiguousarray(x), labels


def ideal_accuracy(x: np.ndarray, labels: np.ndarray) -> float:
    """The expected accuracy of the ideal classifier for flip noise (p < 0.5) on these samples: it picks the
    symbol nearest in Hamming distance, a tie between k symbols counting 1/k if the true symbol is among them."""
    distance = (np.sign(x)[:, None, :] != PATTERNS[None, :, :]).sum(axis=2)  # [n, 4]
    nearest = distance == distance.min(axis=1, keepdims=True)
    return float(np.mean(nearest[np.arange(len(labels)), labels] / nearest.sum(axis=1)))


def best_possible_accuracy(p: float) -> float:
    """The same ideal classifier's accuracy in expectation over all noise, exact: enumerate the 512 black and
    white displays and add up P(display | symbol) for the symbol it picks."""
    bits = (np.arange(512)[:, None] >> np.arange(9)) & 1  # [512, 9]
    displays = np.where(bits == 1, 1.0, -1.0)
    distance = (displays[:, None, :] != PATTERNS[None, :, :]).sum(axis=2)  # [512, 4]
    likelihood = p**distance * (1 - p) ** (9 - distance)  # P(display | symbol) [512, 4]
    return float(likelihood.max(axis=1).sum() / len(PATTERNS))


# ---------------------------------------------------------------------------------------------------------
# Training.


def warm_up() -> None:
    """Compile every kernel (or load it from Numba's cache) with the one signature training uses."""
    net = Network.random(np.random.default_rng(0))
    net.train_step(PATTERNS, np.arange(len(PATTERNS)), 0.0)


def train(
    epochs: int = 20,
    seed: int = 0,
    lr: float = 0.5,
    batch_size: int = 32,
    n_train: int = 2048,
    log_every: int = 0,
    log=print,
) -> Network:
    """Mini-batch gradient descent. Each epoch draws a fresh set of n_train noisy symbols (so longer training
    never overfits one sample of noise) and walks it in shuffled mini-batches. Deterministic for a given
    seed. Logs the mean loss of the last `log_every` steps (0: never)."""
    if n_train % batch_size:
        raise ValueError("n_train must be a multiple of batch_size (one buffer size for every batch)")
    rng = np.random.default_rng(seed)
    net = Network.random(rng)
    step, running = 0, 0.0
    for epoch in range(1, epochs + 1):
        x, labels = training_set(n_train, rng)
        order = rng.permutation(n_train)
        for start in range(0, n_train, batch_size):
            batch = order[start : start + batch_size]
            running += net.train_step(x[batch], labels[batch], lr)
            step += 1
            if log_every and step % log_every == 0:
                log(f"epoch {epoch:3d}  step {step:5d}  loss {running / log_every:.4f}")
                running = 0.0
    return net


def noise_table(
    net: Network, flips=(0.0, 0.1, 0.2, 0.3, 0.4), n: int = 2000, seed: int = 1234
) -> list[tuple[float, float, float, float]]:
    """Rows of (flip probability p, accuracy of net, ideal accuracy on the same samples, ideal accuracy
    exact), with n samples flipped with probability p per row."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in flips:
        x, labels = noisy_symbols(n, p, rng)
        rows.append((p, net.accuracy(x, labels), ideal_accuracy(x, labels), best_possible_accuracy(p)))
    return rows
