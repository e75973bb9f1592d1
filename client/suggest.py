"""Editor suggestions over one Session: what `nextword lsp` and `nextword type` share.

A `Suggester` serves one document. Each `suggest(context)` builds a prompt (a file header and, when the
model knows fill-in-the-middle, the text after the cursor; both detected from the tokenizer's special tokens),
sends it on the document's Session (which supersedes the request in flight), and shapes the answer the way
users expect ghost text: the rest of the line by default, a block after a block opener on an empty line, never
a copy of the text already after the cursor. When the user typed the start of the last suggestion, the rest
comes from that generation: locally if it has finished, from the server's Session continue if it is running.

A `Connection` is the client of the nextword server that all documents share: the model's prompt format, the
server's state (down: empty answers and one log line; back: one more), reconnection by gRPC's own backoff.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc

from nextword.client.client import AsyncClient, AsyncSession, new_request_id
from nextword.client.errors import NextwordError, Unavailable
from nextword.client.types import GenerateEvent, SessionError, SessionReconnected

# gRPC reconnects by itself with an exponential backoff (up to 120 s by default): cap it so that suggestions
# come back within a second of a restarted server being ready.
RECONNECT_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}

# Fill-in-the-middle tokens, prefix / suffix / middle, as the model families spell them (StarCoder, Qwen2.5-Coder
# and CodeGemma, DeepSeek-Coder). A model whose tokenizer has all three gets prefix-suffix-middle prompts.
FIM_TOKENS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)
# File-header tokens, written `{token}{path}\n` before the code (StarCoder's <filename>, Qwen's <|file_sep|>,
# StarCoder2's <file_sep>).
FILE_TOKENS = ("<filename>", "<|file_sep|>", "<file_sep>")
# The end of a line that opens a block: a suggestion on the empty line after it may span several lines.
BLOCK_OPENERS = (":", "{", "(", "[", "=>", "->", " do", " then", "begin")


@dataclass(frozen=True)
class Settings:
    """What a user tunes (initializationOptions / workspace/didChangeConfiguration, camelCase or snake_case)."""

    max_lines: int = 1  # lines of a suggestion (1: the rest of the current line)
    block_lines: int = 8  # lines of a suggestion after a block opener, on an empty line
    max_tokens: int = 48  # tokens generated per suggestion at most
    context_tokens: int = 1024  # token budget of the context sent (cut at a line boundary)
    temperature: float = 0.0  # 0: greedy
    timeout_ms: int = 1000  # a generation stops after this long (the server's max_time_ms)

    def updated(self, options: Mapping | None) -> tuple[Settings, list[str]]:
        """These settings with `options` applied (also under a "nextword" key); returns the unknown or bad
        keys too, so that the caller can say so."""
        options = dict(options or {})
        options = (
            options.get("nextword", options) if isinstance(options.get("nextword"), Mapping) else options
        )
        fields = {f.name: f.type for f in dataclasses.fields(self)}
        changes, bad = {}, []
        for key, value in options.items():
            name = re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()
            if name not in fields:
                bad.append(key)
                continue
            try:
                cast = float if name == "temperature" else int
                if isinstance(value, bool) or cast(value) != value or cast(value) < 0:
                    raise ValueError
                changes[name] = cast(value)
            except (TypeError, ValueError):
                bad.append(key)
        return dataclasses.replace(self, **changes), bad


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt is laid out for the served model, detected from its tokenizer's special tokens."""

    fim: tuple[str, str, str] | None = None
    file_token: str | None = None

    @classmethod
    def from_special_tokens(cls, texts: Iterable[str]) -> PromptFormat:
        texts = set(texts)
        fim = next((family for family in FIM_TOKENS if texts.issuperset(family)), None)
        return cls(fim, next((t for t in FILE_TOKENS if t in texts), None))

    def build(self, path: str, before: str, after: str) -> str:
        header = f"{self.file_token}{path}\n" if self.file_token and path else ""
        if self.fim is None:
            return header + before
        prefix, suffix, middle = self.fim
        return f"{header}{prefix}{before}{suffix}{after}{middle}"


@dataclass(frozen=True)
class Context:
    """A cursor in a document: its file name (for the header) and the text either side of it."""

    path: str
    before: str
    after: str

    @property
    def anchor(self) -> str:
        """Where the model continues from: the text before the cursor less one trailing space. Tokenizers
        give a word its leading space (" return", " 5"), so a prompt ending in that space splits the tokens
        the model was trained on; the generation then starts with the space."""
        return self.before.removesuffix(" ")

    def after_blank(self, raw: str) -> str:
        """A generation from the anchor, less the space already typed."""
        if self.before.endswith(" ") and raw.startswith(" "):
            return raw[1:]
        return raw


