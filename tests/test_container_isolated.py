"""The container path, run for real in isolation: a bubblewrap ``apptainer`` and an image.

``tests/test_container.py`` checks command lines and runs them through a stand-in that
only cleans the environment. Here the same commands run through
``tests/apptainer_bwrap.py``: a runtime that parses Apptainer's arguments and runs the
command in its own mount, PID and IPC namespaces, seeing only an image (the host's
``/usr`` as its operating system, ``/opt/venv`` with the toolkit *wheel* installed
non-editably, the project venv's packages read-only at ``/opt/deps``), the declared
binds, a private ``/tmp``, an empty ``$HOME`` and the image's ``%environment``. The
checkout and the project venv are not in it, so a missing bind, a dependency on the
checkout or a leaked host variable fails here as it would on a cluster.

What is proven: the units of a real tiny study run through real SLURM in that isolation
and give the results of a run on the host; a path that is not bound is not there and the
job says so; host variables do not leak; the checkout, the host ``/tmp`` and ``$HOME``
are not visible; the definition file's ``%test`` passes in the image. What is not (only
a real Apptainer can): see containers/README.md.

Measured on the 2-core test machine: the image builds in about 5 s (wheel included),
the probes take a few seconds each, ``%test`` about 90 s and the SLURM study about 75 s
(both ``slow``; the SLURM tests also ``slurm``). Skipped where bwrap cannot make a sandbox.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests import apptainer_bwrap
from tests.conftest import REPO, build_toolkit_wheel, study_doc
from toolkit.config import study_from_dict
from toolkit.dispatch import container as dcontainer
from toolkit.dispatch.container import shell_line, unit_argv

DEF = REPO / "containers" / "toolkit.def"

pytestmark = pytest.mark.skipif(apptainer_bwrap.available() is not None,
                                reason=str(apptainer_bwrap.available()))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test image (``toolkit.sif`` manifest + ``toolkit.sif.root/``) built from the wheel."""
    tmp = tmp_path_factory.mktemp("image")
    wheel = build_toolkit_wheel(tmp / "wheel")
    return apptainer_bwrap.build_image(tmp / "img" / "toolkit.sif", wheel, DEF, sysconfig.get_paths()["purelib"])


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The bwrap ``apptainer`` first on PATH (inherited by sbatch jobs); returns its call log."""
    log = tmp_path / "apptainer-calls.jsonl"
    bin_dir = tmp_path / "runtime bin"
    apptainer_bwrap.write_runtime(bin_dir, log)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def tiny_doc(root: Path, image: Path, **container: object) -> dict:
    """The tiny study (conftest) on SLURM in the container; training asks for a (fake) GPU."""
    return study_doc("iso", root / "out", dispatch={
        "executor": "slurm",
        "container": {"runtime": "apptainer", "image": str(image), "scratch": str(root / "scratch"), **container},
        "resources": {"train": {"partition": "gpu", "gpus_per_node": 1, "time_minutes": 10}},
    })


PROBE = r"""
import json, os, sys
import toolkit, toolkit.store
out = {"env": dict(os.environ), "toolkit": toolkit.__file__, "schemas": str(toolkit.store.SCHEMA_DIR),
       "cwd": os.getcwd(), "pid": os.getpid(), "home": os.listdir(os.environ["HOME"]),
       "exists": {p: os.path.exists(p) for p in sys.argv[1:]}, "sys_path": sys.path}
for what, path in [("tmp", "/tmp/written-inside"), ("image", "/opt/venv/written-inside"),
                   ("study", os.environ["STUDY_ROOT"] + "/written-inside")]:
    try:
        open(path, "w").write("x")
        out[what] = "written"
    except OSError as e:
        out[what] = type(e).__name__
