"""Safety of shared study folders and clusters.

A study folder is often shared by a group, and so writable by people other than the
one who types ``toolkit status`` or ``toolkit cancel``. These tests plant what such a
person could plant and check that nothing runs, nothing unrelated is killed, nothing
is injected into job scripts, and that what a study writes stays readable by the group:

- a pickle in ``logs/`` whose unpickling would create a file: ``toolkit status`` leaves
  it unread (the jobs' JSON outcome files are read instead, tolerant of garbage);
- a manifest naming a foreign process, or a process id reused with another start time:
  ``toolkit cancel`` leaves it alive and ``toolkit status`` does not show it running;
- newlines and control characters in every value written into an sbatch script or a
  container command: refused naming the field, exit status 2, one line, nothing queued;
- ``umask`` 022 and 002: every file of a real tiny study run has mode ``0666 & ~umask``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import REPO, study_toml
from toolkit.cli import main
from toolkit.config import study_from_dict
from toolkit.dispatch import save_study
from toolkit.dispatch.container import unit_argv
from toolkit.dispatch.job import read_outcome
from toolkit.dispatch.local import kill_tree, pid_alive, process_identity
from toolkit.dispatch.manifest import JobRecord, Manifest, now
from toolkit.dispatch.slurm import slurm_parameters
from toolkit.errors import SubmissionError
from toolkit.study import Layout


def tiny_doc(root: Path) -> dict[str, Any]:
    return {
        "study": {"name": "safe", "seeds": [1], "output_dir": str(root)},
        "corpora": {"m": {"source": "synthetic:markov", "train_records": 24, "eval_records": 8,
                          "synthetic": {"records": 32, "length": 200, "order": 1, "entropy_rate": 1.5}}},
        "runs": {"r": {"corpus": "m", "tokenizer": "kmer3"}},
    }


def tiny_study(root: Path) -> Any:
    return study_from_dict(tiny_doc(root), where="test")


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    """The CLI's error output: exactly one line, ``toolkit: error: ...``, no traceback."""
    lines = [ln for ln in err.splitlines() if not re.match(r"^\d\d:\d\d:\d\d \w+ ", ln)]
    assert len(lines) == 1 and lines[0].startswith("toolkit: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- 1. no unpickling


class _Plant:
    """Unpickling this runs ``open(flag, "w")``: what a planted result pickle could do."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.flag)!r}, 'w').close()",))


def _plant_pickle(path: Path, flag: Path) -> None:
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps((_Plant(flag), "x")))


def _local_record(study: Any, stage: str, key: str, job_id: str, **extra: Any) -> JobRecord:
    folder = Layout(study).logs_dir / stage
    return JobRecord(stage=stage, key=key, executor="local", job_id=job_id, submitted=now(),
                     stdout=str(folder / f"{job_id}_0_log.out"),
                     stderr=str(folder / f"{job_id}_0_log.err"), **extra)


def test_status_never_unpickles_a_planted_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tiny_study(tmp_path / "out")
    save_study(study)
    # Process ids above pid_max: surely ended.
    bad = _local_record(study, "prepare", "m--kmer3", "99999991")
    good = _local_record(study, "train", "r/seed1", "99999992")
    Manifest(Layout(study).manifest, [bad, good]).save()
    flag = tmp_path / "pwned"
    _plant_pickle(Path(bad.stdout.replace("_log.out", "_result.pkl")), flag)
    # The same trap under every name next to the log, and a JSON outcome for the other unit
    # (so that the test sees outcomes are read at all).
    _plant_pickle(Path(bad.stdout.replace("_log.out", "_outcome.json")), flag)
    Path(good.stdout.replace("_log.out", "_outcome.json")).parent.mkdir(parents=True, exist_ok=True)
    Path(good.stdout.replace("_log.out", "_outcome.json")).write_text(
        json.dumps({"outcome": "success", "returncode": 0, "finished": now()}))
    rc, out, err = cli(["status", str(study.root / "study.json")], capsys)
    assert rc == 0, err
    assert not flag.exists(), "toolkit status unpickled a file from the study folder"
    assert re.search(r"^train\s+r/seed1\s+failed\s+99999992\s+.*finished without writing its "
                     r"completion marker", out, re.M), out
    row = next(ln for ln in out.splitlines() if ln.startswith("prepare"))
    assert "failed" in row and "finished without" not in row  # outcome unknown


def test_outcome_files_are_read_tolerantly(tmp_path: Path) -> None:
    """Garbage, huge, FIFO, symlinked, wrongly typed outcome files all read as unknown."""
    log = tmp_path / "7_0_log.out"
    path = tmp_path / "7_0_outcome.json"
    cases: dict[str, Any] = {
        "valid": (b'{"outcome": "success", "returncode": 0}', "success"),
        "requeued": (b'{"outcome": "requeued", "returncode": 75}', "requeued"),
        "garbage": (b"\x80\x04\x95 not json", None),
        "truncated": (b'{"outcome": "succ', None),
        "list": (b'["success"]', None),
        "unknown word": (b'{"outcome": "rm -rf"}', None),
        "outcome not a string": (b'{"outcome": ["success"]}', None),
        "huge": (b'{"outcome": "success", "pad": "' + b"x" * 100_000 + b'"}', None),
        "deep": (b"[" * 100_000, None),
    }
    for name, (data, want) in cases.items():
        path.write_bytes(data)
        assert read_outcome(log) == want, name
    path.unlink()
    assert read_outcome(log) is None  # no file
    assert read_outcome(tmp_path / "7_0_something.txt") is None  # not a submitit log name
    # A FIFO would block a plain open(): it must read as unknown at once.
    os.mkfifo(path)
    t0 = time.monotonic()
    assert read_outcome(log) is None
    assert time.monotonic() - t0 < 2
    path.unlink()
    # A link (to a valid outcome elsewhere) is not followed.
    real = tmp_path / "elsewhere.json"
    real.write_text('{"outcome": "success"}')
    path.symlink_to(real)
    assert read_outcome(log) is None


def test_no_pickle_is_loaded_anywhere_in_the_toolkit() -> None:
    """Nothing in toolkit/ unpickles: no pickle.load(s), no submitit job.result(), no plain torch.load."""
    offenders = []
    for py in sorted((REPO / "toolkit").rglob("*.py")):
        for n, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            bad = (re.search(r"\b(c?pickle|cloudpickle|dill|joblib)\.loads?\(", code)
                   or re.search(r"\.result\(\)", code)
                   or re.search(r"\bpd\.read_pickle\(", code)
                   or (re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code))
            if bad:
                offenders.append(f"{py.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


# --------------------------------------------------------------------------- 2. only our processes


@pytest.fixture
def sleeper() -> Any:
    """A process that is not part of any study (``sleep 60``); killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv or ["sleep", "60"])
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait for exec, so that the command line is final
            if psutil.Process(proc.pid).cmdline() == (argv or ["sleep", "60"]):
                break
            time.sleep(0.02)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _study_with_record(tmp_path: Path, record_of: Any) -> tuple[Any, JobRecord]:
    study = tiny_study(tmp_path / "out")
    save_study(study)
    record = record_of(study)
    Manifest(Layout(study).manifest, [record]).save()
    return study, record


