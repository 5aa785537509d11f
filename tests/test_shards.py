"""Analysis shards on the real SLURM test cluster (tests/slurm_cluster.py).

A real tiny study goes through ``run_study(executor="slurm")``: its measure units are
queued as one job array (one task per run x measure family), each writes its own shard
store, and the analyse unit reduces them. The summary must equal the single-process
analysis of the same members bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_same_summary, study_doc


@pytest.mark.slurm
@pytest.mark.slow
def test_sharded_analyse_on_slurm_equals_the_single_process_analyse(slurm_cluster, tmp_path: Path) -> None:
    from toolkit import store
    from toolkit.analyse import FAMILIES, analyse_study
    from toolkit.analyse.shards import parse_shard_key
    from toolkit.config import study_from_dict
    from toolkit.dispatch import run_study, status_table
    from toolkit.dispatch.manifest import Manifest
    from toolkit.study import Layout
    from toolkit.units import done_members

    study = study_from_dict(study_doc("shards", tmp_path / "out", dispatch={"executor": "slurm"}), where="test")
    run_study(study, executor="slurm", wait=True)
    assert "10 done, 0 stale, 0 running, 0 pending, 0 failed" in status_table(study)

    layout = Layout(study)
    jobs = {k: r.job_id for (s, k), r in Manifest.load(layout.manifest).latest().items() if s == "measure"}
    assert set(jobs) == {f"r/{f}" for f in FAMILIES}
    assert len({j.split("_")[0] for j in jobs.values()}) == 1  # one array ...
    assert len({j.split("_")[1] for j in jobs.values()}) == len(FAMILIES)  # ... a task per shard
    for key in jobs:
        run, family = parse_shard_key(key)
        attrs = store.open_store(layout.shard(run, family), "shard").attrs
        assert attrs["members"] == ["r/seed1", "r/seed2"] and attrs["family"] == family

    single = analyse_study(study, done_members(study), path=tmp_path / "single.zarr")
    assert_same_summary(layout.summary, single)
