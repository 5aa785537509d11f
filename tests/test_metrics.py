"""toolkit.metrics against independent references (scipy, naive float64 loops) on random inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial import procrustes as scipy_procrustes
from scipy.spatial.distance import cdist, jensenshannon
from scipy.special import log_softmax

from toolkit import metrics
from toolkit.errors import CheckpointError, ConfigError, StoreError

TOP_P = (0.05, 0.1, 0.2, 0.3, 0.5, 0.9, 1.0)
KS = (1, 2, 3, 10, 37, 200)


def random_log_probs(rng: np.random.Generator, n: int, v: int, scale: float = 3.0,
                     dtype: type = np.float32) -> np.ndarray:
    """Log-softmax of random logits: peaky for large ``scale``, near-uniform for small."""
    return log_softmax(rng.standard_normal((n, v)) * scale, axis=1).astype(dtype)


def correlated_embeddings(rng: np.random.Generator, v: int = 150, d: int = 12,
                          noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    base = rng.standard_normal((v, d))
    a = base + noise * rng.standard_normal((v, d))
    b = base + noise * rng.standard_normal((v, d))
    return a.astype(np.float32), b.astype(np.float32)


# --------------------------------------------------------------------------- naive references


def naive_truncate(p: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest most-probable set reaching mass top_p (ties by index), renormalise."""
    p = p / p.sum()
    order = np.argsort(-p, kind="stable")
    keep = len(p)
    if top_p < 1.0:
        total = 0.0
        for n, token in enumerate(order, start=1):
            total += p[token]
            if total >= top_p:
                keep = n
                break
    out = np.zeros_like(p)
    out[order[:keep]] = p[order[:keep]]
    return out / out.sum()


def naive_neighbours(sim: np.ndarray, i: int, k: int) -> np.ndarray:
    order = np.argsort(-sim[i], kind="stable")
    return order[order != i][:k]


