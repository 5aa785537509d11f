"""The shipped studies (``jobs/*.toml``) as tests.

- Every study file validates, and its header comment gives a command that really
  parses (a Makefile target or a ``toolkit`` subcommand with valid overrides), an
  expected run time and the expected result.
- The entropy sweep spans near-zero to log2(4) bits per base plus a shuffled control,
  and a two-level cut of it runs on one machine with the analytic rates in its summary.
- The paper study is dry-run exactly as a user would queue it, ``make submit
  STUDY=jobs/paper.toml SET="..."``, against the real single-node SLURM cluster of
  ``tests/slurm_cluster.py`` (fake GPUs), through the stand-in ``apptainer`` of
  ``tests/apptainer_bwrap.py``, with a tiny budget.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from toolkit.config import load_study, study_from_dict, study_to_dict

JOBS = REPO / "jobs"
STUDY_FILES = sorted(JOBS.glob("*.toml"))
TOOLKIT = [sys.executable, "-m", "toolkit"]


def header(path: Path) -> list[str]:
    """The comment lines before the first TOML line, without the leading '#'."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def header_commands(path: Path) -> list[list[str]]:
    """The shell commands of a header (lines starting with ``make`` or ``toolkit``)."""
    commands = []
    for line in header(path):
        if not re.match(r"(make|toolkit)\s", line):
            continue
        # A command ends where its trailing remark starts: '  # ...' or '  (...)'.
        command = re.split(r"\s{2,}[#(]", line, maxsplit=1)[0]
        commands.append(shlex.split(command))
    return commands


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", text, re.M)
    assert phony, "the Makefile declares no .PHONY targets"
    return set(phony.group(1).split())


def check_command(argv: list[str], path: Path) -> str:
    """Check one header command really works as written; returns the study file it names."""
    from toolkit.cli import build_parser

    if argv[0] == "make":
        variables = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
        targets = [a for a in argv[1:] if "=" not in a]
        assert targets and set(targets) <= make_targets(), (path.name, argv)
        study = variables.get("STUDY") or ("jobs/demo.toml" if targets == ["demo"] else "jobs/paper.toml")
        words = shlex.split(variables.get("SET", ""))
        overrides = [w for i, w in enumerate(words) if i and words[i - 1] == "--set"]
        assert len(overrides) == words.count("--set"), (path.name, argv)
    else:
        args = build_parser().parse_args(argv[1:])  # SystemExit (a failure) if it does not parse
        study, overrides = args.study, args.set or []
    load_study(REPO / study, overrides)  # the overrides must keep the study valid
    return study


# --------------------------------------------------------------------------- fast


def test_there_are_three_shipped_studies() -> None:
    assert {p.name for p in STUDY_FILES} >= {"demo.toml", "paper.toml", "entropy-sweep.toml"}


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_study_validates_and_its_header_says_how_long_and_what(path: Path) -> None:
    study = load_study(path)
    assert study.name == path.stem
    assert study.runs and study.description
    for name, run in study.runs.items():
        assert run.corpus in study.corpora, name
    # The header must tell a user how to run it, how long it takes and what to expect;
    # every command it shows must parse and keep the study valid.
    text = "\n".join(header(path))
    assert re.search(r"Expected run time: .*\d.*(minute|hour|GPU-hour)", text, re.S), path.name
    assert re.search(r"Expected result\b.*:", text), path.name
    commands = header_commands(path)
    assert commands, f"{path.name}: no command in the header comment"
    named = [check_command(argv, path) for argv in commands]
    assert f"jobs/{path.name}" in named, (path.name, named)


def test_paper_study_matches_the_paper_setting() -> None:
    """The paper's three ensembles of five BERT-base members, 5 epochs, on SLURM with GPUs."""
    study = load_study(JOBS / "paper.toml")
    assert study.seeds == (1, 2, 3, 4, 5)
    assert {(r.corpus, r.tokenizer) for r in study.runs.values()} == {
        ("wikipedia", "bpe4096"), ("plants", "bpe4096"), ("plants", "kmer6")}
    assert study.model.shape == "bert-base"
    t = study.training
    # No explicit budget means the paper's 5 epochs (toolkit.train), so that
    # `--set training.steps=N` can replace it.
    assert (t.steps, t.tokens, t.epochs) == (None, None, None)
    assert (t.batch_size, t.seq_len, t.lr, t.precision) == (64, 512, 1e-4, "fp32")
    assert study.dispatch.executor == "slurm"
    assert study.dispatch.resources["train"].gpus_per_node == 1
    small = load_study(JOBS / "paper.toml", ["training.steps=3"])
    assert small.training.steps == 3


