"""Run the aggregation stage's Dask computation on SLURM workers (dask-jobqueue).

``dispatch.dask = "local"`` (the default) keeps every Dask computation of
:mod:`toolkit.analyse` on the threads of the analysing process. With
``dispatch.dask = "slurm"`` the study's analysis runs inside
:func:`analysis_scheduler`, which starts a :class:`dask_jobqueue.SLURMCluster` and a
:class:`distributed.Client` (the default scheduler while it is open), so every
``dask.compute`` reads the members' stores from SLURM worker jobs instead.

Each worker is one SLURM job (one process, ``cpus_per_task`` threads) with the
resources of ``dispatch.resources.analyse``: partition, account, qos, time, memory,
GPUs, ``extra_sbatch`` (as ``#SBATCH --key=value`` lines) and ``setup`` (run before the
worker). It runs ``python -m distributed.cli.dask_worker`` with this interpreter, or,
when ``dispatch.container.runtime`` is not ``"none"``, inside the same image with the
same ``--bind`` list as the units (:func:`toolkit.dispatch.container.bind_paths`), so
workers have the same Dask version as the scheduler (checked when they join).

Scaling: adaptive, from 1 worker job up to ``max_workers`` (default
:data:`DEFAULT_MAX_WORKERS`), driven by the scheduler's backlog. The first worker must
join within ``start_timeout_s`` (default :data:`DEFAULT_START_TIMEOUT_S`), otherwise a
:class:`~toolkit.errors.SubmissionError` names the partition and the jobs' ``squeue``
state. Leaving the context closes the client and cancels every worker job. Worker
logs are in ``<study>/logs/dask``.

Needs the ``cluster`` extra (``pip install 'toolkit[cluster]'``: ``dask-jobqueue`` and
``distributed`` of the installed Dask version).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.config import StudyConfig
from toolkit.dispatch.container import shell_line, unit_argv
from toolkit.errors import SubmissionError, ToolkitError
from toolkit.progress import LogProgress
from toolkit.study import Layout

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

STAGE = "analyse"
DEFAULT_MAX_WORKERS = 4
"""Most worker jobs adaptive scaling asks for (one job per worker)."""
DEFAULT_START_TIMEOUT_S = 600.0
"""How long the first worker job may take to start and join the scheduler."""
INSTALL_HINT = "pip install 'toolkit[cluster]'"


def require_packages() -> None:
    """Import ``dask_jobqueue`` and ``distributed``, or say how to install them.

    Raises
    ------
    ToolkitError
        A package is missing, or ``distributed`` does not match the installed Dask.
    """
    import dask

    try:
        import dask_jobqueue  # noqa: F401
        import distributed
    except ImportError as e:
        raise ToolkitError(
            f"dispatch.dask = \"slurm\" needs dask-jobqueue and distributed ({e.name} is missing); "
            f"install them with `{INSTALL_HINT}` or set dispatch.dask = \"local\"") from e
    if distributed.__version__ != dask.__version__:
        raise ToolkitError(
            f"distributed {distributed.__version__} does not match dask {dask.__version__}; "
            f"install matching versions with `{INSTALL_HINT}` (or pip install distributed=={dask.__version__})")


def worker_python(study: StudyConfig) -> str:
    """The shell words that start the worker's Python: this interpreter, or the container's.

    With a container this is ``RUNTIME exec [--nv] --containall --cleanenv --bind ...
    --env TOOLKIT_SCRATCH=... IMAGE python``: the prefix
    :func:`toolkit.dispatch.container.unit_argv` puts in front of the analyse unit, so
    workers see the study, the data and the scratch folder where the units do, and
    nothing else of the host (``--containall`` keeps the network: workers must reach
    the scheduler).
    """
    argv = unit_argv(study, STAGE, "dask-worker")  # [...prefix, python, -m, toolkit, unit, ...]
    return shell_line(argv[: argv.index("-m")])


def _walltime(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def cluster_kwargs(study: StudyConfig) -> dict[str, Any]:
    """:class:`dask_jobqueue.SLURMCluster` keyword arguments from ``dispatch.resources.analyse``.

    Without ``mem_gb`` no ``--mem`` is asked for (the partition's default) and the
    worker has no memory limit of its own.
    """
    res = study.dispatch.resources_for(STAGE)
    extra: list[str] = []
    if res.qos:
        extra.append(f"--qos={res.qos}")
    if res.gpus_per_node:
        extra.append(f"--gres=gpu:{res.gpus_per_node}" if res.gpu_style == "gres"
                     else f"--gpus-per-node={res.gpus_per_node}")
    extra += [f"--{k}={v}" if v != "" else f"--{k}" for k, v in res.extra_sbatch.items()]
    if res.mem_gb is not None:
        memory = f"{int(res.mem_gb * 1024)}MiB"
        mem: dict[str, Any] = {"memory": memory, "job_mem": f"{int(res.mem_gb * 1024)}M"}
    else:
        # dask-jobqueue always writes --mem; skip the line rather than invent an amount.
        mem = {"memory": "0", "job_mem": "0", "job_directives_skip": ["--mem"]}
    return {
        "queue": res.partition,
        "account": res.account,
        "cores": res.cpus_per_task,
        "processes": 1,
        "walltime": _walltime(res.time_minutes),
        "job_name": f"{study.name}-dask",
        "job_script_prologue": list(res.setup),
        "job_extra_directives": extra,
        "python": worker_python(study),
        "log_directory": str(Layout(study).dask_logs),
        # Workers exit on their own when the scheduler is gone (a killed driver).
        "death_timeout": 60,
        "scheduler_options": {"dashboard_address": ":0"},
        **mem,
    }


def _squeue_states(job_ids: list[str]) -> dict[str, str]:
    """Job id -> ``STATE (reason)`` from ``squeue``; jobs it no longer knows are left out."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "--states=all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        states[job] = f"{state} ({reason})" if reason and reason != "None" else state
    return states


def _job_ids(cluster: Any) -> list[str]:
    return [str(j.job_id) for j in list(cluster.workers.values()) if getattr(j, "job_id", None)]


ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "TIMEOUT"}
"""Scheduler states of a job that has stopped (its worker will never join)."""


