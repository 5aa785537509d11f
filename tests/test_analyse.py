"""analyse_study on real Zarr stores written per the schemas, checked against direct computations.

The stores are synthetic but realistic: two runs x three members, log-softmax of random
logits with a low temperature for the text-like run (peaked outputs) and a high one for
the DNA-like run (near uniform), word embeddings correlated across members (less so for
the DNA run), random positive Fisher traces, loss curves and safetensors weights.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.spatial
import scipy.special
import scipy.stats

from tests.conftest import (
    FLOW_STEPS,
    N_POSITIONS,
    RUNS,
    assert_same_summary,
    make_study,
    marked,
    shared_study,
    stored,
    summary,
)
from toolkit import store
from toolkit.config import StudyConfig
from toolkit.errors import StoreError
from toolkit.study import Layout, Member


def pair_stats(values: list[float]) -> tuple[float, float]:
    from toolkit.metrics import pair_mean_std

    return pair_mean_std(np.asarray(values))



@pytest.fixture
def analysed(tmp_path_factory: pytest.TempPathFactory) -> StudyConfig:
    return shared_study(tmp_path_factory)


# --------------------------------------------------------------------------- tests


REQUIRED = {
    "kl_to_uniform_bits": ("run",), "entropy_bits": ("run",), "perplexity": ("run",),
    "top1_accuracy": ("run",), "js_distance": ("run", "top_p"), "js_distance_std": ("run", "top_p"),
    "argmax_agreement": ("run",), "argmax_agreement_std": ("run",),
    "topk_overlap": ("run", "k"), "topk_overlap_std": ("run", "k"),
    "local_spearman": ("run", "k"), "local_spearman_std": ("run", "k"),
    "procrustes_disparity": ("run",), "procrustes_disparity_std": ("run",),
    "fisher_share": ("run", "group"), "unigram_entropy_bits": ("run",),
    "rank_curve": ("run", "rank"), "fisher_block_share": ("run", "block"),
    "fisher_flow": ("run", "estimator", "flow_step_index", "group"),
    "conditional_entropy_bits": ("run", "order"), "contextual_cka_linear": ("run",),
    "cka_linear": ("run",), "cka_rbf": ("run",), "weight_distance": ("run",),
}


def test_summary_has_every_variable_with_dims_units_and_description(analysed: StudyConfig) -> None:
    ds = summary(analysed)
    assert list(ds["run"].values) == list(RUNS)
    assert list(ds["group"].values) == ["embeddings", "transformer", "head"]
    for name, dims in REQUIRED.items():
        assert ds[name].dims == dims, name
    for name, var in ds.variables.items():
        if name not in ds.dims:
            assert "run" in var.dims, name
        assert var.attrs.get("description"), name
    for name in REQUIRED:
        assert "units" in ds[name].attrs, name
    assert list(ds["corpus"].values) == ["wiki", "genome"]
    assert list(ds["kind"].values) == ["text", "dna"]
    assert ds.attrs["members_missing"] == []
    # the DNA-like run is near uniform and its members disagree more: the synthetic design shows
    text, dna = ds.sel(run="text-bpe"), ds.sel(run="dna-kmer2")
    assert float(dna.entropy_fraction) > float(text.entropy_fraction)
    assert float(dna.js_distance.sel(top_p=0.5)) > float(text.js_distance.sel(top_p=0.5))


def test_distribution_metrics_equal_direct_float64_computation(analysed: StudyConfig) -> None:
    from toolkit.metrics import js_distance

    ds = summary(analysed)
    for run in RUNS:
        lps = [np.asarray(stored(analysed, run, s, "predictions")["log_probs"][...], np.float64)
               for s in (1, 2, 3)]
        target = np.asarray(stored(analysed, run, 1, "predictions")["target"][...])
        vocab = lps[0].shape[1]
        ent, kl, ppl, acc, ranked = [], [], [], [], []
        for lp in lps:
            p = np.exp(lp)
            h = scipy.stats.entropy(p, base=2, axis=1)  # scipy renormalises the float16 rows
            ent.append(h.mean())
            kl.append(scipy.stats.entropy(p, np.full(vocab, 1 / vocab), base=2, axis=1).mean())
            ppl.append(math.exp(-lp[np.arange(len(target)), target].mean()))
            acc.append((lp.argmax(1) == target).mean())
            ranked.append(-np.sort(-p, axis=1).mean(0))
        r = ds.sel(run=run)
        np.testing.assert_allclose(float(r.entropy_bits), np.mean(ent), rtol=2e-3)
        np.testing.assert_allclose(float(r.kl_to_uniform_bits), np.mean(kl), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(float(r.perplexity), np.mean(ppl), rtol=1e-4)
        np.testing.assert_allclose(float(r.top1_accuracy), np.mean(acc), rtol=1e-12)
        np.testing.assert_allclose(float(r.top1_accuracy_std), np.std(acc), rtol=1e-9)  # ddof = 0
        np.testing.assert_allclose(r.rank_curve.values[:vocab], np.mean(ranked, 0), rtol=2e-3, atol=1e-6)
        assert np.isnan(r.rank_curve.values[vocab:]).all()
        assert float(r.top1_accuracy_ci_low) < float(r.top1_accuracy) < float(r.top1_accuracy_ci_high)
        pairs = list(itertools.combinations(range(3), 2))
        agree = [(lps[i].argmax(1) == lps[j].argmax(1)).mean() for i, j in pairs]
        np.testing.assert_allclose(float(r.argmax_agreement), np.mean(agree), rtol=1e-12)
        js = np.stack([js_distance(lps[i], lps[j], [0.1, 0.5, 0.9, 1.0]).mean(0) for i, j in pairs])
        np.testing.assert_allclose(r.js_distance.values, js.mean(0), rtol=1e-4)
        np.testing.assert_allclose(r.js_distance_std.values,
                                   [pair_stats(js[:, i])[1] for i in range(4)], rtol=1e-3)
        # p = 1.0 independently of toolkit.metrics: scipy on the full distributions
        ref = np.mean([scipy.spatial.distance.jensenshannon(
            np.exp(lps[i]), np.exp(lps[j]), base=2, axis=1).mean() for i, j in pairs])
        np.testing.assert_allclose(float(r.js_distance.sel(top_p=1.0)), ref, rtol=2e-3)


def test_embedding_metrics_equal_direct_computation(analysed: StudyConfig) -> None:
    from toolkit.metrics import local_spearman, topk_overlap

    ds = summary(analysed)
    for run, spec in RUNS.items():
        word = [np.asarray(stored(analysed, run, s, "embeddings")["word_embeddings"][...], np.float64)
                for s in (1, 2, 3)]
        ctx = [np.asarray(stored(analysed, run, s, "embeddings")["contextual"][...], np.float64)
               for s in (1, 2, 3)]
        pairs = list(itertools.combinations(range(3), 2))
        ks = [k for k in (1, 3, 5, 10, 40) if k < spec["vocab"]]
        r = ds.sel(run=run)
        over = np.stack([topk_overlap(word[i], word[j], ks).mean(1) for i, j in pairs])
        np.testing.assert_allclose(r.topk_overlap.sel(k=ks).values, over.mean(0), rtol=1e-9)
        spear = np.stack([np.nanmean(local_spearman(word[i], word[j], ks)[1:], 1) for i, j in pairs])
        np.testing.assert_allclose(r.local_spearman.sel(k=ks[1:]).values, spear.mean(0), rtol=1e-6)
        assert np.isnan(float(r.local_spearman.sel(k=1)))  # undefined for a single neighbour
        if spec["vocab"] <= 40:
            assert np.isnan(float(r.topk_overlap.sel(k=40)))
        disp = [scipy.spatial.procrustes(word[i], word[j])[2] for i, j in pairs]
        np.testing.assert_allclose(float(r.procrustes_disparity), np.mean(disp), rtol=1e-4)

        def cka(x: np.ndarray, y: np.ndarray) -> float:  # naive linear CKA, float64
            x, y = x - x.mean(0), y - y.mean(0)
            return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))

        np.testing.assert_allclose(float(r.cka_linear), np.mean([cka(word[i], word[j]) for i, j in pairs]),
                                   rtol=1e-4)
        np.testing.assert_allclose(float(r.contextual_cka_linear),
                                   np.mean([cka(ctx[i], ctx[j]) for i, j in pairs]), rtol=1e-4)
        assert float(r.weight_distance) > 0
    assert float(ds.procrustes_disparity.sel(run="dna-kmer2")) > float(
        ds.procrustes_disparity.sel(run="text-bpe"))


def test_fisher_shares_sum_to_one_and_match_direct_normalisation(analysed: StudyConfig) -> None:
    ds = summary(analysed)
    np.testing.assert_allclose(ds.fisher_share.sum("group").values, 1.0, rtol=1e-12)
    np.testing.assert_allclose(ds.fisher_share_estimator.sum("group").values, 1.0, rtol=1e-12)
    for run in RUNS:
        traces = [np.asarray(stored(analysed, run, s, "fisher")["fisher_trace"][...]) for s in (1, 2, 3)]
        norm = np.stack([t / t.sum(2, keepdims=True) for t in traces])  # (M, E, S, G)
        paper = np.stack([norm[..., 0], norm[..., 1:-1].sum(-1), norm[..., -1]], -1)
        r = ds.sel(run=run)
        np.testing.assert_allclose(r.fisher_share.values, paper[:, 0, -1].mean(0), rtol=1e-12)
        np.testing.assert_allclose(r.fisher_flow.values[:, :3], paper.mean(0), rtol=1e-12)
        np.testing.assert_allclose(r.fisher_flow_step.values, FLOW_STEPS)
        blocks = list(ds.block.values)
        layers = RUNS[run]["layers"]
        want = norm[:, 0, -1].mean(0)
        got = r.fisher_block_share.values
        np.testing.assert_allclose(got[[blocks.index(b) for b in
                                        ["embeddings", *[f"layer.{i}" for i in range(layers)], "head"]]],
                                   want, rtol=1e-12)
        assert np.isnan(got).sum() == len(blocks) - layers - 2  # shallower run padded with NaN
    # the design puts the DNA run's Fisher mass into the embeddings
    assert float(ds.fisher_share.sel(run="dna-kmer2", group="embeddings")) > float(
        ds.fisher_share.sel(run="text-bpe", group="embeddings"))


def test_entropy_profile_and_loss_curves_come_from_the_stores(analysed: StudyConfig) -> None:
    ds = summary(analysed)
    for run in RUNS:
        profile = dict(store.open_store(Layout(analysed).run_tokens_dir(run) / "tokens.zarr",
                                        "tokens").attrs)["entropy_profile"]
        r = ds.sel(run=run)
        assert float(r.unigram_entropy_bits) == pytest.approx(profile["unigram_bits"])
        np.testing.assert_allclose(r.conditional_entropy_bits.values, profile["conditional_bits"])
        np.testing.assert_allclose(r.conditional_entropy_bits_per_symbol.values,
                                   np.array(profile["conditional_bits"]) / profile["symbols_per_token"])
        assert np.isnan(float(r.analytic_entropy_rate_bits_per_symbol))
        # the rate and its interval are the profile's (toolkit/entropy/rate.py), not re-derived
        assert int(r.entropy_rate_order) == (2 if RUNS[run]["kind"] == "dna" else -1)
        for key in ("entropy_rate_bits_per_symbol", "entropy_rate_low", "entropy_rate_high",
                    "entropy_rate_heldout_bits_per_symbol", "entropy_rate_ppmd_bits_per_symbol"):
            assert float(r[key]) == pytest.approx(profile[key])
        assert str(r.entropy_rate_method.values) == profile["entropy_rate_method"]
        np.testing.assert_allclose(r.context_coverage.values, profile["context_coverage"])
        loss = np.asarray(stored(analysed, run, 2, "train")["loss"][...], np.float64)
        np.testing.assert_allclose(r.loss_curve.sel(member=2).values, loss)


def test_incomplete_members_are_left_out_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from toolkit.analyse import analyse_study

    # seed 4 has every store but no evaluate marker in text-bpe; dna-kmer2 has one complete member
    study = make_study(tmp_path, seeds=(1, 2, 3, 4),
                       complete={"text-bpe": (1, 2, 3), "dna-kmer2": (2,)})
    with caplog.at_level(logging.WARNING, logger="toolkit.analyse"):
        analyse_study(study, marked(study))
    ds = summary(study)
    assert sorted(ds.attrs["members_missing"]) == sorted(
        ["text-bpe/seed4", "dna-kmer2/seed1", "dna-kmer2/seed3", "dna-kmer2/seed4"])
    assert "text-bpe/seed4" in caplog.text and "dna-kmer2/seed3" in caplog.text
    assert list(ds.n_members.values) == [3, 1]
    lps = [np.asarray(stored(study, "text-bpe", s, "predictions")["log_probs"][...], np.float64)
           for s in (1, 2, 3)]
    target = np.asarray(stored(study, "text-bpe", 1, "predictions")["target"][...])
    acc = np.mean([(lp.argmax(1) == target).mean() for lp in lps])
    np.testing.assert_allclose(float(ds.top1_accuracy.sel(run="text-bpe")), acc, rtol=1e-12)
    dna = ds.sel(run="dna-kmer2")
    assert np.isnan(dna.js_distance.values).all() and np.isnan(float(dna.argmax_agreement))
    assert np.isnan(dna.topk_overlap.values).all() and np.isnan(float(dna.procrustes_disparity))
    assert np.isfinite(float(dna.entropy_bits)) and np.isnan(float(dna.entropy_bits_std))
    assert "dna-kmer2: 1 complete member" in caplog.text


def test_no_complete_member_is_a_store_error_naming_what_to_run(tmp_path: Path) -> None:
    from toolkit.analyse import analyse_study

    study = make_study(tmp_path, seeds=(1, 2), complete={"text-bpe": (), "dna-kmer2": ()})
    with pytest.raises(StoreError, match="toolkit run"):
        analyse_study(study, marked(study))
    assert not Layout(study).summary.exists()


def test_schema_mismatch_is_the_store_error_and_leaves_no_summary(tmp_path: Path) -> None:
    import zarr

    from toolkit.analyse import analyse_study

    study = make_study(tmp_path, seeds=(1, 2))
    path = Layout(study).member_dir(Member("dna-kmer2", 2)) / "predictions.zarr"
    zarr.open_group(str(path), mode="r+").attrs["schema_version"] = 99
    zarr.consolidate_metadata(str(path))
    with pytest.raises(StoreError, match="schema version 99"):
        analyse_study(study, marked(study))
    assert not Layout(study).summary.exists()


def test_distributions_are_reduced_chunk_by_chunk(analysed: StudyConfig) -> None:
    """No Dask task ever holds a member's whole (position, vocab) array, only 64-row chunks."""
    from dask.callbacks import Callback

    from toolkit.analyse.distributions import distribution_run

    sizes: list[int] = []

    class Record(Callback):
        def _posttask(self, key, result, dsk, state, worker_id) -> None:  # noqa: ANN001
            sizes.append(int(getattr(result, "nbytes", 0)))

    vocab = RUNS["text-bpe"]["vocab"]
    ms = [Member("text-bpe", s) for s in (1, 2, 3)]
    with Record():
        out = distribution_run(analysed, "text-bpe", ms)
    assert out["n_positions"] == N_POSITIONS and len(sizes) > 20
    whole = N_POSITIONS * vocab * 2  # one member's float16 log-probs
    assert max(sizes) <= 64 * vocab * 8 < whole  # at most one float64 chunk of 64 positions


