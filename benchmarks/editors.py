"""Keystroke -> suggestion latency of `nextword lsp`: N simulated editors typing real code at 10 chars/s.

    python benchmarks/editors.py [--editors 1 8 32] [--seconds 20] [--isa avx2] [--target HOST:PORT]

Starts `nextword serve` (the default model and weights) on a free port unless --target is given. Each editor
is a pygls LanguageClient with its own `nextword lsp` process on stdio, as in a real editor. It opens one of
this repository's source files with the lines above a starting point already written, asks once with no time
limit (warming the server's prefix cache; not counted), then types the rest character by character every 100
ms: one keystroke = one incremental didChange + one textDocument/inlineCompletion, with the language server's
default settings.

Per keystroke: the time from sending it to the answer. A suggestion is *shown* when the answer is not empty
and arrives before the next keystroke (an editor drops an answer for an older text). The table gives the
shown share and its latency percentiles (at most ~100 ms by that definition, so the shown share is what
moves); *wait*: from each keystroke until a suggestion is on screen, its own or a later keystroke's (what a
user typing on waits for ghost text; keystrokes after the last shown one are left out); the tokens the server
generated per keystroke, and how many of them were thrown away (generations superseded or cancelled: parsed
from the server's per-request log lines, so this needs the server started here). Run it alone on the machine.
"""

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from launch import start_serve

from nextword.client.suggest import Settings
from nextword.kernels.isa import ISAS, reexec_as
from nextword.kernels.isa import target as target_isa

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["server/engine.py", "client/client.py", "server/service.py", "client/load.py", "kernels/llama.py"]
LSP = [sys.executable, "-m", "nextword.client.cli", "lsp"]
WARM_UP_MS = 600_000  # the warm-up request's time budget: it computes the whole file start
LOG_LINE = re.compile(
    r"(?P<prompt>\d+) prompt \((?P<cached>\d+) cached\) \+ (?P<tokens>\d+) generated tokens, "
    r"finish=(?P<reason>\w+), queue=(?P<queue>\d+) ms, ttft=(?P<ttft>\d+) ms"
    r"|(?P<cancelled>cancelled) by the client after (?P<cancelled_tokens>\d+)"
)


def start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    log = open(log_path, "w")  # noqa: SIM115 (the server's lifetime)
    proc, found = start_serve("--metrics-port", "-1", stderr=log)
    return proc, found["grpc"]


@dataclass
class ServerLog:
    """What the server's per-request log lines say about the requests of one level (warm-ups included)."""

    tokens: Counter = field(default_factory=Counter)  # generated tokens per finish reason
    requests: Counter = field(default_factory=Counter)  # requests per finish reason ("continued" too)
    uncached: list = field(default_factory=list)  # per generation: prompt tokens not from the prefix cache
    queue_ms: list = field(default_factory=list)
    ttft_ms: list = field(default_factory=list)  # of the generations that produced a token

    def summary(self) -> str:
        ends = ", ".join(f"{k} {v}" for k, v in self.requests.most_common())
        med = lambda xs: f"{np.median(xs):.0f}" if xs else "-"
        return (
            f"server requests by how they ended: {ends}; median per generation: "
            f"{med(self.uncached)} prompt tokens not cached, queue {med(self.queue_ms)} ms, "
            f"first token {med(self.ttft_ms)} ms"
        )


def read_server_log(log_path: Path | None, start: int) -> tuple[ServerLog, int]:
    """The server log's lines after byte `start`; and the log's new end."""
    out = ServerLog()
    if log_path is None:
        return out, 0
    data = log_path.read_bytes()
    text = data[start:].decode(errors="replace")
    for m in LOG_LINE.finditer(text):
        if m["cancelled"]:
            out.tokens["cancelled"] += int(m["cancelled_tokens"])
            out.requests["cancelled"] += 1
            continue
        out.tokens[m["reason"]] += int(m["tokens"])
        out.requests[m["reason"]] += 1
        out.uncached.append(int(m["prompt"]) - int(m["cached"]))
        out.queue_ms.append(int(m["queue"]))
        if int(m["tokens"]):
            out.ttft_ms.append(int(m["ttft"]))
    out.requests["continued"] = text.count("continued by the next request")
    return out, len(data)