def _last_log_line(study: StudyConfig, job_ids: list[str]) -> str:
    for job in job_ids:
        for path in Layout(study).dask_logs.glob(f"*-{job}.err"):
            lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                return f"; last line of {path}: {lines[-1]}"
    return ""


def _wait_first_worker(study: StudyConfig, client: Client, cluster: Any, timeout_s: float) -> None:
    """Block until a worker joins; fail early when every worker job has already ended.

    Raises
    ------
    SubmissionError
        Naming the partition, each job's ``squeue`` state and reason, and where the logs are.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.wait_for_workers(1, timeout=max(min(5.0, deadline - time.monotonic()), 0.1))
            return
        except TimeoutError as e:
            ids = _job_ids(cluster)
            states = _squeue_states(ids)
            ended = bool(ids) and all(states.get(j, "").split(" ")[0] in ENDED for j in ids)
            if not ended and time.monotonic() < deadline:
                continue
            res = study.dispatch.resources_for(STAGE)
            where = f"partition '{res.partition or '(cluster default)'}'"
            if ids:
                what = "worker job(s) " + ", ".join(f"{j} {states.get(j, 'not in squeue')}" for j in ids)
            else:
                what = "no worker job was queued (sbatch refused it; see the log above)"
            when = "ended before joining" if ended else f"did not join within {timeout_s:.0f} s"
            raise SubmissionError(
                f"Dask workers on {where} {when}: {what}{_last_log_line(study, ids)}; check the "
                f"partition (`sinfo -p`), the worker logs in {Layout(study).dask_logs}, "
                "or set dispatch.dask = \"local\"") from e


def _task_counts(dask_scheduler: Any) -> dict[str, int]:
    """Scheduler-side task states (run on the scheduler through ``run_on_scheduler``)."""
    counts: dict[str, int] = {}
    for ts in dask_scheduler.tasks.values():
        counts[ts.state] = counts.get(ts.state, 0) + 1
    return counts


@contextlib.contextmanager
def _progress_log(client: Client, every_s: float) -> Iterator[None]:
    """Log the scheduler's progress (tasks done, rate, ETA, workers) every ``every_s`` seconds.

    The tqdm callback of :mod:`toolkit.analyse` only sees Dask's local schedulers, so on
    SLURM workers the progress comes from the scheduler instead.
    """
    stop = threading.Event()

    # The poll sets the pace; the line says it at every poll where something is left or moved.
    progress = LogProgress(desc="Dask on SLURM", unit="task", every_s=0.0, logger=log)

    def loop() -> None:
        last_done = -1
        while not stop.wait(every_s):
            try:
                counts = client.run_on_scheduler(_task_counts)
                n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
            except Exception as e:  # noqa: BLE001 (a closing client must not kill the analysis)
                log.debug("progress poll failed: %s", e)
                continue
            done = counts.get("memory", 0) + counts.get("released", 0) + counts.get("forgotten", 0)
            left = sum(counts.values()) - done
            if left or done != last_done:
                progress.moveto(done, total=done + left, note=f"{n_workers} worker(s)")
            last_done = done

    thread = threading.Thread(target=loop, name="dask-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 30)


@contextlib.contextmanager
def slurm_client(study: StudyConfig, *, max_workers: int = DEFAULT_MAX_WORKERS,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 progress_every_s: float = 30.0) -> Iterator[Client]:
    """A :class:`distributed.Client` on SLURM worker jobs; closed (jobs cancelled) on exit.

    The client is Dask's default scheduler while the context is open.

    Parameters
    ----------
    study
        Worker resources come from ``dispatch.resources.analyse``, the container from
        ``dispatch.container``.
    max_workers
        Adaptive scaling goes from 1 up to this many worker jobs.
    start_timeout_s
        Bounded wait for the first worker.
    progress_every_s
        Interval of the progress log lines (tasks done, rate, ETA, workers).

    Raises
    ------
    ToolkitError
        The ``cluster`` extra is not installed.
    SubmissionError
        ``sbatch`` is missing, the partition does not exist, no worker joined in time
        (naming the partition and the jobs' ``squeue`` state), or the workers run a
        different Dask/distributed than this process.
    """
    from toolkit.dispatch import slurm

    require_packages()
    slurm.require_sbatch()
    slurm.check_resources(study, [STAGE], slurm.probe_cluster())
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    kwargs = cluster_kwargs(study)
    Path(kwargs["log_directory"]).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(SLURMCluster(**kwargs))
        cluster.adapt(minimum_jobs=1, maximum_jobs=max(1, max_workers))
        client = stack.enter_context(Client(cluster))
        log.info("Dask scheduler %s: 1 to %d SLURM worker job(s) on partition %s (dashboard %s)",
                 cluster.scheduler_address, max_workers,
                 kwargs["queue"] or "(default)", client.dashboard_link)
        _wait_first_worker(study, client, cluster, start_timeout_s)
        try:
            client.get_versions(check=True)
        except ValueError as e:
            raise SubmissionError(
                f"the Dask workers run other package versions than this process ({e}); run them "
                "from the same environment or container image") from e
        log.info("first Dask worker joined after %.1f s (job(s) %s)", time.perf_counter() - t0,
                 ", ".join(_job_ids(cluster)) or "?")
        stack.enter_context(_progress_log(client, progress_every_s))
        yield client


@contextlib.contextmanager
def analysis_scheduler(study: StudyConfig) -> Iterator[Client | None]:
    """Where :mod:`toolkit.analyse` computes: unchanged for ``"local"``, SLURM workers for ``"slurm"``.

    Yields ``None`` for ``dispatch.dask = "local"`` (nothing is imported or started) and
    the :func:`slurm_client` otherwise.
    """
    if study.dispatch.dask != "slurm":
        yield None
        return
    with slurm_client(study) as client:
        yield client
