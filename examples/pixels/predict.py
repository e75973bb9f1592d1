"""Show a trained pixels network some 3x3 displays and print its probabilities for the 4 symbols.

    python examples/pixels/predict.py DIR PATTERN [PATTERN ...]

A PATTERN is the display's three rows separated by '/': '#' (or 'X') is a white pixel, '.' a black one.
For example "#.#/.#./#.#" is the X symbol and "#.#/.../#.#" an X with its centre pixel gone dark.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import network as nw  # this folder is sys.path[0] when run as a script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a folder written by train.py")
    parser.add_argument("patterns", nargs="+", metavar="PATTERN", help="e.g. '#.#/.#./#.#'")
    args = parser.parse_args(argv)
    try:
        pixels = [nw.parse_pattern(p) for p in args.patterns]
    except ValueError as e:
        parser.error(str(e))
    net = nw.Network.load(args.folder)
    for text, x in zip(args.patterns, pixels, strict=True):
        probs = net.forward(x[None, :])[0]
        print(f"{text}\n{nw.draw(x)}")
        for name, p in zip(net.names, probs, strict=True):
            mark = "  <-" if p == probs.max() else ""
            print(f"  {name}  {p:6.1%}  {'#' * round(40 * p)}{mark}".rstrip())
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
