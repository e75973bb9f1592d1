"""The docs are true: every `$ command` shown in README.md and docs/ (docs/regenerate.py's DOCS) prints what
is shown under it, timings, rates, random seeds and ports aside. The commands run against the docs server
(`nextword serve --weights f32`, a subprocess) exactly as docs/regenerate.py runs them; when one fails here,
`.venv/bin/python docs/regenerate.py` rewrites the stale outputs (then read the diff).
"""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("regenerate", ROOT / "docs" / "regenerate.py")
regenerate = sys.modules["regenerate"] = importlib.util.module_from_spec(_spec)  # dataclasses need it there
_spec.loader.exec_module(regenerate)

SHOWN = [
    shown
    for doc in regenerate.DOCS
    for shown in regenerate.shown_commands(doc, (ROOT / doc).read_text(encoding="utf-8"))
]
HOW_IT_WORKS = [s.command for s in SHOWN if s.doc == "docs/how-it-works.md"]


def test_how_it_works_shows_every_step():
    programs = [shlex.split(c)[:2] for c in HOW_IT_WORKS]
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
    assert any("--show-probs" in c for c in HOW_IT_WORKS) and any("--png" in c for c in HOW_IT_WORKS)


@pytest.mark.parametrize("doc", regenerate.DOCS)
def test_links_resolve(doc):
    path = ROOT / doc
    targets = [t for t in re.findall(r"\]\(([^)\s#]+)", path.read_text(encoding="utf-8")) if "://" not in t]
    missing = [t for t in targets if not (path.parent / t).exists()]
    assert not missing


def test_every_shown_command_shows_output():
    empty = [s.id for s in SHOWN if not any(line.strip() for line in s.output)]
    assert not empty, "run docs/regenerate.py"


def test_matching_masks_only_what_varies():
    shown = ["[length; 5 prompt + 12 generated tokens; first token 22 ms; 201.0 tokens/s; seed 61991]"]
    same = ["[length; 5 prompt + 12 generated tokens; first token 3585 ms; 0.4 tokens/s; seed 12040]"]
    other = ["[length; 5 prompt + 11 generated tokens; first token 22 ms; 201.0 tokens/s; seed 61991]"]
    assert regenerate.matches(shown, same) and not regenerate.matches(shown, other)
    assert regenerate.matches(["a", "...", "c", "...", "e"], ["a", "b", "c", "d", "e"])
    assert not regenerate.matches(["a", "...", "x", "...", "e"], ["a", "b", "c", "d", "e"])
    assert not regenerate.matches(["a", "...", "d"], ["a", "b", "c", "d", "e"])  # the last run ends it
    assert regenerate.matches(["   1   0.583  'cat'", ""], ["   1   0.583  'cat'"])
    assert not regenerate.matches(["   1   0.583  'cat'"], ["   1   0.584  'cat'"])


@pytest.fixture(scope="module")
def docs_server():
    server = regenerate.DocsServer()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.real_model
@pytest.mark.parametrize("shown", SHOWN, ids=[s.id for s in SHOWN])
def test_shown_output_is_what_the_command_prints(shown, docs_server, tmp_path):
    if "--png" in shown.command and importlib.util.find_spec("matplotlib") is None:
        pytest.skip("--png needs matplotlib, which is not installed (pip install 'nextword[viz]')")
    actual, code = regenerate.run(shown.command, docs_server, tmp_path)
    assert code == 0 or any(line.startswith("error:") for line in actual), f"exit {code}:\n" + "\n".join(
        actual
    )
    assert regenerate.matches(shown.output, actual), (
        f"{shown.doc}: `{shown.command}` printed\n"
        + "\n".join(actual)
        + "\n\nbut the doc shows\n"
        + "\n".join(shown.output)
    )
