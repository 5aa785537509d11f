"""A regular (non-editable) install works: the wheel ships its schemas and runs a study.

The wheel is built from a copy of the sources (so no stale ``build/`` of the checkout leaks
in), installed with ``--no-deps`` into a fresh venv outside the repository that sees the
project venv's dependencies through a ``.pth`` line (torch is not installed again), and a
tiny study runs end to end through that install from a folder outside the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import toolkit
from tests.conftest import REPO, TINY_STUDY, build_toolkit_wheel


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clean_env(tmp: Path) -> dict[str, str]:
    """The environment of a cluster user: nothing pointing into the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "TOOLKIT_SCHEMAS", "VIRTUAL_ENV", "PYTHONHOME"}}
    env["MPLCONFIGDIR"] = str(tmp / "mpl")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(venv, wheel, env): the toolkit wheel installed into a fresh venv outside the repo."""
    tmp = tmp_path_factory.mktemp("pkg")
    env = _clean_env(tmp)
    wheel = build_toolkit_wheel(tmp, env)

    venv = tmp / "venv"
    out = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    assert out.returncode == 0, out.stderr
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    # The dependencies come from the project venv, appended after the new site-packages;
    # a plain path line does not run the project venv's editable-install hook.
    (purelib / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                "install", "-q", "--no-deps", str(wheel)], tmp, env)
    assert out.returncode == 0, out.stderr
    return venv, wheel, env


def test_wheel_ships_the_schemas(installed: tuple[Path, Path, dict[str, str]]) -> None:
    import zipfile

    _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"toolkit/storage_schemas/{p.name}" for p in (REPO / "storage_schemas").glob("*.json")}
    assert expected and expected <= names
    assert "toolkit/py.typed" in names


@pytest.mark.slow
def test_installed_wheel_runs_a_study(installed: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    venv, _, env = installed
    python, script = str(venv / "bin" / "python"), str(venv / "bin" / "toolkit")
    work = tmp_path / "work"  # outside the repository: the checkout cannot be imported by accident
    work.mkdir()

    out = _run([python, "-c", "import toolkit, toolkit.store as s; print(toolkit.__file__); print(s.SCHEMA_DIR)"],
               work, env)
    assert out.returncode == 0, out.stderr
    module, schemas = (Path(line) for line in out.stdout.split())
    site = venv.resolve()
    assert module.resolve().is_relative_to(site) and not module.resolve().is_relative_to(REPO)
    assert schemas.resolve() == module.resolve().parent / "storage_schemas"
    out = _run([sys.executable, "-m", "pip", "--python", python, "show", "-f", "toolkit"], work, env)
    assert out.returncode == 0 and "storage_schemas/tokens.json" in out.stdout, out.stdout + out.stderr
    assert "Editable project location" not in out.stdout

    out = _run([script, "--version"], work, env)
    assert (out.returncode, out.stdout.strip()) == (0, f"toolkit {toolkit.__version__}")

    study = work / "study.toml"
    study.write_text(TINY_STUDY.format(name="pkg", out=work / "out"))
    out = _run([script, "prepare", str(study)], work, env)
    assert out.returncode == 0, out.stderr
    out = _run([script, "run", str(study), "--executor", "debug"], work, env, timeout=300)
    assert out.returncode == 0, out.stderr

    probe = (
        "import json, sys, numpy as np, toolkit\n"
        "tree = toolkit.open_results(toolkit.load_study(sys.argv[1]).root)\n"
        "s = tree['summary'].to_dataset()\n"
        "finite = {k: bool(np.isfinite(v.values).all()) for k, v in s.data_vars.items()\n"
        "          if np.issubdtype(v.dtype, np.floating)}\n"
        "print(json.dumps({'file': toolkit.__file__, 'finite': finite}))\n"
    )
    out = _run([python, "-c", probe, str(study)], work, env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(site)
    finite = report["finite"]
    # Some variables are NaN by design in a tiny study (e.g. no such step or block); the core
    # ensemble measurements must be finite.
    core = ["argmax_agreement", "analytic_entropy_rate_bits_per_symbol"]
    assert all(finite.get(name) for name in core), {name: finite.get(name) for name in core}
    assert sum(finite.values()) > len(finite) / 2, sorted(k for k, v in finite.items() if not v)


def _same_behaviour(python: str, script: str, cwd: Path, env: dict[str, str]) -> None:
    """``python -m toolkit`` and the console script: same output and exit code."""
    cases = [["--version"], ["no-such-command"], ["validate", str(cwd / "missing.toml")]]
    codes = []
    for argv in cases:
        via_module = _run([python, "-m", "toolkit", *argv], cwd, env, timeout=120)
        via_script = _run([script, *argv], cwd, env, timeout=120)
        assert (via_module.returncode, via_module.stdout, via_module.stderr) == (
            via_script.returncode, via_script.stdout, via_script.stderr), argv
        codes.append(via_script.returncode)
    assert codes == [0, 2, 2]  # argparse's usage error and a ToolkitError both exit 2


def test_module_and_script_alike_in_the_checkout(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    _same_behaviour(sys.executable, str(bindir / "toolkit"), tmp_path, _clean_env(tmp_path))


@pytest.mark.slow
def test_module_and_script_alike_when_installed(installed: tuple[Path, Path, dict[str, str]],
                                                tmp_path: Path) -> None:
    venv, _, env = installed
    _same_behaviour(str(venv / "bin" / "python"), str(venv / "bin" / "toolkit"), tmp_path, env)
