"""The study ETA of ``toolkit run``: measured per-stage rates, the plan before them.

Expectations are computed by hand in the comments.
"""

from __future__ import annotations

import logging

import pytest

from toolkit.dispatch import local as dlocal
from toolkit.dispatch.local import StudyProgress, study_eta


def test_measured_stages_use_their_own_mean() -> None:
    # prepare: 2 left x mean(10, 20)=15 / min(2, 2) = 15
    # train: 4 left x mean(100)=100 / min(2, 4) = 200
    done = {"prepare": [10.0, 20.0], "train": [100.0]}
    assert study_eta(done, {"prepare": 2, "train": 4}, {}, parallel=2) == pytest.approx(215.0)


def test_fast_prepare_does_not_make_train_look_fast() -> None:
    # The old average: 5 prepare units of 30 s done, 31 units left -> 31 x 30 = 930 s.
    # Per stage with the plan: train planned 60 s/unit, evaluate 20 s, analyse 100 s;
    # prepare planned 40 s/unit took 120 s -> everything is 3x slower than planned.
    # train 24 x 180 / 2 = 2160, evaluate 6 x max(60, 120) / 2 = 360, analyse 1 x 300 = 300.
    done = {"prepare": [120.0] * 5, "train": [], "evaluate": [], "analyse": []}
    remaining = {"prepare": 0, "train": 24, "evaluate": 6, "analyse": 1}
    prior = {"prepare": 40.0, "train": 60.0, "evaluate": 20.0, "analyse": 100.0}
    assert study_eta(done, remaining, prior, parallel=2) == pytest.approx(2820.0)


def test_scale_is_total_measured_over_total_planned() -> None:
    # prepare: 2 x 100 s measured, planned 50 s; train: 1 x 400 s measured, planned 400 s.
    # scale = (200 + 400) / (2 x 50 + 1 x 400) = 600 / 500 = 1.2
    # train left 1 x 400 (its own mean) = 400; evaluate 3 x 100 x 1.2 / 1 = 360.
    done = {"prepare": [100.0, 100.0], "train": [400.0]}
    prior = {"prepare": 50.0, "train": 400.0, "evaluate": 100.0}
    remaining = {"prepare": 0, "train": 1, "evaluate": 3}
    assert study_eta(done, remaining, prior, parallel=1) == pytest.approx(760.0)


def test_short_units_do_not_scale_the_plan() -> None:
    # prepare planned 0.03 s took 3 s (process start): not a throughput, scale stays 1.
    # train 2 x max(10, 3) = 20; with a 30 s train unit measured (planned 10 s, < 30 s:
    # not informative either) the mean of train takes over: 1 x 30; evaluate max(2, 3) = 3.
    prior = {"prepare": 0.03, "train": 10.0, "evaluate": 2.0}
    assert study_eta({"prepare": [3.0]}, {"train": 2}, prior, parallel=1) == pytest.approx(20.0)
    assert study_eta({"prepare": [3.0], "train": [30.0]}, {"train": 1, "evaluate": 1}, prior,
                     parallel=1) == pytest.approx(33.0)


def test_before_any_unit_the_plan_alone() -> None:
    # 3 x 50 / 3 + 1 x 7 = 57
    assert study_eta({}, {"train": 3, "analyse": 1}, {"train": 50.0, "analyse": 7.0},
                     parallel=4) == pytest.approx(57.0)


def test_without_a_plan() -> None:
    # No measurement and no prior: unknown.
    assert study_eta({}, {"train": 3}, {}, parallel=1) is None
    # A stage without prior falls back to the mean of every finished unit: (2+4)/2 = 3 -> 2 x 3
    assert study_eta({"prepare": [2.0, 4.0]}, {"prepare": 0, "train": 2}, {},
                     parallel=1) == pytest.approx(6.0)
    # Nothing left: 0, whatever is known.
    assert study_eta({}, {"train": 0}, {}, parallel=1) == 0.0


def test_zero_priors_do_not_divide_by_zero() -> None:
    # A stage planned at 0 s is left out of the scale: scale = 1; evaluate 2 x 10 = 20
    # (above the shortest unit, 5 s).
    done = {"prepare": [5.0]}
    assert study_eta(done, {"evaluate": 2}, {"prepare": 0.0, "evaluate": 10.0},
                     parallel=1) == pytest.approx(20.0)


def test_planned_stages_take_at_least_the_shortest_measured_unit() -> None:
    # Tiny units are mostly process start: prepare took 3 s against 0.03 s planned,
    # analyse is planned at 0.004 s, but no unit took less than 3 s: 3 s.
    done = {"prepare": [3.0]}
    prior = {"prepare": 0.03, "analyse": 0.004}
    assert study_eta(done, {"analyse": 1}, prior, parallel=1) == pytest.approx(3.0)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_progress_lines_measure_each_unit(monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    monkeypatch.setattr(dlocal.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="toolkit.dispatch")
    progress = StudyProgress({"prepare": ["a", "b"], "train": ["x/seed1", "x/seed2"]}, parallel=2,
                        prior={"prepare": 40.0, "train": 100.0})
    progress.started("prepare", "a")
    progress.started("prepare", "b")
    clock.t += 80  # a: 80 s against 40 planned -> scale 2
    progress.finished("prepare", "a")
    # prepare: 1 x 80 / 1 = 80; train: 2 x 100 x 2 / 2 = 200
    assert progress.eta() == pytest.approx(280.0)
    clock.t += 40
    progress.finished("prepare", "b")  # b: 120 s; scale (80 + 120) / 80 = 2.5; train 2 x 250 / 2
    assert progress.eta() == pytest.approx(250.0)
    assert caplog.records[-1].getMessage() == "prepare b done  [2/4, elapsed 2 min 00 s, ETA 4 min 10 s]"


def test_progress_without_starts_times_the_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A watcher (``wait_study``) only sees units finish: durations are the gaps between."""
    clock = Clock()
    monkeypatch.setattr(dlocal.time, "monotonic", clock)
    progress = StudyProgress({"train": ["a", "b", "c"]}, parallel=1)
    clock.t += 30
    progress.finished("train", "a")
    clock.t += 10
    progress.finished("train", "b")  # mean gap 20 s, 1 left
    assert progress.eta() == pytest.approx(20.0)


def test_planned_unit_seconds_falls_back_to_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import toolkit.plan

    def broken(*a: object, **k: object) -> None:
        raise OSError("corpus not on this machine")

    monkeypatch.setattr(toolkit.plan, "plan_study", broken)
    assert dlocal.planned_unit_seconds(object()) == {}  # type: ignore[arg-type]


def test_planned_unit_seconds_of_a_real_study(tmp_path) -> None:
    from tests.conftest import tiny_study

    prior = dlocal.planned_unit_seconds(tiny_study(tmp_path / "out", seeds=1))
    assert set(prior) == {"prepare", "train", "evaluate", "measure", "analyse"}
    assert all(v > 0 for v in prior.values()) and prior["train"] > prior["prepare"]
