"""Containers: the Apptainer definition, bind checks, exact command lines, quoting.

Apptainer cannot be installed on this machine (it is neither in Debian 12 nor on
PyPI), so the image itself is not built here. What is tested instead: the definition
file parses and its pieces are checked (sections, labels, %files sources, %post
syntax, the %environment it sets, and, where bubblewrap cannot run, its %test smoke check
on the host with the project's venv); command lines are compared with golden files in
``tests/golden/``;
quoting survives paths with spaces and quotes; and the wrapped command runs end to end
through a STAND-IN runtime: a small executable named ``apptainer`` put first on PATH
(``write_standin`` in ``tests/apptainer_bwrap.py``, which reads the command line with the
bubblewrap runtime's parser), which checks its arguments (``exec [--nv] --containall
--cleanenv --bind ... --env ... SIF python ...``, bind sources exist, every path of the
command is inside a bind) and then runs the command with a clean environment on the host. The same stand-in runs a real
study through real SLURM in ``tests/test_dispatch.py``. The stand-in does not hide the
host's files; ``tests/test_container_isolated.py`` runs the same commands isolated
(bubblewrap, an image with the installed wheel).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import submitit.slurm.slurm as submitit_slurm

from tests import apptainer_bwrap
from tests.apptainer_bwrap import def_sections, write_standin
from tests.conftest import REPO
from toolkit.config import study_from_dict
from toolkit.dispatch.container import bind_paths, check_container, shell_line, unit_argv
from toolkit.dispatch.pins import constraints_text
from toolkit.dispatch.slurm import slurm_parameters
from toolkit.errors import SubmissionError

DEF = REPO / "containers" / "toolkit.def"
GOLDEN = REPO / "tests" / "golden"
UPDATE = os.environ.get("TOOLKIT_UPDATE_GOLDEN") == "1"

def container_study(root: Path, **container: object):
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "genome.fa").write_text(">chr1\nACGTACGTAC\n")
    (root / "img").mkdir(exist_ok=True)
    (root / "img" / "toolkit.sif").write_bytes(b"SIF stand-in")
    doc = {
        "study": {"name": "ctr", "seeds": [1], "output_dir": str(root / "out")},
        "corpora": {"dna": {"source": str(root / "data" / "genome.fa")},
                    "syn": {"source": "synthetic:markov"}},
        "runs": {"r": {"corpus": "dna", "tokenizer": "kmer3"}},
        "dispatch": {"container": {"runtime": "apptainer", "image": str(root / "img" / "toolkit.sif"),
                                   "scratch": str(root / "scratch"), **container},
                     "resources": {"train": {"gpus_per_node": 1}}},
    }
    (root / "out").mkdir(exist_ok=True)
    return study_from_dict(doc, where="test")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from the golden file (TOOLKIT_UPDATE_GOLDEN=1 rewrites it)"


# --------------------------------------------------------------------------- definition file


def test_definition_file_sections_and_labels() -> None:
    parts = def_sections(DEF.read_text())
    header = dict(re.findall(r"^(\w+):\s*(\S+)", parts["header"], re.M))
    assert header["Bootstrap"] == "docker"
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime", header["From"])
    assert {"labels", "files", "post", "environment", "test", "runscript"} <= set(parts)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    labels = dict(line.split(None, 1) for line in parts["labels"].strip().splitlines())
    assert labels["Version"] == labels["org.opencontainers.image.version"] == version
    files = [tuple(line.split()) for line in parts["files"].strip().splitlines()]
    for src, dst in files:
        assert (REPO / src).exists(), f"%files source {src} missing"
        assert dst.startswith("/opt/toolkit/")
    # A regular install (the wheel ships storage_schemas/), never an editable one.
    assert "--constraint /opt/toolkit/constraints.txt '/opt/toolkit[cluster,tensorboard]'" in parts["post"]
    # every optional feature a study can switch on is in the image
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) - {"dev", "demo"} == {"cluster", "tensorboard"}
    assert " -e " not in parts["post"] and "--editable" not in parts["post"]
    assert {"setup.py", "storage_schemas"} <= {src for src, _ in files}
    for name in ("post", "environment", "test", "runscript"):
        subprocess.run(["bash", "-n"], input=parts[name], text=True, check=True)


def test_definition_environment_points_caches_at_scratch(tmp_path: Path) -> None:
    env_block = def_sections(DEF.read_text())["environment"]
    script = env_block + '\necho "$PYTHONNOUSERSITE|$HF_HOME|$TORCH_HOME|$MPLCONFIGDIR"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "TOOLKIT_SCRATCH": str(tmp_path)}).stdout.strip()
    assert out == f"1|{tmp_path}/hf|{tmp_path}/torch|{tmp_path}/matplotlib"
    default = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin"}).stdout.strip()
    assert default.split("|")[1] == "/tmp/hf"


@pytest.mark.slow
@pytest.mark.skipif(apptainer_bwrap.available() is None,
                    reason="bwrap works here: the %test runs in the image in test_container_isolated.py")
def test_definition_smoke_test_runs_with_the_venv() -> None:
    """The image's %test (a tiny study), on the host with the project's venv as the image's python."""
    script = def_sections(DEF.read_text())["test"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "toolkit image ok: torch" in out.stdout


def test_constraints_pin_the_venv() -> None:
    pins = dict(line.split("==") for line in (REPO / "containers" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    current = dict(line.split("==") for line in constraints_text().splitlines()
                   if line and not line.startswith("#"))
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower().replace("_", "-")
        if name == "torch":
            assert name not in pins  # the base image's CUDA build
            continue
        assert pins.get(name) == current[name], f"{name}: regenerate containers/constraints.txt"


# --------------------------------------------------------------------------- command lines


def test_unit_command_golden(tmp_path: Path) -> None:
    study = container_study(tmp_path, binds=[str(tmp_path / "data") + ":/data"])
    lines = [shell_line(unit_argv(study, stage, key))
             for stage, key in [("prepare", "dna--kmer3"), ("train", "r/seed1"), ("analyse", "summary")]]
    plain = study_from_dict({"study": {"name": "p", "seeds": [1], "output_dir": str(tmp_path / "out")},
                             "corpora": {"syn": {"source": "synthetic:markov"}},
                             "runs": {"r": {"corpus": "syn", "tokenizer": "kmer3"}}}, where="t")
    lines.append(shell_line(unit_argv(plain, "evaluate", "r/seed1")))
    text = "\n".join(lines).replace(str(tmp_path), "<TMP>").replace(sys.executable, "<PYTHON>") + "\n"
    check_golden("unit_commands.txt", text)


def test_sbatch_script_golden(tmp_path: Path) -> None:
    study = study_from_dict({
        "study": {"name": "paper", "seeds": [1, 2, 3], "output_dir": str(tmp_path)},
        "corpora": {"syn": {"source": "synthetic:markov"}},
        "runs": {"r": {"corpus": "syn", "tokenizer": "kmer6"}},
        "dispatch": {"resources": {
            "train": {"partition": "gpu", "account": "lab", "qos": "high", "time_minutes": 720,
                      "mem_gb": 31.5, "cpus_per_task": 8, "gpus_per_node": 4, "gpu_style": "gres",
                      "array_parallelism": 2, "extra_sbatch": {"constraint": "a100"},
                      "setup": ["module load cuda/12.4", "export OMP_NUM_THREADS=8"]},
            "analyse": {"time_minutes": 30, "mem_gb": 64}}}}, where="t")
    scripts = []
    for stage, dep, count in [("train", "afterok:100", 3), ("analyse", "afterok:101:102_3", None)]:
        params = slurm_parameters(study, stage, dep)
        scripts.append(submitit_slurm._make_sbatch_string(
            command="<COMMAND>", folder=tmp_path / "logs", map_count=count, **params))
    check_golden("sbatch_train_analyse.txt", "\n----\n".join(scripts).replace(str(tmp_path), "<TMP>"))


def test_weird_paths_quote_and_run_through_standin(weird_tmp_path: Path, tmp_path: Path) -> None:
    study = container_study(weird_tmp_path)
    argv = unit_argv(study, "train", "r/seed1")
    line = shell_line(argv)
    assert shlex.split(line) == argv
    log = tmp_path / "calls.jsonl"
    bin_dir = weird_tmp_path / "bin dir"
    write_standin(bin_dir, log)
    # Swap the unit for a probe that prints what it sees, keeping every other argument.
    probe = argv[:argv.index("python") + 1] + ["-c", "import json,os,sys; print(json.dumps([sys.argv[1:], "
                                                "os.environ.get('HF_HOME'), 'SLURM_CONF' in os.environ]))",
                                                str(study.root / "study.json")]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_CONF": "/x"}
    out = subprocess.run(["bash", "-c", shell_line(probe)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    seen_args, hf_home, leaked = json.loads(out.stdout)
    assert seen_args == [str(study.root / "study.json")]
    assert hf_home == str(weird_tmp_path / "scratch" / "hf") and not leaked  # --cleanenv
    call = json.loads(log.read_text())
    assert call["nv"] is True and call["argv"][:4] == ["exec", "--nv", "--containall", "--cleanenv"]


def test_standin_rejects_a_path_outside_the_binds(tmp_path: Path) -> None:
    study = container_study(tmp_path / "s")
    argv = unit_argv(study, "prepare", "dna--kmer3")
    argv[-3] = "/elsewhere/study.json"
    write_standin(tmp_path / "bin", tmp_path / "log")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert out.returncode == 255 and "/elsewhere/study.json would not be visible" in out.stderr


# --------------------------------------------------------------------------- checks before submission


def test_binds_follow_the_study(tmp_path: Path) -> None:
    study = container_study(tmp_path)
    binds = bind_paths(study)
    assert binds[0] == str(tmp_path / "out")
    assert str(tmp_path / "data") in binds and str(tmp_path / "scratch") in binds
    # A data folder reached through a symlink is bound from its real place to the link.
    (tmp_path / "link").symlink_to(tmp_path / "data")
    linked = study_from_dict({**_doc(study), "corpora": {"dna": {"source": str(tmp_path / "link" / "genome.fa")}}},
                             where="t")
    assert f"{tmp_path / 'data'}:{tmp_path / 'link'}" in bind_paths(linked)


def test_binds_follow_corpus_links_into_a_store(tmp_path: Path) -> None:
    """A corpus file that is a link (a chain of links) gets every folder the chain passes."""
    study = container_study(tmp_path)
    store = tmp_path / "store"
    (store / "v3").mkdir(parents=True)
    (store / "v3" / "genome.fa").write_text(">chr1\nACGT\n")
    (store / "current").symlink_to("v3")  # a folder link on the way
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "genome.fa").symlink_to(store / "current" / "genome.fa")
    (tmp_path / "links" / "again.fa").symlink_to("genome.fa")  # a link to a link
    for source in ("links/genome.fa", "links/again.fa", "links", "links/*.fa"):
        linked = study_from_dict({**_doc(study), "corpora": {"dna": {"source": str(tmp_path / source)}}},
                                 where="t")
        binds = bind_paths(linked)
        assert str(tmp_path / "links") in binds, source
        assert f"{store / 'v3'}:{store / 'current'}" in binds, (source, binds)
    # A linked subfolder of a corpus folder is not followed: an error that names the fix.
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "sub").symlink_to(store / "v3")
    folder = study_from_dict({**_doc(study), "corpora": {"dna": {"source": str(tmp_path / "corpus")}}}, where="t")
    with pytest.raises(SubmissionError, match=r"corpora.dna.source: '.*/corpus/sub/genome.fa' is outside every "
                       r"bound folder .* add that folder to dispatch.container.binds"):
        bind_paths(folder)
    doc = _doc(folder)
    doc["dispatch"]["container"]["binds"] = [str(store / "v3")]
    assert str(store / "v3") in bind_paths(study_from_dict(doc, where="t"))


def _doc(study) -> dict:
    from toolkit.config import study_to_dict

    return study_to_dict(study)


@pytest.mark.parametrize(("change", "message"), [
    ({"corpora": {"dna": {"source": "/no/such/genome.fa"}}}, r"corpora.dna.source: '/no/such/genome.fa' does not exist"),
    ({"corpora": {"dna": {"source": "/no/such/*.fa"}}}, r"corpora.dna.source: '/no/such/\*.fa' matches no file"),
    ({"dispatch": {"container": {"runtime": "apptainer", "image": "/no/toolkit.sif"}}},
     r"dispatch.container.image: '/no/toolkit.sif' not found; build it with `make container`"),
    ({"dispatch": {"container": {"runtime": "singularity", "image": "/no/toolkit.sif"}}},
     r"dispatch.container.runtime: 'singularity' is not on PATH"),
    ({"dispatch": {"container": {"runtime": "apptainer", "image": "X", "binds": ["/no/such/dir"]}}},
     r"dispatch.container.binds\[0\]: '/no/such/dir' does not exist"),
])
def test_bad_container_input_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    study = container_study(tmp_path)
    write_standin(tmp_path / "bin", tmp_path / "log")
    doc = _doc(study)
    for table, value in change.items():
        for key, sub in value.items():
            if isinstance(doc[table].get(key), dict) and isinstance(sub, dict):
                doc[table][key] = {**doc[table][key], **sub}
            else:
                doc[table][key] = sub
    if doc["dispatch"]["container"].get("image") == "X":
        doc["dispatch"]["container"]["image"] = str(tmp_path / "img" / "toolkit.sif")
    bad = study_from_dict(doc, where="t")
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{tmp_path / 'bin'}:{old}"
    try:
        with pytest.raises(SubmissionError, match=message):
            check_container(bad)
    finally:
        os.environ["PATH"] = old


def test_comma_in_a_bound_path_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "a,b"
    root.mkdir()
    study = container_study(root)
    with pytest.raises(SubmissionError, match=r"cannot be bound into the container \(',' and ':'"):
        bind_paths(study)
