"""The job body: a submitit Checkpointable callable that runs one unit as a subprocess.

Why a subprocess: submitit's own process must stay on the host, where ``scontrol``
exists (on preemption or time-out submitit requeues the job by calling ``scontrol
requeue`` from inside the job, which a container does not have). The unit itself
may run in a container (see :mod:`toolkit.dispatch.container`).

Preemption and time limits: SLURM sends USR2 (``--signal=USR2@N``) before the time
limit, and SIGTERM then USR2 on preemption (``job._interrupt()`` does the same).
submitit calls :meth:`UnitJob.checkpoint`, which forwards SIGTERM to the child and
waits for it: the training stage finishes its step, saves a checkpoint and exits
with :data:`~toolkit.plumbing.EXIT_REQUEUE` (75). The returned DelayedSubmission
requeues the job and the requeued job resumes from the checkpoint. A child that
exits 75 on its own (it received the signal directly) also means "requeue me".

Outcome: next to submitit's log ``<id>_<task>_log.out`` the job writes
``<id>_<task>_outcome.json`` (``{"outcome": "success"|"error"|"requeued",
"returncode": N, "finished": ISO time}``), atomically. ``toolkit status`` and the
local executor read that file and never submitit's ``*_result.pkl``: unpickling a
file from a study folder that others can write would run their code as whoever
looks at the study.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.plumbing import EXIT_REQUEUE, write_json_atomic

log = logging.getLogger(__name__)

MAX_REQUEUES = 50
"""Safety net against a unit that asks to be requeued forever."""
OUTCOMES = ("success", "error", "requeued")
"""What an outcome file may say (anything else reads as unknown)."""
_LOG_SUFFIX = "_log.out"


def outcome_path(stdout: str | Path) -> Path | None:
    """The outcome file that goes with submitit's stdout log ``<id>_<task>_log.out``."""
    out = str(stdout)
    if not out.endswith(_LOG_SUFFIX):
        return None
    return Path(out[: -len(_LOG_SUFFIX)] + "_outcome.json")


_OUTCOME_LIMIT = 4096
"""An outcome file is a few dozen bytes; anything larger is not one of ours."""


def read_outcome(stdout: str | Path) -> str | None:
    """The outcome a job recorded next to its log: 'success', 'error', 'requeued' or None.

    JSON only, never submitit's ``*_result.pkl``: unpickling a file of a study folder
    that others can write would run their code as whoever reads it. A missing,
    oversized, non-regular (FIFO, device, link) or malformed file reads as None (unknown).
    """
    from toolkit.plumbing import read_small_file

    path = outcome_path(stdout)
    data = read_small_file(path, _OUTCOME_LIMIT) if path is not None else None
    if data is None:
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    outcome = doc.get("outcome") if isinstance(doc, dict) else None
    return outcome if isinstance(outcome, str) and outcome in OUTCOMES else None


def _own_outcome_path() -> Path | None:
    """This job's outcome file, or None outside a submitit job (a unit called directly)."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return None
    try:
        import submitit

        return outcome_path(submitit.JobEnvironment().paths.stdout)
    except Exception:  # submitit found no job environment: nothing to report to
        return None


class UnitFailedError(ToolkitError):
    """A unit's process exited with an error; its log holds the details."""


