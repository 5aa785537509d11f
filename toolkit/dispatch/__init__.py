"""Run a study's units of work as jobs: locally, in-process (debug) or on SLURM.

A study is five stages of units (:func:`toolkit.units.study_units`): prepare (one per
corpus x tokenizer), train (one per member, a job array), evaluate (one per member,
a job array), measure (one per run x measure family, a job array: the analysis shards
of :mod:`toolkit.analyse.shards`) and analyse (one job: the reduce into the summary and
the report). Every job runs::

    python -m toolkit unit <root>/study.json STAGE KEY

(optionally inside an Apptainer container, :mod:`toolkit.dispatch.container`), where
``study.json`` is the resolved study saved before submission, so overrides and
``--out`` reach every job. Units that are done (:mod:`toolkit.units`: marker present
and nothing they consumed changed) are skipped; stale and pending units run, and so
does every unit after them (each re-checks its inputs when its turn comes and is
skipped if they turned out unchanged). Units whose job is still queued or running
(``<root>/manifest.json`` and the scheduler) are not submitted again. See :mod:`.local` and :mod:`.slurm` for the executors and
:mod:`.job` for preemption and time limits.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from toolkit.config import StudyConfig, study_to_dict
from toolkit.dispatch.container import check_container
from toolkit.dispatch.manifest import Manifest
from toolkit.errors import SubmissionError
from toolkit.study import Layout, write_json_atomic

__all__ = ["cancel_study", "pending_units", "run_study", "save_study", "status_table", "wait_study"]

log = logging.getLogger(__name__)


def pending_units(study: StudyConfig, force: set[tuple[str, str]] | None = None) -> dict[str, list[str]]:
    """Stage -> keys of the units a run visits (not done, forced, or after one of those)."""
    from toolkit.units import to_run

    return to_run(study, force)


def save_study(study: StudyConfig) -> Path:
    """Write the resolved study to ``<root>/study.json`` (what every job reads)."""
    path = Layout(study).study_file
    write_json_atomic(path, study_to_dict(study))
    return path


def run_study(study: StudyConfig, executor: str | None = None, wait: bool = True,
              force: list[str] | tuple[str, ...] = ()) -> None:
    """Run (or queue) every unit of the study that is not complete yet.

    Parameters
    ----------
    study
        The resolved study (``--set`` overrides and ``--out`` applied).
    executor
        ``local`` (submitit LocalExecutor, stage by stage, ``dispatch.max_parallel`` at
        a time), ``debug`` (in this process, one unit after the other) or ``slurm``
        (chained job arrays; returns once queued unless ``wait``). ``None``: the
        study's ``dispatch.executor``.
    wait
        Block until every unit has finished. ``slurm`` without waiting returns right
        after queuing; ``local`` without waiting runs in a background process.
    force
        ``STAGE`` or ``STAGE:KEY`` items: units to redo although they are done (their
        markers are removed before anything is queued; a forced train unit starts over).

    Raises
    ------
    SubmissionError
        The cluster cannot run the request (checked before anything is queued), or
        units failed (their logs are named).
    """
    from toolkit.dispatch import local, slurm

    executor = executor or study.dispatch.executor
    if executor not in ("local", "debug", "slurm"):
        raise SubmissionError(f"unknown executor '{executor}'; use local, debug or slurm")
    from toolkit.units import discard_checkpoints, parse_force, study_units

    forced = parse_force(study, force)
    pending = pending_units(study, forced)
    todo = sum(len(keys) for keys in pending.values())
    if not todo:
        log.info("study %s: every unit is complete (%s)", study.name, study.root)
        return
    # Everything the job needs is checked before the first job is queued.
    if executor == "slurm":
        slurm.require_sbatch()
        info = slurm.probe_cluster()
        slurm.check_resources(study, [s for s, k in pending.items() if k], info)
    study.root.mkdir(parents=True, exist_ok=True)
    if executor != "debug":
        check_container(study)
    save_study(study)
    for unit in study_units(study):
        if (unit.stage, unit.key) in forced:
            # A forced unit must not read as done while it waits for its job.
            unit.marker.unlink(missing_ok=True)
            if unit.stage == "train":
                discard_checkpoints(study, unit.key)
    manifest = Manifest.load(Layout(study).manifest)
    log.info("study %s: %d unit(s) to run with the %s executor; output %s",
             study.name, todo, executor, study.root)
    if executor == "debug":
        local.run_debug(study, pending)
    elif executor == "local":
        if wait:
            local.run_local(study, pending, manifest)
        else:
            local.start_detached(study, manifest)
    else:
        ids = slurm.submit_study(study, pending, manifest, info)
        log.info("queued job(s) %s; follow with `toolkit status %s`", ", ".join(ids) or "(none new)",
                 Layout(study).study_file)
        if wait:
            wait_study(study)


def wait_study(study: StudyConfig, *, poll_s: float = 5.0, timeout_s: float | None = None) -> None:
    """Block until every unit is done; log a line per finished unit.

    Raises
    ------
    SubmissionError
        A unit failed (with its log and last error line), or ``timeout_s`` passed.
    """
    from toolkit.dispatch.local import StudyProgress, planned_unit_seconds
    from toolkit.dispatch.status import unit_states

    rows = unit_states(study)
    seen = {(r.stage, r.key) for r in rows if r.state == "done"}
    waiting: dict[str, list[str]] = {}
    for r in rows:
        if r.state != "done":
            waiting.setdefault(r.stage, []).append(r.key)
    # Units are only seen finishing here, so a unit's duration is the time since the
    # previous one finished (already divided by the cluster's parallelism): the plan's
    # seconds per unit are divided likewise, by the units an array runs at a time.
    prior = {stage: secs / min(study.dispatch.resources_for(stage).array_parallelism,
                               len(waiting.get(stage, [])) or 1)
             for stage, secs in planned_unit_seconds(study).items()}
    progress = StudyProgress(waiting, parallel=1, prior=prior)
    start = time.monotonic()
    while True:
        for r in rows:
            if r.state == "done" and (r.stage, r.key) not in seen:
                seen.add((r.stage, r.key))
                progress.finished(r.stage, r.key)
        failed = [r for r in rows if r.state == "failed"]
        if failed:
            first = failed[0]
            raise SubmissionError(f"{len(failed)} unit(s) failed, first {first.stage} {first.key}: "
                                  f"{first.detail} (log: {first.log}); fix it and resubmit")
        if all(r.state == "done" for r in rows):
            return
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise SubmissionError(f"study {study.name}: not finished after {timeout_s:.0f} s; "
                                  "see `toolkit status`")
        time.sleep(poll_s)
        rows = unit_states(study)


def status_table(study: StudyConfig) -> str:
    """Every unit of the study: done / running / pending / failed, with job ids and logs."""
    from toolkit.dispatch.status import format_table, unit_states

    return format_table(study.name, study.root, unit_states(study))


def cancel_study(study: StudyConfig) -> None:
    """Cancel every queued or running job of the study (SLURM: scancel; local: kill)."""
    from toolkit.dispatch import local, slurm

    latest = Manifest.load(Layout(study).manifest).latest()
    slurm_ids = [r.job_id for r in latest.values() if r.executor == "slurm"]
    if slurm_ids:
        states = slurm.job_states(slurm_ids)
        active = [j for j in slurm_ids if states.get(j) in slurm.ACTIVE]
        if active:
            slurm.cancel(active)
        log.info("cancelled %d SLURM job(s)%s", len(active), f": {', '.join(active)}" if active else "")
    # The detached driver first, so that it does not start new local jobs.
    local_recs = sorted((r for r in latest.values() if r.executor == "local"),
                        key=lambda r: r.stage != "driver")
    killed = [r.job_id for r in local_recs if local.kill_tree(r)]  # verifies the pid is the unit's
    if local_recs:
        log.info("stopped %d local process(es)%s", len(killed), f": {', '.join(killed)}" if killed else "")
