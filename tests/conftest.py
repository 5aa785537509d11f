"""Shared fixtures. Real components only: real files, real Zarr stores, real tiny models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


TINY_STUDY = """\
[study]
name = "{name}"
seeds = [1, 2]
output_dir = "{out}"

[corpora.markov]
source = "synthetic:markov"
train_records = 48
eval_records = 16
synthetic = {{ alphabet = "ACGT", order = 2, entropy_rate = 1.2, records = 64, length = 300 }}

[runs.r]
corpus = "markov"
tokenizer = "kmer3"

[model]
shape = "tiny"

[training]
steps = 12
batch_size = 8
seq_len = 64
checkpoint_every_steps = 6
eval_every_steps = 6
eval_batches = 1
log_every_steps = 2
fisher_flow = [0.5]

[analysis]
eval_records = 16
batch_size = 8
fisher_records = 8
contextual_records = 8
bootstrap = 10
top_p = [0.5, 1.0]
topk = [1, 3]

[dispatch]
executor = "debug"
"""
"""A real study that runs end to end in about 15 s on 2 cores: a Markov corpus, 3-mers and
two tiny members (``.format(name=..., out=...)``)."""


@pytest.fixture
def weird_tmp_path(tmp_path: Path) -> Path:
    """A temporary folder whose path has spaces and quotes (submitit's habit)."""
    path = tmp_path / "we ird 'quoted' \"dir\""
    path.mkdir()
    return path


@pytest.fixture
def one_torch_thread():  # type: ignore[no-untyped-def]
    """One intra-op thread: tiny models on a shared 2-core machine are many times faster."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real single-node SLURM cluster for the whole session (see tests/slurm_cluster.py)."""
    from tests.slurm_cluster import SlurmCluster

    if os.geteuid() != 0 and not all(map(shutil.which, ("slurmctld", "slurmd"))):
        pytest.skip("SLURM daemons are not installed and this user cannot install them")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


WHEEL_SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "toolkit", "storage_schemas")
"""What the wheel build reads: pyproject.toml names README.md; setup.py copies storage_schemas/."""


def build_toolkit_wheel(tmp: Path, env: dict[str, str] | None = None) -> Path:
    """Build the toolkit wheel from a copy of the sources in ``tmp``; return its path.

    A copy, so that no stale ``build/`` of the checkout leaks in; ``--no-build-isolation``,
    so that the venv's setuptools builds it and nothing is downloaded.
    """
    import subprocess
    import sys

    src, dist = tmp / "src", tmp / "dist"
    src.mkdir(parents=True)
    for name in WHEEL_SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(dist), str(src)], cwd=tmp, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    (wheel,) = dist.glob("toolkit-*.whl")
    return wheel