def is_block_start(before: str) -> bool:
    """Is the cursor on an empty line right after a line that opens a block?"""
    head, _, line = before.rpartition("\n")
    if line.strip():
        return False
    previous = next((li for li in reversed(head.split("\n")) if li.strip()), "")
    return previous.rstrip().endswith(BLOCK_OPENERS)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def shape(raw: str, context: Context, max_lines: int) -> str:
    """The suggestion users expect from a raw generation: at most `max_lines` lines, none of them dedented
    below the cursor's block, trailing whitespace trimmed, nothing that repeats the text after the cursor."""
    lines = raw.split("\n")[: max(1, max_lines)]
    cursor_line = context.before.rpartition("\n")[2]
    block = _indent(cursor_line) if not cursor_line.strip() else _indent(cursor_line) + 1
    for i, line in enumerate(lines[1:], 1):
        if line.strip() and _indent(line) < block:
            lines = lines[:i]
            break
    lines = [line.rstrip() for line in lines]
    while len(lines) > 1 and not lines[-1]:
        lines.pop()
    rest_of_line, _, below = context.after.partition("\n")
    rest_of_line = rest_of_line.rstrip()
    if rest_of_line:  # e.g. `print(|)` -> suggest `"hi"`, not `"hi")`
        last = lines[-1]
        k = next((k for k in range(len(rest_of_line), 0, -1) if last.endswith(rest_of_line[:k])), 0)
        lines[-1] = last[: len(last) - k].rstrip() if k else last
    elif len(lines) > 1:  # a closing line that is already the next line of the file
        following = next((li.strip() for li in below.split("\n") if li.strip()), None)
        if following is not None and lines[-1].strip() == following:
            lines.pop()
    return "\n".join(lines).rstrip()


class Connection:
    """The nextword server, shared by every document: one AsyncClient, its model's prompt format, and whether
    the server is reachable (each change of that is logged once through `log`)."""

    def __init__(self, make_client: Callable[[], AsyncClient], log: Callable[[str], None]):
        self._make_client, self.log = make_client, log
        self._client: AsyncClient | None = None
        self._format: PromptFormat | None = None
        self.down = False

    @property
    def client(self) -> AsyncClient:
        if self._client is None:  # created lazily: grpc.aio needs the running loop
            self._client = self._make_client()
        return self._client

    async def prompt_format(self) -> PromptFormat:
        if self._format is None:
            info = await self.client.model_info(timeout=5)
            self._format = PromptFormat.from_special_tokens(t.text for t in info.special_tokens)
        return self._format

    def failed(self, error: NextwordError) -> None:
        """A call failed: the server is down or restarting (it may come back with another model)."""
        self._format = None
        if not self.down:
            self.down = True
            self.log(
                f"nextword: the server at {self.client.target} is unavailable ({error.code_name}: "
                f"{error.message}); suggestions are empty until it is back"
            )

    def succeeded(self) -> None:
        if self.down:
            self.down = False
            self.log(f"nextword: the server at {self.client.target} is back")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


@dataclass
class _Generation:
    """One request sent on the Session and what it produced so far."""

    request_id: str
    context: Context
    max_lines: int
    done: asyncio.Future  # resolved with the raw text when the request finishes ("" when it failed)
    text: str = ""
    reason: str | None = None  # the finish reason, once finished


