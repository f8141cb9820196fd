"""The build backend: setuptools, with the scheduling hot path compiled by mypyc in wheels.

``pip install .`` builds a wheel: the modules listed under ``[tool.fairbatching] compiled`` in
pyproject.toml are compiled to C extensions (same source, same results, several times faster).
``pip install -e .`` stays pure Python, so an edit takes effect without a rebuild. ``FAIRBATCHING_COMPILE=0``
builds a pure-Python wheel. A wheel build that cannot compile (no C compiler) warns and installs pure Python.
"""

from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every hook not overridden below is setuptools' own)

MYPYC = "mypy>=1.11"


def _compiling() -> bool:
    return os.environ.get("FAIRBATCHING_COMPILE", "1") != "0"


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + ([MYPYC] if _compiling() else [])


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    os.environ["FAIRBATCHING_MYPYC"] = "1" if _compiling() else "0"
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
