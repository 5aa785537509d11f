"""One unit of work of a study, runnable on its own (the dispatcher's job body).

A unit is ``(stage, key)``: ``prepare`` with key ``<corpus>--<tokenizer>``, ``train``
and ``evaluate`` with a member id ``<run>/seed<N>``, ``analyse`` with key
``summary`` (aggregation and report). A unit whose completion marker exists is
skipped, so running a unit twice is harmless.
"""

from __future__ import annotations

import logging
from pathlib import Path

from toolkit.config import StudyConfig
from toolkit.errors import ConfigError
from toolkit.study import Member, iter_units

log = logging.getLogger(__name__)


def marker(study: StudyConfig, stage: str, key: str) -> Path:
    for s, k, path in iter_units(study):
        if s == stage and k == key:
            return path
    raise ConfigError(f"no unit {stage}:{key} in study '{study.name}'")


def run_unit(study: StudyConfig, stage: str, key: str, *, force: bool = False) -> None:
    """Run one unit in this process; skipped when its marker exists.

    ``force`` removes the marker first, so the stage redoes its final outputs
    (training resumes from its last checkpoint rather than starting over).
    """
    if stage in ("train", "evaluate"):
        # A unit gets the CPUs its stage asked for; torch's default (every core) makes
        # units that share a node, or the two cores of a laptop, fight each other.
        import torch

        torch.set_num_threads(max(1, study.dispatch.resources_for(stage).cpus_per_task))
    done = marker(study, stage, key)
    if force:
        done.unlink(missing_ok=True)
    elif done.exists():
        log.info("%s %s: already complete, skipped", stage, key)
        return
    if stage == "prepare":
        from toolkit.prepare import prepare_unit

        corpus, _, tokenizer = key.partition("--")
        prepare_unit(study, corpus, tokenizer)
    elif stage == "train":
        from toolkit.train import train_member

        train_member(study, Member.parse(key, study))
    elif stage == "evaluate":
        from toolkit.evaluate import evaluate_member

        evaluate_member(study, Member.parse(key, study))
    elif stage == "analyse":
        from toolkit.analyse import analyse_study
        from toolkit.report import write_report

        analyse_study(study)
        write_report(study)
    else:
        raise ConfigError(f"unknown stage '{stage}'; stages: prepare, train, evaluate, analyse")
