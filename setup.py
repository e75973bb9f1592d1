"""setuptools hook: generate the gRPC code from proto/ before packaging (never committed, never hand-edited)."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


class BuildPyWithProtos(build_py):
    def run(self):
        generate = HERE / "proto" / "generate.py"
        if generate.exists():
            runpy.run_path(str(generate))["main"]()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