# --------------------------------------------------------------------------- shards


def _same(a: Any, b: Any, where: str = "") -> None:
    """Equal structure, types of containers and values bit for bit (NaN where NaN)."""
    assert type(a) is type(b) or (isinstance(a, float) and isinstance(b, float)), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or a == b, (where, a, b)
    else:
        assert a == b, where


def test_shard_encoding_round_trips_random_results_exactly(tmp_path: Path) -> None:
    """Nested results as the families return them (int and tuple keys, NaN, 0-d and empty
    arrays, numpy scalars) come back from a real shard store bit for bit."""
    from toolkit.analyse.shards import read_shard, write_shard

    rng = np.random.default_rng(7)
    for trial in range(3):
        result = {
            "scalar": float(rng.normal()), "nan": math.nan, "inf": -math.inf, "count": int(rng.integers(1e9)),
            "np_scalar": np.float64(rng.normal()), "f32": rng.normal(size=5).astype(np.float32),
            "curve": np.append(rng.normal(size=int(rng.integers(1, 50))), math.nan),
            "steps": np.arange(int(rng.integers(0, 4)), dtype=np.int64), "zero_d": np.array(rng.normal()),
            "shares": {"batch": [{"embeddings": rng.random(3), "layer.0": rng.random(3)} for _ in range(2)]},
            "by_seed": {1: (rng.random(4), rng.random(4)), 7: (np.zeros(0), np.zeros(0))},
            "by_pair": {("batch", "head"): [float(rng.random()), math.nan]},
            "pair": (float(rng.random()), math.nan), "empty": {}, "text": "kmer3", "none": None,
        }
        layout = Layout(make_study(tmp_path / f"s{trial}", seeds=(1,)))
        write_shard(layout, "s", "r", "fisher", [Member("r", 1)], result, {"definitions": "toolkit"})
        ids, back = read_shard(layout, "r", "fisher")
        assert ids == ["r/seed1"]
        expected = {**result, "np_scalar": float(result["np_scalar"])}
        _same(expected, back)


def test_summary_from_shards_equals_the_single_process_summary_bit_for_bit(
        analysed: StudyConfig, tmp_path: Path) -> None:
    """Every (run, family) shard written as a measure unit writes it, then reduced: the same
    summary as computing every family in one process; a shard of other members is refused."""
    from toolkit.analyse import FAMILIES, analyse_study, run_shard

    done = marked(analysed)
    for run in analysed.runs:
        for family in FAMILIES:
            run_shard(analysed, run, family, [m for m in done if m.run == run])
    path = analyse_study(analysed, done, from_shards=True, path=tmp_path / "sharded.zarr")
    assert_same_summary(Layout(analysed).summary, path)
    # A shard computed from two of the run's three members is refused by name.
    run = next(iter(analysed.runs))
    run_shard(analysed, run, "embeddings", [m for m in done if m.run == run][:2])
    with pytest.raises(StoreError, match=f"{Layout(analysed).shard(run, 'embeddings')}.*computed from members"):
        analyse_study(analysed, done, from_shards=True, path=tmp_path / "refused.zarr")
    assert not (tmp_path / "refused.zarr").exists()
    run_shard(analysed, run, "embeddings", [m for m in done if m.run == run])  # leave it as found
