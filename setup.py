"""Extension modules only (metadata lives in pyproject.toml): see ``_build/backend.py`` for when they build."""

import os
import sys
import tomllib
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    """The hot-path modules mypyc compiles, as paths under src/ (``[tool.fairbatching] compiled``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [f"src/{name.replace('.', '/')}.py" for name in config["tool"]["fairbatching"]["compiled"]]


class OptionalBuildExt(build_ext):
    """Compiled modules are an acceleration: without a working C compiler the pure-Python modules serve."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # distutils raises several unrelated types for a missing or failing compiler
            print(f"warning: fairbatching's compiled modules did not build ({exc}); using pure Python", file=sys.stderr)


def extensions() -> list:
    if os.environ.get("FAIRBATCHING_MYPYC") != "1":
        return []
    from mypyc.build import mypycify

    return mypycify(compiled_modules(), opt_level="3")


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
