"""Editor autocomplete: `nextword lsp` driven by a real LSP client (pygls's) over stdio, real Neovim and a real
tmux terminal driving `nextword type`, against real servers; and the pure rules of suggest.py.

The suggestions are checked against a greedy `Complete` of the same prompt on the same server (the header
`<filename>PATH\n` that the default model's tokenizer asks for, then the text before the cursor less a
trailing space), never against the language server itself.
"""

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from servers import free_port, serve_argv

from nextword.client import Client
from nextword.client.suggest import Context, PromptFormat, Settings, is_block_start, shape

ROOT = "/proj"
# The shared test machine may be slow: no time cut and whole suggestions in equality tests.
LONG = {"timeoutMs": 600_000, "budgetMs": 600_000}
LSP = [sys.executable, "-m", "nextword.client.cli", "lsp"]
TYPE = [sys.executable, "-m", "nextword.client.cli", "type"]

FIB = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fib"


def need(program: str) -> str:
    """The path of a Debian program a test drives; CI installs it (.ci/run), so there it must be present."""
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is missing under CI: .ci/run installs it")
        pytest.skip(f"{program} is not installed (apt-get install {program}); CI installs it")
    return path


def target(srv) -> str:
    return f"127.0.0.1:{srv.port}"


def greedy(srv_target: str, prompt: str, max_lines: int = 1, max_new_tokens: int = 48) -> str:
    with Client(srv_target) as client:
        return client.complete(prompt, max_new_tokens=max_new_tokens, max_lines=max_lines, temperature=0).text


def counter(srv, name: str) -> float:
    """A server counter, summed over its labels."""
    return sum(
        s.value for m in srv.metrics.registry.collect() for s in m.samples if s.name == name + "_total"
    )


def end_of(text: str):
    from lsprotocol import types as lsp

    return lsp.Position(text.count("\n"), len(text.rpartition("\n")[2]))


class Editor:
    """A pygls LanguageClient running `nextword lsp` as a subprocess; records window/logMessage lines."""

    def __init__(self, client):
        self.client, self.logs, self.versions = client, [], {}

    def open(self, path: str, text: str) -> str:
        from lsprotocol import types as lsp

        uri = f"file://{ROOT}/{path}"
        self.versions[uri] = 1
        self.client.text_document_did_open(
            lsp.DidOpenTextDocumentParams(lsp.TextDocumentItem(uri, "python", 1, text))
        )
        return uri

    def change(self, uri: str, text: str) -> None:
        from lsprotocol import types as lsp

        self.versions[uri] += 1
        self.client.text_document_did_change(
            lsp.DidChangeTextDocumentParams(
                lsp.VersionedTextDocumentIdentifier(version=self.versions[uri], uri=uri),
                [lsp.TextDocumentContentChangeWholeDocument(text=text)],
            )
        )

    def inline(self, uri: str, text: str, msg_id: str | None = None):
        """Request inline completion at the end of `text` (a future)."""
        from lsprotocol import types as lsp

        params = lsp.InlineCompletionParams(
            context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Automatic),
            text_document=lsp.TextDocumentIdentifier(uri),
            position=end_of(text),
        )
        return self.client.protocol.send_request_async(
            lsp.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id
        )

    async def suggestion(self, uri: str, text: str) -> str:
        result = await self.inline(uri, text)
        return result.items[0].insert_text if result.items else ""

    def configure(self, **settings) -> None:
        from lsprotocol import types as lsp

        self.client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings=settings))


@contextlib.asynccontextmanager
async def editor(srv_target: str, **options):
    from lsprotocol import types as lsp
    from pygls.lsp.client import LanguageClient

    client = LanguageClient("nextword-tests", "1")
    ed = Editor(client)

    @client.feature(lsp.WINDOW_LOG_MESSAGE)
    def on_log(params):
        ed.logs.append(params.message)

    await client.start_io(*LSP, "--target", srv_target)
    await client.initialize_async(
        lsp.InitializeParams(
            capabilities=lsp.ClientCapabilities(),
            root_uri=f"file://{ROOT}",
            initialization_options=LONG | options,
        )
    )
    client.initialized(lsp.InitializedParams())
    try:
        yield ed
    finally:
        await client.shutdown_async(None)
        client.exit(None)
        await client.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 600))


