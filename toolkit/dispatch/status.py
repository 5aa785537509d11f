"""Where every unit of a study stands: done / running / pending / failed.

Built from three sources: the completion markers (done), the manifest (which job
ran the unit, where its logs are) and the scheduler (``squeue``/``sacct`` for SLURM,
the process table for local jobs). A running train unit shows how far its member got
(step, loss, tokens/s, ETA, from its live curve, :mod:`toolkit.progress`) and its log; a
failed unit shows its log and the last error line found in it.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from toolkit.config import StudyConfig
from toolkit.dispatch.job import read_outcome
from toolkit.dispatch.local import pid_alive
from toolkit.dispatch.manifest import JobRecord, Manifest, member_log
from toolkit.dispatch.slurm import ACTIVE, job_states
from toolkit.plumbing import tail_lines
from toolkit.progress import format_duration, last_entries, progress_path
from toolkit.study import Layout, Member

RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"}
_ERROR = re.compile(r"(toolkit: error:|\b\w*(Error|Exception)\b|Traceback|CANCELLED|TIME LIMIT|Killed)")
_WRAPPERS = ("UnitFailedError", "UncompletedJobError", "Traceback", "submitit ERROR")


@dataclass(frozen=True)
class UnitStatus:
    stage: str
    key: str
    state: str
    """``done``, ``stale``, ``running``, ``pending`` or ``failed``."""
    job_id: str = ""
    detail: str = ""
    log: str = ""


def last_error_line(path: str | Path, tail_bytes: int = 65536) -> str:
    """The most telling error line near the end of a log ('' if none).

    The unit's own message (``toolkit: error: ...`` or the last ``XxxError: ...``) wins
    over the job wrapper's generic "exited with status N".
    """
    hits = [ln.strip() for ln in tail_lines(path, tail_bytes) if _ERROR.search(ln)]
    if not hits:
        return ""
    own = [ln for ln in hits if "toolkit: error:" in ln]
    if own:
        return own[-1]
    specific = [ln for ln in hits if not any(w in ln for w in _WRAPPERS)]
    return (specific or hits)[-1]


def train_progress(study: StudyConfig, key: str, now: float | None = None) -> str:
    """How far a training member got, from its live curve ('' before its first line).

    ``step 120/400, loss 2.3456, 1,234 tok/s, ETA 3 min 05 s (updated 4 s ago)``: the
    newest log point; the ETA is the training process's own, less the time since.
    """
    entries = last_entries(progress_path(Layout(study).member_dir(Member.parse(key))))
    if not entries:
        return ""
    now = time.time() if now is None else now
    last = next((e for e in reversed(entries) if e["event"] in ("log", "start")), None)
    if last is None:
        return ""
    total = last.get("total_steps")
    if last["event"] == "start" or not isinstance(last.get("time"), (int, float)):
        return f"starting at step {last.get('step')}/{total}"
    age = max(0.0, now - last["time"])
    parts = [f"step {last['step']}/{total}"]
    if isinstance(last.get("loss"), (int, float)):
        parts.append(f"loss {last['loss']:.4f}")
    if isinstance(last.get("tokens_per_second"), (int, float)):
        parts.append(f"{last['tokens_per_second']:,.0f} tok/s")
    eta = last.get("eta_s")
    parts.append(f"ETA {format_duration(eta - age if isinstance(eta, (int, float)) else None)}")
    return f"{', '.join(parts)} (updated {format_duration(age)} ago)"


def _running(study: StudyConfig, stage: str, key: str, job_id: str, how: str, log: str) -> UnitStatus:
    progress = train_progress(study, key) if stage == "train" else ""
    return UnitStatus(stage, key, "running", job_id, f"{how}: {progress}" if progress else how, log)


def _result(record: JobRecord) -> str | None:
    """A finished job's outcome: 'success', 'error', 'requeued' or None (unknown).

    From the job's own JSON outcome file (:func:`toolkit.dispatch.job.read_outcome`),
    never from submitit's ``*_result.pkl``: unpickling a file of a study folder that
    others can write would run their code as whoever types ``toolkit status``.
    """
    return read_outcome(record.stdout)


def unit_states(study: StudyConfig) -> list[UnitStatus]:
    """The status of every unit of the study, in dependency order.

    ``done`` and ``stale`` come from the unit model (:func:`toolkit.units.unit_states`:
    a stale unit's detail says what changed); a unit that is not done shows its job as
    ``running``, queued (``pending``) or ``failed`` where the manifest has one.
    """
    from toolkit.units import unit_states as model_states

    latest = Manifest.load(Layout(study).manifest).latest()
    slurm_ids = [r.job_id for r in latest.values() if r.executor == "slurm"]
    states = job_states(slurm_ids) if slurm_ids else {}
    rows = []
    for (stage, key), ust in model_states(study).items():
        rec = latest.get((stage, key))
        if ust.state == "done":
            rows.append(UnitStatus(stage, key, "done", rec.job_id if rec else ""))
            continue
        if rec is not None and rec.executor == "slurm":
            st = states.get(rec.job_id)
            if st in RUNNING_STATES:
                rows.append(_running(study, stage, key, rec.job_id, st.lower(), member_log(rec)))
                continue
            if st in ACTIVE:
                rows.append(UnitStatus(stage, key, "pending", rec.job_id, f"queued ({st.lower()})",
                                       member_log(rec)))
                continue
            why = st or "no longer known to the scheduler"
        elif rec is not None:
            if pid_alive(rec):
                rows.append(_running(study, stage, key, rec.job_id, "local process", member_log(rec)))
                continue
            why = "process ended"
        if ust.state == "stale":
            rows.append(UnitStatus(stage, key, "stale", rec.job_id if rec else "", ust.reason))
            continue
        if rec is None:
            rows.append(UnitStatus(stage, key, "pending", "", "not submitted"))
            continue
        outcome = _result(rec)
        if outcome == "success":
            why = f"{why}; finished without writing its completion marker"
        error = last_error_line(rec.stderr)
        rows.append(UnitStatus(stage, key, "failed", rec.job_id,
                               f"{why}: {error}" if error else why, member_log(rec)))
    return rows


def format_table(name: str, root: Path, rows: list[UnitStatus]) -> str:
    """A plain-text table: a summary line (study ``name`` in folder ``root``), then one line
    per unit (logs of running and failed units)."""
    counts = Counter(r.state for r in rows)
    head = (f"study {name} ({root}): {len(rows)} units: "
            + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "stale", "running", "pending",
                                                              "failed")))
    w_stage = max(len("STAGE"), *(len(r.stage) for r in rows))
    w_key = max(len("UNIT"), *(len(r.key) for r in rows))
    w_job = max(len("JOB"), *(len(r.job_id) for r in rows))
    lines = [head, f"{'STAGE':<{w_stage}}  {'UNIT':<{w_key}}  {'STATE':<7}  {'JOB':<{w_job}}  DETAIL"]
    for r in rows:
        detail = r.detail
        if r.state in ("running", "failed") and r.log:
            detail = f"{detail} (log: {r.log})"
        lines.append(f"{r.stage:<{w_stage}}  {r.key:<{w_key}}  {r.state:<7}  {r.job_id:<{w_job}}  "
                     f"{detail}".rstrip())
    return "\n".join(lines)