def _under_slurm() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def _preempt_signal() -> signal.Signals:
    """The signal submitit listens to for preemption/time-out (USR2 unless configured)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG")
    return getattr(signal, name, signal.SIGUSR2)


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait for ``proc`` to exit without reaping it (safe inside a signal handler)."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return True
        try:
            if psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a hard dependency
    _Checkpointable = object  # type: ignore[assignment,misc]


class UnitJob(_Checkpointable):
    """Run ``argv`` (one unit of a study) to completion, requeueing on preemption.

    Parameters
    ----------
    argv
        The unit's command (:func:`toolkit.dispatch.container.unit_argv`).
    name
        ``STAGE KEY``, for logs and errors.
    requeues
        How many times this unit was requeued before (carried across requeues).
    grace_s
        How long :meth:`checkpoint` waits for the child to save and exit.
    """

    def __init__(self, argv: list[str], *, name: str, requeues: int = 0,
                 grace_s: float = 60.0) -> None:
        self.argv = list(argv)
        self.name = name
        self.requeues = requeues
        self.grace_s = grace_s
        self._proc: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None  # a process handle does not survive pickling
        state.pop("_terminated", None)
        state.pop("_reported", None)
        return state

    def _run_child(self) -> int:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log.info("%s: running %s", self.name, " ".join(self.argv))
        self._proc = proc = subprocess.Popen(self.argv, env=env)
        try:
            # Poll rather than wait(): a blocking wait() holds Popen's lock, and the
            # signal handler (checkpoint) must be able to watch the same child.
            while proc.poll() is None:
                time.sleep(0.2)
            return proc.returncode
        finally:
            if self._proc.poll() is None:  # interrupted by an exception: do not leave it behind
                self._proc.terminate()

    def _report(self, outcome: str, returncode: int | None) -> None:
        """Write this job's outcome file (once per run); a failure to write is only logged."""
        from toolkit.dispatch.manifest import now

        path = _own_outcome_path()
        if path is None or getattr(self, "_reported", False):
            return
        self._reported = True
        try:
            write_json_atomic(path, {"outcome": outcome, "returncode": returncode, "finished": now()})
        except OSError as e:
            log.error("%s: cannot write the outcome file %s (%s); `toolkit status` will show the "
                      "unit's outcome as unknown", self.name, path, e)

    def __call__(self) -> str:
        """Run the unit; return a one-line summary or raise :class:`UnitFailedError`."""
        self._terminated = False
        self._reported = False
        path = _own_outcome_path()
        if path is not None:
            # A requeued job (same id) or a reused local process id: the old outcome is stale.
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("%s: cannot remove the stale outcome file %s (%s)", self.name, path, e)
        watching = threading.current_thread() is threading.main_thread()  # where handlers can be set
        previous = self._watch_sigterm() if watching else None
        try:
            return self._run()
        except Exception:
            # SystemExit is left alone: submitit exits that way after checkpoint() requeued us.
            self._report("error", getattr(self._proc, "returncode", None))
            raise
        finally:
            if watching:
                signal.signal(signal.SIGTERM, previous)

    def _run(self) -> str:
        while True:
            rc = self._run_child()
            if rc == 0:
                self._report("success", rc)
                return f"{self.name}: done"
            if rc != EXIT_REQUEUE:
                raise UnitFailedError(f"{self.name}: exited with status {rc}; "
                                      "see the unit's log above for the cause")
            if self.requeues >= MAX_REQUEUES:
                raise UnitFailedError(f"{self.name}: asked to be requeued {self.requeues} times; "
                                      "giving up")
            if not _under_slurm():
                if self._terminated:
                    # `toolkit cancel` stopped this job and its unit: restarting the unit
                    # would leave a process behind that nothing stops.
                    raise UnitFailedError(f"{self.name}: stopped (cancelled); its state is saved, "
                                          "run the study again to resume")
                # Locally nothing else preempts us: resume from the checkpoint at once.
                self.requeues += 1
                log.warning("%s: saved its state (exit %d); resuming", self.name, rc)
                continue
            if self._terminated:
                # SLURM sent SIGTERM to the whole job. On preemption (and job._interrupt())
                # USR2 follows at once and submitit's handler requeues us; on scancel (or a
                # preemption that SLURM requeues itself) nothing follows: just stop.
                time.sleep(5.0)
                raise UnitFailedError(f"{self.name}: stopped by the scheduler (cancelled or "
                                      "preempted); its state is saved, resubmit to resume")
            # The child asked to be requeued on its own: raise the same signal SLURM would,
            # so that submitit's handler calls checkpoint() and `scontrol requeue`.
            log.warning("%s: saved its state (exit %d); requeueing", self.name, rc)
            os.kill(os.getpid(), _preempt_signal())
            time.sleep(60)  # the handler exits the process
            raise UnitFailedError(f"{self.name}: requeue did not happen")

    def _watch_sigterm(self) -> Any:
        """Remember a SIGTERM (SLURM: cancel or preemption; local: ``toolkit cancel``), then
        let submitit's handler see it too (it logs and carries on: the unit decides)."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            self._terminated = True
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_term)
        return previous

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on preemption/time-out: stop the child cleanly, requeue."""
        import submitit

        # One requeue per job run: ignore further USR2 signals while we wind down.
        signal.signal(_preempt_signal(), signal.SIG_IGN)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            log.warning("%s: forwarding SIGTERM to the unit and waiting %.0f s for its checkpoint",
                        self.name, self.grace_s)
            proc.send_signal(signal.SIGTERM)
            if not _wait_exit(proc, self.grace_s):
                log.error("%s: unit did not exit in %.0f s; requeueing anyway (it resumes from "
                          "its last saved checkpoint)", self.name, self.grace_s)
                proc.kill()
        # returncode, not poll(): this runs in a signal handler and must not reap the child.
        self._report("requeued", proc.returncode if proc is not None else None)
        fresh = UnitJob(self.argv, name=self.name, requeues=self.requeues + 1, grace_s=self.grace_s)
        return submitit.helpers.DelayedSubmission(fresh)