class Suggester:
    """The suggestions of one document over one Session (opened on first use, reopened after a failure)."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self._session: AsyncSession | None = None
        self._reader: asyncio.Task | None = None
        self._live: _Generation | None = None  # the newest request sent
        self._requests: dict[str, _Generation] = {}
        self._cut = (0, 0, 0)  # context trimming: chars dropped, tokens and chars kept when last measured
        self.latest = 0  # the number of the newest suggest() call: older ones answer None

    async def suggest(self, context: Context, settings: Settings) -> str | None:
        """The suggestion at `context` ("" when there is none or the server is down); None when a newer call
        superseded this one. Cancelling the awaiting task cancels the generation."""
        self.latest += 1
        ticket = self.latest
        block = is_block_start(context.before)
        max_lines = settings.block_lines if block else settings.max_lines
        if (rest := self._typed_along(context, max_lines)) is not None:
            return rest
        try:
            prompt = await self._prompt(context, settings)
            if ticket != self.latest:
                return None
            gen = await self._send(prompt, context, max_lines, settings)
        except NextwordError as e:
            self.connection.failed(e)
            return ""
        try:
            raw = await asyncio.wait_for(asyncio.shield(gen.done), settings.timeout_ms / 1000 + 5)
        except asyncio.CancelledError:
            if self._live is gen and not gen.done.done():
                self._drop_session()  # $/cancelRequest: the server frees the sequence at its next step
            raise
        except asyncio.TimeoutError:
            self._drop_session()
            return ""
        if gen.reason == "superseded" or ticket != self.latest:
            return None
        return shape(context.after_blank(raw), context, max_lines)

    def _typed_along(self, context: Context, max_lines: int) -> str | None:
        """The rest of a finished suggestion whose start the user has just typed (None: ask the server)."""
        last = self._live
        if last is None or last.reason in (None, "superseded", "cancelled") or last.max_lines != max_lines:
            return None
        anchor, last_anchor = context.anchor, last.context.anchor
        if context.after != last.context.after or not anchor.startswith(last_anchor):
            return None
        typed = context.before[len(last_anchor) :]
        if not typed or not last.text.startswith(typed):
            return None
        rest = shape(last.text[len(typed) :], context, max_lines)
        return rest or None

    async def _prompt(self, context: Context, settings: Settings) -> str:
        fmt = await self.connection.prompt_format()
        after = ""
        budget = settings.context_tokens
        if fmt.fim is not None:  # a quarter of the budget for the text after the cursor; bytes >= tokens
            after = _head_lines(context.after, budget // 4)
            budget -= len(after.encode())
        return fmt.build(context.path, await self._trim(context.anchor, budget), after)

    async def _trim(self, before: str, budget: int) -> str:
        """`before` cut at a line boundary to at most `budget` tokens (by the server's tokenizer). The cut stays
        where it is while the kept text fits, so that each keystroke's prompt starts the same way (the
        server's prefix cache); when it no longer fits, it moves down to three quarters of the budget."""
        if len(before.encode()) <= budget:  # a token is at least one byte
            return before
        cut, tokens, chars = self._cut
        if cut <= len(before) and (cut == 0 or before[cut - 1] == "\n") and chars:
            kept = len(before) - cut
            if tokens * kept / chars <= budget:
                return before[cut:]
        window_start = before.rfind("\n", 0, max(0, len(before) - 8 * budget)) + 1
        window = before[window_start:]
        tokenized = await self.connection.client.tokenize(window, timeout=5)
        target = budget * 3 // 4
        kept_chars = sum(len(t) for t in tokenized.tokens[-target:]) if target else 0
        start = len(window) - kept_chars
        if start > 0 and window[start - 1] != "\n":
            newline = window.find("\n", start)
            start = newline + 1 if newline >= 0 else start
        cut = window_start + start
        kept = before[cut:]
        self._cut = (cut, min(target, len(tokenized.ids)), max(1, len(kept)))
        return kept

    async def _send(self, prompt: str, context: Context, max_lines: int, settings: Settings) -> _Generation:
        if self._session is None:
            self._session = self.connection.client.session()
            self._reader = asyncio.ensure_future(self._read(self._session))
        loop = asyncio.get_running_loop()
        previous = self._live
        if previous is not None and not previous.done.done():
            previous.reason = previous.reason or "superseded"
            previous.done.set_result(previous.text)
        gen = _Generation(new_request_id(), context, max_lines, loop.create_future())
        self._live = self._requests[gen.request_id] = gen
        try:
            await self._session.send(
                prompt,
                request_id=gen.request_id,
                max_new_tokens=settings.max_tokens,
                max_lines=max_lines,
                max_time_ms=settings.timeout_ms,
                temperature=settings.temperature,
            )
        except (RuntimeError, NextwordError) as e:  # the stream ended under us: a new one next keystroke
            self._drop_session()
            self._finish(gen, "cancelled")
            if isinstance(e, NextwordError):
                raise
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, "the session ended") from None
        return gen

    async def _read(self, session: AsyncSession) -> None:
        try:
            async for item in session:
                if isinstance(item, SessionReconnected):  # another replica: the latest request starts over
                    for request_id in item.superseded:
                        if (old := self._requests.get(request_id)) is not None:
                            self._finish(old, "superseded")
                    if (gen := self._requests.get(item.request_id)) is not None:
                        gen.text = ""
                    continue
                gen = self._requests.get(item.request_id)
                if gen is None:
                    continue
                if isinstance(item, SessionError):
                    self._finish(gen, "error")
                    if item.code_name in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
                        self.connection.failed(NextwordError(grpc.StatusCode[item.code_name], item.message))
                    else:
                        self.connection.log(f"nextword: {item.code_name}: {item.message}")
                    continue
                self._on_event(gen, item)
        except NextwordError as e:
            self.connection.failed(e)
        finally:
            if self._session is session:
                self._session = None
            for gen in list(self._requests.values()):
                self._finish(gen, "cancelled")

    def _on_event(self, gen: _Generation, event: GenerateEvent) -> None:
        gen.text += event.text
        if event.finish is None:
            return
        if event.finish.reason != "superseded":
            self.connection.succeeded()
        self._finish(gen, event.finish.reason)

    def _finish(self, gen: _Generation, reason: str) -> None:
        self._requests.pop(gen.request_id, None)
        if gen.reason is None:
            gen.reason = reason
        if not gen.done.done():
            gen.done.set_result(gen.text if reason not in ("error", "cancelled") else "")

    def _drop_session(self) -> None:
        if self._session is not None:
            self._session.cancel()
            self._session = None

    async def close(self) -> None:
        self._drop_session()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def _head_lines(text: str, max_bytes: int) -> str:
    """The longest run of whole lines at the start of `text` within `max_bytes` UTF-8 bytes."""
    if len(text.encode()) <= max_bytes:
        return text
    head = text.encode()[:max_bytes].decode(errors="ignore")
    return head[: head.rfind("\n") + 1]
