"""Smoke test of benchmarks/bench_scale.py (issue 12) at tiny sizes: the fit helpers recover known
laws, and every stage the benchmark times runs through the toolkit's real path and gives sane
results (the FASTA reads back, the token stores are built, a predictions store round-trips, the
analyses give distances in range). No assertion on time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_scale as bs


def test_fit_power_law_recovers_a_known_exponent() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([30.0, 100.0, 300.0, 3000.0])
    values = 2.5 * sizes**0.8 * np.exp(rng.normal(0, 0.01, sizes.size))
    b, c = bs.fit_power_law(sizes, values)
    assert b == pytest.approx(0.8, abs=0.02) and c == pytest.approx(2.5, rel=0.1)
    b0, at = bs.extrapolate([30, 300], [1.7e9, 1.7e9], 3000)  # bounded memory: exponent 0
    assert b0 == pytest.approx(0.0, abs=1e-9) and at == pytest.approx(1.7e9)
    a, b = bs.fit_affine([100, 300], [130.0, 230.0])
    assert a == pytest.approx(80.0) and b == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bs.fit_power_law([5, 5], [1, 2])


def test_fit_costs_recovers_member_and_pair_costs() -> None:
    member, pair, fixed = 2e-3, 5e-3, 4.0
    costs = {"member": member, "pair": pair, "fixed": fixed}
    t = {(n, p): bs.predict_costs(costs, n, p) for n, p in ((3, 1000), (2, 10_000), (3, 10_000))}
    got = bs.fit_costs(t[(3, 1000)], t[(2, 10_000)], t[(3, 10_000)], 1000, 10_000)
    assert got["member"] == pytest.approx(member) and got["pair"] == pytest.approx(pair)
    assert got["fixed"] == pytest.approx(fixed)
    # 15 members, 105 pairs
    assert bs.predict_costs(got, 15, 100) == pytest.approx(fixed + 100 * (15 * member + 105 * pair))


def test_pool_windows_cover_exactly_the_positions() -> None:
    windows = bs.pool_windows(10_000, 700, 256)
    assert sum(m for _, m in windows) == 10_000
    assert all(lo >= 0 and lo + m <= 700 for lo, m in windows)
    assert len({lo for lo, _ in windows}) > 1  # not the same rows over and over


@pytest.mark.slow
def test_markov_fasta_is_read_back_and_prepared_by_the_toolkit(tmp_path: Path) -> None:
    from toolkit.config import DnaConfig
    from toolkit.corpora.dna import _read_fasta

    fasta = tmp_path / "m.fa"
    assert bs.write_markov_fasta(fasta, 0.05, seed=3, chrom_mbases=0.02) == 50_000
    pieces = list(_read_fasta(fasta, DnaConfig()))
    assert {r.source for r in pieces} == {"chr0", "chr1", "chr2"}
    assert all(1000 <= len(r.seq) <= 2000 and set(r.seq) <= set("ACGT") for r in pieces)
    # base composition of a 1.9-bit source is far from degenerate
    counts = np.bincount(np.frombuffer("".join(r.seq for r in pieces).encode(), np.uint8))[[65, 67, 71, 84]]
    assert counts.min() > 0.1 * counts.sum()
    for tok in ("kmer6", "bpe4096"):
        r = bs.measure_prepare(fasta, 0.05, tok, tmp_path / f"out-{tok}", tok_records=20)
        assert r["records"] == len(pieces) and r["symbols"] == sum(len(p.seq) for p in pieces)
        assert r["tokens"] > 0 and r["max_rss"] > 0 and r["wall_s"] > 0
        assert r["phase_peak_rss"]["tokenizer"] > 0 and r["phase_seconds"]["tokenizer"] > 0
    lines = bs.report_prepare([{"mbases": m, "tokenizer": "kmer6", "wall_s": m, "cpu_s": m,
                                "max_rss": 1e9, "phase_peak_rss": {}} for m in (1.0, 10.0)])
    assert lines and "size^1.00" in lines[0] and "size^0.00" in lines[0] and "0 s + 1.000 s/Mbase" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(("chunk", "compressor"), [(None, "schema"), (128, "blosc-lz4-shuffle"),
                                                   (512, "none")])
def test_predictions_store_round_trips(tmp_path: Path, chunk: int | None, compressor: str) -> None:
    from toolkit import store

    pool = bs.synthetic_log_probs(300, 64, seed=1)
    assert np.allclose(np.exp(pool.astype(np.float64)).sum(axis=1), 1.0, atol=0.05)
    path = tmp_path / "p.zarr"
    w = bs.write_predictions_store(path, pool, 1000, chunk=chunk, compressor=compressor, batch=97)
    assert w["raw_bytes"] == 1000 * 64 * 2 and w["bytes_on_disk"] > 0 and w["seconds"] > 0
    expected = np.concatenate([pool[lo:lo + m] for lo, m in bs.pool_windows(1000, 300, 97)])
    g = store.open_store(path, "predictions")
    assert g["log_probs"].chunks == (chunk or 1000, 64)  # the schema's 2048 is capped at the length
    assert np.array_equal(np.asarray(g["log_probs"][...]), expected)
    r = bs.read_predictions_store(path)
    assert r["checksum"] == pytest.approx(float(expected.max(axis=1).astype(np.float64).sum()))
    assert r["dask_chunks"] == math.ceil(1000 / (chunk or 1000))


@pytest.mark.slow
def test_analyses_run_on_the_synthetic_stores(tmp_path: Path) -> None:
    bs.build_analysis_study(tmp_path, 300, 3, vocab=64, dim=16, contextual=24)
    d = bs.measure_analyse(tmp_path, 300, 3, "distribution")
    js = np.asarray(d["summary"]["js_distance"])
    assert js.shape == (11,) and np.all((js > 0) & (js < 1))
    assert 0 < d["summary"]["argmax_agreement"] < 1 and d["max_rss"] > 0
    assert 0 < d["summary"]["entropy_bits"] < math.log2(64)
    e = bs.measure_analyse(tmp_path, 300, 2, "embedding")
    assert 0 < e["summary"]["cka_linear"] <= 1
