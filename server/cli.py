"""Engine-side subcommands: `pull` (fetch the default model) and `generate` (run it in-process)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from nextword.client.cli import MissingExtra, add_sampling_flags, examples, format_probs, sampling_kwargs


def add_commands(commands) -> None:
    add_serve_command(commands)
    p = commands.add_parser(
        "pull",
        help="fetch the default model into the cache and import it",
        epilog=examples("nextword pull    # prints the model folder"),
    )
    p.add_argument("--home", help="cache folder (default: $NEXTWORD_HOME or ~/.cache/nextword)")
    p.set_defaults(run=run_pull)

    p = commands.add_parser(
        "generate",
        help="generate text in-process (no server)",
        epilog=examples(
            'nextword generate "The capital of France is" --max-new-tokens 8',
            'nextword generate "Name a colour." --chat --weights f32 --show-probs',
        ),
    )
    p.add_argument("prompt")
    p.add_argument(
        "--model", help="Hugging Face model folder (default: the default model, fetched if needed)"
    )
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    add_weights_flag(p)
    add_sampling_flags(p)
    p.set_defaults(run=run_generate)


def add_weights_flag(p: argparse.ArgumentParser, variables: list | None = None) -> None:
    env_argument(
        p,
        "--weights",
        "q4",
        choices=["f32", "int8", "q4"],
        help="matmul weight format (q4: 4x the decode speed of f32 for +1.3%% perplexity; quantized "
        "output may differ between AVX2 and AVX-512 CPUs, f32 output does not)",
        variables=variables,
    )


def env(name: str, default, kind=str):
    """A flag's default: $NEXTWORD_<NAME> when set, else `default`."""
    value = os.environ.get("NEXTWORD_" + name)
    return default if value is None else kind(value)


def env_argument(p, flag: str, default, kind=str, variables: list | None = None, **kwargs) -> None:
    """A flag whose default comes from $NEXTWORD_<FLAG> when set; the variable is named in its help (and
    listed in `variables`, for the command's epilog)."""
    name = flag.lstrip("-").replace("-", "_").upper()
    if variables is not None:
        variables.append((f"NEXTWORD_{name}", flag))
    kwargs["help"] = kwargs.get("help", "") + f" [${'NEXTWORD_' + name}]"
    p.add_argument(flag, default=env(name, default, kind), type=kind, **kwargs)


SERVE_EXAMPLES = """examples:
  nextword serve                                  # the default model on 127.0.0.1:50051
  nextword serve --weights f32 --port 0           # exact float32 weights, any free port
  NEXTWORD_TOKEN=$(cat token) nextword serve --host 0.0.0.0 --tls-cert cert.pem --tls-key key.pem
"""