# ---- against the default model ----


@pytest.mark.real_model
def test_inline_and_completion_equal_a_greedy_complete(smollm2_server):
    expected = greedy(target(smollm2_server), f"<filename>pkg/fib.py\n{FIB}").split("\n")[0].rstrip()
    assert expected  # the model has something to say here

    async def body():
        from lsprotocol import types as lsp

        async with editor(target(smollm2_server)) as ed:
            uri = ed.open("pkg/fib.py", FIB)
            inline = await ed.suggestion(uri, FIB)
            completion = await ed.client.text_document_completion_async(
                lsp.CompletionParams(lsp.TextDocumentIdentifier(uri), end_of(FIB))
            )
            return inline, completion

    inline, completion = run(body())
    assert inline == expected
    (item,) = completion.items
    # The item replaces the word being typed ("fib") with itself plus the suggestion.
    assert item.text_edit.new_text == "fib" + expected
    assert item.text_edit.range.start.character == len("    return ")


@pytest.mark.real_model
def test_block_opener_gives_lines_of_the_block(smollm2_server):
    text = "class Point:\n    def __init__(self, x, y):\n        "
    raw = greedy(target(smollm2_server), "<filename>point.py\n" + text[:-1], max_lines=8)

    async def body():
        async with editor(target(smollm2_server)) as ed:
            uri = ed.open("point.py", text)
            return await ed.suggestion(uri, text)

    got = run(body())
    # The generation from the last space of the indentation, less that space, cut before the first line
    # indented less than the cursor, trailing blanks trimmed.
    raw = raw.removeprefix(" ")
    raw_lines = raw.split("\n")
    kept = got.split("\n")
    assert len(kept) >= 2, (raw, got)
    assert kept == [line.rstrip() for line in raw_lines[: len(kept)]]
    assert all(len(line) - len(line.lstrip()) >= 8 for line in raw_lines[1 : len(kept)] if line.strip())
    following = [line for line in raw_lines[len(kept) :] if line.strip()]
    assert len(kept) == 8 or not following or len(following[0]) - len(following[0].lstrip()) < 8


@pytest.mark.real_model
def test_burst_leaves_one_generation_and_cancel_frees_it(smollm2_server):
    """20 keystrokes, each a didChange and a request, sent without waiting: the 19 stale requests are
    answered empty (or cancelled), one generation stays live on the server; $/cancelRequest frees it."""
    from lsprotocol import types as lsp
    from pygls.exceptions import JsonRpcRequestCancelled

    engine = smollm2_server.runner.engine
    base = "primes = [2, 3, 5, 7, 11, 13,"
    typed = " 17, 19, 23, 29, 31"  # 19 characters; with the open document, 20 states
    newest = f"<filename>primes.py\n{base}{typed}"  # the last state's prompt

    def live_texts() -> list[str]:
        """What each live sequence holds: its prompt and what it generated (continued requests included)."""
        return [engine.tokenizer.decode(seq.tokens) for seq in engine.sequences()]

    async def body():
        async with editor(target(smollm2_server), maxTokens=400, maxLines=100) as ed:
            uri = ed.open("primes.py", base)
            futures = [ed.inline(uri, base)]
            for i in range(1, len(typed) + 1):
                ed.change(uri, base + typed[:i])
                futures.append(ed.inline(uri, base + typed[:i], msg_id=f"key-{i}"))
            stale = await asyncio.gather(*futures[:-1], return_exceptions=True)
            # The stale requests are answered once the language server has sent the newest; the server gets
            # it a moment later and drops the superseded generations at its next step.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                texts = live_texts()
                if len(texts) == 1 and texts[0].startswith(newest):
                    break
                await asyncio.sleep(0.01)
            live = live_texts()
            ed.client.protocol.notify(lsp.CANCEL_REQUEST, lsp.CancelParams(id=f"key-{len(typed)}"))
            last = await asyncio.gather(futures[-1], return_exceptions=True)
            deadline = time.monotonic() + 60
            while engine.live_sequences and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return stale, live, last[0], engine.live_sequences

    stale, live, last, after_cancel = run(body())
    assert len(stale) == 19
    for answer in stale:
        assert isinstance(answer, JsonRpcRequestCancelled) or not answer.items, answer
    assert len(live) == 1 and live[0].startswith(newest), live  # the newest request's generation, alone
    # The newest suggestion is one line: it may be answered before the cancel arrives (then there is nothing
    # to cancel), even when the client still saw it running (its answer crossed the cancel on the wire); a
    # request still running when $/cancelRequest reaches the language server is answered cancelled.
    assert isinstance(last, JsonRpcRequestCancelled) or not isinstance(last, Exception), last
    assert after_cancel == 0


