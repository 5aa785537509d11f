"""Smoke test of benchmarks/bench_js_pairs.py at tiny sizes: the ensemble looks like model outputs,
the old and new paths run interleaved and agree bit for bit, and a ratio comes out per M. No
assertion on time."""

from __future__ import annotations

import math

import numpy as np

from benchmarks import bench_js_pairs as bj


def test_ensemble_is_float16_log_probs_of_correlated_members() -> None:
    lps = bj.ensemble(3, 40, 32)
    assert len(lps) == 3 and all(x.dtype == np.float16 and x.shape == (40, 32) for x in lps)
    for x in lps:
        np.testing.assert_allclose(np.exp(x.astype(np.float64)).sum(axis=1), 1.0, rtol=2e-2)
    # Members share most of their logits: they agree on the top token far above chance (1/32).
    assert (np.argmax(lps[0], axis=1) == np.argmax(lps[1], axis=1)).mean() > 0.2


def test_run_reports_a_ratio_per_member_count(capsys) -> None:  # noqa: ANN001
    res = bj.run(members=(2, 3), positions=37, vocab=16, repeats=2, top_p=(0.5, 1.0))
    assert sorted(res) == [2, 3] and res[3]["pairs"] == 3
    for r in res.values():
        assert r["old_s"] > 0 and r["new_s"] > 0 and math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert math.isfinite(r["cpu_ratio"]) and r["cpu_ratio"] > 0
    assert "new/old" in capsys.readouterr().out
