"""Running a study on this machine: submitit's LocalExecutor, or in-process (debug).

The local executor has no job dependencies, so stages run one after the other,
waiting for each stage's jobs, with up to ``dispatch.max_parallel`` units at a time.
A line per finished unit shows done/total, elapsed time and the study's ETA
(:func:`study_eta`: measured durations per stage, the plan's for stages not reached yet).

Local jobs are processes, named in the manifest by their process id. A process id
is reused by the system once its process ends, so the manifest also records the
process's start time and command line, and a process is only taken to be the
unit's (shown as running, signalled by ``toolkit cancel``) when both still match.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from toolkit.config import StudyConfig
from toolkit.dispatch.container import unit_argv
from toolkit.dispatch.job import UnitJob, read_outcome
from toolkit.dispatch.manifest import (
    JobRecord,
    Manifest,
    link_member_logs,
    member_log,
    now,
)
from toolkit.errors import SubmissionError
from toolkit.plumbing import tail_lines
from toolkit.progress import format_duration
from toolkit.study import Layout

if TYPE_CHECKING:
    import psutil

log = logging.getLogger(__name__)

_START_TOLERANCE_S = 0.05
"""psutil's create_time is exact to the clock tick (1/100 s); this allows for rounding."""


MIN_PLANNED_S = 30.0
"""Stages planned at less than this per unit do not correct the plan (:func:`study_eta`)."""


def study_eta(done: dict[str, list[float]], remaining: dict[str, int], prior: dict[str, float],
              parallel: int) -> float | None:
    """Seconds until the study's remaining units have run, stage after stage.

    A stage with finished units takes their mean duration per unit; a stage without uses
    its planned seconds per unit (``prior``), scaled by how far the finished units of
    other stages were from their plan (sum of measured durations over sum of planned),
    so the plan's throughput assumptions are corrected by what was measured, and never
    less than the shortest unit measured. Only stages planned at :data:`MIN_PLANNED_S` or
    more per unit set the scale: shorter units are mostly the start of a process and
    reading the study, which the plan leaves out, and say nothing about throughput (a
    prepare unit planned at 0.03 s takes 3 s). A stage takes
    ``units x seconds per unit / min(parallel, units)``.

    Parameters
    ----------
    done
        Stage -> durations (seconds) of its units that finished.
    remaining
        Stage -> units still to finish (running or not started).
    prior
        Stage -> planned seconds per unit; stages missing here fall back to the mean
        of every finished unit.
    parallel
        Units running at a time.

    Returns
    -------
    float or None
        None when some remaining stage has neither a measurement nor a prior.
    """
    measured = [d for ds in done.values() for d in ds]
    informative = [s for s, ds in done.items() if ds and prior.get(s, 0) >= MIN_PLANNED_S]
    planned = sum(prior[s] * len(done[s]) for s in informative)
    actual = sum(sum(done[s]) for s in informative)
    scale = actual / planned if planned > 0 else 1.0
    total = 0.0
    for stage, n in remaining.items():
        if n <= 0:
            continue
        if done.get(stage):
            per_unit = sum(done[stage]) / len(done[stage])
        elif stage in prior:
            per_unit = max(prior[stage] * scale, min(measured, default=0.0))
        elif measured:
            per_unit = sum(measured) / len(measured)
        else:
            return None
        total += n * per_unit / max(1, min(parallel, n))
    return total


def planned_unit_seconds(study: StudyConfig) -> dict[str, float]:
    """Stage -> planned seconds per unit (``toolkit plan``'s longest unit), {} if it fails.

    The plan reads token stores or samples corpora for about a second: cheap next to a
    study, and only a starting point for the ETA (:func:`study_eta`).
    """
    try:
        from toolkit.plan import plan_study

        plan = plan_study(study, sample_seconds=1.0)
        return {stage: sp.unit_hours * 3600.0 for stage, sp in plan.stages.items() if sp.units}
    except Exception as e:  # noqa: BLE001 (the ETA must never stop a run)
        log.debug("no plan for the ETA (%s); it starts from measured units only", e)
        return {}


class StudyProgress:
    """Counts a study's finished units and logs one line each: done/total, elapsed, ETA.

    Not a loop's progress (that is :class:`toolkit.progress.LogProgress`): units of
    different stages take very different times, so the ETA is a model of the stages.

    The ETA comes from :func:`study_eta`: measured durations per stage, the plan's
    (``prior``) for stages that have not finished a unit yet. A unit's duration is from
    :meth:`started` to :meth:`finished`; without a :meth:`started` call (a watcher that
    only sees units finish) it is the time since the previous unit finished, and
    ``parallel`` should be 1.
    """

    def __init__(self, pending: dict[str, list[str]], *, parallel: int = 1,
                 prior: dict[str, float] | None = None) -> None:
        self.remaining = {stage: len(keys) for stage, keys in pending.items()}
        self.total = sum(self.remaining.values())
        self.parallel, self.prior = parallel, dict(prior or {})
        self.durations: dict[str, list[float]] = {stage: [] for stage in pending}
        self.done = 0
        self.start = self.last = time.monotonic()
        self._started: dict[tuple[str, str], float] = {}

    def started(self, stage: str, key: str) -> None:
        self._started[(stage, key)] = time.monotonic()

    def eta(self) -> float | None:
        return study_eta(self.durations, self.remaining, self.prior, self.parallel)

    def finished(self, stage: str, key: str, ok: bool = True) -> None:
        now = time.monotonic()
        self.durations.setdefault(stage, []).append(now - self._started.pop((stage, key), self.last))
        self.remaining[stage] = max(0, self.remaining.get(stage, 0) - 1)
        self.done += 1
        self.last = now
        log.info("%s %s %s  [%d/%d, elapsed %s, ETA %s]", stage, key,
                 "done" if ok else "FAILED", self.done, self.total,
                 format_duration(now - self.start), format_duration(self.eta()))