@pytest.mark.real_model
def test_typing_along_a_suggestion_needs_no_new_generation(smollm2_server):
    srv, engine = smollm2_server, smollm2_server.runner.engine
    primes = "primes = [2, 3, 5, 7, 11, 13,"
    with Client(target(srv)) as client:
        head = client.complete("<filename>primes.py\n" + primes, max_new_tokens=8, temperature=0)
    typed_live = head.tokens[0].text + head.tokens[1].text

    async def body():
        async with editor(target(srv)) as ed:
            # A finished suggestion: typing its first characters is answered from it, locally.
            uri = ed.open("pkg/fib.py", FIB)
            first = await ed.suggestion(uri, FIB)
            before = (counter(srv, "nextword_requests"), counter(srv, "nextword_prompt_tokens"))
            ed.change(uri, FIB + first[:3])
            local = await ed.suggestion(uri, FIB + first[:3])
            after_local = (counter(srv, "nextword_requests"), counter(srv, "nextword_prompt_tokens"))

            # A running generation: typing what it has produced continues it on the server (Session).
            ed.configure(maxTokens=200)
            uri = ed.open("primes.py", primes)
            requests, continuations = (
                counter(srv, "nextword_requests"),
                counter(srv, "nextword_session_continued"),
            )
            generated = engine.generated_tokens
            running = ed.inline(uri, primes)
            while engine.generated_tokens < generated + 6:
                await asyncio.sleep(0.001)
            ed.change(uri, primes + typed_live)
            rest = await ed.suggestion(uri, primes + typed_live)
            superseded = await running
            return first, local, before, after_local, rest, superseded, requests, continuations

    first, local, before, after_local, rest, superseded, requests, continuations = run(body())
    assert len(first) > 3 and local == first[3:]
    assert after_local == before  # nothing reached the server
    assert not superseded.items
    assert counter(srv, "nextword_session_continued") == continuations + 1
    assert counter(srv, "nextword_requests") == requests + 1  # one generation finished for both requests
    assert (typed_live + rest).startswith(head.text.rstrip())


@pytest.mark.real_model
def test_typing_ahead_of_a_running_generation_waits_for_it(smollm2_server):
    """Keystrokes that agree with the running generation but go past what it produced so far do not replace
    it: the language server waits for it and answers the rest of it (one generation on the server)."""
    srv, engine = smollm2_server, smollm2_server.runner.engine
    line = greedy(target(srv), f"<filename>pkg/fib.py\n{FIB}").split("\n")[0].rstrip()
    typed = line[:6]
    assert len(line) > len(typed) + 2  # the model has more to say after the typed part

    async def body():
        async with editor(target(srv)) as ed:
            uri = ed.open("pkg/fib.py", FIB)
            requests, continued = (
                counter(srv, "nextword_requests"),
                counter(srv, "nextword_session_continued"),
            )
            gate = threading.Event()
            srv.runner.call(lambda: gate.wait(120))  # the engine stops between two steps until the gate opens
            try:
                first = ed.inline(uri, FIB)
                while not engine.sequences():  # the request reached the stopped engine: nothing generated
                    await asyncio.sleep(0.01)
                ed.change(uri, FIB + typed)
                second = ed.inline(uri, FIB + typed)
                await asyncio.sleep(0.5)  # time enough for a (wrong) new request to reach the server
                waiting = len(engine.sequences())
            finally:
                gate.set()
            return await first, await second, waiting, requests, continued

    first, second, waiting, requests, continued = run(body())
    assert waiting == 1  # the keystroke did not send a request of its own
    assert not first.items  # superseded by the keystroke
    assert second.items[0].insert_text == line[len(typed) :]
    assert counter(srv, "nextword_requests") == requests + 1  # one generation answered both
    assert counter(srv, "nextword_session_continued") == continued  # and the server never heard of the second


