"""SLURM: check the request against the cluster, queue the stages as chained job arrays.

Submission returns at once. Stages are chained with ``afterok`` dependencies
(``--kill-on-invalid-dep=yes``, so a failed stage cancels what waits on it instead
of leaving it pending forever); ``train`` and ``evaluate`` are job arrays through
``executor.batch()``, split into several arrays when larger than the cluster's
``MaxArraySize``. Everything the cluster cannot run (unknown partition, more GPUs
than a node has, no ``sbatch``) is a :class:`SubmissionError` before anything is queued.

Every value written into the sbatch script (the study folder, which holds the log
paths, the job name, partition, account, qos, ``extra_sbatch`` keys and values and
setup lines) is checked for newlines and other control characters when the script's
parameters are built (:func:`check_script_values`): submitit quotes values with
``shlex.quote``, which keeps a newline, and after a newline the rest of the value is
a shell line that runs on the cluster.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from toolkit.config import ResourceConfig, StudyConfig
from toolkit.dispatch.container import check_container_values, check_script_value, unit_argv
from toolkit.dispatch.job import UnitJob
from toolkit.dispatch.manifest import JobRecord, Manifest, link_member_logs, now
from toolkit.errors import SubmissionError
from toolkit.study import Layout

log = logging.getLogger(__name__)

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
          "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
"""Scheduler states of a job that is queued or running (not to be submitted again)."""


def _cmd(argv: list[str], what: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise SubmissionError(f"{what}: `{' '.join(argv)}` failed ({e})") from e
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise SubmissionError(f"{what}: `{' '.join(argv)}` failed ({last}); check that this "
                              "machine can reach the SLURM controller (`sinfo` works)")
    return out.stdout


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise SubmissionError("sbatch not found on this machine: submit from a SLURM login node, "
                              "or run with --executor local")


@dataclass(frozen=True)
class ClusterInfo:
    partitions: dict[str, int]
    """Partition name -> most GPUs on one of its nodes."""
    default_partition: str | None
    max_array_size: int
    cpus: dict[str, int] = field(default_factory=dict)
    """Partition name -> most CPUs on one of its nodes (absent: not known)."""
    memory_mb: dict[str, int] = field(default_factory=dict)
    """Partition name -> most memory (MB, SLURM's ``RealMemory``) on one of its nodes
    (absent: not known)."""


def parse_gpus(gres: str) -> int:
    """GPUs in a ``sinfo %G`` field such as ``gpu:2``, ``gpu:a100:4(S:0-1)`` or ``(null)``."""
    total = 0
    for item in gres.split(","):
        m = re.match(r"^gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def _node_count(field: str) -> int | None:
    """A per-node number of ``sinfo`` (``%c`` CPUs, ``%m`` MB): None when it is not one
    plain number (``16+``: nodes of that line differ, the largest is not shown)."""
    field = field.strip()
    return int(field) if field.isdigit() else None


def probe_cluster() -> ClusterInfo:
    """Partitions, GPUs, CPUs and memory per node and ``MaxArraySize`` from ``sinfo``
    and ``scontrol``."""
    partitions: dict[str, int] = {}
    cpus: dict[str, int | None] = {}
    memory: dict[str, int | None] = {}
    default = None
    for line in _cmd(["sinfo", "-h", "-o", "%P|%G|%c|%m"], "reading partitions").splitlines():
        name, gres, ncpu, mem = (line.split("|") + ["", "", ""])[:4]
        if name.endswith("*"):
            name = name[:-1]
            default = name
        partitions[name] = max(partitions.get(name, 0), parse_gpus(gres))
        # One unknown line makes the partition's largest node unknown: never refuse on a guess.
        for table, value in ((cpus, _node_count(ncpu)), (memory, _node_count(mem))):
            old = table.get(name, 0)
            table[name] = None if value is None or old is None else max(old, value)
    config = _cmd(["scontrol", "show", "config"], "reading the cluster configuration")
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.M)
    return ClusterInfo(partitions, default, int(m.group(1)) if m else 1001,
                       {k: v for k, v in cpus.items() if v is not None},
                       {k: v for k, v in memory.items() if v is not None})


def check_resources(study: StudyConfig, stages: Sequence[str], info: ClusterInfo) -> None:
    """Every stage's partition exists and has a node with the GPUs, CPUs and memory asked
    for (SLURM would otherwise keep such a job pending for ever); its script values are clean."""
    for stage in stages:
        check_script_values(study, stage)
        res = study.dispatch.resources_for(stage)
        where = f"dispatch.resources.{stage}"
        partition = res.partition or info.default_partition
        if partition is None:
            raise SubmissionError(f"{where}.partition: the cluster has no default partition; "
                                  f"choose one of {', '.join(sorted(info.partitions))}")
        if partition not in info.partitions:
            raise SubmissionError(f"{where}.partition: '{partition}' is not a partition of this "
                                  f"cluster; choose one of {', '.join(sorted(info.partitions))}")
        if res.gpus_per_node > info.partitions[partition]:
            raise SubmissionError(
                f"{where}.gpus_per_node: {res.gpus_per_node} GPUs asked but nodes of partition "
                f"'{partition}' have at most {info.partitions[partition]}; lower it or pick a "
                "partition with GPUs (--set dispatch.resources.STAGE.partition=...)")
        most_cpus = info.cpus.get(partition)
        if most_cpus is not None and res.cpus_per_task > most_cpus:
            raise SubmissionError(
                f"{where}.cpus_per_task: {res.cpus_per_task} CPUs asked but nodes of partition "
                f"'{partition}' have at most {most_cpus}; lower it (--set {where}.cpus_per_task="
                f"{most_cpus}) or pick another partition")
        most_mb = info.memory_mb.get(partition)
        if most_mb is not None and res.mem_gb is not None and res.mem_gb * 1024 > most_mb:
            raise SubmissionError(
                f"{where}.mem_gb: {res.mem_gb:g} GB asked but nodes of partition '{partition}' have "
                f"at most {most_mb / 1024:.1f} GB; lower it (--set {where}.mem_gb=...) or pick "
                "another partition")


_OPTION_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
"""An sbatch long option name (submitit turns '_' into '-')."""


def check_script_values(study: StudyConfig, stage: str) -> None:
    """Every value of ``stage`` that reaches its sbatch script is a single clean line.

    Raises
    ------
    SubmissionError
        A value holds a newline or another control character, or an ``extra_sbatch``
        key is not an option name; the message names the field.
    """
    res: ResourceConfig = study.dispatch.resources_for(stage)
    where = f"dispatch.resources.{stage}"
    # The log paths (#SBATCH --output/--error) and the job's command live under the root.
    check_script_value(Layout(study).stage_logs(stage), "study folder (study.output_dir or --out)")
    check_script_value(study.name, "study.name (the job name)")
    for key in ("partition", "account", "qos"):
        value = getattr(res, key)
        if value:
            check_script_value(value, f"{where}.{key}")
    for key, value in res.extra_sbatch.items():
        check_script_value(key, f"{where}.extra_sbatch key")
        if not _OPTION_NAME.match(key):
            raise SubmissionError(f"{where}.extra_sbatch: {key!r} is not an sbatch option name "
                                  "(letters, digits and '-', starting with a letter, e.g. "
                                  "\"constraint\"); fix the key")
        check_script_value(value, f"{where}.extra_sbatch.{key}")
    for i, line in enumerate(res.setup):
        check_script_value(line, f"{where}.setup[{i}]")
    check_container_values(study.dispatch.container)


def slurm_parameters(study: StudyConfig, stage: str, dependency: str | None) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters for one stage (sbatch flags, setup lines).

    Raises
    ------
    SubmissionError
        A value would not be a single line of the script (:func:`check_script_values`).
    """
    check_script_values(study, stage)
    res: ResourceConfig = study.dispatch.resources_for(stage)
    params: dict[str, Any] = {
        "job_name": f"{study.name}:{stage}",
        "time": res.time_minutes,
        "cpus_per_task": res.cpus_per_task,
        "array_parallelism": res.array_parallelism,
        # USR2 this long before the time limit: enough to finish a step and save.
        "signal_delay_s": min(90, max(10, res.time_minutes * 60 // 3)),
        "stderr_to_stdout": False,
    }
    for key in ("partition", "account", "qos"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    if res.mem_gb is not None:
        params["mem"] = f"{int(res.mem_gb)}GB" if res.mem_gb == int(res.mem_gb) else f"{int(res.mem_gb * 1024)}MB"
    if res.gpus_per_node:
        if res.gpu_style == "gres":
            params["gres"] = f"gpu:{res.gpus_per_node}"
        else:
            params["gpus_per_node"] = res.gpus_per_node
    if res.setup:
        params["setup"] = list(res.setup)
    extra: dict[str, Any] = {"kill_on_invalid_dep": "yes"}
    extra.update(res.extra_sbatch)
    params["additional_parameters"] = extra
    if dependency:
        params["dependency"] = dependency
    return params


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Scheduler state of each job id (``123`` or ``123_4``); unknown ids are left out.

    ``squeue`` (which keeps finished jobs for ``MinJobAge``) first, then ``sacct`` for
    jobs it no longer knows, when accounting is available.
    """
    wanted = set(job_ids)
    states: dict[str, str] = {}
    if not wanted:
        return states
    try:
        out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        jid, _, state = line.strip().partition("|")
        if jid in wanted:
            states[jid] = state
    missing = sorted(wanted - set(states))
    if missing and shutil.which("sacct"):
        try:
            res = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(missing)],
                                 capture_output=True, text=True, timeout=60)
            for line in res.stdout.splitlines() if res.returncode == 0 else []:
                jid, _, state = line.partition("|")
                if jid in wanted:
                    states[jid] = state.split()[0] if state else "UNKNOWN"
        except (OSError, subprocess.SubprocessError):
            pass
    return states


def cancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        _cmd(["scancel", *job_ids], "cancelling jobs")


def submit_stage(study: StudyConfig, stage: str, keys: list[str], dependency: str | None,
                 max_array_size: int, manifest: Manifest) -> list[str]:
    """Queue the units of one stage (arrays of at most ``max_array_size``); return job ids."""
    import submitit

    layout = Layout(study)
    folder = layout.stage_logs(stage)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=10)
    params = slurm_parameters(study, stage, dependency)
    executor.update_parameters(**params)
    # The unit must have saved and exited before SLURM kills the job at its time limit.
    grace_s = max(5.0, params["signal_delay_s"] - 15.0)
    ids: list[str] = []
    for start in range(0, len(keys), max_array_size):
        chunk = keys[start:start + max_array_size]
        jobs = []
        try:
            with executor.batch():
                for key in chunk:
                    body = UnitJob(unit_argv(study, stage, key), name=f"{stage} {key}", grace_s=grace_s)
                    jobs.append(executor.submit(body))
        except Exception as e:  # submitit raises plain exceptions carrying sbatch's message
            manifest.save()  # keep what was queued before the failure
            raise SubmissionError(f"sbatch refused stage {stage}: {e}".splitlines()[0]) from e
        for key, job in zip(chunk, jobs, strict=True):
            record = JobRecord(stage=stage, key=key, executor="slurm", job_id=job.job_id,
                               submitted=now(), stdout=str(job.paths.stdout),
                               stderr=str(job.paths.stderr))
            manifest.add(record)
            link_member_logs(record)
        ids.append(jobs[0].job_id.split("_")[0])
        log.info("queued %s: %d unit(s) as job %s", stage, len(chunk), ids[-1])
    manifest.save()
    return ids


def submit_study(study: StudyConfig, pending: dict[str, list[str]], manifest: Manifest,
                 info: ClusterInfo) -> list[str]:
    """Queue every pending unit, stage after stage; return the job ids queued now.

    ``pending`` maps stage -> unit keys without a completion marker (checked beforehand
    with :func:`check_resources`). A unit whose newest job is still queued or running is
    not submitted again; later stages wait on it.
    """
    # Every stage's script values first: a bad one in a later stage must not leave the
    # earlier stages queued.
    for stage, keys in pending.items():
        if keys:
            check_script_values(study, stage)
    latest = manifest.latest()
    old = {k: r.job_id for k, r in latest.items() if r.executor == "slurm"}
    states = job_states(list(old.values()))
    queued: list[str] = []
    previous: list[str] = []  # job ids the next stage waits on
    for stage, keys in pending.items():
        if not keys:
            continue
        active = [old[(stage, k)] for k in keys if states.get(old.get((stage, k), ""), "") in ACTIVE]
        todo = [k for k in keys if states.get(old.get((stage, k), ""), "") not in ACTIVE]
        if active:
            log.info("%s: %d unit(s) already queued or running, not submitted again", stage, len(active))
        dependency = "afterok:" + ":".join(previous) if previous else None
        new = submit_stage(study, stage, todo, dependency, info.max_array_size, manifest) if todo else []
        queued += new
        previous = new + active
    return queued
