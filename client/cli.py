"""The `nextword` command. Client subcommands live here; engine-side ones (serve, generate, pull) are imported
from nextword.server only when used, so the client never pulls in numba."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

# gRPC's C core writes its own log lines to stderr (a second, cryptic line for a port in use, a TLS handshake
# failure, ...), which our one-line errors already explain. It reads this variable once, when grpc is first
# imported: quiet unless the user set it or runs `serve --log-level debug`.
if "GRPC_VERBOSITY" not in os.environ and "debug" not in " ".join(sys.argv).lower():
    os.environ["GRPC_VERBOSITY"] = "NONE"

import numpy as np

from nextword.client.client import DEFAULT_TARGET, Client
from nextword.client.errors import NextwordError
from nextword.client.types import Finish, GenerateEvent


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default (unless it says it already); epilogs keep their examples'
    line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if "default" in text or unset or action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class MissingExtra(Exception):
    """A command needs an optional part of nextword that is not installed."""

    def __init__(self, module: str | None, extra: str):
        super().__init__(
            f"this command needs the '{extra}' extra ({module!r} is not installed): "
            f"pip install 'nextword[{extra}]'"
        )


UINT64_MAX = 2**64 - 1


def uint64(text: str) -> int:
    """A seed: an integer in [0, 2**64)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= UINT64_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags shared by every command that generates."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the CLI's default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    g.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus: the likeliest tokens holding p (1 = off)"
    )
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="0 = off")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="0 = off")
    g.add_argument(
        "--seed", type=uint64, default=None, help="sampling seed in [0, 2**64) (default: random, reported)"
    )
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable; default: none)")
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


# ---- client commands (they talk to a server) ----


def add_connection_flags(common: argparse.ArgumentParser) -> None:
    """How a client command reaches the server: address, deadline, TLS and token."""
    common.add_argument(
        "--target",
        default=os.environ.get("NEXTWORD_TARGET", DEFAULT_TARGET),
        help="server address: HOST:PORT, or any gRPC target: several replicas as ipv4:HOST:PORT,HOST:PORT or "
        "dns:///NAME:PORT (calls go round-robin to those SERVING), unix:PATH (docs/deploy.md) [$NEXTWORD_TARGET]",
    )
    common.add_argument(
        "--timeout", type=float, default=None, help="deadline of each call, in seconds (default: none)"
    )
    common.add_argument("--json", action="store_true", help="print one JSON object per event or response")
    g = common.add_argument_group("security (docs/security.md)")
    g.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=os.environ.get("NEXTWORD_TLS_CA"),
        help="connect with TLS, trusting this CA (default: plaintext) [$NEXTWORD_TLS_CA]",
    )
    g.add_argument(
        "--tls-cert",
        metavar="PEM",
        default=os.environ.get("NEXTWORD_TLS_CERT"),
        help="this client's certificate, for a server requiring mutual TLS (default: none) "
        "[$NEXTWORD_TLS_CERT]",
    )
    g.add_argument(
        "--tls-key",
        metavar="PEM",
        default=os.environ.get("NEXTWORD_TLS_KEY"),
        help="the private key of --tls-cert (default: none) [$NEXTWORD_TLS_KEY]",
    )
    g.add_argument(
        "--token",
        default=os.environ.get("NEXTWORD_TOKEN"),
        help="bearer token for a server started with one (default: none; prefer $NEXTWORD_TOKEN or "
        "--token-file: other users can see command lines) [$NEXTWORD_TOKEN]",
    )
    g.add_argument(
        "--token-file",
        metavar="FILE",
        default=os.environ.get("NEXTWORD_TOKEN_FILE"),
        help="read the bearer token from this file (default: none) [$NEXTWORD_TOKEN_FILE]",
    )


def connection_kwargs(args: argparse.Namespace) -> dict:
    """Client(...) keyword arguments for the connection flags."""
    token = args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ValueError(f"cannot read --token-file {args.token_file}: {e.strerror}") from None
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
    return {
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "token": token or None,
    }


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join("  " + line for line in lines)