def test_cancel_leaves_a_foreign_pid_from_an_old_manifest_alive(
        tmp_path: Path, sleeper: Any, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A manifest without start time and command line (old, or planted): nothing is killed."""
    proc = sleeper()
    study, record = _study_with_record(tmp_path, lambda s: _local_record(s, "train", "r/seed1", str(proc.pid)))
    assert Manifest.load(Layout(study).manifest).records == [record]  # old format loads
    with caplog.at_level(logging.WARNING):
        rc, _, err = cli(["cancel", str(study.root / "study.json")], capsys)
    assert rc == 0, err
    time.sleep(0.5)
    assert proc.poll() is None, "toolkit cancel killed a process it did not start"
    assert f"not stopping process {proc.pid}" in caplog.text and "older toolkit" in caplog.text


def test_old_manifest_record_is_not_running_when_its_pid_started_later(tmp_path: Path, sleeper: Any) -> None:
    """An old record (no identity) whose pid now belongs to a process started after submission."""
    proc = sleeper()
    study = tiny_study(tmp_path / "out")
    old = dataclasses.replace(_local_record(study, "train", "r/seed1", str(proc.pid)),
                              submitted="2020-01-01T00:00:00+00:00")
    assert not pid_alive(old)
    just_now = _local_record(study, "train", "r/seed1", str(proc.pid))
    assert pid_alive(just_now)  # plausible: started when it was submitted


def test_cancel_refuses_a_pid_with_another_command_line(tmp_path: Path, sleeper: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    proc = sleeper()
    started, _ = process_identity(proc.pid)
    study, record = _study_with_record(tmp_path, lambda s: _local_record(
        s, "train", "r/seed1", str(proc.pid), proc_start=started,
        proc_cmdline=[sys.executable, "-m", "submitit.local._local", str(s.root / "logs" / "train")]))
    assert not pid_alive(record)
    rc, _, err = cli(["cancel", str(study.root / "study.json")], capsys)
    assert rc == 0, err
    time.sleep(0.5)
    assert proc.poll() is None


def test_reused_pid_is_neither_running_nor_killed_nor_its_children(
        tmp_path: Path, sleeper: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Right pid and command line, wrong start time: the id was reused by someone else's process."""
    argv = ["bash", "-c", "sleep 60 & wait"]
    proc = sleeper(argv)
    started, cmdline = process_identity(proc.pid)
    assert started is not None and cmdline == argv
    deadline = time.monotonic() + 10
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(proc.pid).children()[0]
    study, record = _study_with_record(tmp_path, lambda s: _local_record(
        s, "train", "r/seed1", str(proc.pid), proc_start=started - 30.0, proc_cmdline=cmdline))
    assert not pid_alive(record)
    rc, out, err = cli(["status", str(study.root / "study.json")], capsys)
    assert rc == 0, err
    assert not re.search(r"^train\s+r/seed1\s+running", out, re.M), out
    rc, _, err = cli(["cancel", str(study.root / "study.json")], capsys)
    assert rc == 0, err
    time.sleep(0.5)
    assert proc.poll() is None and child.is_running()


def test_cancel_stops_the_verified_unit_and_its_children(tmp_path: Path, sleeper: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The control: when start time and command line match, the unit's tree is stopped."""
    argv = ["bash", "-c", "sleep 60 & wait"]
    proc = sleeper(argv)
    deadline = time.monotonic() + 10
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(proc.pid).children()[0]
    started, cmdline = process_identity(proc.pid)
    study, record = _study_with_record(tmp_path, lambda s: _local_record(
        s, "train", "r/seed1", str(proc.pid), proc_start=started, proc_cmdline=cmdline))
    loaded = Manifest.load(Layout(study).manifest).latest()[("train", "r/seed1")]
    assert loaded == record and pid_alive(loaded)
    rc, _, err = cli(["cancel", str(study.root / "study.json")], capsys)
    assert rc == 0, err
    proc.wait(timeout=15)  # ended (bash may exit 0 once its sleep child is gone)
    psutil.wait_procs([child], timeout=10)
    assert not child.is_running()
    assert not kill_tree(loaded)  # nothing left to stop


# --------------------------------------------------------------------------- 3. script injection

INJECTED = "x\ntouch /tmp/toolkit-injected #"


def _with_resources(study: Any, stage: str, **changes: Any) -> Any:
    res = dataclasses.replace(study.dispatch.resources_for(stage), **changes)
    dispatch = dataclasses.replace(study.dispatch, resources={**study.dispatch.resources, stage: res})
    return dataclasses.replace(study, dispatch=dispatch)


def _with_container(study: Any, root: Path, **changes: Any) -> Any:
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "img" / "toolkit.sif").write_bytes(b"SIF stand-in")
    base = {"runtime": "apptainer", "image": str(root / "img" / "toolkit.sif")}
    container = dataclasses.replace(study.dispatch.container, **{**base, **changes})
    return dataclasses.replace(study, dispatch=dataclasses.replace(study.dispatch, container=container))


# Every value that reaches an sbatch script or a container command, set past the study
# file's own validation (as code or a future option could), and the field the refusal names.
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("account", lambda s, r: _with_resources(s, "train", account=INJECTED), r"dispatch\.resources\.train\.account contains a newline"),
    ("partition", lambda s, r: _with_resources(s, "train", partition="gpu\r\nx"), r"dispatch\.resources\.train\.partition contains a newline"),
    ("qos", lambda s, r: _with_resources(s, "prepare", qos="high\x00"), r"dispatch\.resources\.prepare\.qos contains the control character '\\x00'"),
    ("extra_sbatch key", lambda s, r: _with_resources(s, "train", extra_sbatch={"constraint=a\nb": "x"}), r"dispatch\.resources\.train\.extra_sbatch key contains a newline"),
    ("extra_sbatch key form", lambda s, r: _with_resources(s, "train", extra_sbatch={"constraint=a100 --x": "y"}), r"dispatch\.resources\.train\.extra_sbatch: 'constraint=a100 --x' is not an sbatch option name"),
    ("extra_sbatch value", lambda s, r: _with_resources(s, "train", extra_sbatch={"constraint": INJECTED}), r"dispatch\.resources\.train\.extra_sbatch\.constraint contains a newline"),
    ("setup line", lambda s, r: _with_resources(s, "train", setup=("module load cuda", "echo a\x1b[2J")), r"dispatch\.resources\.train\.setup\[1\] contains the control character '\\x1b'"),
    ("--out path", lambda s, r: dataclasses.replace(s, output_dir=str(r / "a\nb")), r"study folder \(study\.output_dir or --out\) contains a newline"),
    ("study name", lambda s, r: dataclasses.replace(s, name="safe\u2028x"), r"study\.name \(the job name\) contains a newline"),
    ("container image", lambda s, r: _with_container(s, r, image=str(r / "img" / "toolkit.sif\nrm x")), r"dispatch\.container\.image contains a newline"),
    ("container bind", lambda s, r: _with_container(s, r, binds=(str(r) + "\n/etc",)), r"dispatch\.container\.binds\[0\] contains a newline"),
    ("container scratch", lambda s, r: _with_container(s, r, scratch=str(r / "scr\tatch")), r"dispatch\.container\.scratch contains the control character '\\t'"),
]


