"""Train the 3x3 pixel symbol network, report its accuracy, save it and check that it loads back.

    python examples/pixels/train.py [--out DIR] [--epochs N] [--seed S] [--lr LR] [--log-every STEPS]

DIR defaults to $NEXTWORD_HOME/pixels (~/.cache/nextword/pixels). Exits 1 if the trained network misses
one of the 4 clean symbols or the reloaded copy does not give identical outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

START = time.perf_counter()

import network as nw  # this folder is sys.path[0] when run as a script (imports after START: timed)
import numpy as np


def default_out() -> Path:
    # the same cache root as the default language model (nextword.weights.default_model.nextword_home)
    return Path(os.environ.get("NEXTWORD_HOME") or Path.home() / ".cache" / "nextword") / "pixels"


def symbols_art() -> str:
    """The four symbols side by side, names on top."""
    rows = [[name.center(3) for name in nw.NAMES]]
    rows += [[nw.SYMBOLS[name].split("/")[r] for name in nw.NAMES] for r in range(3)]
    return "\n".join(("    " + "   ".join(row)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=default_out(), help="folder for the weights")
    parser.add_argument("--epochs", type=int, default=20, help="passes over 2048 fresh noisy samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate of plain SGD")
    parser.add_argument("--log-every", type=int, default=256, help="print the mean loss every STEPS steps")
    args = parser.parse_args(argv)

    sizes = nw.SIZES
    n_params = sum(int(np.prod(s)) for s in nw.tensor_shapes(sizes).values())
    print(f"network: {sizes[0]} pixels -> {sizes[1]} tanh -> {sizes[2]} sigmoid -> {sizes[3]} softmax")
    print(f"         {n_params} parameters; symbols ('#' white, '.' black):\n{symbols_art()}\n")

    t = time.perf_counter()
    nw.warm_up()
    print(f"kernels ready in {time.perf_counter() - t:.3f} s (compiled, or loaded from Numba's cache)")

    t = time.perf_counter()
    net = nw.train(epochs=args.epochs, seed=args.seed, lr=args.lr, log_every=args.log_every)
    print(f"trained in {time.perf_counter() - t:.3f} s ({args.epochs} epochs of 64 mini-batches of 32)\n")

    labels = np.arange(len(nw.NAMES))
    clean = net.accuracy(nw.PATTERNS, labels)
    print(f"clean symbols: {round(clean * len(labels))}/{len(labels)} correct ({clean:.0%})")
    rows = nw.noise_table(net)
    print("noisy symbols, each pixel flipped with probability p, 2000 samples per row:")
    print("    p     network   ideal (same samples)   ideal (exact)")
    for p, acc, ideal, exact in rows:
        print(f"    {p:.1f}   {acc:7.1%}   {ideal:20.1%}   {exact:13.1%}")

    folder = net.save(args.out)
    again = nw.Network.load(folder)
    x, _ = nw.noisy_symbols(2000, 0.2, np.random.default_rng(7))
    x = np.concatenate([nw.PATTERNS, x])
    same = np.array_equal(net.forward(x).copy(), again.forward(x))
    print(f"\nsaved to {folder} (model.safetensors, config.json)")
    print(f"reloaded through nextword.weights.tensors: outputs {'identical' if same else 'DIFFERENT'}")
    print(f"total {time.perf_counter() - START:.2f} s (including imports)")
    return 0 if clean == 1.0 and same else 1


if __name__ == "__main__":
    sys.exit(main())
