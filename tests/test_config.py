from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.cli import main
from toolkit.config import load_study
from toolkit.errors import ConfigError
from toolkit.study import Member, members

from .conftest import REPO

MINIMAL = """
[study]
name = "mini"
seeds = [1, 2]
[corpora.c]
source = "reads.fa"
[runs.r]
corpus = "c"
tokenizer = "kmer6"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "study.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["demo.toml", "paper.toml", "entropy-sweep.toml"])
def test_shipped_studies_validate(name: str) -> None:
    study = load_study(REPO / "jobs" / name)
    assert study.name
    assert len(members(study)) == len(study.runs) * len(study.seeds)


def test_defaults_are_the_papers(tmp_path: Path) -> None:
    s = load_study(write(tmp_path, MINIMAL))
    assert s.training.lr == 1e-4 and s.training.grad_clip == 0.5 and s.training.weight_decay == 0
    assert s.training.warmup_ratio == 0.1 and s.training.mlm_probability == 0.15
    assert s.analysis.distribution_mask_rate == 0.10 and s.analysis.fisher_mask_rate == 0.15
    assert s.analysis.topk == (1, 3, 5, 10, 20, 50, 100, 1000, 4000)
    assert s.corpora["c"].train_records == 2_000_000 and s.corpora["c"].eval_records == 10_000


def test_members_are_generated_from_runs_and_seeds(tmp_path: Path) -> None:
    s = load_study(write(tmp_path, MINIMAL))
    assert [m.id for m in members(s)] == ["r/seed1", "r/seed2"]
    assert Member.parse("r/seed2", s) == Member("r", 2)
    with pytest.raises(ConfigError, match="not in study"):
        Member.parse("r/seed9", s)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[training]\nstepz = 3\n", r"unknown key 'training.stepz'; allowed keys here: .*steps"),
        ("[training]\nsteps = 'many'\n", r"'training.steps' = 'many' is not valid; expected an integer"),
        ("[training]\nprecision = 'fp8'\n", r"expected one of 'fp32', 'bf16'"),
        ("[training]\nsteps = 3\nepochs = 1\n", r"at most one of steps, tokens, epochs"),
        ("[bogus]\nx = 1\n", r"unknown table \[bogus\]"),
        ("[runs.r2]\ncorpus = 'nope'\ntokenizer = 'kmer6'\n", r"runs.r2.corpus: 'nope' is not one"),
        ("[runs.r3]\ncorpus = 'c'\ntokenizer = 'bpe4'\n", r"not larger than the 5 special tokens"),
        ("[runs.r4]\ncorpus = 'c'\ntokenizer = 'wordpiece'\n", r"'wordpiece' is not valid"),
        ("[dispatch.resources.trian]\ntime_minutes = 3\n", r"unknown stage"),
    ],
)
def test_bad_study_files_name_file_key_and_allowed_values(tmp_path: Path, extra: str, message: str) -> None:
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError, match=message) as info:
        load_study(path)
    assert str(path) in str(info.value)


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    s = load_study(path, ["training.steps=7", "study.seeds=[3]", "runs.r.model.shape=no-transformer"])
    assert s.training.steps == 7 and s.seeds == (3,) and s.runs["r"].model.shape == "no-transformer"
    with pytest.raises(ConfigError):
        load_study(path, ["training.steps=-1"])


def test_study_model_table_is_the_default_for_runs(tmp_path: Path) -> None:
    text = MINIMAL + "[model]\nshape = '4M'\nhidden_size = 96\n[runs.r.model]\nhidden_size = 64\n"
    s = load_study(write(tmp_path, text))
    assert s.runs["r"].model.shape == "4M" and s.runs["r"].model.hidden_size == 64


def test_cli_prints_one_line_and_exits_2_on_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL + "[training]\nstepz = 3\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'training.stepz'" in err and "Traceback" not in err
    assert main(["validate", str(tmp_path / "missing.toml")]) == 2
    assert "study file not found" in capsys.readouterr().err


def test_study_round_trips_through_json(tmp_path: Path) -> None:
    import json

    from toolkit.config import study_to_dict

    s = load_study(REPO / "jobs" / "demo.toml", ["training.steps=7"])
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study_to_dict(s)))
    back = load_study(path)
    assert back.training == s.training and back.corpora == s.corpora and back.runs == s.runs
    assert back.root == s.root and back.seeds == s.seeds


def test_saved_study_keeps_the_order_of_runs(tmp_path: Path) -> None:
    """study.json is what every job reads; the run order is the order of tables and figures."""
    from toolkit.config import study_to_dict
    from toolkit.study import write_json_atomic

    s = load_study(REPO / "jobs" / "demo.toml")
    write_json_atomic(tmp_path / "study.json", study_to_dict(s))
    back = load_study(tmp_path / "study.json")
    assert list(back.runs) == list(s.runs) == ["text-bpe", "dna-bpe", "dna-6mer", "dna-6mer-shuffled", "markov-6mer"]
    assert list(back.corpora) == list(s.corpora)
