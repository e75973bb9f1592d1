"""Regenerate every command output shown in the docs by running the command; or check them (--check).

    .venv/bin/python docs/regenerate.py            # rewrite the outputs in place (takes a minute)
    .venv/bin/python docs/regenerate.py --check    # exit 1 and show the differences if any is stale

In each file of DOCS, a ```console block holds `$ COMMAND` lines, each followed by what it prints (stdout
and stderr together, as a terminal shows them). A line `...` in a shown output skips lines: the lines before
it must begin the real output and the lines after it must end it. Before comparing, VOLATILE values
(timings, rates, random seeds, ports, the model cache path) are masked, so only what a reader could rely on
is compared.

Commands run against one server, `SERVER_COMMAND` (float32 weights: their output is the same on every
x86 CPU, where the quantized formats may round differently on AVX2 and AVX-512 hosts). A `$ nextword serve`
line in a doc must be SERVER_COMMAND; its shown output is that server's start-up lines. `nextword ...` runs
as `python -m nextword.client.cli ...`, `python PATH ...` runs the repository's script, each in a scratch
folder; a trailing `2>/dev/null` drops stderr, as the shell would.

To add a page: put it in DOCS. tests/test_docs.py runs the same comparison for every command.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/how-it-works.md", "docs/security.md"]
SERVER_COMMAND = "nextword serve --weights f32"
SKIP = "..."

VOLATILE = [
    (re.compile(r"\b\d+(?:\.\d+)? (ms|s|tokens/s|tok/s|req/s)\b"), r"# \1"),
    (re.compile(r"\bseed \d+"), "seed #"),
    (re.compile(r"\b(127\.0\.0\.1|localhost|0\.0\.0\.0):\d+"), r"\1:#"),
    (re.compile(r"\b(port|metrics_port)=\d+"), r"\1=#"),
    (re.compile(r"(?<![\w.])/\S*?/models/"), "<home>/models/"),
]


@dataclass
class Shown:
    """One `$ command` in a doc and the output lines shown under it."""

    doc: str
    command: str
    output: list[str]
    start: int  # index of the first output line in the doc's lines
    end: int  # one past the last

    @property
    def id(self) -> str:
        return f"{Path(self.doc).stem}:{self.start}:{' '.join(shlex.split(self.command)[:2])}"


def shown_commands(doc: str, text: str) -> list[Shown]:
    lines = text.splitlines()
    found: list[Shown] = []
    fence = None  # the open block's info string
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            if fence is None and found and found[-1].end == -1:
                found[-1].end = i
            continue
        if fence != "console":
            continue
        if line.startswith("$ "):
            if found and found[-1].end == -1:
                found[-1].end = i
            found.append(Shown(doc, line[2:], [], i + 1, -1))
        elif found and found[-1].end == -1:
            found[-1].output.append(line)
    return found


def mask(text: str) -> str:
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return text


def _chunks(lines: list[str]) -> list[list[str]]:
    """The runs of lines between `...` lines."""
    chunks: list[list[str]] = [[]]
    for line in lines:
        if line == SKIP:
            chunks.append([])
        else:
            chunks[-1].append(line)
    return chunks


def _trim(lines: list[str]) -> list[str]:
    """Without the trailing blank lines (a blank line may separate one command's output from the next)."""
    end = len(lines)
    while end and not lines[end - 1].strip():
        end -= 1
    return lines[:end]


def matches(shown: list[str], actual: list[str]) -> bool:
    """Do the shown lines equal the actual ones, volatile values masked and `...` skipping lines? The first
    run of lines begins the output, the last one ends it, the ones between come in order."""
    shown = [mask(line.rstrip()) for line in _trim(shown)]
    actual = [mask(line.rstrip()) for line in _trim(actual)]
    chunks = _chunks(shown)
    if len(chunks) == 1:
        return shown == actual
    first, *middle, last = chunks
    if actual[: len(first)] != first or len(actual) < len(first) + len(last):
        return False
    at, end = len(first), len(actual) - len(last)
    if last and actual[end:] != last:
        return False
    for chunk in middle:
        found = next(
            (i for i in range(at, end - len(chunk) + 1) if actual[i : i + len(chunk)] == chunk), None
        )
        if found is None:
            return False
        at = found + len(chunk)
    return True


def regenerated(shown: list[str], actual: list[str]) -> list[str]:
    """The actual output in the shown one's shape: as many lines before the first `...` and after the last
    as it had, and its trailing blank lines. The runs between stay as shown when they still match (--all),
    and are dropped otherwise (choose them again)."""
    blank = shown[len(_trim(shown)) :]
    actual = _trim(actual)
    chunks = _chunks(_trim(shown))
    if len(chunks) == 1 or len(actual) <= len(chunks[0]) + len(chunks[-1]):
        return actual + blank
    head, tail = len(chunks[0]), len(chunks[-1])
    middle = [line for chunk in chunks[1:-1] for line in (*chunk, SKIP)] if matches(shown, actual) else []
    return actual[:head] + [SKIP] + middle + (actual[-tail:] if tail else []) + blank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DocsServer:
    """SERVER_COMMAND in a subprocess on free ports; `startup` holds its stdout lines up to the ready line."""

    def __init__(self):
        self.port, self.metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "NEXTWORD_PORT": str(self.port),
            "NEXTWORD_METRICS_PORT": str(self.metrics_port),
            "NEXTWORD_LOG_LEVEL": "WARNING",  # no request lines on the terminal
        }
        argv = [sys.executable, "-m", "nextword.client.cli", *shlex.split(SERVER_COMMAND)[1:]]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.startup: list[str] = []
        for line in self.proc.stdout:
            self.startup.append(self.as_default(line.rstrip("\n")))
            if "; ready in " in line:
                break
        else:
            raise RuntimeError(f"{SERVER_COMMAND} ended before it was ready:\n" + "\n".join(self.startup))

    def as_default(self, text: str) -> str:
        """Output as a server on the default ports would give it (the docs server runs on free ones)."""
        text = re.sub(rf"(?<=[:=]){self.port}\b", "50051", text)
        return re.sub(rf"(?<=[:=]){self.metrics_port}\b", "9464", text)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.proc.stdout.close()