@pytest.mark.real_model
def test_the_budget_answers_what_was_generated_and_the_generation_goes_on(smollm2_server, monkeypatch):
    """Past budgetMs the answer is the text generated so far; the generation goes on, and typing that answer
    is answered from it (the server's continue), not from a new generation."""
    srv, engine = smollm2_server, smollm2_server.runner.engine
    line = greedy(target(srv), f"<filename>pkg/fib.py\n{FIB}").split("\n")[0].rstrip()
    gate, step = threading.Event(), engine.step

    def step_then_hold() -> int:  # the engine stops after the step that gave the first token, until the gate
        n = step()
        if any(seq.generated for seq in engine.sequences()):
            gate.wait(120)
        return n

    async def body():
        async with editor(target(srv), budgetMs=1) as ed:
            uri = ed.open("pkg/fib.py", FIB)
            requests, continued = (
                counter(srv, "nextword_requests"),
                counter(srv, "nextword_session_continued"),
            )
            monkeypatch.setattr(engine, "step", step_then_hold)
            try:
                partial = await ed.suggestion(uri, FIB)  # the budget is long past: one token's text
                ed.configure(budgetMs=600_000)
                ed.change(uri, FIB + partial)
                rest = ed.inline(uri, FIB + partial)
                deadline = time.monotonic() + 60  # the server continues the held generation
                while counter(srv, "nextword_session_continued") == continued and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                gate.set()
            return partial, (await rest).items[0].insert_text, requests, continued

    partial, rest, requests, continued = run(body())
    assert partial and line.startswith(partial) and len(partial) < len(line)
    assert partial + rest == line
    assert counter(srv, "nextword_session_continued") == continued + 1
    assert counter(srv, "nextword_requests") == requests + 1  # one generation for both


@pytest.mark.real_model
def test_context_is_cut_at_a_line_boundary_within_the_token_budget(smollm2_server):
    from nextword.client import AsyncClient
    from nextword.client.suggest import Connection, Suggester

    text = "".join(f"value_{i} = compute({i}, scale={i * 3})\n" for i in range(40)) + "total = "

    async def body():
        async with AsyncClient(target(smollm2_server)) as client:
            suggester = Suggester(Connection(lambda: client, print))
            kept = await suggester._trim(text, 64)
            again = await suggester._trim(text + "value_1", 64)
            tokens = len((await client.tokenize(kept)).ids)
            return kept, again, tokens

    kept, again, tokens = run(body())
    assert text.endswith(kept) and text[len(text) - len(kept) - 1] == "\n"
    assert 32 <= tokens <= 64
    assert again == kept + "value_1"  # the cut stays put while the text fits: the prompt's start is stable


# ---- a server that goes away and comes back ----


def start_serve(model: Path, port: int) -> subprocess.Popen:
    cmd = serve_argv(model, "--port", str(port), "--metrics-port", "-1", "--grace", "0")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with Client(f"127.0.0.1:{port}") as client:
        client.wait_until_ready(timeout=300)
    return proc


def test_server_restart_mid_session(tmp_path):
    from tiny_models import write_tiny_model

    write_tiny_model(tmp_path / "tiny", "llama")
    port = free_port()
    srv_target = f"127.0.0.1:{port}"
    text = "Hello, world! This is"
    servers = [start_serve(tmp_path / "tiny", port)]
    try:
        expected = shape(greedy(srv_target, text), Context("", text, ""), 1)
        assert expected

        async def body():
            async with editor(srv_target) as ed:
                uri = ed.open("notes.txt", text)
                first = await ed.suggestion(uri, text)
                servers[0].send_signal(signal.SIGKILL)
                servers[0].wait()
                down = [await ed.suggestion(uri, text) for _ in range(3)]
                logs_when_down = list(ed.logs)
                servers.append(start_serve(tmp_path / "tiny", port))
                deadline, back = time.monotonic() + 60, ""
                while not back and time.monotonic() < deadline:
                    back = await ed.suggestion(uri, text)
                    await asyncio.sleep(0.1)
                return first, down, logs_when_down, back, list(ed.logs)

        first, down, logs_when_down, back, logs = run(body())
    finally:
        for server in servers:
            server.kill()
            server.wait()
    # notes.txt has no <filename> token in the tiny tokenizer: the prompt is the text itself.
    assert first == expected
    assert down == ["", "", ""]
    assert len(logs_when_down) == 1 and "unavailable" in logs_when_down[0]
    assert back == expected
    assert len(logs) == 2 and "back" in logs[1]


