"""`nextword type`: a terminal to type in, with the model's suggestion in grey after the cursor.

prompt_toolkit draws the suggestion (its auto-suggest ghost text) and accepts it with Right (and Ctrl-E,
Ctrl-F); Tab accepts it too. Every keystroke asks the one Suggester of this terminal (suggest.py), so each
request supersedes the one in flight over one Session. Lines entered with Enter become the context of the
next ones. The bottom line shows how long the last suggestion took from the keystroke.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from nextword.client.client import AsyncClient
from nextword.client.suggest import RECONNECT_OPTIONS, Connection, Context, Settings, Suggester

HELP = "Tab or Right accepts the grey suggestion, Enter starts a new line, Ctrl-D quits"


def add_command(commands, common: argparse.ArgumentParser) -> None:
    from nextword.client.cli import examples

    p = commands.add_parser(
        "type",
        parents=[common],
        help="type in the terminal with the model's suggestion in grey after the cursor",
        description=f"A terminal typing surface over one Session to the server at --target. {HELP}.",
        epilog=examples("nextword type", "nextword type --file-name fib.py --max-tokens 24"),
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=Settings.max_tokens,
        help="tokens per suggestion (default: %(default)s)",
    )
    p.add_argument(
        "--timeout-ms",
        type=int,
        default=Settings.timeout_ms,
        help="a suggestion stops after this long (default: %(default)s)",
    )
    p.add_argument(
        "--budget-ms",
        type=int,
        default=Settings.budget_ms,
        help="a suggestion shows what has been generated after this long; 0: wait for all of it "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--file-name", default="", help="the file name given to models with file tokens (default: none)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # One line at a time: the prompt is one line.
    settings = Settings(
        max_tokens=args.max_tokens, timeout_ms=args.timeout_ms, budget_ms=args.budget_ms, block_lines=1
    )
    from nextword.client.cli import connection_kwargs

    asyncio.run(type_lines(args, settings, connection_kwargs(args)))  # TLS and token, as every client command
    return 0


async def type_lines(args: argparse.Namespace, settings: Settings, security: dict) -> None:
    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.application import get_app
        from prompt_toolkit.auto_suggest import Suggestion
        from prompt_toolkit.filters import Condition
        from prompt_toolkit.key_binding import KeyBindings
    except ImportError as e:
        raise SystemExit(
            f"nextword type needs prompt_toolkit: pip install 'nextword[editors]' ({e})"
        ) from None

    status = {"text": HELP}

    def log(message: str) -> None:
        status["text"] = message
        get_app().invalidate()

    connection = Connection(
        lambda: AsyncClient(args.target, timeout=args.timeout, options=RECONNECT_OPTIONS, **security), log
    )
    suggester = Suggester(connection)
    lines: list[str] = []  # the lines entered so far: the context above the current one

    async def suggest(buffer, document, started: float) -> None:
        before = "".join(line + "\n" for line in lines) + document.text_before_cursor
        context = Context(args.file_name, before, document.text_after_cursor)
        text = await suggester.suggest(context, settings)
        if text is None or buffer.document != document:
            return  # superseded by a later keystroke
        buffer.suggestion = Suggestion(text) if text else None
        if not connection.down:
            status["text"] = f"suggestion in {(time.perf_counter() - started) * 1000:.0f} ms  |  {HELP}"
        get_app().invalidate()

    def on_text_changed(buffer) -> None:
        get_app().create_background_task(suggest(buffer, buffer.document, time.perf_counter()))

    bindings = KeyBindings()
    has_suggestion = Condition(lambda: bool(get_app().current_buffer.suggestion))

    @bindings.add("tab", filter=has_suggestion)
    def _accept(event) -> None:
        buffer = event.current_buffer
        buffer.insert_text(buffer.suggestion.text)

    session = PromptSession(key_bindings=bindings, bottom_toolbar=lambda: status["text"])
    session.default_buffer.on_text_changed += on_text_changed
    try:
        while True:
            try:
                lines.append(await session.prompt_async("> "))
            except KeyboardInterrupt:
                continue
            except EOFError:
                return
    finally:
        await suggester.close()
        await connection.close()
