"""docs/how-it-works.md works as written: every `$ ...` line of its ```console blocks runs and exits 0.

`nextword ...` runs as `python -m nextword.client.cli ...` against a real server (the default model and
weights, in-process, NEXTWORD_TARGET set to it); `python PATH ...` runs the repository's script. Both run in a
scratch folder with NEXTWORD_HOME pointing into it, so files the commands write land there. A console line of
any other kind fails the test: nothing on the page goes unchecked. The page's links must resolve too.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "how-it-works.md"


def console_commands(markdown: str) -> list[str]:
    """The `$ ` lines of the ```console blocks, without the prompt."""
    commands, fence = [], None  # fence: the info string of the open block, None outside blocks
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
        elif fence == "console" and line.startswith("$ "):
            commands.append(line[2:])
    return commands


COMMANDS = console_commands(DOC.read_text(encoding="utf-8"))


def test_the_page_shows_every_step():
    programs = [shlex.split(c)[:2] for c in COMMANDS]
    assert {p[0] for p in programs} <= {"nextword", "python"}, "a console command the test cannot run"
    shown = {p[1] for p in programs}
    for command in [
        "tokenize",
        "similar",
        "analogy",
        "explain",
        "probs",
        "complete",
        "examples/pixels/train.py",
    ]:
        assert command in shown
    assert any("--show-probs" in c for c in COMMANDS) and any("--png" in c for c in COMMANDS)


def test_links_resolve():
    text = DOC.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s#]+)", text) if "://" not in t]
    assert len(targets) >= 15
    missing = [t for t in targets if not (DOC.parent / t).exists()]
    assert not missing


@pytest.mark.real_model
@pytest.mark.parametrize(
    "command", COMMANDS, ids=[f"{i}-{' '.join(shlex.split(c)[:2])}" for i, c in enumerate(COMMANDS)]
)
def test_command_runs(command, smollm2_server, tmp_path):
    argv = shlex.split(command)
    if argv[0] == "nextword":
        run = [sys.executable, "-m", "nextword.client.cli", *argv[1:]]
    elif argv[0] == "python":
        script = ROOT / argv[1]
        assert script.is_file(), f"{argv[1]} is not in the repository"
        run = [sys.executable, str(script), *argv[2:]]
    else:
        pytest.fail(f"no way to run {command!r}")
    if "--png" in argv and importlib.util.find_spec("matplotlib") is None:
        pytest.skip("--png needs matplotlib, which is not installed (pip install 'nextword[viz]')")
    env = {
        **os.environ,
        "NEXTWORD_TARGET": f"127.0.0.1:{smollm2_server.port}",
        "NEXTWORD_HOME": str(tmp_path),
    }
    done = subprocess.run(
        run, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip()
