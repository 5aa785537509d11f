"""Dispatch: the job body, the manifest, status, the local executor and real SLURM.

The SLURM tests run against a real single-node cluster (munged, slurmctld, slurmd on
this machine with two fake GPUs, ``tests/slurm_cluster.py``) started once per session.
Most tests run a *payload* instead of the real stages: a small script that writes
placeholder outputs and the unit's real completion marker through the unit model
(``toolkit.units.mark_complete``, with start and end times), sleeps for a configurable
time, can fail on request, and on SIGTERM/SIGUSR2 saves its progress and exits 75
exactly like ``toolkit/train.py``. The payload goes through the real dispatcher
(submitit, sbatch arrays, afterok chains, requeue); only the command inside the job
differs. The last tests run the real tiny study end to end (``toolkit submit``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.apptainer_bwrap import write_standin
from tests.conftest import study_toml, tiny_study  # test_eta imports tiny_study from here
from toolkit.config import ResourceConfig, load_study, study_to_dict
from toolkit.dispatch import (
    cancel_study,
    pending_units,
    run_study,
    save_study,
    status_table,
    wait_study,
)
from toolkit.dispatch import local as dlocal
from toolkit.dispatch import slurm as dslurm
from toolkit.dispatch.job import UnitFailedError, UnitJob
from toolkit.dispatch.manifest import JobRecord, Manifest
from toolkit.dispatch.status import last_error_line, unit_states
from toolkit.errors import SubmissionError
from toolkit.plumbing import EXIT_REQUEUE
from toolkit.study import Layout
from toolkit.units import get_unit, study_units

PAYLOAD = textwrap.dedent('''\
    """Test payload: a unit that takes WORK seconds, checkpoints on SIGTERM/SIGUSR2 (exit 75)."""
    import json, os, signal, sys, time
    marker, state_path, control, unit = sys.argv[1:5]
    study_json = sys.argv[5] if len(sys.argv) > 5 else None
    ctl = json.load(open(control)) if os.path.exists(control) else {}
    work = float(ctl.get(unit, ctl.get("*", 0.0)))
    state = json.load(open(state_path)) if os.path.exists(state_path) else {"progress": 0.0, "runs": 0, "signals": []}
    state["runs"] += 1
    t0 = time.time()
    open(state_path + ".started", "w").write(str(t0))
    if ctl.get("fail") == unit:
        print("ValueError: payload asked to fail", file=sys.stderr)
        sys.exit(1)
    got = []
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, lambda s, f: got.append(s))
    until_signal = ctl.get("until_signal") == unit and state["runs"] == 1
    if ctl.get("exit75_once") == unit and state["runs"] == 1:  # asks to be requeued on its own
        json.dump(state, open(state_path, "w"))
        sys.exit(75)
    while state["progress"] < work or until_signal:
        time.sleep(0.05)
        state["progress"] += 0.05
        if got:
            state["signals"].append(got[0])
            json.dump(state, open(state_path, "w"))
            sys.exit(75)
    json.dump(state, open(state_path, "w"))
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    doc = {"start": t0, "end": time.time(), "runs": state["runs"],
           "job": os.environ.get("SLURM_JOB_ID"), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if study_json is None:
        json.dump(doc, open(marker, "w"))
        sys.exit(0)
    # Placeholder outputs (the real stages do not run here), then the real marker.
    from toolkit.config import load_study
    from toolkit.units import get_unit, mark_complete, unit_inputs, unit_states
    study = load_study(study_json)
    u = get_unit(study, *unit.split(":", 1))
    for out in u.outputs:
        if out.suffix == ".zarr":
            os.makedirs(out, exist_ok=True)
            json.dump({"attributes": {"payload": unit}}, open(out / "zarr.json", "w"))
        elif out.suffix:
            os.makedirs(out.parent, exist_ok=True)
            open(out, "w").write(unit)
        else:
            os.makedirs(out, exist_ok=True)
            open(out / "weights", "w").write(unit)
    mark_complete(study, u, unit_inputs(study, u, unit_states(study)), extra=doc)
''')


def write_payload(folder: Path) -> Path:
    path = folder / "payload.py"
    path.write_text(PAYLOAD)
    return path


@pytest.fixture
def payload_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Make every dispatched unit run the payload; returns the control file (unit -> seconds)."""
    script = write_payload(tmp_path)
    control = tmp_path / "control.json"
    control.write_text("{}")
    states = tmp_path / "states"
    states.mkdir()

    def argv(study, stage, key, python=None):
        marker = get_unit(study, stage, key).marker
        state = states / f"{stage}-{key.replace('/', '-')}.json"
        return [sys.executable, str(script), str(marker), str(state), str(control), f"{stage}:{key}",
                str(study.root / "study.json")]

    monkeypatch.setattr(dslurm, "unit_argv", argv)
    monkeypatch.setattr(dlocal, "unit_argv", argv)
    return control