def add_client_commands(commands) -> None:
    common = Parser(add_help=False)
    add_connection_flags(common)

    p = commands.add_parser(
        "complete",
        parents=[common],
        help="stream a completion from a server",
        epilog=examples(
            'nextword complete "The capital of France is" --max-new-tokens 12',
            'nextword complete "What is the capital of France?" --chat --show-probs --top-n 3',
            'nextword complete "Once upon a time" --temperature 0.8 --seed 7',
        ),
    )
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    add_sampling_flags(p)
    p.set_defaults(run=run_complete)

    p = commands.add_parser(
        "chat",
        parents=[common],
        help="chat with the model on a server (reads stdin)",
        description="Each line you type is a user message; the answer streams back. " + CHAT_HELP,
        epilog=examples(
            "nextword chat", 'nextword chat --system "Answer in one sentence." --temperature 0.7'
        ),
    )
    p.add_argument("--system", help="a system message opening the conversation (default: none)")
    add_sampling_flags(p)
    p.set_defaults(run=run_chat, max_new_tokens=256)

    p = commands.add_parser(
        "probs",
        parents=[common],
        help="the most likely next tokens after a prompt",
        epilog=examples('nextword probs "The capital of France is" --top-n 5'),
    )
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    p.add_argument("--top-n", type=int, default=10, help="how many tokens to list")
    p.set_defaults(run=run_probs)

    p = commands.add_parser(
        "tokenize",
        parents=[common],
        help="text to token ids, on a server",
        epilog=examples('nextword tokenize "Hello world 2024"', 'nextword tokenize "Hi!" --chat --json'),
    )
    p.add_argument("text")
    p.add_argument("--chat", action="store_true", help="tokenize the text as one user chat message")
    p.set_defaults(run=run_tokenize)

    p = commands.add_parser(
        "detokenize",
        parents=[common],
        help="token ids to text, on a server",
        epilog=examples("nextword detokenize 19556 905"),
    )
    p.add_argument("ids", type=int, nargs="+", metavar="ID")
    p.add_argument("--skip-special-tokens", action="store_true", help="leave special tokens out of the text")
    p.set_defaults(run=run_detokenize)

    p = commands.add_parser(
        "info",
        parents=[common],
        help="the served model, its limits and defaults",
        epilog=examples("nextword info", "nextword info --json --target 10.0.0.5:50051 --tls-ca ca.pem"),
    )
    p.set_defaults(run=run_info)

    add_inspect_commands(commands, common)

    add_score_command(commands, common)

    add_load_command(commands, common)

    from nextword.client import lsp, typing_surface  # the editor commands: their own modules

    lsp.add_command(commands, common)
    typing_surface.add_command(commands, common)


