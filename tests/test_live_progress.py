"""Watching a member train: its live loss curve, resumption, and `toolkit status` meanwhile.

Real training processes (``python -m toolkit train``, the local executor's background
driver) on the tiny training study of tests/conftest.py (``make_train_study``), read
while they run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.conftest import make_train_study as make_study
from toolkit import checkpoint as ckpt
from toolkit import store
from toolkit.config import StudyConfig, study_to_dict
from toolkit.dispatch import cancel_study, run_study, status_table
from toolkit.dispatch.local import pid_alive
from toolkit.dispatch.manifest import Manifest
from toolkit.dispatch.status import train_progress
from toolkit.progress import (
    PROGRESS_FILE,
    ProgressWriter,
    format_duration,
    last_entries,
    open_progress,
    parse_lines,
)
from toolkit.study import Layout, Member
from toolkit.units import unit_states

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")
M1 = Member("r", 1)  # the first member of make_train_study's study
# Slow enough to be watched (about 20 ms a step on one CPU thread), short enough for a test.
LIVE = {"batch_size": 8, "log_every_steps": 2, "eval_every_steps": 50, "checkpoint_every_steps": 1000,
        "device": "cpu"}


def _train(study: StudyConfig, tmp_path: Path) -> subprocess.Popen:
    """``toolkit train`` of member r/seed1 in a process of its own (output to a file)."""
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study_to_dict(study)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = open(tmp_path / "train.out", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "toolkit", "train", str(path), "--member", M1.id],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait(cond, proc: subprocess.Popen | None, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the training process ended before {what} (code {proc.returncode})")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _live_steps(study: StudyConfig) -> list[int]:
    path = Layout(study).member_dir(M1) / PROGRESS_FILE
    return open_progress(path)["step"].values.tolist() if path.exists() else []


def _assert_matches_train_zarr(study: StudyConfig) -> None:
    mdir = Layout(study).member_dir(M1)
    live = open_progress(mdir)
    final = store.open_dataset(mdir / "train.zarr", "train")
    for name in ("step", "loss", "lr", "tokens_seen", "eval_step", "eval_loss"):
        assert np.array_equal(live[name].values, final[name].values), name
    assert live.attrs["complete"] and live.attrs["member"] == M1.id
    assert live.attrs["total_steps"] == final.attrs["final_step"]


# --------------------------------------------------------------------------- pieces


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 42.9, 60, 185, 3599, 3720, 86399, 2 * 86400 + 3 * 3600)] == [
        "0 s", "42 s", "1 min 00 s", "3 min 05 s", "59 min 59 s", "1 h 02 min", "23 h 59 min", "2 d 03 h"]
    assert format_duration(-5) == "0 s"
    assert format_duration(None) == format_duration(float("nan")) == format_duration(float("inf")) == "?"


def test_log_progress_lines_against_the_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one progress line: count, rate and ETA follow from the clock (a controlled
    monotonic clock, checked against the arithmetic); a line at most every ``every_s``;
    positions (moveto), named counts, scaled units, a growing total and the closing line."""
    import logging

    from toolkit import progress as progress_mod

    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    lines: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test.progress")
    logger.setLevel(logging.INFO)
    logger.addHandler(Sink())
    try:
        p = progress_mod.LogProgress(desc="encode", total=400, unit="records", every_s=10.0, logger=logger)
        clock[0] += 5
        p.update(50)  # 5 s < every_s: no line
        assert lines == []
        clock[0] += 5
        p.update(50, {"tokens": 2_500_000})
        # 100 records in 10 s: 10/s, 300 left: 30 s; 2.5 M tokens in 10 s: 250000/s
        assert lines == ["encode: 100/400 records (10.0 records/s, ETA 30 s), 2.50 M tokens (250000 tokens/s)"]
        clock[0] += 30
        p.moveto(400, counts={"tokens": 9_000_000})
        p.close()
        p.close()  # a second close adds nothing
        assert lines[1:] == ["encode: 400/400 records (10.0 records/s, ETA 0 s), 9.00 M tokens (225000 tokens/s)",
                             "encode: 400/400 records in 40 s (10.0 records/s), 9.00 M tokens (225000 tokens/s)"]
        lines.clear()
        b = progress_mod.LogProgress(desc="reading g.fa", total=30e6, unit="MB", scale=1e6, every_s=0, logger=logger)
        clock[0] += 4
        b.moveto(12e6, note="2 worker(s)")
        # 12 MB in 4 s: 3 MB/s, 18 MB left: 6 s
        assert lines == ["reading g.fa: 12/30 MB (3.0 MB/s, ETA 6 s); 2 worker(s)"]
        b.moveto(20e6, total=50e6)  # a total that grows (a Dask graph): ETA from the new total
        assert lines[-1] == "reading g.fa: 20/50 MB (5.0 MB/s, ETA 6 s); 2 worker(s)"
        unknown = progress_mod.LogProgress(desc="count", unit="records", every_s=0, logger=logger)
        clock[0] += 2
        unknown.update(7)
        assert lines[-1] == "count: 7 records (3.5 records/s, ETA ?)"
    finally:
        logger.handlers.clear()
    assert progress_mod.remaining_s(0, 10, 5.0) is None and progress_mod.remaining_s(5, None, 5.0) is None
    assert progress_mod.remaining_s(12, 10, 3.0) == 0  # past the total: nothing left, never negative


