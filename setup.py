"""Build hook: ship the top-level ``storage_schemas/`` inside the package.

``storage_schemas/`` stays the single source at the repository root (the container definition,
the docs and the tests read it there); package-data cannot reach outside ``toolkit/``, so
``build_py`` copies it into the built package as ``toolkit/storage_schemas/``, where
:mod:`toolkit.store` finds it through :mod:`importlib.resources` in a regular install.
An editable install maps ``toolkit`` to the source tree and reads the top-level folder instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSchemas(build_py):
    """``build_py`` that also copies ``storage_schemas/*.json`` into ``toolkit/storage_schemas``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # the editable finder reads the top-level folder directly
            return
        source = ROOT / "storage_schemas"
        schemas = sorted(source.glob("*.json"))
        if not schemas:  # a wheel without schemas cannot open any store: fail the build
            raise RuntimeError(f"no storage schemas in {source}")
        target = Path(self.build_lib) / "toolkit" / "storage_schemas"
        target.mkdir(parents=True, exist_ok=True)
        for path in schemas:
            shutil.copy2(path, target / path.name)


setup(cmdclass={"build_py": BuildPyWithSchemas})
