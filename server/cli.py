"""Engine-side subcommands: `pull` (fetch the default model) and `generate` (run it in-process)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nextword.client.cli import add_sampling_flags, format_probs, sampling_kwargs


def add_commands(commands) -> None:
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
    add_sampling_flags(p)
    p.set_defaults(run=run_generate)


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
        engine = Engine.load(resolve_model(args.model))
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