def naive_spearman(sim_a: np.ndarray, sim_b: np.ndarray, ks: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-token rho from A's and from B's top-k (NaN where undefined), with scipy.stats.spearmanr."""
    v = sim_a.shape[0]
    from_a = np.full((len(ks), v), np.nan)
    from_b = np.full((len(ks), v), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spearmanr warns on constant input (NaN result)
        for j, k in enumerate(ks):
            k = min(k, v - 1)
            if k < 2:
                continue
            for i in range(v):
                na, nb = naive_neighbours(sim_a, i, k), naive_neighbours(sim_b, i, k)
                from_a[j, i] = stats.spearmanr(sim_a[i, na], sim_b[i, na]).statistic
                from_b[j, i] = stats.spearmanr(sim_a[i, nb], sim_b[i, nb]).statistic
    return from_a, from_b


def naive_authors(sim_a: np.ndarray, sim_b: np.ndarray, ks: tuple[int, ...]) -> np.ndarray:
    """The authors' recipe written out per token: A's top-k, ordinal ranks, 1e-8 in the denominator,
    and a second pass over the same subset re-ordered by B."""
    def rho(x: np.ndarray, y: np.ndarray) -> float:
        rx = np.argsort(np.argsort(x, kind="stable"), kind="stable") + 1.0
        ry = np.argsort(np.argsort(y, kind="stable"), kind="stable") + 1.0
        rx, ry = rx - rx.mean(), ry - ry.mean()
        return float((rx * ry).sum() / (np.sqrt((rx ** 2).sum() * (ry ** 2).sum()) + 1e-8))

    v = sim_a.shape[0]
    out = np.empty((len(ks), v))
    for j, k in enumerate(ks):
        k = min(k, v - 1)
        for i in range(v):
            idx = naive_neighbours(sim_a, i, k)
            x, y = sim_a[i, idx], sim_b[i, idx]
            second = np.argsort(-y, kind="stable")
            out[j, i] = 0.5 * (rho(x, y) + rho(x[second], y[second]))
    return out


def naive_hsic_cka(kx: np.ndarray, ky: np.ndarray) -> float:
    n = kx.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    hsic = lambda k, m: np.trace(k @ h @ m @ h)  # noqa: E731
    return hsic(kx, ky) / np.sqrt(hsic(kx, kx) * hsic(ky, ky))


def naive_rbf_gram(x: np.ndarray, frac: float) -> np.ndarray:
    n = x.shape[0]
    d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
    median = np.median([d[i, j] for i in range(n) for j in range(i + 1, n)])
    s = frac * median
    return np.exp(-(d ** 2) / (2 * s * s))


# --------------------------------------------------------------------------- sorting


@settings(max_examples=40, deadline=None, database=None)
@given(st.sampled_from([np.float16, np.float32, np.float64]), st.integers(1, 5), st.integers(1, 40),
       st.integers(0, 2**32 - 1))
def test_desc_order_is_a_stable_descending_sort(dtype: type, rows: int, cols: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Few distinct values so ties are common; -0.0, +-inf and subnormals included.
    pool = np.array([-np.inf, -3.5, -1.0, -0.0, 0.0, 1e-40, 0.25, 2.0, np.inf])
    x = rng.choice(pool, size=(rows, cols)).astype(dtype)
    expected = np.argsort(-x.astype(np.float64), axis=1, kind="stable")
    assert np.array_equal(metrics._desc_order(x), expected)


# --------------------------------------------------------------------------- output distributions


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_distribution_stats_against_scipy(dtype: type) -> None:
    rng = np.random.default_rng(0)
    n, v = 700, 61  # more rows than one slab
    lp = random_log_probs(rng, n, v, dtype=dtype)
    target = rng.integers(0, v, n)
    out = metrics.distribution_stats(lp, target)
    p = np.exp(lp.astype(np.float64))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out["entropy_bits"], stats.entropy(p, base=2, axis=1), rtol=1e-10, atol=1e-12)
    uniform = np.full(v, 1.0 / v)
    kl = np.array([stats.entropy(row, uniform, base=2) for row in p])
    np.testing.assert_allclose(out["kl_to_uniform_bits"], kl, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["nll_nats"], -np.log(p[np.arange(n), target]), rtol=1e-12)
    assert np.array_equal(out["correct"], np.array([np.argmax(row) == t for row, t in zip(lp, target, strict=True)]))
    assert 0 < out["correct"].sum() < n
    np.testing.assert_allclose(out["rank_sum"], np.array([sorted(row, reverse=True) for row in p]).sum(axis=0),
                               rtol=1e-10)
    assert out["rank_sum"].sum() == pytest.approx(n)


def test_distribution_stats_rejects_bad_input() -> None:
    lp = random_log_probs(np.random.default_rng(1), 5, 8)
    with pytest.raises(StoreError, match="target"):
        metrics.distribution_stats(lp, np.array([0, 1, 2, 3, 8]))
    with pytest.raises(StoreError, match="target"):
        metrics.distribution_stats(lp, np.zeros(4, dtype=int))
    with pytest.raises(StoreError, match="lp"):
        metrics.distribution_stats(lp[0], np.zeros(1, dtype=int))


@pytest.mark.parametrize("scale", [0.3, 3.0])  # near-uniform (DNA-like) and peaky (text-like)
def test_js_distance_against_scipy_and_naive_truncation(scale: float) -> None:
    rng = np.random.default_rng(2)
    n, v = 300, 53
    a, b = random_log_probs(rng, n, v, scale), random_log_probs(rng, n, v, scale)
    out = metrics.js_distance(a, b, TOP_P)
    assert out.shape == (n, len(TOP_P))
    pa, pb = np.exp(a.astype(np.float64)), np.exp(b.astype(np.float64))
    full = np.array([jensenshannon(x, y, base=2) for x, y in zip(pa, pb, strict=True)])
    np.testing.assert_allclose(out[:, -1], full, rtol=1e-9, atol=1e-12)
    for j, p in enumerate(TOP_P):
        ref = np.array([jensenshannon(naive_truncate(x, p), naive_truncate(y, p), base=2)
                        for x, y in zip(pa, pb, strict=True)])
        np.testing.assert_allclose(out[:, j], ref, rtol=1e-9, atol=1e-12, err_msg=f"top_p={p}")
    assert (out >= 0).all() and (out <= 1).all()
    assert out.std() > 0.01


def test_js_distance_float16_ties_and_identical_members() -> None:
    rng = np.random.default_rng(3)
    # float16 log-probs of a small vocabulary: many exactly tied probabilities at the cut.
    a = np.round(random_log_probs(rng, 400, 24, 1.0, np.float64) * 4) / 4
    b = np.round(random_log_probs(rng, 400, 24, 1.0, np.float64) * 4) / 4
    a[rng.random(a.shape) < 0.2] = -np.inf  # tokens a model gives no mass at all
    b[rng.random(b.shape) < 0.2] = -np.inf
    a, b = a.astype(np.float16), b.astype(np.float16)
    out = metrics.js_distance(a, b, TOP_P)
    pa, pb = np.exp(a.astype(np.float64)), np.exp(b.astype(np.float64))
    for j, p in enumerate(TOP_P):
        ref = [jensenshannon(naive_truncate(x, p), naive_truncate(y, p), base=2) for x, y in zip(pa, pb, strict=True)]
        np.testing.assert_allclose(out[:, j], ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(metrics.js_distance(a, a, TOP_P), 0.0, atol=1e-7)
    stats_a = metrics.distribution_stats(a, rng.integers(0, 24, 400))
    np.testing.assert_allclose(stats_a["entropy_bits"], stats.entropy(pa, base=2, axis=1), rtol=1e-9)


@settings(max_examples=25, deadline=None, database=None)
@given(st.integers(2, 30), st.floats(0.01, 1.0), st.integers(0, 2**32 - 1))
def test_js_distance_property(v: int, p: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = random_log_probs(rng, 3, v, 2.0, np.float64), random_log_probs(rng, 3, v, 2.0, np.float64)
    out = metrics.js_distance(a, b, [p])[:, 0]
    ref = [jensenshannon(naive_truncate(np.exp(x), p), naive_truncate(np.exp(y), p), base=2) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out, metrics.js_distance(b, a, [p])[:, 0], rtol=1e-12, atol=1e-14)


def test_js_distance_rejects_bad_input() -> None:
    a = random_log_probs(np.random.default_rng(4), 4, 6)
    with pytest.raises(ConfigError, match="top_p"):
        metrics.js_distance(a, a, [0.0, 0.5])
    with pytest.raises(ConfigError, match="top_p"):
        metrics.js_distance(a, a, [1.5])
    with pytest.raises(StoreError, match="shape"):
        metrics.js_distance(a, a[:3], [1.0])


def test_argmax_agreement() -> None:
    rng = np.random.default_rng(5)
    a, b = random_log_probs(rng, 500, 7), random_log_probs(rng, 500, 7)
    b[:100] = a[:100]
    out = metrics.argmax_agreement(a, b)
    assert np.array_equal(out, np.array([np.argmax(x) == np.argmax(y) for x, y in zip(a, b, strict=True)]))
    assert out[:100].all() and 0 < out[100:].sum() < 400


# --------------------------------------------------------------------------- lazy versions


def test_lazy_versions_equal_eager_on_a_real_predictions_store(tmp_path: Path) -> None:
    from toolkit import store

    rng = np.random.default_rng(6)
    n, v = 1100, 40
    members = [random_log_probs(rng, n, v, 2.0, np.float16) for _ in range(2)]
    target = rng.integers(0, v, n).astype(np.int32)
    for seed, lp in enumerate(members, start=1):
        attrs = {"member": f"r/seed{seed}", "run": "r", "seed": seed, "checkpoint": "final",
                 "tokenizer_hash": "0" * 64, "vocab_size": v}
        with store.writing(tmp_path / f"seed{seed}.zarr", "predictions", attrs) as group:
            store.create_array(group, "predictions", "log_probs", data=lp, chunks=(256, v))
            store.create_array(group, "predictions", "target", data=target)
    ds = [store.open_dataset(tmp_path / f"seed{s}.zarr", "predictions", chunks={}) for s in (1, 2)]
    lp_a, lp_b = ds[0]["log_probs"].data, ds[1]["log_probs"].data
    assert lp_a.numblocks[0] > 1

    import dask

    lazy = metrics.lazy_distribution_stats(lp_a, ds[0]["target"].data)
    computed = dict(zip(lazy, dask.compute(*lazy.values()), strict=True))
    eager = metrics.distribution_stats(members[0], target)
    for key in eager:
        np.testing.assert_allclose(computed[key], eager[key], rtol=1e-12, err_msg=key)
    js = metrics.lazy_js_distance(lp_a, lp_b, TOP_P)
    assert js.chunks[0] == lp_a.chunks[0]
    np.testing.assert_array_equal(js.compute(), metrics.js_distance(*members, TOP_P))
    np.testing.assert_array_equal(metrics.lazy_argmax_agreement(lp_a, lp_b).compute(),
                                  metrics.argmax_agreement(*members))
    # xarray DataArrays are accepted as they are (still lazy).
    js_xr = metrics.lazy_js_distance(ds[0]["log_probs"], ds[1]["log_probs"], [0.5])
    assert js_xr.numblocks[0] == lp_a.numblocks[0]
    np.testing.assert_array_equal(js_xr.compute(), metrics.js_distance(*members, [0.5]))


def test_lazy_js_distance_aligns_different_chunkings() -> None:
    import dask.array as da

    rng = np.random.default_rng(7)
    a, b = random_log_probs(rng, 500, 30), random_log_probs(rng, 500, 30)
    lazy = metrics.lazy_js_distance(da.from_array(a, chunks=(128, 10)), da.from_array(b, chunks=(77, 30)), [0.5, 1.0])
    np.testing.assert_array_equal(lazy.compute(), metrics.js_distance(a, b, [0.5, 1.0]))


def ensemble_log_probs(rng: np.random.Generator, m: int, n: int, v: int) -> list[np.ndarray]:
    """M members' float16 log-probs with ties (quarter-nat steps), -inf entries, near-uniform rows,
    rows equal to another member's and rows one float16 step from it (the authors' rule gives
    NaN on many of those): every branch of both rules."""
    out = []
    for k in range(m):
        x = np.round(random_log_probs(rng, n, v, 1.0 + k, np.float64) * 4) / 4
        x[rng.random(x.shape) < 0.15] = -np.inf
        x[: n // 10] = random_log_probs(rng, n // 10, v, 0.05, np.float64)  # near uniform
        out.append(x.astype(np.float16))
    for k in range(1, m):
        out[k][n // 10: n // 5] = out[0][n // 10: n // 5]  # identical rows
        near = np.arange(n // 5, n // 3)
        out[k][near] = random_log_probs(rng, len(near), v, 0.3, np.float16)
        out[0][near] = out[k][near]
        col = rng.integers(0, v, len(near))
        out[k][near, col] = np.nextafter(out[k][near, col], np.float16(0))
    return out


@pytest.mark.parametrize("rule", ["reach", "authors"])
@pytest.mark.parametrize(("m", "v"), [(2, 7), (3, 64), (5, 7), (5, 64)])
def test_pairwise_js_distance_equals_js_distance_per_pair(m: int, v: int, rule: str) -> None:
    import itertools

    rng = np.random.default_rng(100 + m * v)
    n = 203
    lps = ensemble_log_probs(rng, m, n, v)
    pairs = list(itertools.combinations(range(m), 2))
    ref = np.stack([metrics.js_distance(lps[i], lps[j], TOP_P, rule) for i, j in pairs])
    assert ref.shape == (len(pairs), n, len(TOP_P))
    # Default budget (one slab), and slabs of 1, 2, 3 and 17 rows (203 is no multiple of them).
    if rule == "authors":
        assert np.isnan(ref).any()  # NaN where NaN
    per_row = m * v * (4 * (len(TOP_P) + 1) if rule == "authors" else 36)
    for rows in (None, 1, 2, 3, 17):
        kw = {} if rows is None else {"slab_bytes": rows * per_row}
        np.testing.assert_array_equal(metrics.pairwise_js_distance(lps, TOP_P, rule, **kw), ref,
                                      err_msg=f"slab of {rows} rows")


@pytest.mark.parametrize("rule", ["reach", "authors"])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_lazy_pairwise_js_distance_equals_js_distance_per_pair(m: int, rule: str) -> None:
    import itertools

    import dask.array as da

    rng = np.random.default_rng(200 + m)
    n, v = 301, 64
    lps = ensemble_log_probs(rng, m, n, v)
    pairs = list(itertools.combinations(range(m), 2))
    ref = np.stack([metrics.js_distance(lps[i], lps[j], TOP_P, rule) for i, j in pairs])
    agree = np.stack([metrics.argmax_agreement(lps[i], lps[j]) for i, j in pairs])
    # Chunkings that do not divide 301, different per member, the vocabulary split too.
    lazy_lps = [da.from_array(x, chunks=(64 + 13 * k, 64 if k % 2 else 20)) for k, x in enumerate(lps)]
    js = metrics.lazy_pairwise_js_distance(lazy_lps, TOP_P, rule, slab_bytes=5 * m * v * 36)
    assert js.shape == ref.shape and js.chunks[1] == lazy_lps[0].chunks[0] and js.numblocks[0] == 1
    np.testing.assert_array_equal(js.compute(), ref)
    np.testing.assert_array_equal(metrics.lazy_pairwise_js_distance(lazy_lps, TOP_P, rule).compute(), ref)
    lazy_agree = metrics.lazy_pairwise_argmax_agreement(lazy_lps)
    assert lazy_agree.dtype == bool and lazy_agree.chunks[1] == lazy_lps[0].chunks[0]
    np.testing.assert_array_equal(lazy_agree.compute(), agree)
    np.testing.assert_array_equal(metrics.pairwise_argmax_agreement(lps), agree)


def test_pairwise_js_distance_edge_cases() -> None:
    import dask.array as da

    rng = np.random.default_rng(9)
    a = random_log_probs(rng, 10, 6, dtype=np.float16)
    assert metrics.pairwise_js_distance([a], TOP_P).shape == (0, 10, len(TOP_P))  # one member: no pair
    assert metrics.lazy_pairwise_js_distance([da.from_array(a, chunks=4)], TOP_P).compute().shape == (0, 10, len(TOP_P))
    assert metrics.lazy_pairwise_argmax_agreement([da.from_array(a, chunks=4)]).compute().shape == (0, 10)
    with pytest.raises(StoreError, match="no members"):
        metrics.pairwise_js_distance([], TOP_P)
    with pytest.raises(StoreError, match="shape"):
        metrics.pairwise_js_distance([a, a, a[:3]], TOP_P)
    with pytest.raises(StoreError, match="shape"):
        metrics.lazy_pairwise_js_distance([da.from_array(a), da.from_array(a[:3])], TOP_P)
    with pytest.raises(ConfigError, match="top_p"):
        metrics.pairwise_js_distance([a, a], [0.0])
    with pytest.raises(ConfigError, match="top_p_rule"):
        metrics.pairwise_js_distance([a, a], TOP_P, "nope")


# --------------------------------------------------------------------------- static embeddings


def test_cosine_similarity_and_topk_neighbours() -> None:
    rng = np.random.default_rng(8)
    emb = rng.standard_normal((60, 5))
    emb[7] = 0.0  # an untrained padding row
    sim = metrics.cosine_similarity(emb)
    ref = 1 - cdist(emb, emb, "cosine")
    ref[7], ref[:, 7] = 0.0, 0.0
    np.testing.assert_allclose(sim, ref, atol=1e-12)
    assert metrics.cosine_similarity(emb.astype(np.float32)).dtype == np.float32
    for k in (1, 4, 59, 500):
        nb = metrics.topk_neighbours(sim, k)
        assert nb.shape == (60, min(k, 59))
        assert np.array_equal(nb, np.stack([naive_neighbours(sim, i, k) for i in range(60)]))
    assert np.array_equal(metrics.topk_neighbours(sim, 59)[7], [i for i in range(60) if i != 7])


def test_topk_overlap_against_naive_jaccard() -> None:
    rng = np.random.default_rng(9)
    a, b = correlated_embeddings(rng, noise=0.7)
    sa, sb = metrics.cosine_similarity(a), metrics.cosine_similarity(b)
    out = metrics.topk_overlap(a, b, KS + (149, 1000))
    for j, k in enumerate(KS + (149, 1000)):
        ref = []
        for i in range(len(a)):
            x, y = set(naive_neighbours(sa, i, k)), set(naive_neighbours(sb, i, k))
            ref.append(len(x & y) / len(x | y))
        np.testing.assert_array_equal(out[j], ref)
    assert (out[-2:] == 1).all()  # k >= V - 1: every other token
    assert 0 < out[2].mean() < 1


def test_local_spearman_symmetric_against_scipy() -> None:
    rng = np.random.default_rng(10)
    a, b = correlated_embeddings(rng)
    out = metrics.local_spearman(a, b, KS)
    from_a, from_b = naive_spearman(metrics.cosine_similarity(a), metrics.cosine_similarity(b), KS)
    assert np.isnan(out[0]).all()  # k = 1: undefined
    np.testing.assert_allclose(out, 0.5 * (from_a + from_b), rtol=1e-9, atol=1e-12)
    assert 0.05 < np.nanmean(out[3]) < 0.95
    # Symmetric in its arguments (up to rounding).
    np.testing.assert_allclose(metrics.local_spearman(b, a, KS), out, rtol=1e-9, atol=1e-12)


def test_local_spearman_with_tied_similarities() -> None:
    rng = np.random.default_rng(11)
    # Small integer embeddings: many exactly equal cosines; row 5 all zero (constant similarities).
    a = rng.integers(-2, 3, (90, 4)).astype(np.float64)
    b = a + rng.integers(-1, 2, (90, 4))
    a[5] = 0.0
    sa, sb = metrics.cosine_similarity(a), metrics.cosine_similarity(b)
    out = metrics.local_spearman(a, b, KS)
    from_a, from_b = naive_spearman(sa, sb, KS)
    expected = 0.5 * (from_a + from_b)
    assert np.array_equal(np.isnan(out), np.isnan(expected))
    assert np.isnan(out[1:, 5]).all()
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(metrics.local_spearman(a, b, KS, "authors"), naive_authors(sa, sb, KS),
                               rtol=1e-9, atol=1e-12)


def test_local_spearman_authors_variant() -> None:
    rng = np.random.default_rng(12)
    a, b = correlated_embeddings(rng)
    sa, sb = metrics.cosine_similarity(a), metrics.cosine_similarity(b)
    ab = metrics.local_spearman(a, b, KS, "authors")
    ba = metrics.local_spearman(b, a, KS, "authors")
    np.testing.assert_allclose(ab, naive_authors(sa, sb, KS), rtol=1e-9, atol=1e-12)
    assert (ab[0] == 0).all()  # their epsilon turns 0/0 into 0
    # Their value only ever looks at A's neighbours, so it is the first direction of the
    # symmetric definition, and swapping the members changes it.
    from_a, from_b = naive_spearman(sa, sb, KS)
    np.testing.assert_allclose(ab[1:], from_a[1:], atol=1e-7)
    np.testing.assert_allclose(ba[1:], from_b[1:], atol=1e-7)
    assert abs(ab[3].mean() - ba[3].mean()) > 1e-4
    np.testing.assert_allclose(metrics.local_spearman(a, b, KS)[1:], 0.5 * (ab + ba)[1:], atol=1e-7)
    with pytest.raises(ConfigError, match="spearman_variant"):
        metrics.local_spearman(a, b, KS, "paper")  # type: ignore[arg-type]


def test_static_metrics_reject_bad_input() -> None:
    rng = np.random.default_rng(13)
    a, b = correlated_embeddings(rng)
    with pytest.raises(ConfigError, match="topk"):
        metrics.topk_overlap(a, b, [0, 3])
    with pytest.raises(StoreError, match="tokens"):
        metrics.local_spearman(a, b[:-1], [3])
    bad = a.copy()
    bad[3, 2] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        metrics.topk_overlap(bad, b, [3])


def test_neighbours_are_cached_by_content() -> None:
    rng = np.random.default_rng(14)
    a, _ = correlated_embeddings(rng)
    metrics.clear_neighbour_cache()
    first = metrics.neighbours(a)
    assert metrics.neighbours(a.copy()) is first
    assert metrics.neighbours(first) is first
    assert metrics.neighbours(a + 1) is not first
    assert np.array_equal(first.order[:, :-1], np.stack([naive_neighbours(first.sim, i, 149) for i in range(150)]))
    assert np.array_equal(np.take_along_axis(first.rank, first.order, axis=1),
                          np.broadcast_to(np.arange(150), (150, 150)))
    metrics.clear_neighbour_cache()
    assert metrics.neighbours(a) is not first


def test_procrustes_against_scipy() -> None:
    rng = np.random.default_rng(15)
    a, b = correlated_embeddings(rng, v=200, d=10)
    disparity, cosine = metrics.procrustes(a, b)
    m1, m2, ref = scipy_procrustes(a.astype(np.float64), b.astype(np.float64))
    assert disparity == pytest.approx(ref, rel=1e-9)
    cos = (m1 * m2).sum(axis=1) / (np.linalg.norm(m1, axis=1) * np.linalg.norm(m2, axis=1))
    assert cosine == pytest.approx(cos.mean(), rel=1e-9)
    # A rotated, scaled, shifted copy aligns perfectly.
    q = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    d2, c2 = metrics.procrustes(a, 3 * a @ q + 1)
    assert d2 == pytest.approx(0, abs=1e-10) and c2 == pytest.approx(1, abs=1e-10)
    with pytest.raises(StoreError, match="identical"):
        metrics.procrustes(a, np.ones_like(a))


def test_cka_against_naive_and_invariances() -> None:
    rng = np.random.default_rng(16)
    x = rng.standard_normal((70, 6))
    y = x @ rng.standard_normal((6, 9)) + 0.8 * rng.standard_normal((70, 9))
    assert metrics.linear_cka(x, y) == pytest.approx(naive_hsic_cka(x @ x.T, y @ y.T), rel=1e-10)
    for frac in (None, 0.5, 2.0):
        ref = naive_hsic_cka(naive_rbf_gram(x, frac or 1.0), naive_rbf_gram(y, frac or 1.0))
        assert metrics.rbf_cka(x, y, frac) == pytest.approx(ref, rel=1e-9)
    assert 0.2 < metrics.linear_cka(x, y) < 0.99
    q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    for cka in (metrics.linear_cka, metrics.rbf_cka):
        assert cka(x, 2.5 * x @ q) == pytest.approx(1.0, abs=1e-10)
        assert cka(x, y) == pytest.approx(cka(y, x), rel=1e-12)
    with pytest.raises(StoreError, match="rows"):
        metrics.linear_cka(x, y[:-1])
    with pytest.raises(ConfigError, match="rbf_sigma"):
        metrics.rbf_cka(x, y, 0.0)


def test_weight_distance_on_torch_state_dicts() -> None:
    import torch

    torch.manual_seed(0)
    net_a, net_b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    state_a, state_b = net_a.state_dict(), net_b.state_dict()
    state_a["steps"] = state_b["steps"] = torch.tensor([1, 2])  # integer buffers are skipped
    flat = lambda s: np.concatenate([s[k].double().numpy().ravel() for k in ("weight", "bias")])  # noqa: E731
    fa, fb = flat(state_a), flat(state_b)
    ref = np.linalg.norm(fa - fb) / (0.5 * (np.linalg.norm(fa) + np.linalg.norm(fb)))
    assert metrics.weight_distance(state_a, state_b) == pytest.approx(ref, rel=1e-6)
    assert metrics.weight_distance(state_a, state_a) == 0.0
    with pytest.raises(CheckpointError, match="bias"):
        metrics.weight_distance(state_a, {k: v for k, v in state_b.items() if k != "bias"})


# --------------------------------------------------------------------------- uncertainty


def test_bootstrap_ci_covers_the_true_mean() -> None:
    rng = np.random.default_rng(17)
    hits = 0
    for rep in range(60):
        x = rng.exponential(2.0, 150)
        lo, hi = metrics.bootstrap_ci(x, n_boot=300, confidence=0.9, seed=rep)
        assert lo < x.mean() < hi
        hits += lo <= 2.0 <= hi
    assert 45 <= hits <= 60  # nominal 90 % coverage: 54 of 60 expected
    x = rng.normal(3.0, 1.0, 4000)
    lo, hi = metrics.bootstrap_ci(np.append(x, np.nan))
    assert hi - lo == pytest.approx(2 * 1.96 / np.sqrt(4000), rel=0.25)
    assert metrics.bootstrap_ci(x, seed=1) == metrics.bootstrap_ci(x, seed=1)
    with pytest.raises(ConfigError, match="confidence"):
        metrics.bootstrap_ci(x, confidence=95)


def test_pair_mean_std() -> None:
    values = np.random.default_rng(18).random(10)
    mean, std = metrics.pair_mean_std(list(values))
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=0))
    assert np.isnan(metrics.pair_mean_std([])[0])


@pytest.mark.gpu
def test_weight_distance_on_cuda_tensors() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(1)
    state_a, state_b = torch.nn.Linear(8, 4).state_dict(), torch.nn.Linear(8, 4).state_dict()
    on_gpu = {k: v.cuda() for k, v in state_a.items()}
    assert metrics.weight_distance(on_gpu, state_b) == pytest.approx(metrics.weight_distance(state_a, state_b))