def markers(study) -> dict[tuple[str, str], dict]:
    return {(u.stage, u.key): json.loads(u.marker.read_text()) for u in study_units(study)
            if u.marker.exists()}


def assert_stage_order(study) -> None:
    """Every unit of a stage started after every unit of the previous stage ended."""
    done = markers(study)
    stages = ["prepare", "train", "evaluate", "measure", "analyse"]
    for before, after in zip(stages, stages[1:], strict=False):
        ends = [v["end"] for (s, _), v in done.items() if s == before]
        starts = [v["start"] for (s, _), v in done.items() if s == after]
        assert ends and starts and max(ends) <= min(starts), (before, after)


# --------------------------------------------------------------------------- no scheduler


def test_save_study_round_trips_overrides(tmp_path: Path) -> None:
    study = tiny_study(tmp_path / "out", seeds=2)
    path = save_study(study)
    again = load_study(path)
    assert study_to_dict(again) == study_to_dict(study)
    pending = pending_units(study)
    assert pending["prepare"] == ["m1--kmer3", "m2--kmer3"]
    assert pending["train"] == ["r1/seed1", "r1/seed2", "r2/seed1", "r2/seed2"]
    assert pending["measure"] == [f"{r}/{f}" for r in ("r1", "r2")
                                  for f in ("distributions", "embeddings", "fisher", "training")]
    assert pending["analyse"] == ["summary"]


def test_manifest_latest_and_corruption(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "manifest.json")
    m.add(JobRecord(stage="train", key="a/seed1", executor="slurm", job_id="1_0", submitted="t"))
    m.add(JobRecord(stage="train", key="a/seed1", executor="slurm", job_id="7_0", submitted="t"))
    m.save()
    assert Manifest.load(m.path).latest()[("train", "a/seed1")].job_id == "7_0"
    m.path.write_text("{not json")
    with pytest.raises(SubmissionError, match="manifest.json: not a valid job manifest"):
        Manifest.load(m.path)


def test_member_log_links_are_relative_and_replaced(tmp_path: Path) -> None:
    from toolkit.dispatch.manifest import link_member_logs, member_log

    folder = tmp_path / "logs" / "train"
    folder.mkdir(parents=True)

    def record(job: str) -> JobRecord:
        return JobRecord(stage="train", key="dna-6mer/seed1", executor="slurm", job_id=job,
                         submitted="t", stdout=str(folder / f"{job}_0_log.out"),
                         stderr=str(folder / f"{job}_0_log.err"))

    first, second = record("7_1"), record("9_1")
    assert member_log(first) == first.stderr  # no link yet: the job's own log
    link_member_logs(first)
    link = folder / "dna-6mer-seed1.err"
    assert os.readlink(link) == "7_1_0_log.err" and os.readlink(folder / "dna-6mer-seed1.out") == "7_1_0_log.out"
    assert member_log(first) == str(link)
    link_member_logs(second)  # resubmitted: the link moves, no temporary file is left
    assert os.readlink(link) == "9_1_0_log.err"
    assert member_log(first) == first.stderr and member_log(second) == str(link)
    assert sorted(p.name for p in folder.iterdir()) == ["dna-6mer-seed1.err", "dna-6mer-seed1.out"]
    # A name that cannot be replaced (a folder planted there) is logged, not raised.
    link.unlink()
    link.mkdir()
    link_member_logs(first)
    assert link.is_dir() and member_log(first) == first.stderr


def test_last_error_line_prefers_the_units_message(tmp_path: Path) -> None:
    log_file = tmp_path / "x_log.err"
    log_file.write_text("INFO start\nTraceback (most recent call last):\n  File x\n"
                        "ValueError: bad record 17 in corpus.fa\n"
                        "submitit ERROR: job failed\n"
                        "toolkit.dispatch.job.UnitFailedError: train a/seed1: exited with status 1\n")
    assert last_error_line(log_file) == "ValueError: bad record 17 in corpus.fa"
    log_file.write_text("toolkit: error: corpora.x.source: missing\nUnitFailedError: exited 2\n")
    assert last_error_line(log_file) == "toolkit: error: corpora.x.source: missing"
    assert last_error_line(tmp_path / "absent") == ""