def test_reader_skips_half_written_lines_and_writer_never_fails_training(tmp_path: Path) -> None:
    path = tmp_path / PROGRESS_FILE
    w = ProgressWriter(path, "r/seed1", 10)
    w.start(2, {"step": [2], "loss": [3.0], "lr": [0.1], "tokens_seen": [40]}, {"step": [], "loss": []})
    w.log_point(4, float("nan"), 0.2, 80, 1000.0, 3.0)  # a step without masked tokens: null
    w.eval_point(4, 2.5)
    with open(path, "a") as f:
        f.write('{"event":"log","step":6,"lo')  # a writer caught mid-line
    ds = open_progress(path)
    assert ds["step"].values.tolist() == [2, 4] and np.isnan(ds["loss"].values[1])
    assert ds["eval_step"].values.tolist() == [4] and not ds.attrs["complete"]
    assert [e["event"] for e in last_entries(path, tail_bytes=70)] == ["eval"]  # cut first line skipped
    assert parse_lines(["[1, 2]", "nonsense", '{"event": "end", "reason": "done"}']) == [
        {"event": "end", "reason": "done"}]
    # An unwritable place: a warning, never an exception that would stop training.
    (tmp_path / "blocker").write_text("")
    broken = ProgressWriter(tmp_path / "blocker" / PROGRESS_FILE, "r/seed1", 10)
    broken.start(0, {"step": [], "loss": [], "lr": [], "tokens_seen": []}, {"step": [], "loss": []})
    broken.log_point(2, 1.0, 0.1, 10, 1.0, 1.0)
    broken.end("done", 2)


def test_status_line_of_a_member_from_its_live_curve(tmp_path: Path) -> None:
    study = make_study(tmp_path, **LIVE)
    assert train_progress(study, M1.id) == ""  # never started
    path = Layout(study).member_dir(M1) / PROGRESS_FILE
    w = ProgressWriter(path, M1.id, 5000)
    w.start(1000, {"step": [1000], "loss": [2.5], "lr": [0.1], "tokens_seen": [9]}, {"step": [], "loss": []})
    assert train_progress(study, M1.id) == "starting at step 1000/5000"  # resumed, nothing new yet
    w.log_point(1200, 2.34567, 0.1, 99, 12345.6, 4000.0)
    w.flush()
    when = last_entries(path)[-1]["time"]
    assert train_progress(study, M1.id, now=when + 95) == (
        "step 1200/5000, loss 2.3457, 12,346 tok/s, ETA 1 h 05 min (updated 1 min 35 s ago)")


# --------------------------------------------------------------------------- real training


