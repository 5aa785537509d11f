"""The unit model: fingerprints, stale units with reasons, exactly the right reruns, locks.

A real tiny study (a Markov corpus, 3-mers, two members of the tiny model) is run once
with the in-process executor; each test works on a copy of its folder and extends or
changes it the way a researcher would, then checks which units ran again (by their
markers' ``finished`` time and fingerprint) and that the summary reflects the change.
"""

from __future__ import annotations

import dataclasses
import json
import re
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


# --------------------------------------------------------------------------- evaluation masks (prepare)

OLD_MASKS = ("masks-17b5f8c21dff.zarr", "e38ba79d3769d2326a534037bd9e9891502a36b197c08aa824e9a12c1eb5bb10")
"""Name and array digest (:func:`masks_arrays_digest`) of the masks store that the toolkit built
in evaluate, before prepare built it, for the tiny study (measured with that code)."""
MASK_ARRAYS = ("distribution/input_ids", "distribution/attention_mask", "distribution/labels",
               "distribution/record", "distribution/position_sequence", "distribution/position_offset",
               "fisher/input_ids", "fisher/attention_mask", "fisher/labels",
               "contextual/input_ids", "contextual/attention_mask")


def masks_arrays_digest(path: Path) -> str:
    import hashlib

    import numpy as np

    from toolkit import store

    g = store.open_store(path, "masks")
    h = hashlib.sha256()
    for name in MASK_ARRAYS:
        a = np.asarray(g[name][...])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def token_files(study: Any) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file of the token store and the tokenizer: a re-tokenized
    unit rewrites them all."""
    folder = study.root / "tokens" / "markov--kmer3"
    files = [folder / "tokenizer.json", *sorted((folder / "tokens.zarr").rglob("*"))]
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in files if p.is_file()}


def prepare_outputs(study: Any) -> dict[str, str]:
    return json.loads(get_unit(study, "prepare", "markov--kmer3").marker.read_text())["outputs"]


def test_prepare_builds_the_masks_equal_to_the_earlier_evaluate_ones(study_copy: Path) -> None:
    """The prepare unit writes the masks store (one of its outputs, digest "masks"); its arrays
    are those of the masks builder called directly on the token store, and those the toolkit
    built in evaluate before."""
    from toolkit import store
    from toolkit.masks import build_masks, masks_path

    study = load_study(study_copy)
    path = masks_path(study, "r")
    assert path in get_unit(study, "prepare", "markov--kmer3").outputs
    assert set(prepare_outputs(study)) == {"tokenizer", "tokens", "profile", "masks"}
    tokens = store.open_store(study.root / "tokens" / "markov--kmer3" / "tokens.zarr", "tokens")
    direct = study_copy.parent / "direct" / path.name
    build_masks(study, "markov", "kmer3", tokens, direct)
    assert masks_arrays_digest(path) == masks_arrays_digest(direct)
    assert (path.name, masks_arrays_digest(path)) == OLD_MASKS
    assert dict(store.open_store(path, "masks").attrs) == dict(store.open_store(direct, "masks").attrs)


def test_deleted_masks_make_prepare_stale_and_evaluate_refuses(study_copy: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from toolkit.errors import StoreError
    from toolkit.evaluate import evaluate_member
    from toolkit.masks import masks_path
    from toolkit.study import Member

    study = load_study(study_copy)
    path = masks_path(study, "r")
    digest = masks_arrays_digest(path)
    shutil.rmtree(path)
    assert main(["status", str(study_copy)]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"prepare +markov--kmer3 +stale +output {path.name} is missing", text), text
    # evaluate never builds masks: directly, one line naming the store and the command...
    with pytest.raises(StoreError, match=r"no evaluation masks .*rerun `toolkit run STUDY` \(or "
                                         r"`toolkit run STUDY --force prepare:markov--kmer3`\)") as err:
        evaluate_member(study, Member("r", 1))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    # ...and as a unit, refused because its prepare unit is stale.
    rc = main(["evaluate", str(study_copy), "--member", "r/seed1", "--force"])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err_lines) == 1
    assert f"needs prepare markov--kmer3, which is stale (output {path.name} is missing)" in err_lines[0]
    assert not path.exists()
    # A run rebuilds only the masks (the token store is untouched), the same ones: nothing else reruns.
    files = token_files(study)
    with caplog.at_level(logging.INFO, logger="toolkit.prepare"):
        study, ran = rerun(study_copy)
    assert ran == {"prepare:markov--kmer3"}
    assert "building only the evaluation masks" in caplog.text
    assert token_files(study) == files and masks_arrays_digest(path) == digest
    assert {s for s, _ in states(study).values()} == {"done"}


def test_changed_mask_seed_builds_only_masks_and_reevaluates(study_copy: Path) -> None:
    """A mask setting is a prepare setting: prepare reruns without re-tokenizing, training stays
    done, evaluation (which reads the masks) reruns on the new masks."""
    from toolkit import store
    from toolkit.masks import masks_path

    before = load_study(study_copy)
    old_path, outputs, files = masks_path(before, "r"), prepare_outputs(before), token_files(before)
    study = load_study(study_copy, ["analysis.mask_seed=3"])
    st = states(study)
    assert st["prepare:markov--kmer3"] == ("stale", "analysis.mask_seed changed")
    assert st["train:r/seed1"] == ("stale", "waits for prepare markov--kmer3 (stale)")
    assert st["evaluate:r/seed1"] == ("stale", "waits for prepare markov--kmer3 (stale)")
    study, ran = rerun(study_copy, "analysis.mask_seed=3")
    assert "prepare:markov--kmer3" in ran and not any(u.startswith("train:") for u in ran)
    assert {"evaluate:r/seed1", "evaluate:r/seed2", "analyse:summary"} <= ran
    assert token_files(study) == files  # not re-tokenized
    new = prepare_outputs(study)
    assert {k: new[k] for k in ("tokenizer", "tokens", "profile")} == {
        k: outputs[k] for k in ("tokenizer", "tokens", "profile")}
    assert new["masks"] != outputs["masks"]
    path = masks_path(study, "r")
    assert path != old_path and old_path.exists()  # beside the old store, which is left alone
    assert store.open_store(path, "masks").attrs["mask_seed"] == 3
    pred = store.open_store(study.root / "members" / "r" / "seed1" / "predictions.zarr", "predictions")
    assert pred.attrs["masks"]["mask_seed"] == 3
    assert {s for s, _ in states(study).values()} == {"done"}


def test_masks_only_decision(study_copy: Path) -> None:
    """Only mask settings (or a missing masks store) make a prepare rerun masks-only."""
    from toolkit.masks import masks_path
    from toolkit.units import masks_only, unit_inputs

    def decide(*sets: str) -> bool:
        study = load_study(study_copy, list(sets))
        sts = unit_states(study)
        st = sts[("prepare", "markov--kmer3")]
        return masks_only(st.unit, st, unit_inputs(study, st.unit, sts, (st.marker or {}).get("inputs")))

    assert not decide()  # done: nothing to rerun
    assert decide("analysis.mask_seed=3")
    assert decide("analysis.fisher_records=4", "analysis.distribution_mask_rate=0.2")
    assert decide("training.seq_len=32")  # the evaluation length follows it (analysis.seq_len unset)
    assert not decide("analysis.entropy_orders=2")
    assert not decide("analysis.mask_seed=3", "analysis.entropy_orders=2")
    assert not decide("corpora.markov.eval_records=12")
    study = load_study(study_copy)
    shutil.rmtree(masks_path(study, "r"))
    assert decide()
    shutil.rmtree(study.root / "tokens" / "markov--kmer3" / "tokens.zarr")
    assert not decide()  # the token store itself is missing: everything is rebuilt


def test_forced_prepare_re_tokenizes_and_a_locked_prepare_writes_nothing(study_copy: Path) -> None:
    """--force prepare redoes the whole unit; a second process is kept out by its lock (the
    masks are written only under it), and writes no masks store."""
    from toolkit.masks import masks_path

    study = load_study(study_copy, ["analysis.mask_seed=5"])
    unit = get_unit(study, "prepare", "markov--kmer3")
    with unit_lock(unit), pytest.raises(UnitBusyError):
        run_unit(study, "prepare", "markov--kmer3")
    assert not masks_path(study, "r").exists()
    files = token_files(study)
    run_unit(study, "prepare", "markov--kmer3", force=True)
    assert masks_path(study, "r").exists()
    after = token_files(study)
    assert set(after) == set(files) and all(after[k] != files[k] for k in files)  # all rewritten
    assert states(study)["train:r/seed1"] == ("done", "")  # the same tokens: training stays done


def test_study_from_before_masks_moved_to_prepare(study_copy: Path) -> None:
    """Markers written when evaluate built the masks: prepare reruns masks-only (its store is
    kept: same name, same content), training stays done, evaluation reruns."""
    from toolkit.units import MASK_FIELDS

    study = load_study(study_copy)
    keys = {f"analysis.{f}" for f in MASK_FIELDS}
    for u in study_units(study):
        doc = json.loads(u.marker.read_text())
        settings = doc["inputs"]["settings"]
        if u.stage == "prepare":
            doc["inputs"]["settings"] = {k: v for k, v in settings.items() if k not in keys}
            doc["outputs"].pop("masks")
        elif u.stage == "evaluate":
            prep = {k: v for k, v in unit_settings_of(study, "prepare:markov--kmer3").items() if k in keys}
            settings.update(prep)
        for up in (doc["inputs"].get("upstream") or {}).values():
            up.pop("masks", None)
        if u.stage in ("prepare", "evaluate", "measure"):
            from toolkit.units import fingerprint

            doc["fingerprint"] = fingerprint(doc["inputs"])
        u.marker.write_text(json.dumps(doc))
    st = states(study)
    assert st["prepare:markov--kmer3"] == ("stale", "now also reads analysis.contextual_records, "
                                           "analysis.distribution_mask_rate, analysis.eval_records, "
                                           "analysis.fisher_mask_rate and 3 more")
    assert st["train:r/seed1"] == ("stale", "waits for prepare markov--kmer3 (stale)")
    files = token_files(study)
    study, ran = rerun(study_copy)
    assert "prepare:markov--kmer3" in ran and {"evaluate:r/seed1", "evaluate:r/seed2"} <= ran
    assert not any(u.startswith("train:") for u in ran)
    assert token_files(study) == files
    assert {s for s, _ in states(study).values()} == {"done"}


def unit_settings_of(study: Any, unit_id: str) -> dict[str, Any]:
    from toolkit.units import unit_settings

    stage, _, key = unit_id.partition(":")
    return unit_settings(study, get_unit(study, stage, key))
