"""The job body: a submitit Checkpointable callable that runs one unit as a subprocess.

Why a subprocess: submitit's own process must stay on the host, where ``scontrol``
exists (on preemption or time-out submitit requeues the job by calling ``scontrol
requeue`` from inside the job, which a container does not have). The unit itself
may run in a container (see :mod:`toolkit.dispatch.container`).

Preemption and time limits: SLURM sends USR2 (``--signal=USR2@N``) before the time
limit, and SIGTERM then USR2 on preemption (``job._interrupt()`` does the same).
submitit calls :meth:`UnitJob.checkpoint`, which forwards SIGTERM to the child and
waits for it: the training stage finishes its step, saves a checkpoint and exits
with :data:`EXIT_REQUEUE` (75). The returned DelayedSubmission requeues the job and
the requeued job resumes from the checkpoint. A child that exits 75 on its own
(it received the signal directly) also means "requeue me".
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Any

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75
"""Exit status of a unit that saved its state and wants to be run again (EX_TEMPFAIL)."""
MAX_REQUEUES = 50
"""Safety net against a unit that asks to be requeued forever."""


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

    def __call__(self) -> str:
        """Run the unit; return a one-line summary or raise :class:`UnitFailedError`."""
        self._terminated = False
        if _under_slurm():
            self._watch_sigterm()
        while True:
            rc = self._run_child()
            if rc == 0:
                return f"{self.name}: done"
            if rc != EXIT_REQUEUE:
                raise UnitFailedError(f"{self.name}: exited with status {rc}; "
                                      "see the unit's log above for the cause")
            if self.requeues >= MAX_REQUEUES:
                raise UnitFailedError(f"{self.name}: asked to be requeued {self.requeues} times; "
                                      "giving up")
            if not _under_slurm():
                # Locally nothing preempts us: resume from the checkpoint at once.
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

    def _watch_sigterm(self) -> None:
        """Remember a SIGTERM (cancel/preemption), then let submitit's handler see it too."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            self._terminated = True
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_term)

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
        fresh = UnitJob(self.argv, name=self.name, requeues=self.requeues + 1, grace_s=self.grace_s)
        return submitit.helpers.DelayedSubmission(fresh)