@pytest.mark.slow
def test_live_curve_grows_while_training_and_ends_equal_to_train_zarr(tmp_path: Path) -> None:
    study = make_study(tmp_path / "out", steps=300, **LIVE)
    layout = Layout(study)
    proc = _train(study, tmp_path)
    seen: list[list[int]] = []
    record = layout.member_dir(M1) / "train.zarr"

    def grown() -> bool:
        steps = _live_steps(study)
        if steps and not record.exists() and (not seen or steps != seen[-1]):
            seen.append(steps)
        return len(seen) >= 3

    _wait(grown, proc, "three snapshots of a growing curve", timeout=90)
    assert proc.wait(timeout=120) == 0, (tmp_path / "train.out").read_text()[-2000:]
    # Mid-training snapshots: proper, growing prefixes of the final curve.
    final = _live_steps(study)
    assert len(seen[0]) < len(seen[1]) < len(seen[2]) < len(final)
    for steps in seen:
        assert steps == final[:len(steps)]
    _assert_matches_train_zarr(study)
    # The live curve is no output of the unit: changing it leaves the member done.
    with open(layout.member_dir(M1) / PROGRESS_FILE, "a") as f:
        f.write("garbage\n")
    assert unit_states(study)[("train", M1.id)].state == "done"


@pytest.mark.slow
def test_killed_and_preempted_member_resumes_its_curve_without_duplicates(tmp_path: Path) -> None:
    # Evaluations (every 50 steps) write the curve at once, so between the evaluation at
    # 150 and the checkpoint at 200 the curve is ahead of the saved step 100, and so on.
    study = make_study(tmp_path / "out", steps=400, **{**LIVE, "checkpoint_every_steps": 100})
    ckdir = Layout(study).checkpoints_dir(M1)

    def saved_step() -> int:
        folders = ckpt.step_folders(ckdir)
        return int(folders[0].name.split("-")[1]) if folders else 0

    # 1) SIGKILL once the curve runs ahead of the last checkpoint: those steps are redone.
    proc = _train(study, tmp_path)
    _wait(lambda: saved_step() > 0 and max(_live_steps(study), default=0) > saved_step() + 6, proc,
          "steps logged after a checkpoint")
    proc.kill()
    proc.wait()
    assert max(_live_steps(study)) > saved_step()
    # 2) Resume, then SIGTERM: checkpoint, an 'end: preempted' line, exit 75.
    first = saved_step()
    proc = _train(study, tmp_path)
    _wait(lambda: saved_step() > first and max(_live_steps(study), default=0) > saved_step(), proc,
          "the resumed process to log past its next checkpoint")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    path = Layout(study).member_dir(M1) / PROGRESS_FILE
    end = last_entries(path)[-1]
    assert end["event"] == "end" and end["reason"] == "preempted" and end["step"] == saved_step()
    # 3) Resume to the end: one curve, each log step once, equal to train.zarr's.
    resumed = saved_step()
    proc = _train(study, tmp_path)
    assert proc.wait(timeout=120) == 0, (tmp_path / "train.out").read_text()[-2000:]
    assert _live_steps(study) == list(range(2, 401, 2))
    _assert_matches_train_zarr(study)
    # The last start rewrote the file from its checkpoint: one start, one end.
    events = [(e["event"], e.get("step"), e.get("reason")) for e in parse_lines(
        path.read_text().splitlines()) if e["event"] in ("start", "end")]
    assert events == [("start", resumed, None), ("end", 400, "done")]


@pytest.mark.slow
def test_status_shows_a_running_members_progress_and_log(tmp_path: Path) -> None:
    # A long member run by the local executor's background driver, cancelled once seen.
    study = make_study(tmp_path / "out", steps=1_000_000, **LIVE)
    run_study(study, executor="local", wait=False)
    manifest = Layout(study).manifest
    try:
        _wait(lambda: "tok/s" in train_progress(study, M1.id), None, "the member's first log point",
              timeout=90)
        table = status_table(study)
        rec = Manifest.load(manifest).latest()[("train", M1.id)]
        (line,) = [ln for ln in table.splitlines() if ln.startswith("train") and M1.id in ln]
        assert " running " in line and rec.job_id in line
        for part in ("local process: step ", "/1000000, loss ", " tok/s, ETA ", " ago)",
                     f"(log: {Path(rec.stderr).parent / (M1.id.replace('/', '-') + '.err')})"):
            assert part in line, (part, line)
        assert Path(rec.stderr).is_file()
        assert re.search(r"ETA \d+ h \d\d min ", line), line  # a million steps take hours
    finally:
        cancel_study(study)
    rec = Manifest.load(manifest).latest()[("train", M1.id)]
    assert not pid_alive(rec)