def _last_line(path: Any, tail_bytes: int = 4096) -> str:
    """The last non-empty line of a log file ('' if none yet)."""
    lines = tail_lines(path, tail_bytes)
    line = next((line.strip() for line in reversed(lines) if line.strip()), "")
    # Drop the unit's own "HH:MM:SS LEVEL logger:" prefix: this process adds its own.
    return re.sub(r"^\d\d:\d\d:\d\d \w+ [\w.]+: ", "", line)


def run_debug(study: StudyConfig, pending: dict[str, list[str]]) -> None:
    """Run every pending unit in this process, in order (no container, easy to debug)."""
    from toolkit.config import load_study
    from toolkit.units import run_unit

    resolved = load_study(Layout(study).study_file)
    progress = StudyProgress(pending, parallel=1, prior=planned_unit_seconds(resolved))
    for stage, keys in pending.items():
        for key in keys:
            progress.started(stage, key)
            run_unit(resolved, stage, key)
            progress.finished(stage, key)


def run_local(study: StudyConfig, pending: dict[str, list[str]], manifest: Manifest,
              *, poll_s: float = 0.5, heartbeat_s: float = 30.0) -> None:
    """Run the pending units with submitit's LocalExecutor, stage by stage; wait for all.

    Every ``heartbeat_s`` seconds the latest progress line of each running unit
    (from its log) is repeated here, so long units show their step, rate and ETA.

    Raises
    ------
    SubmissionError
        Some units of a stage failed (their logs are named); later stages are not run.
    """
    import submitit

    layout = Layout(study)
    width = max(1, study.dispatch.max_parallel)
    progress = StudyProgress(pending, parallel=width, prior=planned_unit_seconds(study))
    for stage, keys in pending.items():
        if not keys:
            continue
        res = study.dispatch.resources_for(stage)
        executor = submitit.LocalExecutor(folder=layout.stage_logs(stage))
        executor.update_parameters(timeout_min=res.time_minutes, visible_gpus=(),
                                   gpus_per_node=0)
        log.info("stage %s: %d unit(s), %d at a time; logs in %s (<unit>.err)", stage, len(keys),
                 width, layout.stage_logs(stage))
        queue = list(keys)
        running: dict[str, Any] = {}  # key -> submitit LocalJob
        failed: list[str] = []
        last_beat = time.monotonic()
        while queue or running:
            while queue and len(running) < width:
                key = queue.pop(0)
                job = executor.submit(UnitJob(unit_argv(study, stage, key), name=f"{stage} {key}"))
                running[key] = job
                progress.started(stage, key)
                started, cmdline = process_identity(job.job_id)
                record = JobRecord(stage=stage, key=key, executor="local", job_id=str(job.job_id),
                                   submitted=now(), stdout=str(job.paths.stdout),
                                   stderr=str(job.paths.stderr), proc_start=started,
                                   proc_cmdline=cmdline)
                manifest.add(record)
                manifest.save()
                link_member_logs(record)
            time.sleep(poll_s)
            if time.monotonic() - last_beat >= heartbeat_s:
                last_beat = time.monotonic()
                for key, job in running.items():
                    line = _last_line(job.paths.stderr)
                    if line:
                        log.info("  %s %s: %s", stage, key, line[-160:])
            for key, done_job in list(running.items()):
                if not done_job.done():
                    continue
                del running[key]
                # Not done_job.result(): it unpickles <id>_result.pkl from the study folder.
                # This process's own child wrote that file, but the folder may be shared and
                # group-writable, and a file swapped in between would run its code here. The
                # JSON outcome the job writes next to it says all that is needed.
                if read_outcome(done_job.paths.stdout) == "success":
                    progress.finished(stage, key)
                else:  # the unit's error is in its log; name the log
                    progress.finished(stage, key, ok=False)
                    failed.append(f"{key} (log {member_log(manifest.latest()[(stage, key)])})")
        if failed:
            raise SubmissionError(f"stage {stage}: {len(failed)} unit(s) failed: {'; '.join(failed)}; "
                                  "fix the cause and rerun (finished units are skipped)")


