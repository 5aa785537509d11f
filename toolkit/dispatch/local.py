"""Running a study on this machine: submitit's LocalExecutor, or in-process (debug).

The local executor has no job dependencies, so stages run one after the other,
waiting for each stage's jobs, with up to ``dispatch.max_parallel`` units at a time.
A line per finished unit shows done/total, elapsed time and ETA.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import sys
import time
from typing import Any

from toolkit.config import StudyConfig
from toolkit.dispatch.container import STUDY_JSON, unit_argv
from toolkit.dispatch.job import UnitJob
from toolkit.dispatch.manifest import JobRecord, Manifest, now, tail_lines
from toolkit.errors import SubmissionError
from toolkit.study import Layout

log = logging.getLogger(__name__)


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Counts finished units and logs one line each: done/total, elapsed, ETA."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.start = time.monotonic()

    def finished(self, stage: str, key: str, ok: bool = True) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        log.info("%s %s %s  [%d/%d, elapsed %s, ETA %s]", stage, key,
                 "done" if ok else "FAILED", self.done, self.total, _fmt(elapsed), _fmt(eta))


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

    resolved = load_study(study.root / STUDY_JSON)
    progress = Progress(sum(len(k) for k in pending.values()))
    for stage, keys in pending.items():
        for key in keys:
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
    progress = Progress(sum(len(k) for k in pending.values()))
    width = max(1, study.dispatch.max_parallel)
    for stage, keys in pending.items():
        if not keys:
            continue
        res = study.dispatch.resources_for(stage)
        executor = submitit.LocalExecutor(folder=layout.logs_dir / stage)
        executor.update_parameters(timeout_min=res.time_minutes, visible_gpus=(),
                                   gpus_per_node=0)
        log.info("stage %s: %d unit(s), %d at a time; logs in %s", stage, len(keys), width,
                 layout.logs_dir / stage)
        queue = list(keys)
        running: dict[str, Any] = {}  # key -> submitit LocalJob
        failed: list[str] = []
        last_beat = time.monotonic()
        while queue or running:
            while queue and len(running) < width:
                key = queue.pop(0)
                job = executor.submit(UnitJob(unit_argv(study, stage, key), name=f"{stage} {key}"))
                running[key] = job
                manifest.add(JobRecord(stage=stage, key=key, executor="local", job_id=str(job.job_id),
                                       submitted=now(), stdout=str(job.paths.stdout),
                                       stderr=str(job.paths.stderr)))
                manifest.save()
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
                try:
                    done_job.result()
                    progress.finished(stage, key)
                except Exception:  # the unit's error is in its log; name the log
                    progress.finished(stage, key, ok=False)
                    failed.append(f"{key} (log {done_job.paths.stderr})")
        if failed:
            raise SubmissionError(f"stage {stage}: {len(failed)} unit(s) failed: {'; '.join(failed)}; "
                                  "fix the cause and rerun (finished units are skipped)")


def start_detached(study: StudyConfig, manifest: Manifest) -> int:
    """``toolkit run --executor local --no-wait``: a background driver process; returns its pid."""
    layout = Layout(study)
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    out = layout.logs_dir / "driver.log"
    argv = [sys.executable, "-m", "toolkit", "run", str(study.root / STUDY_JSON), "--executor", "local"]
    with open(out, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    manifest.add(JobRecord(stage="driver", key="local", executor="local", job_id=str(proc.pid),
                           submitted=now(), stdout=str(out), stderr=str(out)))
    manifest.save()
    log.info("running in the background as process %d; log %s", proc.pid, out)
    return proc.pid


def pid_alive(pid: str) -> bool:
    import psutil

    try:
        p = psutil.Process(int(pid))
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


def kill_tree(pid: str) -> bool:
    """Terminate a local job (and its children); True when something was running."""
    import psutil

    try:
        root = psutil.Process(int(pid))
    except (psutil.NoSuchProcess, ValueError):
        return False
    procs = [*root.children(recursive=True), root]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return True
