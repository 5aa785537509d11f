"""The unit model: fingerprints, stale units with reasons, exactly the right reruns, locks.

A real tiny study (a Markov corpus, 3-mers, two members of the tiny model) is run once
with the in-process executor; each test works on a copy of its folder and extends or
changes it the way a researcher would, then checks which units ran again (by their
markers' ``finished`` time and fingerprint) and that the summary reflects the change.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_STUDY
from toolkit.cli import main
from toolkit.config import AnalysisConfig, TrainingConfig, load_study
from toolkit.dispatch import run_study
from toolkit.errors import ConfigError, SubmissionError
from toolkit.units import (
    ANALYSIS_FIELDS,
    ANALYSIS_SHARED,
    TRAINING_IGNORED,
    UnitBusyError,
    get_unit,
    run_unit,
    study_units,
    to_run,
    unit_lock,
    unit_states,
)

STUDY = TINY_STUDY.replace("{name}", "units")


def write_study(folder: Path, out: Path) -> Path:
    path = folder / "study.toml"
    path.write_text(STUDY.format(out=out))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished study folder (run once for the module)."""
    import torch

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("units")
    path = write_study(base, base / "out")
    run_study(load_study(path))
    return base / "out"


@pytest.fixture
def study_copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished study (the study file points at the copy)."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    # study.json names its output folder: point the copy at itself.
    doc = json.loads((out / "study.json").read_text())
    doc["study"]["output_dir"] = str(out)
    (out / "study.json").write_text(json.dumps(doc))
    return write_study(tmp_path, out)


def markers(study: Any) -> dict[str, tuple[str, str]]:
    """unit id -> (finished time, fingerprint) of every marker present."""
    out = {}
    for u in study_units(study):
        if u.marker.exists():
            doc = json.loads(u.marker.read_text())
            out[u.id] = (doc.get("finished", ""), doc.get("fingerprint", ""))
    return out


def rerun(path: Path, *sets: str, force: tuple[str, ...] = ()) -> tuple[Any, set[str]]:
    """Run the study with overrides; return it and the ids of the units that ran again."""
    study = load_study(path, list(sets))
    before = markers(study)
    time.sleep(1.1)  # marker times have one-second resolution
    run_study(study, force=force)
    after = markers(study)
    return study, {k for k, v in after.items() if before.get(k) != v}


def states(study: Any) -> dict[str, tuple[str, str]]:
    return {st.unit.id: (st.state, st.reason) for st in unit_states(study).values()}


def summary(study: Any) -> Any:
    import xarray as xr

    return xr.open_zarr(study.root / "summary.zarr", zarr_format=3, consolidated=True)


MEASURE_R = {f"measure:r/{f}" for f in ("distributions", "embeddings", "fisher", "training")}
"""The measure units (analysis shards) of run r."""


# --------------------------------------------------------------------------- fingerprint coverage


def test_every_setting_is_in_a_fingerprint_or_declared_ignored() -> None:
    analysis = {f.name for f in dataclasses.fields(AnalysisConfig)}
    named = [f for fields in ANALYSIS_FIELDS.values() for f in fields]
    assert set(named) == analysis, "classify every analysis setting by the stage that reads it"
    assert len(named) == len(set(named)), "a setting read by two stages goes in ANALYSIS_SHARED"
    assert set(ANALYSIS_SHARED) <= analysis
    assert set(TRAINING_IGNORED) <= {f.name for f in dataclasses.fields(TrainingConfig)}


# --------------------------------------------------------------------------- reruns


def test_finished_study_is_done_and_a_second_run_does_nothing(study_copy: Path) -> None:
    study, ran = rerun(study_copy)
    assert ran == set()
    assert {s for s, _ in states(study).values()} == {"done"}
    assert to_run(study) == {"prepare": [], "train": [], "evaluate": [], "measure": [], "analyse": []}


