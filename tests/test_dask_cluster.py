"""The aggregation stage's Dask computation on SLURM workers (dask-jobqueue).

The fast tests check how ``dispatch.resources.analyse`` and the container become the
worker job script (rendered by dask-jobqueue's own ``SLURMJob``) and the error for a
missing package. The ``slurm`` tests start real worker jobs on the single-node test
cluster (``tests/slurm_cluster.py``): a real reduction, a real ``analyse_study`` on
synthetic stores compared with the local scheduler, and a worker that never starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_study, marked
from toolkit.config import StudyConfig, study_from_dict, study_to_dict
from toolkit.dispatch import dask_cluster
from toolkit.dispatch.container import bind_paths
from toolkit.errors import SubmissionError, ToolkitError
from toolkit.study import Layout


def with_dispatch(study: StudyConfig, **dispatch: object) -> StudyConfig:
    """The same study with ``dispatch`` fields replaced (through the real validation)."""
    raw = study_to_dict(study)
    raw["dispatch"] = {**raw.get("dispatch", {}), **dispatch}
    return study_from_dict(raw, where="test")


def plain_study(root: Path, name: str = "dasktest", **dispatch: object) -> StudyConfig:
    raw = {"study": {"name": name, "seeds": [1], "output_dir": str(root)},
           "corpora": {"c": {"source": "synthetic:markov"}},
           "runs": {"r": {"corpus": "c", "tokenizer": "kmer3"}},
           "dispatch": dispatch}
    return study_from_dict(raw, where="test")


def needs_cluster_extra() -> None:
    """Skip when the ``cluster`` extra (also in ``dev``) is not installed."""
    for module in ("distributed", "dask_jobqueue"):
        pytest.importorskip(module, reason="needs `pip install 'toolkit[cluster]'`")


def job_script(study: StudyConfig) -> str:
    """The worker's sbatch script, rendered by dask-jobqueue itself (no scheduler started)."""
    needs_cluster_extra()
    from dask_jobqueue.slurm import SLURMJob

    kwargs = dask_cluster.cluster_kwargs(study)
    kwargs.pop("scheduler_options")
    return SLURMJob(scheduler="tcp://127.0.0.1:1", name="w0", **kwargs).job_script()


# --------------------------------------------------------------------------- job script


def test_analyse_resources_become_the_worker_job_script(tmp_path: Path) -> None:
    study = plain_study(tmp_path, resources={"analyse": {
        "partition": "big", "account": "proj7", "qos": "long", "time_minutes": 125, "mem_gb": 6,
        "cpus_per_task": 3, "gpus_per_node": 1, "gpu_style": "gres",
        "extra_sbatch": {"constraint": "ib", "exclusive": ""},
        "setup": ["module load foo", "export X='a b'"]}})
    script = job_script(study)
    header = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    for line in ("#SBATCH -p big", "#SBATCH -A proj7", "#SBATCH --qos=long", "#SBATCH -t 02:05:00",
                 "#SBATCH --cpus-per-task=3", "#SBATCH --mem=6144M", "#SBATCH --gres=gpu:1",
                 "#SBATCH --constraint=ib", "#SBATCH --exclusive", "#SBATCH -J dasktest-dask"):
        assert line in header, (line, header)
    body = script.splitlines()
    prologue = body.index("module load foo")
    worker = next(i for i, ln in enumerate(body) if "distributed.cli.dask_worker" in ln)
    assert body[prologue + 1] == "export X='a b'" and prologue < worker
    argv = shlex.split(body[worker])
    assert argv[:3] == [sys.executable, "-m", "distributed.cli.dask_worker"]
    assert argv[argv.index("--nthreads") + 1] == "3"
    assert argv[argv.index("--memory-limit") + 1] == "6.00GiB"
    assert f"-o {Layout(study).logs_dir / 'dask'}" in script


def test_defaults_ask_for_no_memory_and_keep_the_partition_default(tmp_path: Path) -> None:
    script = job_script(plain_study(tmp_path))
    assert "#SBATCH --mem" not in script and "#SBATCH -p" not in script and "#SBATCH -A" not in script
    assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH -t 01:00:00" in script
    argv = shlex.split(next(ln for ln in script.splitlines() if "dask_worker" in ln))
    assert argv[argv.index("--memory-limit") + 1] in ("0B", "0.0B")  # 0: no limit


