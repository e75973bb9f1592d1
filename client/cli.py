"""The `nextword` command. Client subcommands live here; engine-side ones (serve, generate, pull) are imported
from nextword.server only when used, so the client never pulls in numba."""

from __future__ import annotations

import argparse
import sys


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags shared by every command that generates."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument("--top-n", type=int, default=5, help="alternatives shown per token with --show-probs")
    g.add_argument("--show-probs", action="store_true", help="print each token with its top alternatives")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "seed": args.seed,
        "stop": tuple(args.stop),
        "ignore_eos": args.ignore_eos,
        "top_n": args.top_n if args.show_probs else 0,
    }


def format_probs(token_text: str, prob: float, top: list[tuple[str, float]]) -> str:
    """One line per token for --show-probs: the token, its probability, then the alternatives."""
    alternatives = "  ".join(f"{t!r} {p:.3f}" for t, p in top)
    return f"{token_text!r:>16} {prob:.3f} | {alternatives}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nextword", description="A CPU language-model inference server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from nextword.server import cli as server_cli

    server_cli.add_commands(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