def test_analysis_setting_reruns_analyse_only(study_copy: Path) -> None:
    study = load_study(study_copy, ["analysis.bootstrap=25"])
    st = states(study)
    # bootstrap is read by the distribution and embedding shards (their intervals) and the summary
    shards = {"measure:r/distributions", "measure:r/embeddings"}
    assert all(st[k] == ("stale", "analysis.bootstrap changed") for k in shards)
    assert st["analyse:summary"] == ("stale", "waits for measure r/distributions (stale: "
                                     "analysis.bootstrap changed)")
    assert all(s == "done" for k, (s, _) in st.items() if k not in shards | {"analyse:summary"})
    study, ran = rerun(study_copy, "analysis.bootstrap=25")
    assert ran == shards | {"analyse:summary"}
    assert int(summary(study).attrs["bootstrap"]) == 25


def test_added_seed_trains_and_evaluates_only_the_new_member(study_copy: Path) -> None:
    study = load_study(study_copy, ["study.seeds=[1,2,3]"])
    st = states(study)
    assert st["train:r/seed3"][0] == "pending" and st["evaluate:r/seed3"][0] == "pending"
    assert st["analyse:summary"][0] == "stale" and "members added: r/seed3" in st["analyse:summary"][1]
    study, ran = rerun(study_copy, "study.seeds=[1,2,3]")
    assert ran == {"train:r/seed3", "evaluate:r/seed3", "analyse:summary", *MEASURE_R}
    assert summary(study)["n_members"].values.tolist() == [3]


def test_added_run_prepares_and_trains_only_the_new_run(study_copy: Path) -> None:
    text = study_copy.read_text() + '\n[runs.r2]\ncorpus = "markov"\ntokenizer = "kmer2"\n'
    study_copy.write_text(text)
    study, ran = rerun(study_copy)
    assert ran == {"prepare:markov--kmer2", "train:r2/seed1", "train:r2/seed2",
                   "evaluate:r2/seed1", "evaluate:r2/seed2", "analyse:summary",
                   *(k.replace("r/", "r2/") for k in MEASURE_R)}
    assert summary(study)["run"].values.tolist() == ["r", "r2"]


def test_changed_entropy_setting_reprepares_but_keeps_identical_tokens_downstream(study_copy: Path) -> None:
    """A prepare unit rerun with the same token data leaves training and evaluation done."""
    study = load_study(study_copy, ["analysis.entropy_orders=2"])
    assert states(study)["prepare:markov--kmer3"] == ("stale", "analysis.entropy_orders changed")
    assert states(study)["train:r/seed1"] == ("stale", "waits for prepare markov--kmer3 (stale)")
    study, ran = rerun(study_copy, "analysis.entropy_orders=2")
    assert ran == {"prepare:markov--kmer3", "analyse:summary"}


def test_changed_training_setting_refuses_to_resume_other_checkpoints(study_copy: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    study = load_study(study_copy, ["training.lr=0.0003"])
    assert states(study)["train:r/seed1"] == ("stale", "training.lr changed")
    rc = main(["run", str(study_copy), "--set", "training.lr=0.0003"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "training.lr changed" in err[0]
    assert "--force train:r/seed1" in err[0] and "Traceback" not in err[0]
    # With --force the members start over; their outputs change, so everything after reruns.
    study, ran = rerun(study_copy, "training.lr=0.0003", force=("train",))
    assert ran == {u.id for u in study_units(study) if u.stage != "prepare"}


def test_changed_corpus_setting_invalidates_downstream(study_copy: Path) -> None:
    study = load_study(study_copy, ["corpora.markov.eval_records=12"])
    st = states(study)
    assert st["prepare:markov--kmer3"] == ("stale", "corpora.markov.eval_records changed")
    assert all(s == "stale" for s, _ in st.values())


def test_force_one_unit_with_identical_output_leaves_the_rest_done(study_copy: Path) -> None:
    """Evaluation is deterministic: redoing it writes the same stores, analyse stays done."""
    study, ran = rerun(study_copy, force=("evaluate:r/seed1",))
    assert ran == {"evaluate:r/seed1"}
    assert {s for s, _ in states(study).values()} == {"done"}


def test_deleted_output_and_old_marker_read_as_stale(study_copy: Path) -> None:
    study = load_study(study_copy)
    shutil.rmtree(study.root / "members" / "r" / "seed2" / "fisher.zarr")
    marker = get_unit(study, "train", "r/seed1").marker
    doc = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in doc.items() if k != "marker_format"}))
    st = states(study)
    assert st["evaluate:r/seed2"] == ("stale", "output fisher.zarr is missing")
    assert st["train:r/seed1"][0] == "stale" and "another toolkit version" in st["train:r/seed1"][1]
    assert st["evaluate:r/seed1"] == ("stale", "waits for train r/seed1 (stale)")