def test_container_workers_run_in_the_image_with_the_units_binds(weird_tmp_path: Path) -> None:
    image = weird_tmp_path / "toolkit.sif"
    image.write_bytes(b"not a real image; only its path is used")
    data = weird_tmp_path / "data dir"
    data.mkdir()
    study = plain_study(weird_tmp_path / "study", container={
        "runtime": "apptainer", "image": str(image), "binds": [str(data)],
        "scratch": str(weird_tmp_path / "scratch")})
    study.root.mkdir(parents=True)
    argv = shlex.split(next(ln for ln in job_script(study).splitlines() if "dask_worker" in ln))
    n = argv.index("-m")
    assert argv[:n] == ["apptainer", "exec", "--containall", "--cleanenv", "--bind", ",".join(bind_paths(study)),
                        "--env", f"TOOLKIT_SCRATCH={weird_tmp_path / 'scratch'}", str(image), "python"]
    assert str(data) in argv[5].split(",") and str(study.root) in argv[5].split(",")
    gpu = with_dispatch(study, resources={"analyse": {"gpus_per_node": 1}})
    assert shlex.split(dask_cluster.worker_python(gpu))[:3] == ["apptainer", "exec", "--nv"]


def test_missing_package_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import raises ImportError
    with pytest.raises(ToolkitError, match=r"dask_jobqueue is missing.*pip install 'toolkit\[cluster\]'"):
        dask_cluster.require_packages()
    study = plain_study(tmp_path, dask="slurm")
    with pytest.raises(ToolkitError, match="toolkit.cluster"), dask_cluster.analysis_scheduler(study):
        pytest.fail("the body must not run without the packages")


def test_local_scheduler_starts_nothing(tmp_path: Path) -> None:
    with dask_cluster.analysis_scheduler(plain_study(tmp_path)) as client:
        assert client is None


# --------------------------------------------------------------------------- real SLURM


def squeue_ids(name: str) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
    return set(out.split())


def worker_jobs(client) -> dict[str, tuple[str | None, str | None, int]]:  # noqa: ANN001
    """Worker address -> (SLURM_JOB_ID, SLURM_JOB_PARTITION, transitions it has run)."""
    return client.run(lambda dask_worker: (os.environ.get("SLURM_JOB_ID"),
                                           os.environ.get("SLURM_JOB_PARTITION"),
                                           dask_worker.state.transition_counter))


