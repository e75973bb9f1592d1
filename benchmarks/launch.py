"""`nextword serve` for a benchmark: a child process on free ports, returned once it is ready."""

import os
import re
import subprocess
import sys

# what the server's start lines announce, by name
ANNOUNCED = {
    "grpc": r"listening on ([\d.]+:\d+)",
    "http": r"HTTP on http://([\d.]+:\d+)",
    "metrics": r"metrics on (\S+/metrics)",
}


def start_serve(*flags: str, stderr=None, env=None) -> tuple[subprocess.Popen, dict[str, str]]:
    """`nextword serve --port 0 FLAGS`; (process, {"grpc": host:port, "http": host:port, "metrics": URL}: those
    its flags turn on) once it says it is ready. `stderr`: where its log goes (default: this terminal);
    `env`: its environment (default: this one)."""
    cmd = [sys.executable, "-m", "nextword.client.cli", "serve", "--port", "0", *flags]
    env = (os.environ if env is None else env) | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    found = {}
    for line in proc.stdout:
        for name, pattern in ANNOUNCED.items():
            if m := re.search(pattern, line):
                found[name] = m.group(1)
        if "ready in" in line:
            return proc, found
    raise RuntimeError(f"nextword serve {' '.join(flags)} did not start")