def add_serve_command(commands) -> None:
    variables: list[tuple[str, str]] = []
    p = commands.add_parser("serve", help="serve the model over gRPC")

    def flag(name, default, kind=str, **kwargs):
        env_argument(p, name, default, kind, variables, **kwargs)

    flag("--model", None, help="Hugging Face model folder (default: the default model, fetched if needed)")
    add_weights_flag(p, variables)
    flag("--host", "127.0.0.1", help="address to listen on (0.0.0.0: every interface; see docs/security.md)")
    flag("--port", 50051, int, help="gRPC port (0: any free port)")
    flag("--kv-cache-tokens", 16384, int, help="KV-cache size, in tokens")
    flag(
        "--kv-cache-dtype",
        "auto",
        choices=("auto", "f32", "f16"),
        help="what the KV cache holds: f16 halves its memory and what long contexts read (auto: f16 with "
        "quantized weights, f32 with f32 weights)",
    )
    flag("--max-batch-tokens", 1024, int, help="tokens per engine step at most")
    flag("--max-context", None, int, help="longest prompt + output (default: the model's context)")
    flag("--max-top-n", 20, int, help="alternatives per token a request may ask for")
    flag("--max-queue", 256, int, help="waiting requests at most; beyond it RESOURCE_EXHAUSTED")
    flag("--max-request-bytes", 1 << 20, int, help="largest request message")
    flag("--metrics-port", 9464, int, help="Prometheus /metrics port (0: any free port; -1: no metrics)")
    flag("--metrics-host", "127.0.0.1", help="address of /metrics: loopback unless set, whatever --host is")
    flag(
        "--http-port",
        None,
        int,
        help="also serve the OpenAI-compatible HTTP API on this port (default: off; 0: any free port)",
    )
    flag(
        "--replica-name",
        None,
        help="the name this server gives itself in the x-nextword-replica metadata of its responses, so "
        "that clients balancing over replicas can tell them apart (default: HOSTNAME:PORT)",
    )
    flag("--grace", 10.0, float, help="seconds to drain in-flight requests on SIGINT/SIGTERM")
    flag("--log-level", "INFO", help="DEBUG, INFO, WARNING or ERROR (DEBUG adds tracebacks to errors)")
    g = p.add_argument_group("security (docs/security.md)")

    def secure(name, **kwargs):
        env_argument(g, name, None, variables=variables, **kwargs)

    secure(
        "--tls-cert",
        metavar="PEM",
        help="serve TLS with this certificate chain, with --tls-key (default: plaintext)",
    )
    secure("--tls-key", metavar="PEM", help="the private key of --tls-cert (default: none)")
    secure(
        "--tls-client-ca",
        metavar="PEM",
        help="mutual TLS: require client certificates signed by this CA (default: none required)",
    )
    secure(
        "--token-file",
        metavar="FILE",
        help="require this file's token as 'authorization: Bearer <token>' on every RPC but health "
        "(or set $NEXTWORD_TOKEN to the token itself; default: no token)",
    )
    g.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        help="turn gRPC server reflection off (on by default: grpcurl can list the services)",
    )
    variables.append(("NEXTWORD_TOKEN", "the token itself, instead of --token-file"))
    names = "\n".join(f"  {name:<28}{what}" for name, what in variables)
    p.epilog = (
        f"environment (each sets the default of the flag named):\n{names}\n"
        "  NEXTWORD_HOME               the model cache (default ~/.cache/nextword)\n"
        "  NEXTWORD_GGUF               an already-downloaded GGUF of the default model\n\n" + SERVE_EXAMPLES
    )
    p.set_defaults(run=run_serve)


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The token given directly, or read from a file (surrounding whitespace dropped); None if neither."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise ValueError(f"cannot read --token-file {token_file}: {e.strerror}") from None
        if not token:
            raise ValueError(f"--token-file {token_file} is empty")
    return token or None


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        from nextword.kernels.cache_loading import lean_cache_loads
        from nextword.server.memory import use_server_malloc_policy
        from nextword.server.serve import ServerConfig, StartupError, serve
    except ModuleNotFoundError as e:
        raise MissingExtra(e.name, "server") from e

    try:
        token = read_token(os.environ.get("NEXTWORD_TOKEN"), args.token_file)
        config = ServerConfig(
            model=resolve_model(args.model)
            if args.model
            else None,  # the default: fetched once the port is bound
            weights=args.weights,
            host=args.host,
            port=args.port,
            kv_cache_tokens=args.kv_cache_tokens,
            kv_cache_dtype=args.kv_cache_dtype,
            max_batch_tokens=args.max_batch_tokens,
            max_context=args.max_context,
            max_top_n=args.max_top_n,
            max_queue=args.max_queue,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            metrics_host=args.metrics_host,
            http_port=args.http_port,
            max_request_bytes=args.max_request_bytes,
            grace_s=args.grace,
            tls_cert=args.tls_cert and Path(args.tls_cert),
            tls_key=args.tls_key and Path(args.tls_key),
            tls_client_ca=args.tls_client_ca and Path(args.tls_client_ca),
            token=token,
            reflection=args.reflection,
            replica=args.replica_name,
        )
        print("nextword: " + config.describe(), flush=True)
        use_server_malloc_policy()  # before the server's threads exist
        lean_cache_loads()
        return asyncio.run(serve(config))
    except (StartupError, ValueError) as e:
        logging.getLogger("nextword.serve").debug("start-up failed", exc_info=True)
        print(f"nextword: error: {e}", file=sys.stderr, flush=True)
        return 2


def resolve_model(path: str | None) -> Path:
    """--model PATH, or the default model (fetched and imported on first use)."""
    if path:
        if not Path(path, "config.json").is_file():
            raise ValueError(f"--model {path}: not a model folder (no config.json there)")
        return Path(path)
    try:
        from nextword.weights.default_model import ensure_default_model
    except ModuleNotFoundError as e:
        raise MissingExtra(e.name, "server") from e

    return ensure_default_model(progress=lambda line: print(line, file=sys.stderr))


def run_pull(args: argparse.Namespace) -> int:
    try:
        from nextword.weights import gguf_import  # noqa: F401 (imported when needed: check the extra now)
        from nextword.weights.default_model import ensure_default_model
    except ModuleNotFoundError as e:
        raise MissingExtra(e.name, "server") from e

    print(ensure_default_model(home=args.home, verify=True))  # every file's sha256, repaired if damaged
    return 0


def run_generate(args: argparse.Namespace) -> int:
    try:
        from nextword.server.engine import Engine
        from nextword.server.sampling import InvalidParameter, SamplingParams
        from nextword.weights.config import ModelError
    except ModuleNotFoundError as e:
        raise MissingExtra(e.name, "server") from e

    try:
        engine = Engine.load(resolve_model(args.model), weights=args.weights)
        if args.chat:
            prompt = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            prompt = engine.tokenizer.encode(args.prompt)
        steps = engine.generate(prompt, SamplingParams(**sampling_kwargs(args)))
        text = engine.tokenizer.token_text
        for step in steps:
            if args.show_probs and step.token:
                top = [(text(t.token_id), t.prob) for t in step.token.top]
                print(format_probs(text(step.token.token_id), step.token.prob, top), flush=True)
            elif not args.show_probs:
                print(step.text, end="", flush=True)
            if step.finish:
                f = step.finish
                tps = (
                    (f.generated_tokens - 1) / (f.mean_itl_s * (f.generated_tokens - 1))
                    if f.mean_itl_s
                    else 0
                )
                print(
                    f"\n[{f.reason}{': ' + repr(f.stop) if f.stop else ''}; {f.prompt_tokens} prompt + "
                    f"{f.generated_tokens} generated tokens; first token {f.ttft_s * 1000:.0f} ms; "
                    f"{tps:.1f} tokens/s]",
                    file=sys.stderr,
                )
    except (InvalidParameter, ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