def token_range(text: str) -> tuple[int, int]:
    """Parse "A:B" into (A, B), for the --*-tokens-range flags."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (two token counts), got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 1 <= A <= B, got {text!r}")
    return low, high


def add_score_command(commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "score",
        parents=[common],
        help="the perplexity of a text (and each token's log-probability), on a server",
        description="Score a text: the log-probability of each token given the ones before it, and the "
        "perplexity exp(-mean log-probability). A text longer than --window tokens is scored in windows "
        "starting every --stride tokens, each scoring the tokens no earlier window scored (with the defaults, "
        "1024 and 1024, the method and the figure of benchmarks/perplexity.py).",
        epilog=examples(
            "nextword score benchmarks/data/english.txt",
            "echo 'The capital of France is Paris.' | nextword score - --tokens --top-n 3",
        ),
    )
    p.add_argument("file", help="the text file, or - for stdin")
    p.add_argument("--window", type=int, default=1024, help="tokens per window")
    p.add_argument(
        "--stride", type=int, default=None, help="tokens between window starts (default: --window)"
    )
    p.add_argument("--tokens", action="store_true", help="also print each token's log-probability and rank")
    p.add_argument("--top-n", type=int, default=0, help="with --tokens or --json: the top-N at each position")
    p.set_defaults(run=run_score)


def add_load_command(commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "load",
        parents=[common],
        help="load-test a server: TTFT, ITL, TPOT, E2E latency, throughput, errors by status",
        description="Load-test a server, closed loop (--concurrency) or open loop (--rate). Latencies are "
        "measured from each request's scheduled send time. Progress goes to stderr; the result table (or "
        "--json) to stdout. --timeout is the deadline of each request.",
        epilog=examples(
            "nextword load --concurrency 8 --num-requests 64",
            "nextword load --rate 4 --duration 30 --json > result.json",
            "nextword load --scenario typist --concurrency 4 --num-requests 20",
            "nextword load --protocol http --target 127.0.0.1:8000 --concurrency 16",
            "nextword load --target ipv4:127.0.0.1:50051,127.0.0.1:50052 --concurrency 16   # per-replica counts",
        ),
    )
    g = p.add_argument_group("load")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency",
        type=int,
        help="closed loop: N workers, each sends when its previous request ended (default 1)",
    )
    mode.add_argument(
        "--rate",
        type=float,
        help="open loop: Poisson arrivals at R requests/s, sent on schedule (default: closed loop)",
    )
    g.add_argument(
        "--max-inflight",
        type=int,
        default=256,
        help="open loop: requests in flight at most; an arrival beyond waits, counted (default 256)",
    )
    g.add_argument("--num-requests", type=int, help="measured requests (default 100 unless --duration)")
    g.add_argument(
        "--duration",
        type=float,
        help="seconds of sending, in-flight requests then finish (default: no limit)",
    )
    g.add_argument("--warmup", type=int, default=0, help="requests sent first and not counted (default 0)")
    g.add_argument(
        "--channels", type=int, help="gRPC channels (connections), round-robin (default min(concurrency, 8))"
    )
    g.add_argument(
        "--scenario",
        choices=("plain", "cancel-storm", "typist"),
        default="plain",
        help="plain requests, a storm of cancelled ones, or editor users typing (one Session each)",
    )
    g.add_argument(
        "--protocol",
        choices=("grpc", "http"),
        default="grpc",
        help="http: --target is an OpenAI-compatible server (nextword serve --http-port, llama-server, "
        "vLLM), driven with streamed /v1/completions (default grpc)",
    )
    g.add_argument(
        "--cancel-fraction",
        type=float,
        default=0.5,
        help="cancel-storm: fraction of requests cancelled after 1-5 tokens (default 0.5)",
    )
    g.add_argument(
        "--keystroke-ms", type=float, default=50.0, help="typist: ms between keystrokes (default 50)"
    )
    g.add_argument(
        "--keystroke-tokens",
        type=int,
        default=16,
        help="typist: max_new_tokens of each keystroke (default 16)",
    )
    g.add_argument("--detailed", action="store_true", help="with --json: add every request's record")

    g = p.add_argument_group("requests")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-tokens", type=int, metavar="L", help="prompt length in tokens (default 32)")
    prompt.add_argument(
        "--prompt-tokens-range", type=token_range, metavar="A:B", help="uniform in [A, B] (default: fixed)"
    )
    output = g.add_mutually_exclusive_group()
    output.add_argument("--output-tokens", type=int, metavar="M", help="tokens generated (default 32)")
    output.add_argument(
        "--output-tokens-range", type=token_range, metavar="A:B", help="uniform in [A, B] (default: fixed)"
    )
    g.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="T",
        help="every prompt starts with the same T tokens (exercises the prefix cache)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument(
        "--seed",
        type=uint64,
        default=None,
        help="sampling seed, and the load's own randomness (default: random)",
    )
    p.set_defaults(run=run_load)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, timeout=args.timeout, **connection_kwargs(args))


def _prompt(args: argparse.Namespace, text: str):
    return [{"role": "user", "content": text}] if args.chat else text


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def finish_line(f: Finish) -> str:
    stop = f": {f.stop!r}" if f.stop else ""
    return (
        f"[{f.reason}{stop}; {f.usage.prompt_tokens} prompt + {f.usage.generated_tokens} generated tokens; "
        f"first token {f.timings.ttft_ms:.0f} ms; {f.timings.tokens_per_s:.1f} tokens/s; seed {f.seed}]"
    )


def print_stream(events: Iterable[GenerateEvent], args: argparse.Namespace) -> str:
    """Print a generation as it arrives (text, --show-probs lines or --json lines); returns its text."""
    parts = []
    for event in events:
        parts.append(event.text)
        if args.json:
            _print_json(event.to_dict())
        elif args.show_probs:
            if event.token:
                t = event.token
                print(format_probs(t.text, t.prob, [(a.text, a.prob) for a in t.top]), flush=True)
        else:
            print(event.text, end="", flush=True)
        if event.finish and not args.json:
            if not args.show_probs:
                print(flush=True)
            print(finish_line(event.finish), file=sys.stderr, flush=True)
    return "".join(parts)


def run_complete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print_stream(client.generate(_prompt(args, args.prompt), **sampling_kwargs(args)), args)
    return 0


CHAT_HELP = (
    "Commands: /help shows them, /reset forgets the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops "
    "an answer. A line starting with // is sent as text starting with /."
)


def run_chat(args: argparse.Namespace) -> int:
    """A REPL: each stdin line is a user turn; /reset forgets the conversation, /exit or EOF quits."""
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not args.json
    prompt = "> " if interactive else ""
    failed = False
    with _client(args) as client:
        if interactive:
            print(f"[chat with {args.target}. {CHAT_HELP}]", file=sys.stderr, flush=True)
        while True:
            try:
                line = input(prompt)
            except EOFError:
                break
            command = line.strip()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history = list(start)
                print("[conversation cleared]", file=sys.stderr, flush=True)
                continue
            if command == "/help":
                print(f"[{CHAT_HELP}]", file=sys.stderr, flush=True)
                continue
            if command.startswith("//"):
                line = line.replace("//", "/", 1)
            elif command.startswith("/"):
                name = command.split()[0]
                print(f"[unknown command {name}: not sent. {CHAT_HELP}]", file=sys.stderr, flush=True)
                continue
            if not command:
                continue
            messages = [*history, {"role": "user", "content": line}]
            try:
                answer = print_stream(client.generate(messages, **sampling_kwargs(args)), args)
            except NextwordError as e:  # report it and stay in the conversation (the turn is dropped)
                print_error(e, args.target)
                failed = True
                continue
            except KeyboardInterrupt:  # Ctrl-C stops this answer (the RPC is cancelled), not the chat
                print("\n[interrupted]", file=sys.stderr, flush=True)
                continue
            history = [*messages, {"role": "assistant", "content": answer}]
    return 1 if failed else 0


def run_probs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        dist = client.next_token_probabilities(_prompt(args, args.prompt), top_n=args.top_n)
    if args.json:
        _print_json(dist.to_dict())
        return 0
    print(f"{'rank':>4} {'id':>7}  {'token':<20} {'prob':>8} {'logprob':>9}")
    for rank, t in enumerate(dist.top, 1):
        print(f"{rank:>4} {t.token_id:>7}  {t.text!r:<20} {t.prob:>8.4f} {t.logprob:>9.4f}")
    print(f"[{dist.prompt_tokens} prompt tokens; vocabulary of {dist.vocab_size}]", file=sys.stderr)
    return 0


def run_score(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    with _client(args) as client:
        scores = client.score(text, top_n=args.top_n, window=args.window, stride=args.stride)
    if args.json:
        _print_json(scores.to_dict())
        return 0
    if args.tokens:
        print(f"{'index':>6} {'id':>7}  {'token':<20} {'logprob':>9} {'rank':>6}")
        for t in scores.tokens:
            top = "  ".join(f"{a.text!r} {a.logprob:.3f}" for a in t.top)
            print(
                f"{t.index:>6} {t.id:>7}  {t.text!r:<20} {t.logprob:>9.4f} {t.rank:>6}"
                + (f" | {top}" if top else "")
            )
    print(
        f"perplexity {scores.perplexity:.3f} over {len(scores.tokens)} tokens (sum of log-probabilities "
        f"{scores.sum_logprob:.2f}; {scores.prompt_tokens} tokens in {scores.windows} windows of "
        f"{scores.window}, stride {scores.stride})"
    )
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tokenized = client.tokenize(_prompt(args, args.text))
    if args.json:
        _print_json(tokenized.to_dict())
        return 0
    for token_id, text in zip(tokenized.ids, tokenized.tokens, strict=True):
        print(f"{token_id} {text!r}")
    print(f"[{len(tokenized.ids)} tokens]", file=sys.stderr)
    return 0


def run_detokenize(args: argparse.Namespace) -> int:
    with _client(args) as client:
        text = client.detokenize(args.ids, skip_special_tokens=args.skip_special_tokens)
    if args.json:
        _print_json({"text": text})
    else:
        print(text)
    return 0


def run_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_info()
    if args.json:
        _print_json(info.to_dict())
        return 0
    rows = {
        "model": info.model_id,
        "architecture": info.architecture,
        "parameters": f"{info.parameters:,}",
        "weights": info.weights_format,
        "vocabulary": info.vocab_size,
        "context": f"{info.context_length} tokens",
        "chat template": "yes" if info.has_chat_template else "no",
        "eos token ids": " ".join(map(str, info.eos_token_ids)),
        "special tokens": " ".join(f"{t.id}={t.text!r}" for t in info.special_tokens),
        "limits": " ".join(f"{k}={v}" for k, v in info.limits.to_dict().items()),
        # The server's defaults apply to a field a request leaves unset (the Python client's None); the
        # nextword commands always send their own flags' values, and they are greedy.
        "server defaults": " ".join(f"{k}={v}" for k, v in info.defaults.items())
        + "  (for fields a request leaves unset, e.g. from Python)",
        "CLI defaults": "temperature=0 (greedy) max_new_tokens=64  (complete, chat: see --help)",
    }
    for name, value in rows.items():
        print(f"{name + ':':<17}{value}")
    return 0


# ---- looking inside the model: similar, analogy, explain ----


def add_inspect_commands(commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "similar",
        parents=[common],
        help="rank words or sentences by how similar the model finds them to the first one",
        description="Rank ITEMs (and --file lines) by cosine similarity to the first of them. Single words "
        "are compared by their input embeddings (the table row the model starts from, taken with a leading "
        "space, as a word inside a sentence); anything longer by its sentence embedding (the mean of the "
        "last hidden state over its tokens).",
        epilog=examples(
            "nextword similar cat dog car banana",
            'nextword similar "I love this film" "What a great movie" "The invoice is overdue"',
        ),
    )
    p.add_argument("items", nargs="*", metavar="ITEM", help="the query first, then the items to rank")
    p.add_argument("--file", help="more items, one per line (blank lines skipped; default: none)")
    p.add_argument(
        "--by",
        choices=("auto", "words", "sentences"),
        default="auto",
        help="words: input embeddings of ' ITEM'; sentences: sentence embeddings; auto (default): words "
        "when every item is one word",
    )
    p.add_argument(
        "--layer",
        type=int,
        help="instead: the mean over each item's tokens of the hidden state after this layer (0 = the "
        "input embeddings; default: see --by)",
    )
    p.set_defaults(run=run_similar)

    p = commands.add_parser(
        "analogy",
        parents=[common],
        help="A is to B as C is to ?: the tokens whose input embeddings are nearest B - A + C",
        epilog=examples("nextword analogy man king woman"),
    )
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("c", metavar="C")
    p.add_argument("--top-n", type=int, default=10, help="how many tokens to list (default 10)")
    p.add_argument(
        "--no-space",
        action="store_true",
        help="use the words as written (default: with a leading space, as words inside a sentence)",
    )
    p.set_defaults(run=run_analogy)

    p = commands.add_parser(
        "explain",
        parents=[common],
        help="how the model reads a prompt: its tokens, what a token attends to, what comes next",
        epilog=examples(
            'nextword explain "The cat sat on the"',
            'nextword explain "The cat sat on the" --layer 3 --head 0 --png attention.png',
        ),
    )
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    p.add_argument(
        "--position",
        type=int,
        default=-1,
        help="index of the token to explain (negative: from the end; default -1)",
    )
    p.add_argument(
        "--layer", type=int, help="one layer's attention, 1..L (default: the mean over all layers)"
    )
    p.add_argument("--head", type=int, help="one query head, 0..H-1 (default: the mean over the heads)")
    p.add_argument("--top-n", type=int, default=5, help="tokens listed per table (default 5)")
    p.add_argument(
        "--png",
        metavar="FILE",
        help="also draw the attention matrix into this PNG (needs nextword[viz]; default: no picture)",
    )
    p.set_defaults(run=run_explain)


def visible(token: str) -> str:
    """A token as the model sees it, spaces shown: ' bank' -> '·bank', '\n' -> '\\n'."""
    escaped = token.encode("unicode_escape").decode("ascii") if not token.isprintable() else token
    return escaped.replace(" ", "·")


def embed_batches(items: list[str], max_texts: int, max_tokens: int) -> list[list[str]]:
    """Split items into Embed calls within the server's limits: a token is at least one UTF-8 byte, so a
    batch of at most max_tokens bytes fits (an item longer than that goes alone and may still fit)."""
    batches, size = [[]], 0
    for item in items:
        n = len(item.encode())
        if batches[-1] and (len(batches[-1]) >= max_texts or size + n > max_tokens):
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += n
    return batches


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def run_similar(args: argparse.Namespace) -> int:
    items = list(args.items)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            items += [line.rstrip("\n") for line in f if line.strip()]
    if len(items) < 2:
        print("error: give a query and at least one item to rank (ITEM arguments or --file)", file=sys.stderr)
        return 2
    words = args.by == "words" or (args.by == "auto" and all(len(item.split()) == 1 for item in items))
    if args.layer is not None:
        texts, layer, by = items, args.layer, f"the mean hidden state after layer {args.layer}"
        if args.layer == 0:
            by = "the mean input embedding of their tokens"
    elif words:
        texts, layer = [" " + item.strip() for item in items], 0
        by = "input embeddings (each word with a leading space)"
    else:
        texts, layer, by = items, None, "sentence embeddings"
    with _client(args) as client:
        limits = client.model_info().limits
        vectors = []
        for batch in embed_batches(texts, limits.max_embed_texts, limits.max_embed_tokens):
            result = client.embed(batch, layer=layer)
            if layer is None:
                vectors += [t.sentence for t in result.texts]
            else:
                vectors += [_unit(t.token_embeddings.mean(axis=0)) for t in result.texts]
    cosines = np.stack(vectors[1:]) @ vectors[0]
    order = np.argsort(-cosines, kind="stable")
    if args.json:
        ranked = [{"item": items[1 + i], "cosine": float(cosines[i])} for i in order]
        _print_json({"query": items[0], "by": by, "ranked": ranked})
        return 0
    print(f"similarity to {items[0]!r} by {by}:")
    for rank, i in enumerate(order, 1):
        print(f"{rank:>4}  {cosines[i]:6.3f}  {items[1 + i]!r}")
    return 0


def run_analogy(args: argparse.Namespace) -> int:
    a, b, c = (w if args.no_space else " " + w.strip() for w in (args.a, args.b, args.c))
    with _client(args) as client:
        result = client.nearest_tokens([(b, 1.0), (a, -1.0), (c, 1.0)], top_n=args.top_n)
    if args.json:
        _print_json(result.to_dict())
        return 0
    terms = "  ".join(f"{t.text!r} (id {t.token_id})" for t in result.terms)
    print(
        f"{args.a} : {args.b} :: {args.c} : ?   nearest to {b!r} - {a!r} + {c!r} among the input embeddings"
    )
    for word, t in zip((b, a, c), result.terms, strict=True):
        if t.text != word:
            print(
                f"  note: {word!r} is several tokens; its first, {t.text!r}, stands for it", file=sys.stderr
            )
    for rank, t in enumerate(result.nearest, 1):
        print(f"{rank:>4}  {t.cosine:6.3f}  {t.text!r}")
    print(f"[terms: {terms}]", file=sys.stderr)
    return 0


def run_explain(args: argparse.Namespace) -> int:
    if args.png:
        folder = Path(args.png).parent
        if not folder.is_dir():
            print(f"error: --png {args.png}: the folder {folder} does not exist", file=sys.stderr)
            return 2
        try:
            import matplotlib  # noqa: F401 (only checked here: fail before the work, not after)
        except ImportError:
            print("error: --png needs matplotlib: pip install 'nextword[viz]'", file=sys.stderr)
            return 2
    with _client(args) as client:
        att = client.attention(_prompt(args, args.prompt), layer=args.layer, head=args.head)
        T = len(att.token_ids)
        if not -T <= args.position < T:
            print(
                f"error: --position {args.position}: the prompt has {T} tokens (0..{T - 1})", file=sys.stderr
            )
            return 2
        i = args.position % T
        dist = client.next_token_probabilities(list(att.token_ids[: i + 1]), top_n=args.top_n)
    heads = f"head {att.head}" if att.head is not None else f"the mean over the {att.num_heads} heads"
    layers = f"layer {att.layer}" if att.layer is not None else f"all {att.num_layers} layers"
    row = att.weights[i]
    order = np.argsort(-row[: i + 1], kind="stable")[: args.top_n]
    if args.json:
        _print_json(
            {
                "tokens": [{"id": t, "text": s} for t, s in zip(att.token_ids, att.tokens, strict=True)],
                "token": i,
                "layer": att.layer,
                "head": att.head,
                "attends_to": [{"index": int(j), "weight": float(row[j])} for j in order],
                "next": [t.to_dict() for t in dist.top],
            }
        )
    else:
        print(f"tokens (· is a space): {T}")
        print("  " + "  ".join(f"{j}:{visible(s)}" for j, s in enumerate(att.tokens)))
        print(f"\ntoken {i} {visible(att.tokens[i])} attends most to ({heads}, {layers}):")
        for j in order:
            print(f"  {row[j]:6.3f}  {j:>4} {visible(att.tokens[j])}")
        print(f"\nnext token after {visible(att.tokens[i])}:")
        for t in dist.top:
            print(f"  {t.prob:6.3f}  {visible(t.text)}")
    if args.png:
        draw_attention(args.png, att, i, f"attention: {heads}, {layers}")
        print(f"[heatmap written to {args.png}]", file=sys.stderr)
    return 0


def draw_attention(path: str, att, highlight: int, title: str) -> None:
    """A heatmap of att.weights (rows: the query tokens, columns: the tokens they attend to) as a PNG."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    T = len(att.tokens)
    labels = [f"{visible(s)} {j}" for j, s in enumerate(att.tokens)]
    side = min(4 + 0.3 * T, 40)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(att.weights, cmap="viridis", vmin=0.0)
    ax.set_xticks(range(T), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(T), labels, fontsize=8)
    ax.set_xlabel("attends to (key)")
    ax.set_ylabel("token (query)")
    ax.set_title(title)
    ax.add_patch(Rectangle((-0.5, highlight - 0.5), T, 1, fill=False, edgecolor="red", linewidth=1.5))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _first_set(*values):
    return next(v for v in values if v is not None)