def test_entropy_sweep_spans_zero_to_two_bits_with_a_shuffled_control() -> None:
    study = load_study(JOBS / "entropy-sweep.toml")
    used = {run.corpus for run in study.runs.values()}
    levels = sorted(c.synthetic.entropy_rate for name, c in study.corpora.items()
                    if c.source == "synthetic:markov" and name in used)
    assert len(levels) >= 6
    assert levels[0] <= 0.25 and math.isclose(levels[-1], math.log2(4))
    assert len(set(levels)) == len(levels)
    assert all(c.synthetic.alphabet == "ACGT" for c in study.corpora.values()
               if c.source == "synthetic:markov")
    shuffled = [name for name in used if study.corpora[name].source.startswith("shuffle:")]
    assert shuffled, "no run trains on a shuffled control"
    target = study.corpora[study.corpora[shuffled[0]].source.split(":", 1)[1]]
    assert target.source.startswith("builtin:") and "synthetic" not in target.source
    # Same model and budget for every level: no run overrides them.
    assert all(run.model == study.model for run in study.runs.values())
    assert len({run.tokenizer for run in study.runs.values()}) == 1


def entropy_rate_reference(p: np.ndarray) -> float:
    """Entropy rate (bits/symbol) of an order-k chain, dense float64, no toolkit code.

    ``p`` is (a**k, a): row c is P(next | context c), the context being the last k
    symbols as a base-a number (oldest most significant); the stationary law solves
    pi (T - I) = 0 with sum(pi) = 1 by least squares over the full context matrix T.
    """
    n, a = p.shape
    t = np.zeros((n, n))  # (n, n) context -> next context
    for c in range(n):
        for x in range(a):
            t[c, (c * a + x) % n] += p[c, x]
    lhs = np.vstack([(t - np.eye(n)).T, np.ones((1, n))])  # (n + 1, n)
    rhs = np.append(np.zeros(n), 1.0)
    pi = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    assert np.allclose(pi @ t, pi, atol=1e-10) and np.all(pi > -1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)  # (n,)
    return float(pi @ h)


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_synthetic_levels_are_exact(path: Path) -> None:
    """Each shipped Markov source really has the entropy rate its study asks for."""
    from toolkit.corpora import markov_transitions

    study = load_study(path)
    for name, corpus in study.corpora.items():
        if corpus.source != "synthetic:markov":
            continue
        p, _, rate = markov_transitions(corpus.synthetic)
        assert np.allclose(p.sum(axis=1), 1.0)
        target = corpus.synthetic.entropy_rate
        assert abs(rate - target) < 1e-9, (name, rate, target)
        assert abs(entropy_rate_reference(p) - target) < 1e-6, name


# --------------------------------------------------------------------------- the sweep, one machine


def small_sweep(out: Path) -> dict:
    """The shipped sweep cut to its lowest and highest levels, with a tiny budget."""
    study = load_study(JOBS / "entropy-sweep.toml")
    doc = study_to_dict(study)
    by_rate = {c["synthetic"]["entropy_rate"]: name for name, c in doc["corpora"].items()
               if c["source"] == "synthetic:markov"}
    keep = [by_rate[min(by_rate)], by_rate[max(by_rate)]]
    doc["corpora"] = {name: doc["corpora"][name] for name in keep}
    for name in keep:
        doc["corpora"][name].update(train_records=24, eval_records=8)
        doc["corpora"][name]["synthetic"].update(records=32, length=300)
    doc["runs"] = {r: run for r, run in doc["runs"].items() if run["corpus"] in keep}
    assert len(doc["runs"]) == 2
    doc["study"].update(seeds=[1, 2], output_dir=str(out))
    doc["training"].update(steps=5, batch_size=4, seq_len=64, checkpoint_every_steps=5,
                           eval_every_steps=5, eval_batches=1, log_every_steps=1, fisher_flow=[0.5])
    doc["analysis"].update(eval_records=8, batch_size=8, fisher_records=4, contextual_records=4,
                           bootstrap=10, topk=[1, 3, 5], top_p=[0.5, 1.0])
    doc["dispatch"].update(executor="local", max_parallel=2)
    study_from_dict(doc, where="small sweep")  # still a valid study
    return doc


