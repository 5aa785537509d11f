"""``toolkit plan``: its arithmetic against independent references, its disk estimate
against what a real tiny study writes, its warnings and its output formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_STUDY
from toolkit.cli import main
from toolkit.config import load_study
from toolkit.dispatch import run_study
from toolkit.model import SHAPES, bert_config, build_model
from toolkit.model import n_parameters as counted_parameters
from toolkit.plan import (
    DEVICES,
    UNIT_OVERHEAD_S,
    flops_per_token,
    load_calibration,
    n_parameters,
    plan_study,
)


def _study(tmp_path: Path, *overrides: str, name: str = "plan") -> object:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY_STUDY.format(name=name, out=tmp_path / name))
    return load_study(path, list(overrides))


@pytest.mark.parametrize("shape", ["tiny", "4M", "20M", "no-transformer"])
@pytest.mark.parametrize("vocab", [4096, 4106, 9])
def test_parameter_count_matches_the_built_model(shape: str, vocab: int) -> None:
    """The closed form equals ``sum(p.numel())`` of the model the toolkit builds."""
    from toolkit.config import ModelConfig

    model = build_model(ModelConfig(shape=shape), vocab, seed=0)  # type: ignore[arg-type]
    assert n_parameters(SHAPES[shape], vocab) == counted_parameters(model)


def test_flops_per_token_matches_torch_flop_counter() -> None:
    """Forward FLOPs with the head on every position, against torch's own FLOP counter
    (eager attention: the counter does not see inside the CPU SDPA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertForMaskedLM

    from toolkit.config import ModelConfig

    for shape, T in (("tiny", 64), ("4M", 128)):
        cfg = bert_config(ModelConfig(shape=shape), 4096)  # type: ignore[arg-type]
        cfg._attn_implementation = "eager"
        model = BertForMaskedLM(cfg).eval()
        ids = torch.randint(5, 4096, (3, T))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        per_token = counter.get_total_flops() / ids.numel()
        mine = flops_per_token(SHAPES[shape], 4096, T, head_fraction=1.0, train=False)
        assert mine == pytest.approx(per_token, rel=0.01), (shape, mine, per_token)


def _apparent_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.slow
def test_disk_estimate_within_30_percent_of_a_real_study(tmp_path: Path) -> None:
    """Planned before the study runs (nothing prepared) and after (measured token stores):
    both totals within 30% of the bytes the study wrote; the dominant kinds within 30% too."""
    study = _study(tmp_path)
    before = plan_study(study)  # type: ignore[arg-type]
    run_study(study, executor="debug")  # type: ignore[arg-type]
    root = Path(study.root)  # type: ignore[attr-defined]
    written = _apparent_size(root) - _apparent_size(root / "logs") - _apparent_size(root / "report")
    after = plan_study(study)  # type: ignore[arg-type]
    for plan in (before, after):
        assert abs(plan.disk_bytes - written) / written < 0.30, (plan.disk_by_kind, written)
    members = root / "members" / "r"
    measured = {"predictions": sum(_apparent_size(p) for p in members.glob("seed*/predictions.zarr")),
                "fisher": sum(_apparent_size(p) for p in members.glob("seed*/fisher.zarr")),
                "checkpoints": sum(_apparent_size(p) for p in members.glob("seed*/checkpoints"))}
    for kind, size in measured.items():
        assert abs(after.disk_by_kind[kind] - size) / size < 0.30, (kind, after.disk_by_kind[kind], size)
    # the plan knows the data exactly here: a synthetic source, then the token store
    assert "exact: synthetic source" in before.assumptions[0]
    assert "measured: token store" in after.assumptions[0]


def test_json_has_the_documented_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.toml"
    path.write_text(TINY_STUDY.format(name="s", out=tmp_path / "s"))
    assert main(["plan", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # prepare, 2 x train, 2 x evaluate, 4 measure shards (one run x 4 families), analyse
    assert isinstance(doc["units"], int) and doc["units"] == 1 + 2 + 2 + 4 + 1
    assert isinstance(doc["disk_bytes"], int) and doc["disk_bytes"] > 0
    assert set(doc["stages"]) == {"prepare", "train", "evaluate", "measure", "analyse"}
    for stage in doc["stages"].values():
        assert {"units", "cpu_hours", "gpu_hours", "peak_memory_bytes", "disk_bytes", "warnings"} <= set(stage)
        assert stage["cpu_hours"] >= 0 and stage["gpu_hours"] == 0  # no GPU asked for
    assert not (tmp_path / "s").exists(), "plan must not write the study folder"


def test_text_output_names_every_stage_and_its_assumptions(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.toml"
    path.write_text(TINY_STUDY.format(name="s", out=tmp_path / "s"))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    for word in ("prepare", "train", "evaluate", "analyse", "total", "assumptions:", "FLOPs per token"):
        assert word in out


def test_warnings_for_short_time_limits_and_small_memory(tmp_path: Path) -> None:
    """A SLURM study whose train limit is far below the estimate requeues; too little memory warns."""
    study = _study(tmp_path, "dispatch.executor=slurm", "model.shape=20M", "training.steps=20000",
                   "dispatch.resources.train.time_minutes=1", "dispatch.resources.train.mem_gb=0.5",
                   "dispatch.resources.evaluate.mem_gb=0.5")
    plan = plan_study(study)  # type: ignore[arg-type]
    train = " ".join(plan.stages["train"].warnings)
    assert "requeue" in train and "time_minutes is 1" in train
    assert "mem_gb is 0.5" in train
    assert "mem_gb is 0.5" in " ".join(plan.stages["evaluate"].warnings)
    # the same study on the local executor has no time limits to warn about
    local = plan_study(_study(tmp_path, "model.shape=20M", "training.steps=20000", name="local"))  # type: ignore[arg-type]
    assert not any("requeue" in w for w in local.stages["train"].warnings)


def test_gpu_stages_use_the_calibrated_device(tmp_path: Path) -> None:
    """With GPUs asked for, train hours are GPU-hours at the calibrated throughput."""
    study = _study(tmp_path, "dispatch.resources.train.gpus_per_node=1",
                   "dispatch.resources.evaluate.gpus_per_node=1", "training.steps=1000")
    calib = tmp_path / "calibration.json"
    flops = DEVICES["cuda"].flops["fp32"]
    calib.write_text(json.dumps({"cuda": {"name": "test GPU", "flops": {"fp32": flops / 2},
                                          "memory_bytes": 10 * 2 ** 30}}))
    default = plan_study(study)  # type: ignore[arg-type]
    slower = plan_study(study, devices=load_calibration(calib))  # type: ignore[arg-type]
    assert default.stages["train"].gpu_hours > 0 and default.stages["train"].cpu_hours == 0
    fixed = default.stages["train"].units * UNIT_OVERHEAD_S["train"] / 3600  # process start etc.
    assert slower.stages["train"].gpu_hours - fixed == pytest.approx(
        2 * (default.stages["train"].gpu_hours - fixed), rel=1e-3)
    assert any("test GPU" in line for line in slower.assumptions)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("{", "not valid JSON"),
    ('{"cuda": {"flops": {"fp32": -1}}}', "positive FLOP/s"),
])
def test_bad_calibration_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     content: str | None, message: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(TINY_STUDY.format(name="s", out=tmp_path / "s"))
    calib = tmp_path / "c.json"
    if content is not None:
        calib.write_text(content)
    assert main(["plan", str(path), "--calibration", os.fspath(calib)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("toolkit: error: --calibration") and message in err and err.count("\n") == 1


def test_paper_study_plans_without_its_data() -> None:
    """jobs/paper.toml points at data that is not here: the plan still prints, from stated
    assumptions, with the paper's scale (15 members, bert-base, GPU-hours)."""
    from tests.conftest import REPO

    plan = plan_study(load_study(REPO / "jobs" / "paper.toml"), sample_seconds=0.5)
    assert plan.stages["train"].units == 15 and plan.stages["train"].gpu_hours > 50
    assert plan.disk_by_kind["predictions"] > 30e9  # 3 runs x 5 members x ~4 GB at float32
    assert any("assumed" in line and "source not readable" in line for line in plan.assumptions)


def test_masks_are_planned_in_prepare_once_per_token_store(tmp_path: Path) -> None:
    """The evaluation masks are a prepare output: their disk is the prepare stage's, counted once
    per token store however many runs read it, and no longer the evaluate stage's."""
    one = plan_study(_study(tmp_path, name="one"))  # type: ignore[arg-type]
    two = plan_study(_study(tmp_path, 'runs.r2={corpus = "markov", tokenizer = "kmer3"}', name="two"))  # type: ignore[arg-type]
    assert two.stages["prepare"].units == 1 and two.stages["evaluate"].units == 2 * one.stages["evaluate"].units
    assert two.disk_by_kind["masks"] == one.disk_by_kind["masks"] > 0
    for plan in (one, two):
        kinds = plan.disk_by_kind
        assert plan.stages["prepare"].disk_bytes == pytest.approx(kinds["tokens"] + kinds["masks"], abs=2)
        assert plan.stages["evaluate"].disk_bytes == pytest.approx(
            kinds["predictions"] + kinds["fisher"] + kinds["embeddings"], abs=2 * plan.stages["evaluate"].units)
