"""``<root>/manifest.json``: every job the dispatcher submitted for a study.

One record per submitted unit (stage, key, executor, job id, submit time, log
paths), appended, never edited: the newest record of a unit is the one that counts.
The dispatcher reads it before submitting (so a unit whose job is still queued or
running is not submitted twice), ``toolkit status`` reads it to tell pending,
running and failed units apart, and ``toolkit cancel`` reads it to find the jobs.
Only the submitting process writes it, atomically.

A local job's record also holds the process's start time and command line, so that
``toolkit cancel`` and ``toolkit status`` can tell the unit's process from an
unrelated one that later got the same process id (see :mod:`.local`). Older
manifests without them still load; their processes are never signalled.

Beside every job's logs, ``logs/<stage>/<key>.err`` and ``.out`` (``/`` in the key
written ``-``) link to the newest job of the unit (:func:`link_member_logs`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from toolkit.errors import SubmissionError
from toolkit.plumbing import write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    stage: str
    """``prepare``, ``train``, ``evaluate``, ``analyse`` (or ``driver`` for a detached local run)."""
    key: str
    executor: str
    """``slurm``, ``local`` or ``debug``."""
    job_id: str
    """SLURM job id (``123`` or ``123_4`` for an array task) or a local process id."""
    submitted: str
    """ISO time, UTC."""
    stdout: str = ""
    stderr: str = ""
    proc_start: float | None = None
    """Local jobs: the process's start time (``psutil.Process.create_time()``), or None."""
    proc_cmdline: list[str] | None = None
    """Local jobs: the process's command line when it was submitted, or None."""


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Manifest:
    """The job records of one study; :meth:`save` after :meth:`add`."""

    def __init__(self, path: Path, records: list[JobRecord] | None = None) -> None:
        self.path = path
        self.records: list[JobRecord] = records or []

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read the manifest (empty when the study was never submitted)."""
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            records = [JobRecord(**r) for r in raw["jobs"]]
        except (ValueError, KeyError, TypeError) as e:
            raise SubmissionError(f"{path}: not a valid job manifest ({e}); move it away "
                                  "and resubmit (finished units are skipped)") from e
        return cls(path, records)

    def add(self, record: JobRecord) -> None:
        self.records.append(record)

    def save(self) -> None:
        write_json_atomic(self.path, {"jobs": [asdict(r) for r in self.records]})

    def latest(self) -> dict[tuple[str, str], JobRecord]:
        """The newest record of every (stage, key)."""
        out: dict[tuple[str, str], JobRecord] = {}
        for r in self.records:
            out[(r.stage, r.key)] = r
        return out


def member_log_links(record: JobRecord) -> tuple[Path, Path]:
    """``logs/<stage>/<key with / as ->.err`` and ``.out`` beside the job's own logs.

    submitit names a job's logs by job id (``<jobid>_0_log.err``); these names follow
    the unit, e.g. ``logs/train/dna-6mer-seed1.err``.
    """
    folder = Path(record.stderr).parent
    name = record.key.replace("/", "-")
    return folder / f"{name}.err", folder / f"{name}.out"


def link_member_logs(record: JobRecord) -> None:
    """Point the unit's member-named log links at the job's logs (see :func:`member_log_links`).

    Relative links, each made under a temporary name and renamed over the old one, so a
    resubmitted unit's link moves to the new job in one step (``tail -F`` follows it).
    The links are a convenience: a failure is logged, never raised.
    """
    if record.stage == "driver" or not record.stderr or not record.stdout:
        return
    for link, target in zip(member_log_links(record), (record.stderr, record.stdout), strict=True):
        tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.relpath(target, link.parent), tmp)
            os.replace(tmp, link)  # replaces a name, never what an old link points to
        except OSError as e:
            log.warning("cannot link %s to %s (%s); the log is %s", link, target, e.strerror or e, target)
            with contextlib.suppress(OSError):
                tmp.unlink()


def member_log(record: JobRecord) -> str:
    """The unit's member-named error log when it points at this record's log, else the log."""
    link = member_log_links(record)[0]
    try:
        if os.readlink(link) == os.path.relpath(record.stderr, link.parent):
            return str(link)
    except (OSError, ValueError):
        pass
    return record.stderr