@pytest.mark.slow
def test_entropy_sweep_runs_on_one_machine(tmp_path: Path) -> None:
    """`toolkit run` of the sweep's two end levels; the summary carries their analytic rates.

    The debug executor (every unit in one process) takes about 15 s here; the local
    executor, one process per unit, about 75 s on a loaded 2-core machine (it is
    tested in test_dispatch.py).
    """
    from toolkit import open_results

    doc = small_sweep(tmp_path / "out")
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(doc))
    res = subprocess.run([*TOOLKIT, "run", str(path), "--executor", "debug"], cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    status = subprocess.run([*TOOLKIT, "status", str(tmp_path / "out" / "study.json")],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    # 2 prepare (one per level), 4 train, 4 evaluate, 8 measure (2 runs x 4 families), 1 analyse.
    assert "19 units: 19 done, 0 stale, 0 running, 0 pending, 0 failed" in status.stdout, status.stdout
    summary = open_results(tmp_path / "out")["summary"].to_dataset()
    rates = dict(zip(summary["run"].values.tolist(),
                     summary["analytic_entropy_rate_bits_per_symbol"].values.tolist(), strict=True))
    assert set(rates) == set(doc["runs"])
    for run, rate in rates.items():
        corpus = doc["runs"][run]["corpus"]
        assert math.isclose(rate, doc["corpora"][corpus]["synthetic"]["entropy_rate"], rel_tol=1e-6)
    # The two ends of the shipped sweep: near 0 and log2(4) bits per base.
    assert min(rates.values()) < 0.5 and math.isclose(max(rates.values()), 2.0)


# --------------------------------------------------------------------------- the paper study on SLURM


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real single-node SLURM cluster for this module (tests/slurm_cluster.py).

    Its own instance (stopped when the module ends); ``SLURM_CONF`` is passed to the
    subprocesses explicitly, so the session cluster of test_dispatch.py is untouched.
    """
    from tests.slurm_cluster import SlurmCluster

    if os.geteuid() != 0 and not all(map(shutil.which, ("slurmctld", "slurmd"))):
        pytest.skip("SLURM daemons are not installed and this user cannot install them")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-studies")).start()
    yield cluster
    cluster.stop()


def paper_overrides(sif: Path) -> list[str]:
    """``--set`` values that shrink jobs/paper.toml to a tiny budget for the test cluster."""
    small = "{ time_minutes = 10, cpus_per_task = 1, mem_gb = 1 }"
    gpu = "{ partition = \"gpu\", time_minutes = 10, cpus_per_task = 1, mem_gb = 1, gpus_per_node = 1 }"
    return [
        'corpora.wikipedia.source="builtin:wikipedia-vital"', 'corpora.wikipedia.format="auto"',
        "corpora.wikipedia.max_records=40", "corpora.wikipedia.train_records=32",
        "corpora.wikipedia.eval_records=8",
        'corpora.plants.source="builtin:arabidopsis-thaliana-chr1"',
        "corpora.plants.dna={ piece_min = 200, piece_max = 400 }",
        "corpora.plants.max_records=40", "corpora.plants.train_records=32",
        "corpora.plants.eval_records=8",
        "study.seeds=[1, 2]",
        "model.num_hidden_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
        "model.intermediate_size=64",
        'model.shape="tiny"', "training.steps=3", "training.batch_size=4", "training.seq_len=64",
        "training.checkpoint_every_steps=3", "training.eval_every_steps=3", "training.eval_batches=1",
        "training.log_every_steps=1", "training.fisher_flow=[0.5]",
        "analysis.eval_records=8", "analysis.batch_size=8", "analysis.fisher_records=4",
        "analysis.contextual_records=4", "analysis.bootstrap=10", "analysis.topk=[1, 3, 5]",
        "analysis.top_p=[0.5, 1.0]",
        f'dispatch.container.image="{sif}"',
        f"dispatch.resources.prepare={small}", f"dispatch.resources.analyse={small}",
        f"dispatch.resources.measure={small}",
        f"dispatch.resources.train={gpu}", f"dispatch.resources.evaluate={gpu}",
    ]


@pytest.mark.slurm
@pytest.mark.slow
def test_paper_study_dry_run_through_make_submit(cluster, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`make submit STUDY=jobs/paper.toml SET=...` queues the whole paper study; it completes."""
    from tests.apptainer_bwrap import write_standin
    from toolkit import open_results
    from toolkit.dispatch import status_table, wait_study
    from toolkit.dispatch.manifest import Manifest
    from toolkit.study import Layout

    sif = tmp_path / "img" / "toolkit.sif"
    sif.parent.mkdir()
    sif.write_bytes(b"SIF stand-in")
    calls = tmp_path / "apptainer-calls.jsonl"
    bin_dir = tmp_path / "bin"
    write_standin(bin_dir, calls)
    out = tmp_path / "paper"
    sets = " ".join(f"--set {shlex.quote(o)}" for o in paper_overrides(sif))
    env = {**cluster.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    t0 = time.monotonic()
    # `-o .venv/.installed`: never reinstall the venv from a test (CI's `make test` just did).
    res = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "submit",
                          "STUDY=jobs/paper.toml", f"SET={sets} --out {shlex.quote(str(out))}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert time.monotonic() - t0 < 60  # queues and returns

    study = load_study(out / "study.json")
    assert study.name == "paper" and study.training.steps == 3 and study.seeds == (1, 2)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    wait_study(study, poll_s=1.0, timeout_s=480)  # 28 jobs on the 2-core test cluster

    status = subprocess.run([*TOOLKIT, "status", str(out / "study.json")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    # 3 prepare (2 corpora x tokenizers), 6 train, 6 evaluate, 12 measure (3 runs x 4), 1 analyse.
    assert "28 units: 28 done, 0 stale, 0 running, 0 pending, 0 failed" in status.stdout, status.stdout
    assert "28 units: 28 done" in status_table(study)
    tree = open_results(out)
    summary = tree["summary"].to_dataset()
    assert sorted(summary["run"].values.tolist()) == ["dna-6mer", "dna-bpe", "text-bpe"]
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert all(run in page for run in ("dna-6mer", "dna-bpe", "text-bpe"))
    # The tiny budget reached the jobs: every member trained exactly 3 steps.
    for member in ("text-bpe/seed1", "dna-bpe/seed2", "dna-6mer/seed1"):
        done = json.loads((out / "members" / member / "train.complete.json").read_text())
        assert done["final_step"] == 3, member
    # GPU requests: one per node on the gpu partition for train and evaluate, none elsewhere.
    folders = {r.stage: Path(r.stderr).parent for r in Manifest.load(Layout(study).manifest).records}
    assert set(folders) == {"prepare", "train", "evaluate", "measure", "analyse"}
    for stage, folder in folders.items():
        scripts = sorted(folder.glob("*_submission.sh"))
        assert scripts, stage
        for script in scripts:
            text = script.read_text()
            gpu = stage in ("train", "evaluate")
            assert ("#SBATCH --gpus-per-node=1" in text) == gpu, script
            assert ("#SBATCH --partition=gpu" in text) == gpu, script
    # Every unit ran through the container runtime, GPUs (--nv) for train and evaluate.
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    stages = [c["argv"][-2] for c in seen]
    assert sorted(stages) == sorted(["prepare"] * 3 + ["train"] * 6 + ["evaluate"] * 6 + ["measure"] * 12
                                    + ["analyse"])
    assert all(c["nv"] == (c["argv"][-2] in ("train", "evaluate")) for c in seen)