def test_changed_source_file_is_named(tmp_path: Path) -> None:
    """A file corpus: editing the file makes prepare stale, naming the file; touching it does not."""
    data = tmp_path / "data"
    data.mkdir()
    fasta = data / "g.fa"
    import numpy as np

    rng = np.random.default_rng(0)
    fasta.write_text("".join(f">r{i}\n{''.join(rng.choice(list('ACGT'), 1200))}\n" for i in range(12)))
    path = tmp_path / "s.toml"
    path.write_text(f"""[study]\nname = "src"\nseeds = [1]\noutput_dir = "{tmp_path / 'out'}"\n
[corpora.g]\nsource = "data"\ntrain_records = 8\neval_records = 4\n
[runs.r]\ncorpus = "g"\ntokenizer = "kmer3"\n""")
    study = load_study(path)
    run_unit(study, "prepare", "g--kmer3")
    assert states(study)["prepare:g--kmer3"][0] == "done"
    fasta.touch()  # same content, new time: still done (the checksum decides)
    assert states(study)["prepare:g--kmer3"][0] == "done"
    fasta.write_text(fasta.read_text().replace("A", "C", 5))
    assert states(study)["prepare:g--kmer3"] == ("stale", "source file(s) g.fa changed")


# --------------------------------------------------------------------------- refusals and locks


