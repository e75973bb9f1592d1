"""Engine-side subcommands: `pull` (fetch the default model) and `generate` (run it in-process)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from nextword.client.cli import add_sampling_flags, format_probs, sampling_kwargs


def add_commands(commands) -> None:
    add_serve_command(commands)
    p = commands.add_parser("pull", help="fetch the default model into the cache and import it")
    p.add_argument("--home", help="cache folder (default $NEXTWORD_HOME or ~/.cache/nextword)")
    p.set_defaults(run=run_pull)

    p = commands.add_parser("generate", help="generate text in-process (no server)")
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


def add_weights_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        default=env("WEIGHTS", "q4"),
        choices=["f32", "int8", "q4"],
        help="matmul weight format (default q4: 4x the decode speed of f32 for +1.3%% perplexity)",
    )


def env(name: str, default, kind=str):
    """A flag's default: $NEXTWORD_<NAME> when set, else `default`."""
    value = os.environ.get("NEXTWORD_" + name)
    return default if value is None else kind(value)


def add_serve_command(commands) -> None:
    p = commands.add_parser("serve", help="serve the model over gRPC")
    p.add_argument("--model", default=env("MODEL", None), help="HF model folder (default: the default model)")
    add_weights_flag(p)
    p.add_argument("--host", default=env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=env("PORT", 50051, int), help="0 picks a free port")
    p.add_argument("--kv-cache-tokens", type=int, default=env("KV_CACHE_TOKENS", 16384, int))
    p.add_argument("--max-batch-tokens", type=int, default=env("MAX_BATCH_TOKENS", 1024, int))
    p.add_argument(
        "--max-context", type=int, default=env("MAX_CONTEXT", None, int), help="default: the model's"
    )
    p.add_argument("--max-top-n", type=int, default=env("MAX_TOP_N", 20, int))
    p.add_argument(
        "--max-queue", type=int, default=env("MAX_QUEUE", 256, int), help="waiting requests at most"
    )
    p.add_argument("--metrics-port", type=int, default=env("METRICS_PORT", 9464, int), help="-1 = no metrics")
    p.add_argument("--max-request-bytes", type=int, default=env("MAX_REQUEST_BYTES", 1 << 20, int))
    p.add_argument(
        "--grace", type=float, default=env("GRACE", 10.0, float), help="seconds to drain on shutdown"
    )
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from nextword.server.memory import use_one_malloc_arena
    from nextword.server.serve import ServerConfig, serve

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        model=resolve_model(args.model),
        weights=args.weights,
        host=args.host,
        port=args.port,
        kv_cache_tokens=args.kv_cache_tokens,
        max_batch_tokens=args.max_batch_tokens,
        max_context=args.max_context,
        max_top_n=args.max_top_n,
        max_queue=args.max_queue,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        max_request_bytes=args.max_request_bytes,
        grace_s=args.grace,
    )
    print("nextword: " + ", ".join(f"{k}={v}" for k, v in vars(config).items()), flush=True)
    use_one_malloc_arena()  # before the server's threads exist
    return asyncio.run(serve(config))


def resolve_model(path: str | None) -> Path:
    """--model PATH, or the default model (fetched and imported on first use)."""
    if path:
        return Path(path)
    from nextword.weights.default_model import ensure_default_model

    return ensure_default_model(progress=lambda line: print(line, file=sys.stderr))


def run_pull(args: argparse.Namespace) -> int:
    from nextword.weights.default_model import ensure_default_model

    print(ensure_default_model(home=args.home))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from nextword.server.engine import Engine
    from nextword.server.sampling import InvalidParameter, SamplingParams
    from nextword.weights.config import ModelError

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
    except (InvalidParameter, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