print(json.dumps(out))
"""


def run_probe(study, stage: str, key: str, *paths: str, env: dict[str, str] | None = None) -> dict:
    """The unit's exact container command, with the unit swapped for :data:`PROBE`."""
    argv = unit_argv(study, stage, key)
    image = argv.index("python") - 1
    argv[image:image] = ["--env", f"STUDY_ROOT={study.root}"]  # a flag, so before the image
    probe = argv[:argv.index("python") + 1] + ["-c", PROBE, *paths]
    out = subprocess.run(["bash", "-c", shell_line(probe)], capture_output=True, text=True,
                         env=env or dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- isolation, probed


def test_unit_sees_only_the_image_and_its_binds(image: Path, runtime: Path, weird_tmp_path: Path,
                                                tmp_path: Path) -> None:
    root = weird_tmp_path
    study = study_from_dict(tiny_doc(root, image), where="test")
    study.root.mkdir(parents=True)
    host_file = Path("/tmp") / f"host-only-{os.getpid()}"
    host_file.write_text("the host's /tmp")
    schemas = tmp_path / "host schemas"  # a real schemas folder, on the host only
    shutil.copytree(REPO / "storage_schemas", schemas)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOOLKIT_SCHEMAS": str(schemas), "SLURM_CONF": "/x",
           "HF_HOME": "/host/hf"}
    try:
        seen = run_probe(study, "train", "r/seed1", str(REPO), sys.prefix, sys.base_prefix, str(host_file),
                         str(study.root), os.environ.get("HOME", "/root") + "/.cache", env=env)
    finally:
        host_file.unlink()
    # (b) a clean environment: the image's %environment and --env, nothing from the host.
    cenv = seen["env"]
    assert not {"PYTHONPATH", "TOOLKIT_SCHEMAS", "SLURM_CONF", "VIRTUAL_ENV"} & set(cenv), sorted(cenv)
    scratch = str(root / "scratch")
    assert cenv["TOOLKIT_SCRATCH"] == scratch and cenv["HF_HOME"] == scratch + "/hf"
    assert cenv["MPLCONFIGDIR"] == scratch + "/matplotlib" and cenv["PYTHONNOUSERSITE"] == "1"
    assert cenv["PATH"].startswith("/opt/venv/bin:")
    # The installed wheel, not the checkout; its own schemas.
    assert seen["toolkit"] == "/opt/venv/lib/python3.11/site-packages/toolkit/__init__.py"
    assert seen["schemas"] == "/opt/venv/lib/python3.11/site-packages/toolkit/storage_schemas"
    assert not any(p.startswith(str(REPO)) for p in seen["sys_path"])
    # (c) the checkout, the project venv, its Python and the host's $HOME are not there.
    exists = seen["exists"]
    assert not exists[str(REPO)] and not exists[sys.prefix] and not exists[sys.base_prefix]
    assert not exists[os.environ.get("HOME", "/root") + "/.cache"] and seen["home"] == []
    assert seen["cwd"] == cenv["HOME"]  # not the host's working directory
    # (d) a private /tmp; the study folder (a bind below /tmp) is there and writable.
    assert not exists[str(host_file)] and exists[str(study.root)]
    assert seen["tmp"] == "written" and not Path("/tmp/written-inside").exists()
    assert seen["study"] == "written" and (study.root / "written-inside").exists()
    assert seen["image"] == "OSError"  # read-only image
    assert seen["pid"] == 2  # own PID namespace: bwrap's reaper is 1, as Apptainer's sinit
    call = json.loads(runtime.read_text())
    assert call["nv"] and call["argv"][:4] == ["exec", "--nv", "--containall", "--cleanenv"]


def test_sigterm_reaches_the_unit_in_its_pid_namespace(image: Path, runtime: Path, tmp_path: Path) -> None:
    """submitit stops a unit by signalling the runtime; the unit must get it to checkpoint (exit 75)."""
    study = study_from_dict(tiny_doc(tmp_path, image), where="test")
    study.root.mkdir(parents=True)
    argv = unit_argv(study, "train", "r/seed1")
    unit = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
            "print(os.getpid(), flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen(argv[:argv.index("python") + 1] + ["-c", unit], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "2"  # running, as PID 2
    proc.terminate()
    assert proc.wait(timeout=30) == 75