def test_unit_whose_upstream_is_not_done_is_refused(study_copy: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["evaluate", str(study_copy), "--set", "study.seeds=[1,2,3]", "--member", "r/seed3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == ("toolkit: error: evaluate r/seed3: needs train r/seed3, which is pending (not run); "
                      "run `toolkit run STUDY` to run every unit in order")
    study = load_study(study_copy, ["study.seeds=[1,2,3]"])
    with pytest.raises(SubmissionError):
        run_unit(study, "evaluate", "r/seed3")


def test_a_locked_unit_is_not_run_twice(study_copy: Path, capsys: pytest.CaptureFixture) -> None:
    study = load_study(study_copy)
    unit = get_unit(study, "analyse", "summary")
    with unit_lock(unit):
        with pytest.raises(UnitBusyError, match=r"being run by pid \d+ on "):
            run_unit(study, "analyse", "summary", force=True)
        rc = main(["analyse", str(study_copy), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "being run by pid" in err[0]
    # Released: the unit runs.
    run_unit(study, "analyse", "summary", force=True)


def test_lock_from_another_process_blocks(study_copy: Path) -> None:
    """flock is per open file: a second process is refused while the first holds the lock."""
    import subprocess
    import sys

    study = load_study(study_copy)
    unit = get_unit(study, "train", "r/seed1")
    code = ("import sys, time; from toolkit.config import load_study; from toolkit.units import get_unit, unit_lock\n"
            f"u = get_unit(load_study({str(study_copy)!r}), 'train', 'r/seed1')\n"
            "with unit_lock(u):\n    print('locked', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(UnitBusyError, match=f"pid {proc.pid} on"):
            run_unit(study, "train", "r/seed1", force=True)
    finally:
        proc.kill()
        proc.wait()
    assert unit.marker.exists()  # the refused run touched nothing


def test_force_names_are_checked(study_copy: Path) -> None:
    study = load_study(study_copy)
    with pytest.raises(ConfigError, match="unknown stage 'training'"):
        run_study(study, force=("training",))
    with pytest.raises(ConfigError, match="no unit train 'r/seed9'.*r/seed1, r/seed2"):
        run_study(study, force=("train:r/seed9",))


# --------------------------------------------------------------------------- status


def test_status_reads_the_study_folder_and_notes_a_changed_file(study_copy: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    out = study_copy.parent / "out"
    # The study was last run with an override; status of the folder needs no --set.
    study, _ = rerun(study_copy, "analysis.bootstrap=25")
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "10 units: 10 done, 0 stale" in text
    # The study file without the override: shown as last run, with a note on the difference.
    assert main(["status", str(study_copy)]) == 0
    text = capsys.readouterr().out
    assert "10 done" in text and "differs in analysis.bootstrap" in text
    # With --set the study as given: what a run of it would redo.
    assert main(["status", str(study_copy), "--set", "analysis.bootstrap=10"]) == 0
    text = capsys.readouterr().out
    assert "measure   r/embeddings     stale         analysis.bootstrap changed" in text
    assert main(["status", str(study_copy.parent)]) == 2
    assert "without study.json" in capsys.readouterr().err


def test_report_refuses_a_stale_summary(study_copy: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["report", str(study_copy), "--set", "analysis.bootstrap=30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "the summary is stale (waits for measure r/distributions (stale: analysis.bootstrap changed))" in err[0]


def test_open_results_refuses_a_stale_summary_and_leaves_out_stale_members(study_copy: Path) -> None:
    from toolkit import open_results
    from toolkit.errors import StoreError

    out = study_copy.parent / "out"
    assert open_results(out).attrs["members"] == ["r/seed1", "r/seed2"]
    shutil.rmtree(out / "members" / "r" / "seed2" / "fisher.zarr")
    with pytest.raises(StoreError, match=r"summary is stale: waits for measure r/distributions \(stale: "
                                         r"waits for evaluate r/seed2 \(stale\)\)"):
        open_results(out)
    tree = open_results(out, allow_stale=True)
    assert tree.attrs["summary_stale"].startswith("stale: waits for measure r/distributions")
    assert tree.attrs["members"] == ["r/seed1"]


def test_removed_source_keeps_prepared_tokens_valid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Raw data purged after preparing: the token store stays done (it cannot be rebuilt)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "g.fa").write_text(">r\n" + "ACGTTGCA" * 600 + "\n>s\n" + "TTGACCA" * 700 + "\n")
    path = tmp_path / "s.toml"
    path.write_text(f"""[study]\nname = "gone"\nseeds = [1]\noutput_dir = "{tmp_path / 'out'}"\n
[corpora.g]\nsource = "data"\ntrain_records = 3\neval_records = 1\n
[runs.r]\ncorpus = "g"\ntokenizer = "kmer3"\n""")
    study = load_study(path)
    run_unit(study, "prepare", "g--kmer3")
    shutil.rmtree(data)
    assert states(study)["prepare:g--kmer3"][0] == "done"
    assert "could not be rebuilt" in caplog.text


def test_external_checkpoint_files_are_part_of_the_train_fingerprint(study_copy: Path) -> None:
    """A member adopted from a checkpoint folder is stale once that folder's files change."""
    out = study_copy.parent / "out"
    ext = study_copy.parent / "external"
    shutil.copytree(out / "members" / "r" / "seed1" / "checkpoints" / "final", ext)
    text = study_copy.read_text().replace("seeds = [1, 2]", "seeds = [1]")
    study_copy.write_text(text + f'\n[runs.x]\ncorpus = "markov"\ntokenizer = "kmer3"\ncheckpoints = ["{ext}"]\n')
    study = load_study(study_copy)
    run_unit(study, "train", "x/seed1")
    assert states(study)["train:x/seed1"][0] == "done"
    (ext / "config.json").write_text((ext / "config.json").read_text() + " ")
    assert states(study)["train:x/seed1"] == ("stale", "source file(s) config.json changed")


def test_an_unopenable_lock_file_is_one_line(study_copy: Path, capsys: pytest.CaptureFixture) -> None:
    study = load_study(study_copy)
    unit = get_unit(study, "analyse", "summary")
    unit.lock.unlink(missing_ok=True)
    unit.lock.mkdir()  # something that is not a file where the lock file goes
    rc = main(["analyse", str(study_copy), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot open the unit's lock file" in err[0]