def run(command: str, server: DocsServer, scratch: Path) -> tuple[list[str], int]:
    """Run a shown command as a user would; returns its output lines and exit code."""
    argv = shlex.split(command)
    if argv[:2] == ["nextword", "serve"] and "--help" not in argv:
        if command != SERVER_COMMAND:
            raise ValueError(f"a doc starts `{command}`; docs show only `{SERVER_COMMAND}` (the docs server)")
        return server.startup, 0
    stderr = subprocess.STDOUT
    if argv[-1] == "2>/dev/null":
        argv, stderr = argv[:-1], subprocess.DEVNULL
    if argv[0] == "nextword":
        argv = [sys.executable, "-m", "nextword.client.cli", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    else:
        raise ValueError(f"no way to run {command!r}: docs run `nextword ...` and `python PATH ...`")
    env = {
        **os.environ,
        "NEXTWORD_TARGET": server.target,
        "NEXTWORD_HOME": str(scratch),  # files the commands write land in the scratch folder
        "PYTHONUNBUFFERED": "1",  # stdout and stderr interleaved as on a terminal
        "COLUMNS": "110",
    }
    done = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=scratch, env=env, timeout=600, check=False
    )
    printed = done.stdout.rstrip("\n").replace(str(scratch), "$NEXTWORD_HOME")  # not a random temp path
    return server.as_default(printed).splitlines(), done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if an output is stale")
    parser.add_argument(
        "--all", action="store_true", help="rewrite every output, also those that differ only in timings"
    )
    args = parser.parse_args()
    server = DocsServer()
    stale = 0
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for doc in DOCS:
                path = ROOT / doc
                lines = path.read_text(encoding="utf-8").splitlines()
                for shown in reversed(shown_commands(doc, "\n".join(lines))):  # from the end: indices hold
                    actual, code = run(shown.command, server, Path(scratch))
                    if matches(shown.output, actual) and not (args.all and not args.check):
                        continue
                    stale += 1
                    print(f"{doc}: `{shown.command}` (exit {code}) prints something else:", file=sys.stderr)
                    diff = difflib.unified_diff(shown.output, actual, "shown", "printed", lineterm="")
                    print("\n".join(diff), file=sys.stderr)
                    lines[shown.start : shown.end] = regenerated(shown.output, actual)
                if not args.check:
                    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    finally:
        server.close()
    verb = "stale" if args.check else "regenerated"
    print(f"{stale} shown output(s) {verb}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