# ---- real editors ----


def neovim_snippet() -> str:
    """The Neovim 0.7 configuration of docs/editors.md, verbatim (the Lua block after "the tested form")."""
    doc = (Path(__file__).parent.parent / "docs" / "editors.md").read_text(encoding="utf-8")
    return re.search(r"the tested form is:\n\n```lua\n(.*?)```", doc, re.DOTALL).group(1)


# After the snippet: set the file type (the snippet attaches on FileType), wait for the server's
# capabilities, change a setting, request completion at the end of the last line, write the answer as JSON.
NVIM_REQUEST = r"""
vim.bo.filetype = "python"
vim.wait(120000, function()
  local c = vim.lsp.get_client_by_id(id)
  return c ~= nil and c.server_capabilities ~= nil and c.server_capabilities.completionProvider ~= nil
end, 20)
-- The shared test machine can be slow: no time cut (a setting, sent as a user's config change would be).
vim.lsp.get_client_by_id(id).notify("workspace/didChangeConfiguration", {settings = {timeoutMs = 600000, budgetMs = 600000}})
local params = {
  textDocument = {uri = vim.uri_from_bufnr(0)},
  position = {line = vim.fn.line("$") - 1, character = #vim.fn.getline("$")},
}
local result = vim.lsp.buf_request_sync(0, "textDocument/completion", params, 600000)
local out = io.open(os.getenv("NEXTWORD_OUT"), "w")
out:write(vim.fn.json_encode(result[id].result))
out:close()
vim.cmd("qa!")
"""


