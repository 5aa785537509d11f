"""benchmarks/gpu_check.sh --smoke on the CPU: the GPU readiness script runs and reports every item.

The full run needs a GPU (issue 11); this proves, in CI, that the wrapper, the toolkit's
training loop stopped through its preemption signal, HF Trainer, the Fisher comparison and
the tiny study on the local executor all work through the script and land in its JSON.
About a minute on 2 shared cores, mostly the study's unit processes starting.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SHAPES = ("bert-base", "20M", "tiny")
PRECISIONS = ("fp32", "bf16")
CONTENDERS = ("toolkit", "hf_trainer")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu check") / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--device", "cpu",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(Path(out).read_text()), proc.stdout


@pytest.mark.slow
def test_smoke_json_has_every_item(smoke: tuple[dict, str]) -> None:
    doc, _ = smoke
    assert doc["schema"] == "gpu_check/1" and doc["mode"] == "smoke"
    for key in ("torch", "transformers", "device", "device_name", "driver", "float32_matmul_precision",
                "matmul_tflops_measured"):
        assert key in doc["env"], key
    assert doc["env"]["device"] == "cpu"
    assert set(doc["peak_tflops"]) == {"table_key", "bf16", "tf32", "fp32"}
    assert doc["skipped_for_budget"] == []
    assert 0 < doc["wall_seconds"] < doc["budget_seconds"]

    results = doc["train"]["results"]
    assert set(results) == set(SHAPES)
    for shape in SHAPES:
        assert set(results[shape]) == set(PRECISIONS)
        for precision in PRECISIONS:
            cell = results[shape][precision]
            assert set(CONTENDERS) <= set(cell) and "ratio_toolkit_over_hf" in cell
            for contender in CONTENDERS:
                expected = "ok" if (shape, precision) == ("tiny", "fp32") else "skipped"
                assert cell[contender]["status"] == expected, (shape, precision, contender, cell[contender])

    cell = results["tiny"]["fp32"]
    for contender in CONTENDERS:
        r = cell[contender]
        assert r["tokens_per_s"] > 0 and r["measured_steps"] > 0 and r["measured_seconds"] > 0
        assert r["warmup_steps"] >= doc["train"]["warmup_steps"]
        # toolkit/model.py's table: 1,007,616 for tiny at V = 4096, plus (d + 1) per extra token
        assert r["n_parameters"] == 1_007_616 + (doc["train"]["vocab_size"] - 4096) * 129
        assert r["flops_per_token"] == 6 * r["n_parameters"] + 12 * 2 * doc["train"]["seq_len"] * 128
        assert r["mfu"] is None and r["peak_memory_bytes"] is None  # no peak, no CUDA on a CPU
    assert cell["toolkit"]["stopped_by"].startswith("SIGUSR2")  # the loop's own preemption path
    assert math.isfinite(cell["ratio_toolkit_over_hf"]) and cell["ratio_toolkit_over_hf"] > 0

    fisher = doc["fisher"]
    assert fisher["status"] == "ok" and fisher["shape"] == "tiny" and fisher["reps"] >= 2
    assert set(fisher["median_seconds"]) == {"fair", "hf", "per_example", "per_example_diagonal"}
    assert all(t > 0 for t in fisher["median_seconds"].values())
    assert all(math.isfinite(r) and r > 0 for r in fisher["ratios"].values())
    assert set(fisher["ratios"]) == {"per_example_over_fair", "per_example_over_hf",
                                     "per_example_diagonal_over_fair", "per_example_diagonal_over_hf"}

    study = doc["study"]
    assert study["status"] == "ok", study.get("reason", "") + study.get("log_tail", "")
    assert study["returncode"] == 0 and study["wall_seconds"] > 0
    assert study["expected_device"] == "cpu"
    assert len(study["devices"]) == 4 and set(study["devices"].values()) == {"cpu"}


@pytest.mark.slow
def test_smoke_json_calibrates_toolkit_plan(smoke: tuple[dict, str], tmp_path: Path) -> None:
    """The JSON's calibration block is what `toolkit plan --calibration` reads: the measured
    tokens/s times the plan's FLOPs per token, per core on the CPU."""
    from toolkit.plan import load_calibration

    doc, _ = smoke
    cpu = doc["calibration"]["cpu"]
    assert cpu["flops"]["fp32"] > 0 and "tiny" in cpu["measured_on"]["fp32"]
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(doc))
    devices = load_calibration(path)
    assert devices["cpu"].flops["fp32"] == cpu["flops"]["fp32"]
    assert devices["cpu"].source.startswith("measured")


@pytest.mark.slow
def test_smoke_prints_labelled_lines(smoke: tuple[dict, str]) -> None:
    _, stdout = smoke
    for label in ("[env] torch", "[env] assumed dense peak", "[env] model FLOPs per trained token",
                  "[train] tiny      fp32 ratio toolkit/HF", "[fisher] ratio per-example Fisher",
                  "[study] tiny study end to end (local executor): OK", "SKIPPED (smoke mode)",
                  "[summary]", "[done]"):
        assert label in stdout, label
    assert "Traceback" not in stdout


def test_budget_skips_instead_of_overrunning(tmp_path: Path) -> None:
    """A budget too small for anything: every item is SKIPPED (time budget), nothing runs."""
    out = tmp_path / "r.json"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--device", "cpu",
                           "--budget", "1", "--skip", "matmul", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["study"]["reason"] == doc["fisher"]["reason"] == "SKIPPED (time budget)"
    assert "train/tiny/fp32/toolkit" in doc["skipped_for_budget"]
    assert "SKIPPED (time budget)" in proc.stdout


def test_peak_table_prefers_specific_names() -> None:
    from benchmarks.gpu_check import peak_table

    assert peak_table("NVIDIA H200")["table_key"] == "H200"
    assert peak_table("NVIDIA H200 NVL")["table_key"] == "H200 NVL"
    assert peak_table("NVIDIA H100 PCIe")["bf16"] == 756.5
    assert peak_table("NVIDIA A100-SXM4-80GB")["fp32"] == 19.5
    assert peak_table("Tesla V100-SXM2-32GB")["bf16"] is None
    assert peak_table("Some Other GPU")["table_key"] is None