def test_a_path_that_is_not_bound_is_not_there(image: Path, runtime: Path, tmp_path: Path) -> None:
    """(a) the runtime enforces the bind list: a file outside it fails to open, clearly."""
    data = tmp_path / "unbound data"
    data.mkdir()
    (data / "genome.fa").write_text(">chr1\nACGT\n")
    study = study_from_dict(tiny_doc(tmp_path, image), where="test")
    study.root.mkdir(parents=True)
    argv = unit_argv(study, "prepare", "markov--kmer3")
    cmd = argv[:argv.index("python") + 1] + ["-c", "import sys; open(sys.argv[1]).read()", str(data / "genome.fa")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and f"No such file or directory: '{data / 'genome.fa'}'" in out.stderr
    # A bind whose source is missing is refused before anything runs, as by Apptainer.
    bad = cmd.copy()
    bad[bad.index("--bind") + 1] += f",{tmp_path / 'gone'}"
    out = subprocess.run(bad, capture_output=True, text=True, timeout=60)
    assert out.returncode == 255 and "mount source" in out.stderr and "doesn't exist" in out.stderr


def test_a_corpus_linked_into_a_store_is_read_in_the_container(image: Path, runtime: Path,
                                                               tmp_path: Path) -> None:
    """The real prepare unit, isolated, reads a corpus file that is a chain of links."""
    from toolkit.dispatch import save_study
    from toolkit.store import open_store
    from toolkit.study import Layout
    from toolkit.units import get_unit

    rng = np.random.default_rng(0)
    store = tmp_path / "store"
    (store / "v3").mkdir(parents=True)
    (store / "v3" / "genome.fa").write_text("".join(
        f">r{i}\n{''.join(rng.choice(list('ACGT'), 300))}\n" for i in range(80)))
    (store / "current").symlink_to("v3")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "genome.fa").symlink_to(store / "current" / "genome.fa")
    doc = tiny_doc(tmp_path, image)
    doc["corpora"] = {"markov": {"source": str(tmp_path / "data" / "genome.fa"), "train_records": 48,
                                 "eval_records": 16, "dna": {"piece_min": 100, "piece_max": 300}}}
    study = study_from_dict(doc, where="test")
    save_study(study)
    out = subprocess.run(unit_argv(study, "prepare", "markov--kmer3"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert get_unit(study, "prepare", "markov--kmer3").marker.exists()
    # what the unit read through the links: the records it was asked for, from that file
    tokens = open_store(Layout(study).run_tokens_dir("r") / "tokens.zarr", "tokens")
    assert tokens.attrs["source"] == str(tmp_path / "data" / "genome.fa")
    split = np.asarray(tokens["split"][...])  # 0 train, 1 eval, 2 unused
    assert ((split == 0).sum(), (split == 1).sum()) == (48, 16) and tokens.attrs["n_tokens"] > 0
    binds = json.loads(runtime.read_text())["binds"]
    assert f"{store / 'v3'}:{store / 'current'}" in binds


@pytest.mark.slow
def test_definition_test_section_passes_in_the_image(image: Path, runtime: Path) -> None:
    """``apptainer test``: the def's %test (a tiny study, local executor) inside the image."""
    out = subprocess.run(["apptainer", "test", "--containall", str(image)], capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "toolkit image ok: torch" in out.stdout
    assert "toolkit image ok: tiny study" in out.stdout


# --------------------------------------------------------------------------- a real study on SLURM


def summary_values(root: Path) -> dict[str, np.ndarray]:
    import toolkit

    s = toolkit.open_results(root)["summary"].to_dataset()
    return {k: v.values for k, v in s.data_vars.items() if np.issubdtype(v.dtype, np.floating)}


@pytest.mark.slurm
@pytest.mark.slow
def test_study_runs_on_slurm_in_isolated_containers(slurm_cluster, image: Path, runtime: Path,
                                                    weird_tmp_path: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, one_torch_thread) -> None:
    from toolkit.dispatch import run_study, status_table

    # Host variables that would break a unit if they leaked: a schemas folder that is not bound.
    schemas = tmp_path / "host schemas"
    shutil.copytree(REPO / "storage_schemas", schemas)
    monkeypatch.setenv("TOOLKIT_SCHEMAS", str(schemas))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    study = study_from_dict(tiny_doc(weird_tmp_path, image), where="test")
    run_study(study, executor="slurm", wait=True)
    assert "10 done, 0 stale, 0 running, 0 pending, 0 failed" in status_table(study)
    calls = [json.loads(line) for line in runtime.read_text().splitlines()]
    assert sorted(c["argv"][-2] for c in calls) == ["analyse", "evaluate", "evaluate", *["measure"] * 4,
                                                    "prepare", "train", "train"]
    assert all(c["nv"] == (c["argv"][-2] == "train") and "--containall" in c["argv"] for c in calls)
    # The same study on the host, without a container, in this process: the same results.
    monkeypatch.delenv("TOOLKIT_SCHEMAS")
    plain = tiny_doc(tmp_path / "host", image)
    plain["dispatch"] = {"executor": "debug"}
    reference = study_from_dict(plain, where="test")
    run_study(reference, executor="debug")
    got, want = summary_values(study.root), summary_values(reference.root)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, equal_nan=True, err_msg=name)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_missing_bind_fails_the_job_clearly(slurm_cluster, image: Path, runtime: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """(a) on SLURM: a corpus folder left out of the binds makes its job fail, naming the file."""
    from toolkit.dispatch import run_study
    from toolkit.dispatch.status import unit_states
    from toolkit.errors import SubmissionError

    data = tmp_path / "data"
    data.mkdir()
    (data / "genome.fa").write_text(">chr1\n" + "ACGT" * 200 + "\n")
    doc = tiny_doc(tmp_path, image)
    doc["corpora"] = {"markov": {"source": str(data / "genome.fa")}}
    study = study_from_dict(doc, where="test")
    real = dcontainer.bind_paths
    monkeypatch.setattr(dcontainer, "bind_paths", lambda s: [b for b in real(s) if b != str(data)])
    with pytest.raises(SubmissionError, match=r"first prepare markov--kmer3: FAILED: toolkit: error: "
                       + re.escape(f"{data / 'genome.fa'}: file not found; check the corpus source path")):
        run_study(study, executor="slurm", wait=True)
    row = next(r for r in unit_states(study) if r.stage == "prepare")
    assert row.state == "failed" and f"{data / 'genome.fa'}: file not found" in row.detail, row.detail
    assert [json.loads(line)["argv"][-2] for line in runtime.read_text().splitlines()] == ["prepare"]