@pytest.mark.real_model
def test_neovim_builtin_client_gets_the_suggestion(smollm2_server, tmp_path):
    """docs/editors.md's Neovim configuration in a real `nvim --headless`; `nextword` found on PATH and the
    server through $NEXTWORD_TARGET, as a user's shell would have them."""
    nvim = need("nvim")
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "fib.py"
    source.write_text(FIB + "\n")
    (tmp_path / "t.lua").write_text(neovim_snippet() + NVIM_REQUEST)
    expected = greedy(target(smollm2_server), f"<filename>pkg/fib.py\n{FIB}").split("\n")[0].rstrip()
    bin_dir = Path(sys.executable).parent  # where `nextword` is installed, beside this Python
    assert (bin_dir / "nextword").exists()
    env = os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "NEXTWORD_TARGET": target(smollm2_server),
        "NEXTWORD_OUT": str(tmp_path / "out.json"),
    }
    subprocess.run(
        [nvim, "--headless", "-u", "NONE", "-n", str(source), "-c", f"luafile {tmp_path / 't.lua'}"],
        env=env,
        cwd=tmp_path,
        timeout=600,
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    result = json.loads((tmp_path / "out.json").read_text())
    (item,) = result["items"]
    assert item["textEdit"]["newText"] == "fib" + expected


GREY = re.compile(
    r"\x1b\[(?:[0-9;]*;)?(?:90|38;5;(?:59|102|145|188|23[2-9]|24[0-9]|25[0-5])|38;2;(\d+);\1;\1)m"
)


def test_tmux_typing_surface_shows_and_accepts_the_grey_suggestion(smollm2_server, tmp_path):
    tmux = need("tmux")
    socket_name = f"nextword-test-{os.getpid()}"
    typed = "for i in range("
    expected = greedy(target(smollm2_server), typed).split("\n")[0].rstrip()
    assert expected

    def tm(*args: str) -> str:
        return subprocess.run(
            [tmux, "-L", socket_name, *args], capture_output=True, text=True, check=True
        ).stdout

    def screen(escapes: bool) -> str:
        return tm("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "editor")

    def wait_for(predicate, escapes: bool) -> str:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if predicate(text := screen(escapes)):
                return text
            time.sleep(0.1)
        raise AssertionError(f"the screen never showed it:\n{text}")

    command = " ".join(
        [*TYPE, "--target", target(smollm2_server), "--timeout-ms", "600000", "--budget-ms", "600000"]
    )
    tm("new-session", "-d", "-s", "editor", "-x", "100", "-y", "12", "-e", "TERM=xterm-256color", command)
    try:
        wait_for(
            lambda s: s.startswith(">"), escapes=False
        )  # the prompt (capture-pane drops trailing blanks)
        tm("send-keys", "-t", "editor", "-l", typed)
        shown = wait_for(lambda s: expected in s, escapes=False)
        assert f"> {typed}{expected}" in shown
        assert "suggestion in" in shown and " ms" in shown  # the status line: the last suggestion's latency
        coloured = screen(escapes=True)
        grey = GREY.search(coloured, coloured.index(typed) + len(typed))
        assert grey is not None and coloured[grey.end() :].startswith(expected), coloured
        tm("send-keys", "-t", "editor", "Tab")
        accepted = wait_for(lambda s: f"> {typed}{expected}" in s, escapes=True)  # one run: no colour between
        tm("send-keys", "-t", "editor", "Enter")
        wait_for(lambda s: len(re.findall(r"^>", s, re.MULTILINE)) == 2, escapes=False)  # a new line
        assert f"> {typed}{expected}" in accepted
    finally:
        subprocess.run([tmux, "-L", socket_name, "kill-server"], check=False, capture_output=True)


# ---- the rules, on their own ----

SMOLLM2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>", "<filename>"]


def test_prompt_format_is_detected_from_special_tokens():
    smol = PromptFormat.from_special_tokens(SMOLLM2_SPECIAL)
    assert smol == PromptFormat(None, "<filename>")
    assert smol.build("a.py", "x = ", "\ny = 2") == "<filename>a.py\nx = "
    starcoder = PromptFormat.from_special_tokens(
        ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<filename>"]
    )
    assert (
        starcoder.build("a.py", "x = ", "\n") == "<filename>a.py\n<fim_prefix>x = <fim_suffix>\n<fim_middle>"
    )
    qwen = PromptFormat.from_special_tokens(
        ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>"]
    )
    assert qwen.build("", "a", "b") == "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"
    assert qwen.build("m.py", "a", "b").startswith("<|file_sep|>m.py\n")
    assert PromptFormat.from_special_tokens(["<fim_prefix>", "<|endoftext|>"]) == PromptFormat()  # incomplete


def test_shape_rules():
    def ctx(before, after=""):
        return Context("", before, after)

    assert shape("x + 1  \ny = 2", ctx("a = "), 1) == "x + 1"  # one line, trailing blanks trimmed
    assert shape('"hi")', ctx("print(", ")"), 1) == '"hi"'  # not what is already after the cursor
    assert shape('"hi"):', ctx("if f(", "):"), 1) == '"hi"'
    assert shape("x)", ctx("f(", ""), 1) == "x)"
    block = ctx("def f(x):\n    ", "\n")
    assert shape("y = x\n    return y\n\ndef g():\n    pass", block, 8) == "y = x\n    return y"  # dedent
    assert shape("a\n    b\n    c", block, 2) == "a\n    b"  # max lines
    closing = ctx("if (x) {\n  ", "\n}\n")
    assert shape("y();\n}", closing, 8) == "y();"  # the closing line is already the next line
    assert is_block_start("def f(x):\n    ") and is_block_start("if (x) {\n\n  ")
    assert not is_block_start("def f(x):\n    y") and not is_block_start("x = 1\n")


def test_settings_from_either_spelling():
    settings, bad = Settings().updated({"maxLines": 3, "context_tokens": 256, "temperature": 0.2, "nope": 1})
    assert (settings.max_lines, settings.context_tokens, settings.temperature) == (3, 256, 0.2)
    assert bad == ["nope"]
    nested, bad = Settings().updated({"nextword": {"maxTokens": 12, "timeoutMs": "soon"}})
    assert nested.max_tokens == 12 and nested.timeout_ms == Settings.timeout_ms and bad == ["timeoutMs"]
    assert Context("", "x = ", "").anchor == "x =" and Context("", "x = ", "").after_blank(" 1") == "1"
    assert Context("", "\t", "").anchor == "\t" and Context("", "\t", "").after_blank(" 1") == " 1"