@pytest.mark.parametrize(("name", "make", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_script_values_with_control_characters_are_refused(tmp_path: Path, name: str, make: Any,
                                                           message: str) -> None:
    bad = make(tiny_study(tmp_path / "out"), tmp_path)
    stage = "prepare" if name == "qos" else "train"  # the stage whose resources were changed
    with pytest.raises(SubmissionError, match=message) as info:
        slurm_parameters(bad, stage, None)
    assert "\n" not in str(info.value) and "\r" not in str(info.value)
    if name.startswith("container") or name == "--out path":
        with pytest.raises(SubmissionError, match=message):
            unit_argv(bad, "train", "r/seed1")


def test_clean_values_still_reach_the_script(tmp_path: Path) -> None:
    """The control: ordinary values (spaces, quotes, unicode, '_' in keys) pass unchanged."""
    import submitit.slurm.slurm as submitit_slurm

    study = _with_resources(tiny_study(tmp_path / "o u't"), "train", account="läb 1", qos="high",
                            extra_sbatch={"exclusive": True, "mail_type": "END"},
                            setup=("module load cuda/12.4",))
    params = slurm_parameters(study, "train", None)
    script = submitit_slurm._make_sbatch_string(command="C", folder=tmp_path / "logs", **params)
    assert "#SBATCH --account='läb 1'" in script and "#SBATCH --mail-type=END" in script
    assert "#SBATCH --exclusive" in script


@pytest.fixture
def queue_snapshot(slurm_cluster: Any) -> Any:
    def ids() -> set[str]:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return set(out.stdout.split())

    return ids


@pytest.mark.slurm
@pytest.mark.parametrize(("name", "make", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_injection_queues_nothing_on_a_real_cluster(queue_snapshot: Any, tmp_path: Path, name: str,
                                                    make: Any, message: str) -> None:
    from toolkit.dispatch import run_study

    before = queue_snapshot()
    bad = make(tiny_study(tmp_path / "out"), tmp_path)
    with pytest.raises(SubmissionError, match=message):
        run_study(bad, executor="slurm", wait=False)
    assert not Layout(bad).manifest.exists()
    assert queue_snapshot() == before


@pytest.mark.slurm
def test_cli_submit_with_a_newline_in_out_or_account(queue_snapshot: Any, tmp_path: Path) -> None:
    """Through the real command line: exit 2, one line, no traceback, nothing queued or created."""
    toml = tmp_path / "s.json"
    toml.write_text(json.dumps(tiny_doc(tmp_path / "out")))
    flag = tmp_path / "injected"
    before = queue_snapshot()
    for extra, field in [
        (["--out", f"{tmp_path / 'o'}\ntouch {flag} #"], "--out"),
        (["--set", f'dispatch.resources.train.account="lab\\ntouch {flag} #"'],
         "dispatch.resources.train.account"),
        (["--set", 'dispatch.resources.train.extra_sbatch={"a\\nb" = "x"}'],
         "dispatch.resources.train.extra_sbatch"),
    ]:
        res = subprocess.run([sys.executable, "-m", "toolkit", "submit", str(toml), *extra],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert res.returncode == 2, res.stderr
        line = one_line_error(res.stderr)
        assert field in line, line
    assert queue_snapshot() == before
    assert not flag.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


# --------------------------------------------------------------------------- 4. umask


def umask_toml() -> str:
    """The tiny study cut down further: one member, three steps, fewer and shorter records;
    no output folder (``--out`` gives it) and the default executor."""
    return study_toml("perm", seeds=(1,), runs={"markov-3mer": "kmer3"},
                      corpus={"train_records": 24, "eval_records": 8,
                              "synthetic": {"records": 32, "length": 200}},
                      training={"steps": 3, "batch_size": 4, "checkpoint_every_steps": 3,
                                "eval_every_steps": 3, "log_every_steps": 1},
                      analysis={"eval_records": 8, "fisher_records": 4, "contextual_records": 4,
                                "topk": [1, 3, 5]},
                      dispatch={"executor": None})


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_of_a_study_follows_the_umask(tmp_path: Path, umask: int) -> None:
    """A real tiny study through the local executor: every file 0666 & ~umask, folders 0777 & ~umask."""
    (tmp_path / "s.toml").write_text(umask_toml())
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "toolkit", "run", str(tmp_path / "s.toml"),
                          "--executor", "local", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
                         preexec_fn=lambda: os.umask(umask))
    assert res.returncode == 0, res.stderr[-3000:]
    wrong, names = [], set()
    for path in [out, *out.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        want = (0o777 if stat.S_ISDIR(st.st_mode) else 0o666) & ~umask
        if stat.S_IMODE(st.st_mode) != want:
            wrong.append(f"{oct(stat.S_IMODE(st.st_mode))} {path.relative_to(out)}")
        names.add(path.name)
    assert not wrong, wrong
    # What the test covered: markers, study.json, manifest, checkpoints, stores, outcomes, report.
    for name in ("study.json", "manifest.json", "complete.json", "train.complete.json",
                 "evaluate.complete.json", "model.safetensors", "optim.pt", "meta.json",
                 "tokens.zarr", "summary.zarr", "index.html"):
        assert name in names, name
    assert any(n.endswith("_outcome.json") for n in names)
    assert all(st & 0o040 for st in (p.stat().st_mode for p in out.rglob("*") if p.is_file()))


@pytest.mark.slurm
def test_array_jobs_write_their_outcome_next_to_their_log(queue_snapshot: Any, tmp_path: Path) -> None:
    """On SLURM (an array, as train/evaluate are queued), each task's outcome is readable as JSON."""
    import submitit

    from toolkit.dispatch.job import UnitJob

    ex = submitit.SlurmExecutor(folder=tmp_path / "logs")
    ex.update_parameters(time=5, cpus_per_task=1)
    with ex.batch():
        ok = ex.submit(UnitJob([sys.executable, "-c", "print('ok')"], name="train a"))
        bad = ex.submit(UnitJob([sys.executable, "-c", "raise SystemExit(3)"], name="train b"))
    assert "_" in ok.job_id  # array task ids: <array>_<index>
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and None in (read_outcome(ok.paths.stdout), read_outcome(bad.paths.stdout)):
        time.sleep(0.5)
    assert read_outcome(ok.paths.stdout) == "success"
    assert read_outcome(bad.paths.stdout) == "error"
    doc = json.loads(Path(str(bad.paths.stdout).replace("_log.out", "_outcome.json")).read_text())
    assert doc["returncode"] == 3 and doc["finished"]


def test_process_identity_is_the_exec_ed_command_not_the_forking_parent() -> None:
    """Recorded right after Popen, before the child may have exec'ed: still the child's argv."""
    import subprocess
    import sys

    from toolkit.dispatch.local import process_identity

    for _ in range(20):
        argv = [sys.executable, "-c", "import time; time.sleep(30)"]
        proc = subprocess.Popen(argv)
        try:
            started, cmdline = process_identity(proc.pid)
            assert cmdline == argv and started is not None
        finally:
            proc.kill()
            proc.wait()