def wait_gone(name: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while squeue_ids(name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not squeue_ids(name), f"worker job(s) of {name} still queued after leaving the context"


@pytest.mark.slurm
@pytest.mark.slow
def test_worker_job_computes_a_reduction(slurm_cluster, tmp_path: Path) -> None:
    needs_cluster_extra()
    import dask
    import dask.array as da

    study = plain_study(tmp_path, "reduction", dask="slurm",
                        resources={"analyse": {"partition": "cpu", "time_minutes": 5, "cpus_per_task": 2}})
    name = f"{study.name}-dask"
    with dask_cluster.slurm_client(study, max_workers=1, start_timeout_s=60) as client:
        jobs = dask_cluster._job_ids(client.cluster)
        assert len(jobs) == 1 and squeue_ids(name) == set(jobs)
        before = worker_jobs(client)
        assert [v[:2] for v in before.values()] == [(jobs[0], "cpu")]  # the worker is the SLURM job
        x = np.random.default_rng(5).normal(size=(400, 300))
        lazy = da.from_array(x, chunks=(50, 100))
        (got,) = dask.compute((lazy**2).sum(axis=0) / lazy.std())  # default scheduler: the client
        np.testing.assert_allclose(got, (x**2).sum(axis=0) / x.std(), rtol=1e-12)
        after = worker_jobs(client)
        assert [v[2] for v in after.values()][0] > [v[2] for v in before.values()][0] + 20
    assert dask.config.get("scheduler", None) is None  # local threads again
    wait_gone(name)
    assert list((Layout(study).logs_dir / "dask").glob("reduction-dask-*.err"))


@pytest.mark.slurm
@pytest.mark.slow
def test_analyse_on_slurm_workers_matches_local(slurm_cluster, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    needs_cluster_extra()
    import xarray as xr

    from toolkit.analyse import analyse_study

    local = make_study(tmp_path / "local", seeds=(1, 2))
    analyse_study(local, marked(local))
    study = with_dispatch(make_study(tmp_path / "slurm", seeds=(1, 2)), dask="slurm",
                          resources={"analyse": {"partition": "cpu", "time_minutes": 5}})
    seen: dict[str, object] = {}
    real = dask_cluster.slurm_client

    @contextlib.contextmanager
    def recording(study: StudyConfig, **kwargs: object):
        with real(study, progress_every_s=0.2, **kwargs) as client:
            yield client
            seen["jobs"] = dask_cluster._job_ids(client.cluster)
            seen["workers"] = worker_jobs(client)
            seen["prefixes"] = client.run_on_scheduler(lambda dask_scheduler: set(dask_scheduler.task_prefixes))

    monkeypatch.setattr(dask_cluster, "slurm_client", recording)
    with caplog.at_level(logging.INFO, logger="toolkit.dispatch.dask_cluster"):
        # the same analysis, its Dask graphs computed by SLURM workers
        analyse_study(study, marked(study), scheduler=dask_cluster.analysis_scheduler)
    # Every worker was a SLURM job of the study and ran the distribution graphs' tasks.
    assert seen["workers"] and all(job in seen["jobs"] and n > 100  # type: ignore[operator]
                                   for job, _, n in seen["workers"].values())  # type: ignore[union-attr]
    assert any("open_dataset" in p for p in seen["prefixes"]), seen["prefixes"]  # type: ignore[union-attr]
    assert "first Dask worker joined" in caplog.text and "ETA" in caplog.text
    wait_gone(f"{study.name}-dask")

    a = xr.open_zarr(Layout(local).summary, consolidated=True).load()
    b = xr.open_zarr(Layout(study).summary, consolidated=True).load()
    assert set(a.variables) == set(b.variables) and len(a.variables) > 40
    for var in a.variables:  # the same graph and chunks: bit for bit (NaN where NaN)
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)


@pytest.mark.slurm
@pytest.mark.slow
def test_worker_that_never_starts_is_a_bounded_submission_error(slurm_cluster, tmp_path: Path) -> None:
    needs_cluster_extra()
    study = plain_study(tmp_path, "neverstarts", dask="slurm", resources={"analyse": {
        "partition": "gpu", "time_minutes": 5, "extra_sbatch": {"begin": "now+1hour"}}})
    t0 = time.monotonic()
    with (pytest.raises(SubmissionError, match=r"on partition 'gpu' did not join within 5 s.*PENDING \(BeginTime\)"),
          dask_cluster.slurm_client(study, start_timeout_s=5)):
        pytest.fail("no worker can have joined")
    assert time.monotonic() - t0 < 40
    deadline = time.monotonic() + 30  # the pending job was cancelled on the way out
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-n", f"{study.name}-dask", "-o", "%T"],
                             capture_output=True, text=True).stdout.split()
        if "PENDING" not in out:
            break
        time.sleep(0.5)
    assert "PENDING" not in out


@pytest.mark.slurm
def test_unknown_partition_fails_before_anything_is_queued(slurm_cluster, tmp_path: Path) -> None:
    needs_cluster_extra()
    study = plain_study(tmp_path, "nopartition", dask="slurm",
                        resources={"analyse": {"partition": "nope"}})
    with (pytest.raises(SubmissionError, match="dispatch.resources.analyse.partition: 'nope'"),
          dask_cluster.slurm_client(study, start_timeout_s=5)):
        pytest.fail("unreachable")
    assert not squeue_ids(f"{study.name}-dask")


@pytest.mark.slurm
@pytest.mark.slow
def test_worker_job_that_dies_fails_early_with_its_log_line(slurm_cluster, tmp_path: Path) -> None:
    needs_cluster_extra()
    study = plain_study(tmp_path, "dies", dask="slurm", resources={"analyse": {
        "time_minutes": 5, "setup": ["echo 'module load: cuda/99 not found' >&2", "exit 3"]}})
    t0 = time.monotonic()
    with (pytest.raises(SubmissionError, match=r"partition '\(cluster default\)' ended before joining: "
                        r"worker job\(s\) \d+ FAILED \(NonZeroExitCode\); last line of .*dies-dask-\d+\.err: "
                        r"module load: cuda/99 not found"),
          dask_cluster.slurm_client(study, start_timeout_s=120)):
        pytest.fail("no worker can have joined")
    assert time.monotonic() - t0 < 60  # not the whole start timeout