def script(index: int) -> tuple[str, str, str]:
    """(path, text already written, text to type) of editor `index`: a real file, a different place each."""
    path = SOURCES[index % len(SOURCES)]
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines(keepends=True)
    start = min(30 + 11 * (index // len(SOURCES)), len(lines) - 40)
    return path, "".join(lines[:start]), "".join(lines[start:])


async def editor(
    index: int, target: str, seconds: float, settings: dict, go: asyncio.Event, ready: list, out: list
) -> None:
    from lsprotocol import types as lsp
    from pygls.lsp.client import LanguageClient

    path, written, to_type = script(index)
    client = LanguageClient(f"bench-{index}", "1")

    @client.feature(lsp.WINDOW_LOG_MESSAGE)
    def on_log(params) -> None:
        print(f"editor {index}: {params.message}", flush=True)

    await client.start_io(*LSP, "--target", target)
    await client.initialize_async(
        lsp.InitializeParams(
            capabilities=lsp.ClientCapabilities(),
            root_uri=f"file://{ROOT}",
            initialization_options=settings | {"timeoutMs": WARM_UP_MS, "budgetMs": 0},
        )
    )
    client.initialized(lsp.InitializedParams())
    uri = f"file://{ROOT}/{path}"
    client.text_document_did_open(
        lsp.DidOpenTextDocumentParams(lsp.TextDocumentItem(uri, "python", 1, written))
    )
    line, column = written.count("\n"), 0

    def request(line: int, column: int):
        params = lsp.InlineCompletionParams(
            context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Automatic),
            text_document=lsp.TextDocumentIdentifier(uri),
            position=lsp.Position(line, column),
        )
        return client.protocol.send_request_async(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, params)

    # Warm-up: the prefix cache holds the file's start, as it does once an editor has had the file open for a
    # while. With the default 1 s budget, 8 editors' first prompts (~400 tokens each) ran out of time
    # half-computed and the measured keystrokes paid for the rest.
    await request(line, column)
    client.workspace_did_change_configuration(
        lsp.DidChangeConfigurationParams(
            settings={"timeoutMs": Settings.timeout_ms, "budgetMs": Settings.budget_ms} | settings
        )
    )
    ready.append(index)
    await go.wait()
    loop = asyncio.get_running_loop()
    await asyncio.sleep(random.random() * 0.1)  # editors are not in step
    t0, sent_at, answers = loop.time(), [], []
    keystrokes = int(seconds * 10)
    for k, char in enumerate(to_type[:keystrokes]):
        await asyncio.sleep(max(0.0, t0 + k * 0.1 - loop.time()))
        client.text_document_did_change(
            lsp.DidChangeTextDocumentParams(
                lsp.VersionedTextDocumentIdentifier(version=k + 2, uri=uri),
                [
                    lsp.TextDocumentContentChangePartial(
                        lsp.Range(lsp.Position(line, column), lsp.Position(line, column)), char
                    )
                ],
            )
        )
        line, column = (line + 1, 0) if char == "\n" else (line, column + 1)
        sent_at.append(loop.time())
        future = request(line, column)
        future.add_done_callback(lambda f, k=k: answers.append((k, loop.time(), f)))
        await asyncio.sleep(0)
    deadline = loop.time() + 30
    while len(answers) < len(sent_at) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    results = []
    for k, when, future in answers:
        shown = (
            not future.cancelled()
            and future.exception() is None
            and bool(future.result().items)
            and (k + 1 == len(sent_at) or when < sent_at[k + 1])
        )
        results.append((k, shown, when))
    on_screen = float("inf")  # when the first suggestion of this keystroke or a later one was shown
    for k, shown, when in sorted(results, reverse=True):
        if shown:
            on_screen = min(on_screen, when)
        out.append((shown, (when - sent_at[k]) * 1000, (on_screen - sent_at[k]) * 1000))
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()


async def level(n: int, target: str, seconds: float, settings: dict) -> list[tuple[bool, float]]:
    go, ready, out = asyncio.Event(), [], []
    tasks = [asyncio.create_task(editor(i, target, seconds, settings, go, ready, out)) for i in range(n)]
    while len(ready) < n:
        if any(t.done() for t in tasks):
            await asyncio.gather(*tasks)  # raise what went wrong
        await asyncio.sleep(0.05)
    go.set()
    await asyncio.gather(*tasks)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--editors", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=20.0, help="typing time of each editor per level")
    ap.add_argument("--target", help="an already running server (then no thrown-away token counts)")
    ap.add_argument(
        "--isa", choices=ISAS, help="the server's kernels compiled for this instruction set (default: host)"
    )
    ap.add_argument(
        "--settings",
        default="{}",
        help="the language server's settings, as JSON (default: its defaults), e.g. '{\"budgetMs\": 0}'",
    )
    args = ap.parse_args()
    if args.isa:
        reexec_as(args.isa)  # the server started here inherits the setting
    settings = json.loads(args.settings)

    proc, log_path = None, None
    if args.target:
        target = args.target
    else:
        log_path = Path(tempfile.mkdtemp()) / "serve.log"
        proc, target = start_server(log_path)
    kernels = "" if args.target else f" with kernels for {target_isa()}"
    print(f"server {target}{kernels}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    header = "| editors | keystrokes | shown | p50 ms | p90 ms | p99 ms | wait p50 ms | wait p99 ms | generated tok/keystroke | thrown away tok/keystroke | load avg |"
    rows = [header, "|" + "---|" * 11]
    try:
        for n in args.editors:
            _, start = read_server_log(log_path, 0)
            began = time.perf_counter()
            out = asyncio.run(level(n, target, args.seconds, settings))
            server_log, _ = read_server_log(log_path, start)
            tokens = server_log.tokens
            shown = np.array([ms for ok, ms, _ in out if ok])
            p50, p90, p99 = np.percentile(shown, [50, 90, 99]) if len(shown) else (float("nan"),) * 3
            waits = np.array([wait for _, _, wait in out if wait < float("inf")])
            w50, w99 = np.percentile(waits, [50, 99]) if len(waits) else (float("nan"),) * 2
            keys = len(out)
            generated = sum(tokens.values())
            thrown = tokens.get("superseded", 0) + tokens.get("cancelled", 0)
            tok = f"{generated / keys:.1f} | {thrown / keys:.1f}" if log_path else "- | -"
            row = (
                f"| {n} | {keys} | {len(shown) / keys:.0%} | {p50:.0f} | {p90:.0f} | {p99:.0f} | {w50:.0f} | {w99:.0f} | {tok} "
                f"| {os.getloadavg()[0]:.1f} |"
            )
            rows.append(row)
            print(row, f"({time.perf_counter() - began:.0f} s)", flush=True)
            if log_path:
                print(f"  {server_log.summary()} (warm-ups included)", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