def test_unit_job_resumes_locally_after_exit_75(tmp_path: Path) -> None:
    script = tmp_path / "once.py"
    script.write_text("import os,sys\nf=sys.argv[1]\n"
                      f"if not os.path.exists(f): open(f,'w').write('ckpt'); sys.exit({EXIT_REQUEUE})\n"
                      "print('resumed from', open(f).read())\n")
    job = UnitJob([sys.executable, str(script), str(tmp_path / "state")], name="train a/seed1")
    assert job() == "train a/seed1: done"
    assert job.requeues == 1
    bad = UnitJob([sys.executable, "-c", "raise SystemExit(3)"], name="prepare x")
    with pytest.raises(UnitFailedError, match="prepare x: exited with status 3"):
        bad()


def test_cancelled_local_job_does_not_resume_its_unit(tmp_path: Path) -> None:
    """`toolkit cancel` signals a local job, then its unit, which saves and exits 75: the job
    must not start the unit again (it did, and the new unit outlived the cancel). A real job
    process and unit process, signalled in kill_tree's order (parents first)."""
    starts = tmp_path / "starts"
    unit = tmp_path / "unit.py"
    unit.write_text("import signal, sys, time\n"
                    f"open({str(starts)!r}, 'a').write('start\\n')\n"
                    f"signal.signal(signal.SIGTERM, lambda *a: sys.exit({EXIT_REQUEUE}))\n"
                    "time.sleep(60)\n")
    job = subprocess.Popen([sys.executable, "-c",
                            "import sys; from toolkit.dispatch.job import UnitJob\n"
                            f"UnitJob([sys.executable, {str(unit)!r}], name='train r/seed1')()"],
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (starts.exists() and psutil.Process(job.pid).children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = psutil.Process(job.pid).children()
    job.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # kill_tree signals the whole tree at once; the job's handler runs first here
    child.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode != 0 and "stopped (cancelled)" in err, err
    assert starts.read_text() == "start\n"  # never started again
    assert not child.is_running()


def test_checkpoint_forwards_sigterm_and_requeues(tmp_path: Path) -> None:
    """checkpoint() (what submitit calls on USR2) stops the child cleanly and returns a requeue."""
    script = write_payload(tmp_path)
    control = tmp_path / "control.json"
    control.write_text(json.dumps({"*": 30}))
    state = tmp_path / "state.json"
    marker = tmp_path / "m" / "done.json"
    job = UnitJob([sys.executable, str(script), str(marker), str(state), str(control), "u"], name="u",
                  grace_s=20)
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(job()))
    thread.start()
    deadline = time.monotonic() + 20
    while not Path(str(state) + ".started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    control.write_text(json.dumps({"*": 0}))  # read at start only: lets the local resume finish at once
    old = signal.getsignal(signal.SIGUSR2)
    try:
        delayed = job.checkpoint()
    finally:
        signal.signal(signal.SIGUSR2, old)
    saved = json.loads(state.read_text())
    assert saved["signals"] == [15] and 0 < saved["progress"] < 30  # SIGTERM, mid-way
    fresh = delayed.function
    assert isinstance(fresh, UnitJob) and fresh.argv == job.argv and fresh._proc is None
    # 1, or 2 when the thread's own local resume (exit 75) counted first: a test-only race,
    # under submitit checkpoint() runs in the thread that runs the unit.
    assert fresh.requeues in (1, 2)
    thread.join(30)
    assert out == ["u: done"] and json.loads(marker.read_text())["runs"] == 2


def test_parse_gpus_and_check_resources(tmp_path: Path) -> None:
    assert dslurm.parse_gpus("gpu:2") == 2
    assert dslurm.parse_gpus("gpu:a100:4(S:0-1),gpu:v100:2") == 6
    assert dslurm.parse_gpus("(null)") == 0
    info = dslurm.ClusterInfo({"cpu": 0, "gpu": 2}, "cpu", 4)
    ok = tiny_study(tmp_path, resources={"train": {"partition": "gpu", "gpus_per_node": 2}})
    dslurm.check_resources(ok, ["prepare", "train"], info)
    with pytest.raises(SubmissionError, match=r"resources.train.gpus_per_node: 3 GPUs .* at most 2"):
        dslurm.check_resources(tiny_study(tmp_path, resources={"train": {"partition": "gpu", "gpus_per_node": 3}}),
                               ["train"], info)
    with pytest.raises(SubmissionError, match="'big' is not a partition .* cpu, gpu"):
        dslurm.check_resources(tiny_study(tmp_path, resources={"evaluate": {"partition": "big"}}),
                               ["evaluate"], info)
    # CPUs and memory per node: asking more than any node has would pend for ever.
    sized = dslurm.ClusterInfo({"cpu": 0, "gpu": 2}, "cpu", 4, cpus={"cpu": 8, "gpu": 32},
                               memory_mb={"cpu": 16384})
    dslurm.check_resources(tiny_study(tmp_path, resources={"train": {"cpus_per_task": 8, "mem_gb": 16}}),
                           ["train"], sized)
    with pytest.raises(SubmissionError, match=r"resources.train.cpus_per_task: 9 CPUs .* 'cpu' have at most 8"):
        dslurm.check_resources(tiny_study(tmp_path, resources={"train": {"cpus_per_task": 9}}), ["train"], sized)
    with pytest.raises(SubmissionError, match=r"resources.measure.mem_gb: 16.5 GB .* at most 16.0 GB"):
        dslurm.check_resources(tiny_study(tmp_path, resources={"measure": {"mem_gb": 16.5}}), ["measure"], sized)
    # partition 'gpu': CPUs known, memory not (a node line with '4096+'): not refused on a guess
    dslurm.check_resources(tiny_study(tmp_path, resources={"train": {"partition": "gpu", "mem_gb": 999,
                                                                     "cpus_per_task": 32}}), ["train"], sized)
    assert dslurm._node_count("16") == 16 and dslurm._node_count("16+") is None and dslurm._node_count("") is None


def test_probe_reads_cpus_and_memory_and_refuses_an_oversized_study(slurm_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The real test cluster (one node: this machine's CPUs, RealMemory 4096 MB): the probe
    reads both, and a study asking more is refused before anything is written or queued."""
    info = dslurm.probe_cluster()
    assert info.cpus == {p: os.cpu_count() for p in info.partitions}
    assert info.memory_mb == dict.fromkeys(info.partitions, 4096)
    study = tiny_study(tmp_path / "out", resources={"prepare": {"cpus_per_task": (os.cpu_count() or 2) + 1}})
    with pytest.raises(SubmissionError, match="resources.prepare.cpus_per_task"):
        run_study(study, executor="slurm", wait=False)
    assert not study.root.exists()
    study = tiny_study(tmp_path / "out2", resources={"train": {"mem_gb": 5}})
    with pytest.raises(SubmissionError, match="resources.train.mem_gb: 5 GB .* at most 4.0 GB"):
        run_study(study, executor="slurm", wait=False)
    assert not study.root.exists()


def test_submit_without_sbatch_fails_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    study = tiny_study(tmp_path / "out")
    with pytest.raises(SubmissionError, match="sbatch not found"):
        run_study(study, executor="slurm", wait=False)
    assert not study.root.exists()


@pytest.mark.slow
def test_local_executor_stages_progress_and_failure(tmp_path: Path, payload_units: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    study = tiny_study(tmp_path / "out", seeds=1, max_parallel=2)
    caplog.set_level(logging.INFO, logger="toolkit.dispatch")
    run_study(study, executor="local")
    assert_stage_order(study)
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    # 2 prepare, 2 train, 2 evaluate, 8 measure (2 runs x 4 families), 1 analyse
    assert len(lines) == 15 and "[15/15," in lines[-1]
    assert re.search(r"\[15/15, elapsed \d+ (s|min \d\d s), ETA 0 s\]$", lines[-1]), lines[-1]
    assert "15 done, 0 stale, 0 running, 0 pending, 0 failed" in status_table(study)
    # Every unit's logs are also reachable by its name: relative links to the job's logs.
    latest = Manifest.load(Layout(study).manifest).latest()
    for (stage, key), rec in latest.items():
        err = Layout(study).logs_dir / stage / f"{key.replace('/', '-')}.err"
        assert os.readlink(err) == Path(rec.stderr).name and err.resolve() == Path(rec.stderr).resolve()
        assert err.with_suffix(".out").resolve() == Path(rec.stdout).resolve()
    # A failing unit: the stage fails naming its log, the next stage is not started.
    other = tiny_study(tmp_path / "out2", seeds=1, max_parallel=2)
    payload_units.write_text(json.dumps({"fail": "train:r2/seed1"}))
    with pytest.raises(SubmissionError, match=r"stage train: 1 unit\(s\) failed: r2/seed1 \(log .*/logs/train/r2-seed1.err\)"):
        run_study(other, executor="local")
    rows = {(r.stage, r.key): r for r in unit_states(other)}
    assert rows[("train", "r2/seed1")].state == "failed"
    assert "ValueError: payload asked to fail" in rows[("train", "r2/seed1")].detail
    assert rows[("train", "r2/seed1")].log == str(Layout(other).logs_dir / "train" / "r2-seed1.err")
    assert f"(log: {Layout(other).logs_dir / 'train' / 'r2-seed1.err'})" in status_table(other)
    assert rows[("evaluate", "r1/seed1")].state == "pending"
    # Resubmitted, the unit's link moves to the new job's log.
    link = Layout(other).logs_dir / "train" / "r2-seed1.err"
    first = os.readlink(link)
    payload_units.write_text("{}")
    run_study(other, executor="local")
    new = Manifest.load(Layout(other).manifest).latest()[("train", "r2/seed1")]
    assert os.readlink(link) == Path(new.stderr).name != first
    assert "ValueError: payload asked to fail" not in link.read_text()


# --------------------------------------------------------------------------- real SLURM


def wait_for(cond, timeout_s: float, what: str, poll_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.slurm
def test_submitit_round_trip_with_fake_gpus(slurm_cluster, tmp_path: Path) -> None:
    import submitit

    ex = submitit.SlurmExecutor(folder=tmp_path / "logs")
    study = tiny_study(tmp_path, resources={"train": {"partition": "gpu", "gpus_per_node": 2,
                                                     "gpu_style": "gres", "time_minutes": 5}})
    ex.update_parameters(**dslurm.slurm_parameters(study, "train", None))
    job = ex.submit(UnitJob([sys.executable, "-c", "import os; print('gpus', os.environ['CUDA_VISIBLE_DEVICES'])"],
                            name="train x"))
    wait_for(job.paths.result_pickle.exists, 60, "the job's result")
    assert job.result() == "train x: done"
    assert "gpus 0,1" in job.paths.stdout.read_text()
    assert "#SBATCH --gres=gpu:2" in job.paths.submission_file.read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_chain_arrays_resubmit_kill_and_status(slurm_cluster, tmp_path: Path, payload_units: Path) -> None:
    """Stages chained with afterok, arrays split at MaxArraySize, fake GPUs, idempotent resubmits."""
    study = tiny_study(tmp_path / "out", seeds=3, resources={
        "train": {"partition": "gpu", "gpus_per_node": 1, "time_minutes": 5},
        "evaluate": {"partition": "gpu", "gpus_per_node": 1, "gpu_style": "gres", "time_minutes": 5}})
    # One member is slow, so that it is still running when we resubmit and then kill it.
    payload_units.write_text(json.dumps({"train:r1/seed2": 120}))
    t0 = time.monotonic()
    run_study(study, executor="slurm", wait=False)
    assert time.monotonic() - t0 < 20  # returns once queued
    manifest = Manifest.load(Layout(study).manifest)
    assert len(manifest.records) == 2 + 6 + 6 + 8 + 1
    arrays = {r.job_id.split("_")[0] for r in manifest.records if r.stage == "train"}
    assert len(arrays) == 2  # 6 members > MaxArraySize 4: split into two arrays
    slow = manifest.latest()[("train", "r1/seed2")].job_id
    wait_for(lambda: {r.key for r in unit_states(study) if r.state == "done" and r.stage == "train"}
             == {"r1/seed1", "r1/seed3", "r2/seed1", "r2/seed2", "r2/seed3"}, 90, "the fast members")
    table = status_table(study)
    assert re.search(rf"^train\s+r1/seed2\s+running\s+{slow}\s", table, re.M), table
    assert all(r.state == "pending" for r in unit_states(study) if r.stage in ("evaluate", "measure", "analyse"))
    # Resubmitting while the member runs and its dependents wait queues nothing new.
    run_study(study, executor="slurm", wait=False)
    assert len(Manifest.load(Layout(study).manifest).records) == 23
    # Kill the member: its dependents are cancelled too (kill-on-invalid-dep), status says so.
    subprocess.run(["scancel", slow], check=True)
    wait_for(lambda: {r.key for r in unit_states(study) if r.state == "failed"} >= {"r1/seed2", "summary"},
             60, "the killed member and its dependents to show as failed")
    failed = {(r.stage, r.key): r for r in unit_states(study)}[("train", "r1/seed2")]
    assert "CANCELLED" in failed.detail and failed.log.endswith("/logs/train/r1-seed2.err")
    assert Path(failed.log).resolve() == Path(Manifest.load(Layout(study).manifest).latest()[
        ("train", "r1/seed2")].stderr).resolve()
    # Resubmit: only the killed member, the evaluations and the analysis run again.
    payload_units.write_text("{}")
    run_study(study, executor="slurm", wait=False)
    again = Manifest.load(Layout(study).manifest).records[23:]
    assert sorted((r.stage, r.key) for r in again if r.stage not in ("evaluate", "measure")) == [
        ("analyse", "summary"), ("train", "r1/seed2")]
    assert len([r for r in again if r.stage == "evaluate"]) == 6
    assert len([r for r in again if r.stage == "measure"]) == 8
    wait_study(study, poll_s=0.5, timeout_s=120)
    assert_stage_order(study)
    done = markers(study)
    assert done[("train", "r1/seed1")]["gpus"] in ("0", "1")  # one fake GPU each
    assert done[("evaluate", "r2/seed3")]["gpus"] in ("0", "1")
    assert "23 done, 0 stale, 0 running, 0 pending, 0 failed" in status_table(study)


@pytest.mark.slurm
def test_cancel_study_and_bad_requests(slurm_cluster, tmp_path: Path, payload_units: Path) -> None:
    before = squeue_ids()
    for resources, message in [
        ({"train": {"partition": "nope"}}, r"dispatch.resources.train.partition: 'nope' is not a partition of this cluster; choose one of cpu, gpu"),
        ({"evaluate": {"partition": "gpu", "gpus_per_node": 4}}, r"dispatch.resources.evaluate.gpus_per_node: 4 GPUs asked but nodes of partition 'gpu' have at most 2"),
    ]:
        bad = tiny_study(tmp_path / "bad", seeds=1, resources=resources)
        with pytest.raises(SubmissionError, match=message):
            run_study(bad, executor="slurm", wait=False)
        assert not Layout(bad).manifest.exists()
    assert not squeue_ids() - before  # nothing was queued
    study = tiny_study(tmp_path / "out", seeds=1)
    payload_units.write_text(json.dumps({"*": 120}))
    run_study(study, executor="slurm", wait=False)
    ids = [r.job_id for r in Manifest.load(Layout(study).manifest).records]
    wait_for(lambda: any(r.state == "running" for r in unit_states(study)), 30, "a running unit")
    cancel_study(study)
    wait_for(lambda: not (set(ids) & {i for i, s in dslurm.job_states(ids).items() if s in dslurm.ACTIVE}),
             30, "every job to leave the queue")
    assert all(r.state == "failed" for r in unit_states(study))
    assert "0 stale, 0 running, 0 pending, 15 failed" in status_table(study)


def _submit_payload(tmp_path: Path, control: dict, **params) -> tuple:
    import submitit

    script = write_payload(tmp_path)
    (tmp_path / "control.json").write_text(json.dumps(control))
    state = tmp_path / "state.json"
    ex = submitit.SlurmExecutor(folder=tmp_path / "logs", max_num_timeout=3)
    ex.update_parameters(**params)
    job = ex.submit(UnitJob([sys.executable, str(script), str(tmp_path / "done.json"), str(state),
                             str(tmp_path / "control.json"), "u"], name="train u", grace_s=20))
    return job, state


@pytest.mark.slurm
def test_preemption_requeues_and_resumes(slurm_cluster, tmp_path: Path) -> None:
    """job._interrupt(): SIGTERM then USR2, as on preemption; the unit saves, exits 75, resumes."""
    job, state = _submit_payload(tmp_path, {"*": 6}, time=15, signal_delay_s=30)
    wait_for(lambda: Path(str(state) + ".started").exists(), 30, "the unit to start")
    time.sleep(1.0)
    job._interrupt()
    wait_for(job.paths.result_pickle.exists, 60, "the requeued job to finish")
    assert job.result() == "train u: done"
    saved = json.loads(state.read_text())
    assert saved["runs"] == 2 and saved["signals"][0] in (15, 12)
    assert json.loads((tmp_path / "done.json").read_text())["runs"] == 2
    logs = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert "this job is preempted" in logs and "Requeued job" in logs


@pytest.mark.slurm
def test_unit_exiting_75_on_its_own_is_requeued(slurm_cluster, tmp_path: Path) -> None:
    job, state = _submit_payload(tmp_path, {"exit75_once": "u"}, time=15)
    wait_for(job.paths.result_pickle.exists, 60, "the requeued job to finish")
    assert job.result() == "train u: done"
    assert json.loads(state.read_text())["runs"] == 2
    logs = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert "saved its state (exit 75); requeueing" in logs and "Requeued job" in logs


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_requeues_and_resumes(slurm_cluster, tmp_path: Path) -> None:
    """A 1-minute limit with USR2 45 s before it: the unit checkpoints, is requeued, finishes."""
    job, state = _submit_payload(tmp_path, {"until_signal": "u"}, time=1, signal_delay_s=45)
    wait_for(job.paths.result_pickle.exists, 110, "the job to time out, requeue and finish")
    assert job.result() == "train u: done"
    saved = json.loads(state.read_text())
    assert saved["runs"] == 2 and saved["signals"][0] in (12, 15)  # USR2 (--signal) or forwarded TERM
    logs = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert "this job is timed-out" in logs and "Requeued job" in logs


def test_resources_defaults() -> None:
    params = dslurm.slurm_parameters(tiny_study(Path("/tmp/x")), "analyse", None)
    assert params["time"] == ResourceConfig().time_minutes and "partition" not in params
    assert params["additional_parameters"] == {"kill_on_invalid_dep": "yes"}


# --------------------------------------------------------------------------- the real study

def e2e_toml() -> str:
    """The tiny study for the dispatcher's end-to-end test (about 2 minutes on 2 cores): no
    output folder (``--out`` gives it), longer training, containers, a GPU for training."""
    return study_toml("e2e", runs={"markov-3mer": "kmer3"},
                      training={"steps": 40, "checkpoint_every_steps": 20, "eval_every_steps": 20},
                      analysis={"topk": [1, 3, 5]},
                      dispatch={"executor": None,
                                "container": {"runtime": "apptainer", "image": "img/toolkit.sif",
                                              "scratch": "scratch"},
                                "resources": {"train": {"partition": "gpu", "gpus_per_node": 1,
                                                        "time_minutes": 20}}})


@pytest.mark.slurm
@pytest.mark.slow
def test_real_study_submit_preempt_resume_report(slurm_cluster, weird_tmp_path: Path, tmp_path: Path) -> None:
    """`toolkit submit` (what `make submit` runs) on a real tiny study, end to end.

    Every unit runs through the STAND-IN `apptainer` (tests/apptainer_bwrap.py; the real
    runtime cannot be installed here) in a folder whose path has spaces and quotes. One
    training job is preempted mid-way (job._interrupt(): SIGTERM then USR2); training
    saves a checkpoint and exits 75, submitit requeues the job, and it resumes from that
    checkpoint. At the end every unit is done and the report exists.
    """
    import submitit

    (weird_tmp_path / "img").mkdir()
    (weird_tmp_path / "img" / "toolkit.sif").write_bytes(b"SIF stand-in")
    toml = weird_tmp_path / "e2e.toml"
    toml.write_text(e2e_toml())
    calls = tmp_path / "apptainer-calls.jsonl"
    bin_dir = weird_tmp_path / "bin"
    write_standin(bin_dir, calls)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = weird_tmp_path / "out dir"
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "toolkit", "submit", str(toml), "--out", str(out),
                          "--set", "study.description=submitted by the test"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 60
    study = load_study(out / "study.json")
    assert study.description == "submitted by the test"  # --set reaches the jobs
    record = Manifest.load(Layout(study).manifest).latest()[("train", "markov-3mer/seed1")]
    log_err = Path(record.stderr)

    def training_started() -> bool:
        failed = [f"{r.stage} {r.key}: {r.detail}" for r in unit_states(study) if r.state == "failed"]
        assert not failed, failed
        return log_err.exists() and " step " in log_err.read_text()

    wait_for(training_started, 240, "the first training steps of markov-3mer/seed1", poll_s=0.3)
    job = submitit.SlurmJob(folder=log_err.parent, job_id=record.job_id)
    job._interrupt()
    wait_study(study, poll_s=1.0, timeout_s=300)
    text = log_err.read_text() + Path(record.stdout).read_text()
    assert "exiting with code 75" in text and "Requeued job" in text
    assert re.search(r"resuming from .* \(step \d+/40\)", text), text[-3000:]
    assert "markov-3mer" in (out / "report" / "index.html").read_text(encoding="utf-8")
    assert "10 done, 0 stale, 0 running, 0 pending, 0 failed" in status_table(study)
    # The member-named link follows the (requeued) job's log; logs hold no tqdm fragments.
    assert (log_err.parent / "markov-3mer-seed1.err").resolve() == log_err.resolve()
    for path in Layout(study).logs_dir.rglob("*_log.*"):
        assert "\r" not in path.read_bytes().decode("utf-8", "replace"), path
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    units = [c["argv"][-3:] for c in seen]
    assert [str(out / "study.json"), "train", "markov-3mer/seed1"] in units
    assert all(c["nv"] == (c["argv"][-2] == "train") for c in seen)  # GPUs asked for train only
    assert len(seen) == 11  # 10 units (4 of them measure shards) + the requeued training run


def test_unit_command_parses_with_the_real_cli(tmp_path: Path) -> None:
    from toolkit.cli import build_parser
    from toolkit.dispatch.container import unit_argv

    study = tiny_study(tmp_path / "out")
    argv = unit_argv(study, "train", "r2/seed3")
    assert argv[:3] == [sys.executable, "-m", "toolkit"]
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.stage, args.key) == ("unit", "train", "r2/seed3")
    assert args.study == str(study.root / "study.json")


@pytest.mark.slow
def test_local_no_wait_runs_in_background_and_cancel_stops_it(tmp_path: Path) -> None:
    """`toolkit run --executor local --no-wait`: a background driver; `toolkit cancel` kills it."""
    study = tiny_study(tmp_path / "out", seeds=1)
    run_study(study, executor="local", wait=False)
    path = Layout(study).manifest
    driver = Manifest.load(path).latest()[("driver", "local")].job_id
    assert dlocal.pid_alive(driver)
    wait_for(lambda: ("prepare", "m1--kmer3") in Manifest.load(path).latest(), 90,
             "the background driver to start the first unit")
    unit = Manifest.load(path).latest()[("prepare", "m1--kmer3")].job_id
    rows = {(r.stage, r.key): r for r in unit_states(study)}
    assert rows[("prepare", "m1--kmer3")].state in ("running", "done")
    cancel_study(study)
    assert not dlocal.pid_alive(driver) and not dlocal.pid_alive(unit)
    assert {r.state for r in unit_states(study)} <= {"done", "failed", "pending"}


@pytest.mark.slow
def test_local_real_study_logs_hold_plain_progress_lines(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A real tiny study on the local executor: its job logs hold plain progress lines
    (count, rate) and none of a tqdm bar's carriage-return fragments; the study ETA
    lines use one duration format."""
    toml = tmp_path / "tiny.toml"
    toml.write_text(study_toml("logs", tmp_path / "out", dispatch={"executor": "local"}))
    study = load_study(toml)
    caplog.set_level(logging.INFO, logger="toolkit.dispatch")
    run_study(study)
    logs = Layout(study).logs_dir
    files = [p for p in logs.rglob("*") if p.suffix in (".err", ".out", ".log") and not p.is_symlink()]
    assert any(p.suffix == ".err" for p in files)
    for path in files:
        text = path.read_bytes().decode("utf-8", "replace")
        assert "\r" not in text and "|█" not in text and "it/s]" not in text, path
    dist = (logs / "measure" / "r-distributions.err").read_text()  # the shards' job logs
    assert re.search(r"r: distributions: (\d+)/\1 task in \d+ s \(\d+\.\d task/s\)", dist), dist[-2000:]
    emb = (logs / "measure" / "r-embeddings.err").read_text()
    assert re.search(r"r: embedding pairs: 1/1 pair in \d+ s", emb), emb[-2000:]
    etas = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert len(etas) == 10  # a line per unit: 1 prepare, 2 train, 2 evaluate, 4 measure, 1 analyse
    assert all(re.search(r"elapsed \d+ (s|min \d\d s), ETA (\d+ (s|min \d\d s)|\?)\]$", m) for m in etas), etas
