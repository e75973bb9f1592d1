"""Packaging guards: lint is clean, and bare top-level imports (`import server`) are caught."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


def ruff(*args, cwd=ROOT):
    return subprocess.run([RUFF, *args], check=False, cwd=cwd, capture_output=True, text=True)


@pytest.fixture(autouse=True)
def _need_ruff():
    assert RUFF, "ruff is a dev dependency: pip install -e '.[dev]'"


def test_lint_and_format_are_clean():
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_bare_package_imports_are_banned(tmp_path):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "bad.py").write_text(
        "import server\nfrom kernels.matmul import linear\n\nprint(server, linear)\n"
    )
    result = ruff("check", "--select", "TID251", "bad.py", cwd=tmp_path)
    assert result.returncode == 1
    assert "import nextword.server" in result.stdout and "import nextword.kernels" in result.stdout


def test_pytest_imports_in_importlib_mode():
    # with importlib mode the repo root is not on sys.path, so a bare `import server` cannot work by accident
    assert str(ROOT) not in sys.path