def run_load(args: argparse.Namespace) -> int:
    from nextword.client import load

    try:
        config = load.LoadConfig(
            target=args.target,
            protocol=args.protocol,
            concurrency=args.concurrency,
            rate=args.rate,
            max_inflight=args.max_inflight,
            num_requests=args.num_requests,
            duration=args.duration,
            warmup=args.warmup,
            prompt_tokens=_first_set(args.prompt_tokens_range, args.prompt_tokens, 32),
            output_tokens=_first_set(args.output_tokens_range, args.output_tokens, 32),
            temperature=args.temperature,
            seed=args.seed,
            shared_prefix=args.shared_prefix,
            scenario=args.scenario,
            cancel_fraction=args.cancel_fraction,
            keystroke_ms=args.keystroke_ms,
            keystroke_tokens=args.keystroke_tokens,
            channels=args.channels,
            timeout=args.timeout,
            security=connection_kwargs(args),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    live = sys.stderr.isatty()  # a live line on a terminal; plain periodic lines otherwise
    config.progress_interval = 0.5 if live else 5.0

    def progress(p) -> None:
        line = load.format_progress(p)
        if live:
            print(f"\r{line}\x1b[K", end="\n" if p.phase == "done" else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    try:
        result = asyncio.run(load.run_load(config, progress))
    except ValueError as e:  # e.g. prompt + output longer than the model's context
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = result.to_dict(detailed=args.detailed)
    if args.json:
        _print_json(summary)
    else:
        print(load.format_result(summary), flush=True)
    return 0 if summary["completed"] and summary["healthy_after"] is not False else 1


def print_error(e: NextwordError, target: str | None = None) -> None:
    """One line: the status code, the server's message, and a hint when the cause is recognisable."""
    message, hint = e.message, ""
    first = message.splitlines()[0] if message else ""
    # pick_first says "failed to connect to all addresses", round_robin "... Failed to connect to remote host"
    if e.code_name == "UNAVAILABLE" and "failed to connect" in message.lower():
        where = f" at {target}" if target else ""
        if "Connection refused" in message or "Socket closed" in message or "Connection reset" in message:
            first = f"no server{where} (connection refused)"
        elif "ssl" in message.lower() or "handshake" in message.lower() or "certificate" in message.lower():
            first = f"the TLS handshake{where} failed"
            hint = " (check --tls-ca, and --tls-cert/--tls-key for a server requiring client certificates)"
        else:
            first = f"cannot reach a server{where}"
        hint = hint or (
            " (start one with `nextword serve`, or check --target / $NEXTWORD_TARGET; a TLS server needs --tls-ca)"
        )
    elif e.code_name == "UNAUTHENTICATED":
        hint = " (give the server's token: --token-file, --token or $NEXTWORD_TOKEN)"
    print(f"error: {e.code_name}: {first}{hint}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """After a broken pipe (`nextword tokenize ... | head`): point stdout at /dev/null so the interpreter's
    final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests, embedding)
        pass


def version() -> str:
    try:
        return metadata.version("nextword")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nextword",
        description="A CPU language-model inference server, and its client.",
        epilog="`nextword COMMAND --help` shows a command's flags, defaults and examples.",
    )
    parser.add_argument("--version", action="version", version=f"nextword {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_client_commands(commands)
    from nextword.server import cli as server_cli

    server_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except NextwordError as e:
        print_error(e, getattr(args, "target", None))
        return 1
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        return 130
    except (MissingExtra, ValueError, OSError) as e:  # causes we can name: one line, no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
