"""`nextword lsp`: a language server (pygls, over stdio) that answers completion requests from a nextword server.

Editors speak LSP; this turns it into the Session RPC: `textDocument/inlineCompletion` (ghost text, LSP 3.18)
and `textDocument/completion` (one item, for every other client) are answered by one `Suggester` per open
document (see suggest.py: supersede, continue, context, prompt format, shaping). `$/cancelRequest` cancels the
handler's task, which cancels the generation. Settings (Settings' fields, camelCase or snake_case) come from
`initializationOptions` and `workspace/didChangeConfiguration`.
"""

from __future__ import annotations

import argparse
import os
import re
from urllib.parse import unquote, urlparse

from nextword.client.client import AsyncClient
from nextword.client.suggest import RECONNECT_OPTIONS, Connection, Context, Settings, Suggester

WORD = re.compile(r"[\w$]*$")  # the identifier being typed: what editors filter completion items by


def add_command(commands, common: argparse.ArgumentParser) -> None:
    from nextword.client.cli import examples

    p = commands.add_parser(
        "lsp",
        parents=[common],
        help="a language server on stdio: completions from a nextword server, for any editor",
        description="Serve the Language Server Protocol on stdin/stdout: textDocument/inlineCompletion and "
        "textDocument/completion, answered from the nextword server at --target. docs/editors.md has the "
        "configuration of Neovim, Helix, Emacs and VS Code.",
        epilog=examples(
            "nextword lsp                                 (an editor starts it: see docs/editors.md)",
            "nextword lsp --target 127.0.0.1:50051 --token-file ~/.nextword-token",
        ),
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nextword.client.cli import connection_kwargs

    security = connection_kwargs(args)  # TLS and token, as for every client command
    server = build_server(
        lambda: AsyncClient(args.target, timeout=args.timeout, options=RECONNECT_OPTIONS, **security)
    )
    server.start_io()
    return 0


def build_server(make_client):
    """The language server (not started): `make_client()` makes the AsyncClient of the nextword server."""
    try:
        from lsprotocol import types as lsp
        from pygls.lsp.server import LanguageServer
    except ImportError as e:
        raise SystemExit(
            f"nextword lsp needs pygls and lsprotocol: pip install 'nextword[editors]' ({e})"
        ) from None

    from nextword import client as client_package

    server = LanguageServer("nextword", getattr(client_package, "__version__", "0.1.0"))
    state = {"settings": Settings()}
    suggesters: dict[str, Suggester] = {}

    def log(message: str, kind=lsp.MessageType.Warning) -> None:
        server.window_log_message(lsp.LogMessageParams(type=kind, message=message))

    connection = Connection(make_client, log)

    def configure(options) -> None:
        state["settings"], bad = state["settings"].updated(options)
        if bad:
            log(f"nextword: ignored unknown or invalid settings: {', '.join(map(str, bad))}")

    @server.feature(lsp.INITIALIZE)
    def initialize(params: lsp.InitializeParams) -> None:
        state["root"] = _path(params.root_uri) if params.root_uri else None
        configure(params.initialization_options)

    @server.feature(lsp.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(params: lsp.DidChangeConfigurationParams) -> None:
        configure(params.settings if isinstance(params.settings, dict) else {})

    @server.feature(lsp.TEXT_DOCUMENT_DID_CLOSE)
    async def did_close(params: lsp.DidCloseTextDocumentParams) -> None:
        if (suggester := suggesters.pop(params.text_document.uri, None)) is not None:
            await suggester.close()

    @server.feature(lsp.SHUTDOWN)
    async def shutdown(_params) -> None:
        for suggester in suggesters.values():
            await suggester.close()
        suggesters.clear()
        await connection.close()

    async def suggestion(uri: str, position: lsp.Position):
        """(the suggestion or None, the document, the cursor's offset)."""
        doc = server.workspace.get_text_document(uri)
        lines = doc.lines
        if position.line >= len(lines):  # past the end: the end
            offset = len(doc.source)
        else:
            line = lines[position.line].rstrip("\r\n")
            clamped = lsp.Position(position.line, min(position.character, len(line.encode("utf-16-le")) // 2))
            offset = doc.offset_at_position(clamped)
        context = Context(_relative(doc.path, state.get("root")), doc.source[:offset], doc.source[offset:])
        suggester = suggesters.get(uri)
        if suggester is None:
            suggester = suggesters[uri] = Suggester(connection)
        return await suggester.suggest(context, state["settings"]), doc, offset

    @server.feature(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.InlineCompletionOptions())
    async def inline_completion(params: lsp.InlineCompletionParams) -> lsp.InlineCompletionList:
        text, _, _ = await suggestion(params.text_document.uri, params.position)
        if not text:
            return lsp.InlineCompletionList(items=[])
        where = lsp.Range(params.position, params.position)
        return lsp.InlineCompletionList(items=[lsp.InlineCompletionItem(insert_text=text, range=where)])

    @server.feature(lsp.TEXT_DOCUMENT_COMPLETION, lsp.CompletionOptions(trigger_characters=[".", "(", " "]))
    async def completion(params: lsp.CompletionParams) -> lsp.CompletionList:
        text, doc, offset = await suggestion(params.text_document.uri, params.position)
        if not text:
            return lsp.CompletionList(is_incomplete=True, items=[])
        # The item replaces the word being typed with that word plus the suggestion: editors filter items by
        # the word before the cursor.
        word = WORD.search(doc.source[max(0, offset - 200) : offset]).group()
        start = lsp.Position(
            params.position.line, params.position.character - len(word.encode("utf-16-le")) // 2
        )
        first_line = text.split("\n", 1)[0]
        item = lsp.CompletionItem(
            label=(word + first_line).strip() or text.strip(),
            kind=lsp.CompletionItemKind.Text,
            detail="nextword",
            filter_text=word + text,
            sort_text="0",
            preselect=True,
            insert_text_format=lsp.InsertTextFormat.PlainText,
            text_edit=lsp.TextEdit(lsp.Range(start, params.position), word + text),
        )
        return lsp.CompletionList(is_incomplete=True, items=[item])

    return server


def _path(uri: str) -> str:
    return unquote(urlparse(uri).path)


def _relative(path: str, root: str | None) -> str:
    """The file's path as the model saw paths in training: relative to the project when inside it."""
    if root and path.startswith(root.rstrip("/") + "/"):
        return os.path.relpath(path, root)
    return os.path.basename(path)