def start_detached(study: StudyConfig, manifest: Manifest) -> int:
    """``toolkit run --executor local --no-wait``: a background driver process; returns its pid."""
    layout = Layout(study)
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    out = layout.driver_log
    argv = [sys.executable, "-m", "toolkit", "run", str(layout.study_file), "--executor", "local"]
    with open(out, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    started, cmdline = process_identity(proc.pid)
    manifest.add(JobRecord(stage="driver", key="local", executor="local", job_id=str(proc.pid),
                           submitted=now(), stdout=str(out), stderr=str(out), proc_start=started,
                           proc_cmdline=cmdline))
    manifest.save()
    log.info("running in the background as process %d; log %s", proc.pid, out)
    return proc.pid


def process_identity(pid: int | str) -> tuple[float | None, list[str] | None]:
    """(start time, command line) of a live process, to tell it from a later one with its id.

    ``(None, None)`` when it already ended or cannot be inspected: such a record's
    process is never signalled.
    """
    import psutil

    try:
        proc = psutil.Process(int(pid))
        # Right after Popen the child may not have exec'ed yet: between fork and exec its
        # command line is still ours, and during exec it reads empty. Wait (briefly) for
        # the one it will keep.
        ours = psutil.Process().cmdline()
        deadline = time.monotonic() + 5.0
        while True:
            with proc.oneshot():
                started, cmdline = proc.create_time(), proc.cmdline()
            if (cmdline and cmdline != ours) or time.monotonic() > deadline:
                return started, cmdline
            time.sleep(0.01)
    except (psutil.Error, ValueError):
        return None, None


def _live(pid: str) -> psutil.Process | None:
    import psutil

    try:
        proc = psutil.Process(int(pid))
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except (psutil.Error, ValueError):
        return None


def _same_process(proc: psutil.Process, record: JobRecord) -> bool:
    """The live ``proc`` has the start time and command line recorded at submission."""
    import psutil

    if not isinstance(record.proc_start, int | float) or not isinstance(record.proc_cmdline, list):
        return False
    try:
        with proc.oneshot():
            return (abs(proc.create_time() - record.proc_start) <= _START_TOLERANCE_S
                    and proc.cmdline() == record.proc_cmdline)
    except psutil.Error:
        return False


def _started_near_submission(proc: psutil.Process, record: JobRecord) -> bool:
    """For records without a recorded identity: did ``proc`` start when the job was submitted?

    The manifest's ``submitted`` time (whole seconds) is taken right after the process
    was started; a process started later reused the id. Used only to *show* a unit as
    running, never to signal a process.
    """
    import psutil

    try:
        submitted = dt.datetime.fromisoformat(record.submitted).timestamp()
        started = proc.create_time()
    except (ValueError, TypeError, psutil.Error):
        return False
    return submitted - 60.0 <= started <= submitted + 1.0


def pid_alive(target: JobRecord | str) -> bool:
    """Whether a local job's process is still running.

    Parameters
    ----------
    target
        The job's manifest record: its process counts as alive only while the process
        with that id has the recorded start time and command line (a reused process
        id is not the unit). Records from older manifests, without them, fall back to
        the process having started at the submission time. A bare process id is only
        checked for existence: pass one only for a process this program started itself.
    """
    if isinstance(target, str):
        return _live(target) is not None
    proc = _live(target.job_id)
    if proc is None:
        return False
    if target.proc_start is None and target.proc_cmdline is None:
        return _started_near_submission(proc, target)
    return _same_process(proc, target)


def kill_tree(record: JobRecord) -> bool:
    """Terminate a local job's process and its children; True when something was stopped.

    Only a process verified to be the job's (its start time and command line match
    the record) is signalled, with its descendants. A record without them (an older
    manifest) is refused with a log line: the id may belong to anyone's process now.
    """
    import psutil

    root = _live(record.job_id)
    if root is None:
        return False
    if record.proc_start is None or record.proc_cmdline is None:
        log.warning("not stopping process %s (%s %s): the manifest does not record its start time "
                    "and command line (written by an older toolkit), so it cannot be told from an "
                    "unrelated process that reused the id; stop it yourself if it is the unit",
                    record.job_id, record.stage, record.key)
        return False
    if not _same_process(root, record):
        log.warning("not stopping process %s (%s %s): it is not the unit's process (different "
                    "start time or command line; the id was reused)", record.job_id, record.stage,
                    record.key)
        return False
    try:
        # Parents first: the job learns it is cancelled before its unit exits, so it does
        # not resume the unit (toolkit.dispatch.job.UnitJob).
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for p in procs:
        # psutil refuses to signal a process whose id was reused since `p` was made.
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=10)
    # A process that outlived the signal may have started children since (a unit resumed
    # in the meantime): they go too, found while their parent still lives (once it is
    # gone they would be orphans that nothing here can tell from anyone else's).
    seen = {p.pid for p in procs}
    for p in list(alive):
        with contextlib.suppress(psutil.Error):
            alive += [c for c in p.children(recursive=True) if c.pid not in seen]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return True
