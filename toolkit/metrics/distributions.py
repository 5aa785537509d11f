"""Output-distribution metrics: one member's distributions, and two members' at the same positions.

:func:`distribution_stats` (entropy, KL to uniform in both directions, NLL, top-1 correctness,
rank curve) for one member; :func:`js_distance` (Jensen-Shannon distance after top-p
truncation, by the toolkit's rule or the authors' exact one, see :data:`TOP_P_RULES`) and
:func:`argmax_agreement` for a pair; :func:`pairwise_js_distance` and
:func:`pairwise_argmax_agreement` for every pair of M members, each member's rows prepared once
(sorted, exponentiated, ranked) and shared by its M - 1 pairs; and their lazy Dask versions
(:func:`lazy_distribution_stats`, :func:`lazy_js_distance`, :func:`lazy_argmax_agreement`,
:func:`lazy_pairwise_js_distance`, :func:`lazy_pairwise_argmax_agreement`), which work chunk by
chunk along positions so memory stays bounded by the chunk size.
Log-probabilities are natural logs; entropies and Jensen-Shannon values are in bits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from toolkit.errors import ConfigError, StoreError
from toolkit.metrics.sorting import _SLAB, _SLAB_BYTES, _desc_order, _inverse, _slab_rows

if TYPE_CHECKING:
    import dask.array

__all__ = [
    "TOP_P_RULES", "argmax_agreement", "distribution_stats", "js_distance", "lazy_argmax_agreement",
    "lazy_distribution_stats", "lazy_js_distance", "lazy_pairwise_argmax_agreement",
    "lazy_pairwise_js_distance", "pairwise_argmax_agreement", "pairwise_js_distance", "replace_nan_by_mean",
]

LN2 = math.log(2.0)
CLAMP = 1e-10
"""Probabilities are clamped at this value before a log in KL(U || P), as the authors' code does."""
TOP_P_RULES = ("reach", "authors")
"""``reach``: keep the smallest prefix of the sorted distribution whose mass reaches p, in
float64 (never NaN). ``authors``: the authors' code exactly (lbcb-sci/GFMs,
``top_p_reweight`` and ``jensen_shannon_distance``), in float32, NaN where their arithmetic
gives a negative JSD (see :func:`replace_nan_by_mean`)."""


# --------------------------------------------------------------------------- output distributions


def _check_lp(name: str, lp: Any) -> np.ndarray:
    lp = np.asarray(lp)
    if lp.ndim != 2 or lp.shape[1] < 2 or lp.dtype.kind != "f":
        raise StoreError(f"{name}: expected float log-probabilities of shape (positions, vocab >= 2), "
                         f"got {lp.dtype} {lp.shape}; pass a predictions store's log_probs array")
    return lp


def _check_pair(lp_a: Any, lp_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_lp("lp_a", lp_a), _check_lp("lp_b", lp_b)
    if a.shape != b.shape:
        raise StoreError(f"lp_a {a.shape} and lp_b {b.shape} differ in shape; compare members of the "
                         "same run evaluated on the same masks.zarr")
    return a, b


def _check_top_p(top_p: Sequence[float]) -> tuple[float, ...]:
    ps = tuple(float(p) for p in np.atleast_1d(np.asarray(top_p, dtype=float)))
    if not ps or not all(0.0 < p <= 1.0 for p in ps):
        raise ConfigError(f"analysis.top_p = {list(top_p)}: every value must lie in (0, 1] (1.0 keeps "
                          "the whole distribution); fix the study file")
    return ps


def _normalised(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 (log p, p) renormalised row-wise: stored float16 log-probs do not sum to exactly 1."""
    x = lp.astype(np.float64)  # (R, V)
    top = x.max(axis=1, keepdims=True)
    x -= top + np.log(np.exp(x - top).sum(axis=1, keepdims=True))  # log-sum-exp
    return x, np.exp(x)


def _probs(lp: np.ndarray) -> np.ndarray:
    """float64 probabilities, renormalised row-wise (one exp: cheaper than :func:`_normalised`)."""
    p = lp.astype(np.float64)  # (R, V)
    p -= p.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    return p


def distribution_stats(lp: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position statistics of one member's output distributions.

    Parameters
    ----------
    lp : (P, V) float16/32/64
        Natural-log probabilities at P masked positions. Each row is renormalised in float64
        first (stored float16 rows sum to 1 only within ~1e-3).
    target : (P,) int
        True token id at each position.

    Returns
    -------
    dict
        ``entropy_bits`` (P,) H(P) in bits; ``kl_to_uniform_bits`` (P,) KL(P || U) = log2|V| - H;
        ``kl_uniform_to_model_bits`` (P,) KL(U || P) = -log2|V| - mean_v log2 max(P_v, 1e-10)
        (the direction of the authors' current code, with their clamp); ``nll_nats`` (P,) -log p(target); ``correct`` (P,) bool, top-1 (first index on ties)
        equals the target; ``rank_sum`` (V,) sum over positions of the probabilities sorted in
        descending order (divide by P, then average members, for the rank curve).
    """
    lp = _check_lp("lp", lp)
    target = np.asarray(target)
    n, v = lp.shape
    if target.shape != (n,) or target.dtype.kind not in "iu":
        raise StoreError(f"target: expected ({n},) integer token ids, got {target.dtype} {target.shape}")
    if n and (target.min() < 0 or target.max() >= v):
        raise StoreError(f"target: token ids must lie in [0, {v}), found {target.min()}..{target.max()}; "
                         "the predictions store and its vocabulary disagree")
    out = {"entropy_bits": np.empty(n), "nll_nats": np.empty(n), "correct": np.empty(n, dtype=bool),
           "rank_sum": np.zeros(v), "kl_uniform_to_model_bits": np.empty(n)}
    log_clamp = math.log(CLAMP)
    for s in range(0, n, _SLAB):
        rows = slice(s, s + _SLAB)
        x, p = _normalised(lp[rows])  # (R, V)
        with np.errstate(invalid="ignore"):
            plogp = p * x
        plogp[p == 0] = 0.0  # 0 * log 0 = 0 (log-probs of -inf)
        out["entropy_bits"][rows] = -plogp.sum(axis=1) / LN2
        # KL(U || P) is unbounded where P_v = 0: the clamp makes it finite, as in the authors' code.
        out["kl_uniform_to_model_bits"][rows] = (-math.log2(v)
                                                 - np.maximum(x, log_clamp).mean(axis=1) / LN2)
        t = target[rows].astype(np.intp)
        out["nll_nats"][rows] = -x[np.arange(len(t)), t]
        out["correct"][rows] = np.argmax(lp[rows], axis=1) == t
        out["rank_sum"] += np.sort(p, axis=1)[:, ::-1].sum(axis=0)
    out["kl_to_uniform_bits"] = math.log2(v) - out["entropy_bits"]
    return out


class _Reach(NamedTuple):
    """One member's slab prepared for the ``reach`` rule (what :func:`_js_pair` needs of it alone).

    ``order`` (R, V) intp: the row's token ids by descending probability (ties by ascending id);
    ``p`` (R, V) float64: renormalised probabilities (:func:`_probs`); ``s`` (R, V) float64:
    ``p`` in ``order`` (descending); ``rank`` (R, V) int32: the inverse of ``order`` (each
    token's rank); ``kept`` and ``mass``, one (R,) array per top-p level: the number of tokens
    kept (the smallest prefix whose cumulative sum reaches p, all of them at p = 1) and their
    mass (the cumulative sum at the last one, the renormaliser).
    """

    order: np.ndarray
    p: np.ndarray
    s: np.ndarray
    rank: np.ndarray
    kept: tuple[np.ndarray, ...]
    mass: tuple[np.ndarray, ...]


_REACH_BYTES_PER_TOKEN = 36
"""float64/intp bytes held per row and vocabulary entry while a member's slab is prepared for
the reach rule (order, p, s, cumulative sum: 8 each; ranks: 4)."""


def _js_prepare(lp: np.ndarray, ps: tuple[float, ...]) -> _Reach:
    """Everything :func:`_js_pair` derives from one member's slab (R, V) of log-probs."""
    r, v = lp.shape
    order = _desc_order(lp)  # exp is monotone: sort the stored values
    p = _probs(lp)  # (R, V) float64
    s = np.take_along_axis(p, order, axis=1)  # probabilities, descending
    cum = np.cumsum(s, axis=1)
    rows = np.arange(r)
    kept, mass = [], []
    for q in ps:
        # Smallest prefix whose mass reaches q; q = 1 keeps all (cumsum may end at 1 - 1e-16).
        n = np.full(r, v) if q >= 1.0 else np.minimum((cum < q).sum(axis=1) + 1, v)
        kept.append(n)
        mass.append(cum[rows, n - 1])
    return _Reach(order, p, s, _inverse(order, np.int32), tuple(kept), tuple(mass))


def _js_pair(a: _Reach, b: _Reach) -> np.ndarray:
    """Jensen-Shannon distance (R, n_p) of two members' prepared slabs; see :func:`js_distance`.

    With x, y the truncated distributions, 2 JSD (nats) = sum over tokens kept by both members
    of x log(2x / (x + y)) + y log(2y / (x + y)), plus ln 2 times the mass each member keeps
    alone (1 - its shared mass). So each level only needs logs on the shared tokens. The work
    runs in A's sorted order; it is not symmetric in (a, b) bit for bit.
    """
    r, v = a.order.shape
    # Everything below runs in A's sorted order: B's probability and B's rank of A's r-th token.
    qa = np.take_along_axis(b.p, a.order, axis=1)
    rank_b_at_a = np.take_along_axis(b.rank, a.order, axis=1)
    # A zero probability on either side makes the token "kept by one member only".
    rank_b_at_a[(a.s == 0) | (qa == 0)] = v
    rows = np.arange(r)
    out = np.empty((r, len(a.kept)))
    for j, (n_a, n_b) in enumerate(zip(a.kept, b.kept, strict=True)):
        w = int(n_a.max())  # columns past every row's A-support hold no shared token
        both = (np.arange(w) < n_a[:, None]) & (rank_b_at_a[:, :w] < n_b[:, None])  # (R, w)
        row = np.repeat(rows, both.sum(axis=1))  # (K,) row of each shared token
        x = a.s[:, :w][both]  # (K,)
        x /= a.mass[j][row]  # truncated and renormalised
        y = qa[:, :w][both]
        y /= b.mass[j][row]
        # x log(2x / (x + y)) + y log(2y / (x + y)) - (x + y) ln 2, in place (K can be millions).
        inv = np.add(x, y)
        np.reciprocal(inv, out=inv)
        g = np.multiply(x, inv)
        np.log(g, out=g)
        g *= x
        inv *= y
        np.log(inv, out=inv)
        inv *= y
        g += inv
        two_jsd = 2 * LN2 + np.bincount(row, g, r)
        out[:, j] = np.sqrt(np.clip(two_jsd / (2 * LN2), 0.0, 1.0))
    return out


def _js_slab(a: np.ndarray, b: np.ndarray, ps: tuple[float, ...]) -> np.ndarray:
    """Jensen-Shannon distance (R, n_p) of one slab of rows of two members (reach rule)."""
    return _js_pair(_js_prepare(a, ps), _js_prepare(b, ps))


def _check_rule(rule: str) -> str:
    if rule not in TOP_P_RULES:
        raise ConfigError(f"analysis.top_p_rule = {rule!r}: must be one of {', '.join(TOP_P_RULES)}; "
                          "fix the study file")
    return rule


def _authors_probs(lp: np.ndarray) -> np.ndarray:
    """float32 softmax of the stored log-probs, with torch's ``F.softmax`` arithmetic (the
    authors' distributions; softmax is unchanged by the log-sum shift of log-softmax values)."""
    x = lp.astype(np.float32)  # (R, V)
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def _authors_truncate(prob: np.ndarray, p: float) -> np.ndarray:
    """The authors' ``top_p_reweight`` on float32 probabilities (R, V), in float32.

    Sort descending, cumulative sum, zero every token whose cumulative sum exceeds p except
    the first, renormalise (total clamped at 1e-8). Their cumulative sum ran on CPU tensors,
    where torch accumulates float32 in float64 and rounds each prefix sum to float32; that
    rounding is what drops the last tokens of many rows at p = 1.
    """
    order = _desc_order(prob)
    sp = np.take_along_axis(prob, order, axis=1)
    cum = np.cumsum(sp, axis=1, dtype=np.float64).astype(np.float32)
    drop = cum > np.float32(p)  # torch compares a float32 tensor with a Python float in float32
    drop[:, 0] = False  # at least one token
    sp[drop] = 0.0
    sp /= np.maximum(sp.sum(axis=1, keepdims=True, dtype=np.float32), np.float32(1e-8))
    out = np.empty_like(sp)
    np.put_along_axis(out, order, sp, axis=1)
    return out


def _authors_js(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The authors' ``jensen_shannon_distance`` (R,) in float32: their ``kl_divergence`` clamps
    both arguments at 1e-10, so tokens kept by one member only add small negative terms and
    near-equal rows can end below zero: sqrt gives NaN there, as in their code."""
    tiny = np.float32(CLAMP)
    m = (x + y) / np.float32(2)
    log_m = np.log2(np.maximum(m, tiny))
    jsd = np.zeros(x.shape[0], dtype=np.float32)
    for d in (x, y):
        dc = np.maximum(d, tiny)
        jsd += np.float32(0.5) * (dc * (np.log2(dc) - log_m)).sum(axis=1, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        return np.sqrt(jsd)


def _authors_prepare(lp: np.ndarray, ps: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """One member's slab (R, V) truncated by the authors' rule at every level: n_p (R, V) float32."""
    prob = _authors_probs(lp)
    return tuple(_authors_truncate(prob, p) for p in ps)


def _authors_pair(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> np.ndarray:
    """The authors' JS distance (R, n_p) of two members' truncated slabs, NaN where theirs is NaN."""
    out = np.empty((a[0].shape[0], len(a)))
    for j, (x, y) in enumerate(zip(a, b, strict=True)):
        out[:, j] = _authors_js(x, y)
    return out


def _js_slab_authors(a: np.ndarray, b: np.ndarray, ps: tuple[float, ...]) -> np.ndarray:
    """The authors' JS distance (R, n_p) of one slab, NaN where theirs is NaN."""
    return _authors_pair(_authors_prepare(a, ps), _authors_prepare(b, ps))


def js_distance(lp_a: np.ndarray, lp_b: np.ndarray, top_p: Sequence[float],
                rule: str = "reach") -> np.ndarray:
    """Jensen-Shannon distance (base 2) between two members' distributions after top-p truncation.

    Each distribution is truncated separately, then renormalised; p = 1.0 keeps everything
    under the ``reach`` rule.

    - ``rule = "reach"`` (the toolkit's): keep the smallest set of most probable tokens whose
      mass reaches p (ties by ascending token id). Rows are renormalised in float64 first and
      the computation is float64 throughout; the JSD is clipped to [0, 1] before the square
      root, so the result is never NaN for finite log-probs (two coinciding truncated
      distributions give exactly 0).
    - ``rule = "authors"``: their code exactly, in float32 (see :func:`_authors_truncate` and
      :func:`_authors_js`): keeps the LARGEST prefix whose mass is at most p (at least one
      token), and is NaN where their arithmetic makes the JSD negative. Replace those with
      :func:`replace_nan_by_mean` over all of the pair's positions, as they do.

    Computed slab by slab: each member's slab is prepared (:func:`_js_prepare` or
    :func:`_authors_prepare`), then the pair's part runs on the two preparations
    (:func:`_js_pair` or :func:`_authors_pair`); :func:`pairwise_js_distance` shares the
    preparations between pairs and gives the same values bit for bit.

    Parameters
    ----------
    lp_a, lp_b : (P, V) float
        Natural-log probabilities of two members at the same positions.
    top_p : sequence of float in (0, 1]
    rule : {"reach", "authors"}

    Returns
    -------
    (P, len(top_p)) float64
        sqrt(JSD) in [0, 1] (NaN possible with ``rule = "authors"`` only).
    """
    a, b = _check_pair(lp_a, lp_b)
    ps = _check_top_p(top_p)
    slab = _js_slab_authors if _check_rule(rule) == "authors" else _js_slab
    out = np.empty((a.shape[0], len(ps)))
    for s in range(0, a.shape[0], _SLAB):
        out[s:s + _SLAB] = slab(a[s:s + _SLAB], b[s:s + _SLAB], ps)
    return out


def _no_members(lps: Sequence[Any]) -> None:
    if len(lps) == 0:
        raise StoreError("lps: no members; pass the log-probabilities of at least one member")


def _same_shapes(arrs: Sequence[Any]) -> None:
    for k, x in enumerate(arrs[1:], start=1):
        if x.shape != arrs[0].shape:
            raise StoreError(f"lps[{k}] {x.shape} and lps[0] {arrs[0].shape} differ in shape; compare "
                             "members of the same run evaluated on the same masks.zarr")


def _check_members(lps: Sequence[Any]) -> list[np.ndarray]:
    _no_members(lps)
    arrs = [_check_lp(f"lps[{k}]", lp) for k, lp in enumerate(lps)]
    _same_shapes(arrs)
    return arrs


def pairwise_js_distance(lps: Sequence[np.ndarray], top_p: Sequence[float], rule: str = "reach", *,
                         slab_bytes: int = _SLAB_BYTES) -> np.ndarray:
    """:func:`js_distance` of every pair of M members, each member prepared once per slab of rows.

    Bit for bit ``np.stack([js_distance(lps[i], lps[j], top_p, rule) for i, j in
    itertools.combinations(range(M), 2)])``, at a fraction of the cost: what the distance
    derives from one member alone (under ``reach``: the descending order, float64
    probabilities, sorted probabilities, ranks, and the kept count and mass of every level;
    under ``authors``: the float32 truncated distribution of every level) is computed once per
    member and shared by its M - 1 pairs, instead of once per pair.

    Parameters
    ----------
    lps : sequence of M (P, V) float arrays
        Natural-log probabilities of the members at the same positions.
    top_p : sequence of float in (0, 1]
    rule : {"reach", "authors"}
    slab_bytes : int
        Budget of the preparations of all M members held at once: the slab height is chosen so
        that M x rows x V x (36 bytes under ``reach``, 4 (n_p + 1) under ``authors``) stays
        within it (at least one row).

    Returns
    -------
    (M (M - 1) / 2, P, len(top_p)) float64
        Pairs in ``itertools.combinations(range(M), 2)`` order.
    """
    arrs = _check_members(lps)
    ps = _check_top_p(top_p)
    authors = _check_rule(rule) == "authors"
    m = len(arrs)
    n, v = arrs[0].shape
    pairs = list(itertools.combinations(range(m), 2))
    out = np.empty((len(pairs), n, len(ps)))
    if not pairs:
        return out
    per_token = 4 * (len(ps) + 1) if authors else _REACH_BYTES_PER_TOKEN
    rows = _slab_rows(m * v * per_token, slab_bytes)
    prepare: Any = _authors_prepare if authors else _js_prepare
    pair: Any = _authors_pair if authors else _js_pair
    for s in range(0, n, rows):
        prepared = [prepare(x[s:s + rows], ps) for x in arrs]
        for k, (i, j) in enumerate(pairs):
            out[k, s:s + rows] = pair(prepared[i], prepared[j])
    return out


def pairwise_argmax_agreement(lps: Sequence[np.ndarray]) -> np.ndarray:
    """(M (M - 1) / 2, P) bool: :func:`argmax_agreement` of every pair (combinations order),
    each member's argmax computed once."""
    arrs = _check_members(lps)
    top = [np.argmax(x, axis=1) for x in arrs]
    n = arrs[0].shape[0]
    pairs = list(itertools.combinations(range(len(arrs)), 2))
    out = np.empty((len(pairs), n), dtype=bool)
    for k, (i, j) in enumerate(pairs):
        out[k] = top[i] == top[j]
    return out


def replace_nan_by_mean(js: Any) -> Any:
    """NaN entries of a pair's (P, n_p) JS distances replaced by the mean of the pair's other
    positions at the same p (the authors' rule); numpy or dask arrays.

    The mean over positions afterwards equals the NaN-skipping mean; a column that is NaN
    everywhere stays NaN.
    """
    import warnings

    if type(js).__module__.startswith("dask"):
        import dask.array as da

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: stays NaN
            return da.where(da.isnan(js), da.nanmean(js, axis=0), js)
    js = np.asarray(js, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.where(np.isnan(js), np.nanmean(js, axis=0), js)


def argmax_agreement(lp_a: np.ndarray, lp_b: np.ndarray) -> np.ndarray:
    """(P,) bool: the two members' most probable tokens agree (first index on ties)."""
    a, b = _check_pair(lp_a, lp_b)
    return np.argmax(a, axis=1) == np.argmax(b, axis=1)


# --------------------------------------------------------------------------- lazy versions


def _unwrap(x: Any) -> Any:
    """The dask array behind an xarray DataArray (``np.asarray`` on it would load everything)."""
    return x.data if type(x).__name__ == "DataArray" else x


def _as_rows(name: str, x: Any) -> dask.array.Array:
    """A dask array of log-probs with the vocabulary in one chunk (each block holds whole rows)."""
    import dask.array as da

    x = da.asarray(_unwrap(x))
    if x.ndim != 2 or x.dtype.kind != "f":
        raise StoreError(f"{name}: expected float log-probabilities of shape (positions, vocab), "
                         f"got {x.dtype} {x.shape}")
    return x.rechunk({1: -1})


def _lazy_pair(lp_a: Any, lp_b: Any) -> tuple[dask.array.Array, dask.array.Array]:
    a, b = _as_rows("lp_a", lp_a), _as_rows("lp_b", lp_b)
    if a.shape != b.shape:
        raise StoreError(f"lp_a {a.shape} and lp_b {b.shape} differ in shape; compare members of the "
                         "same run evaluated on the same masks.zarr")
    return a, b.rechunk({0: a.chunks[0]})


def lazy_distribution_stats(lp: dask.array.Array, target: dask.array.Array) -> dict[str, dask.array.Array]:
    """:func:`distribution_stats` over a dask array chunked along positions.

    Every output shares one task per chunk, so compute them together
    (``dask.compute(*out.values())``) to read each chunk once. Memory is bounded by the chunk.
    """
    import dask
    import dask.array as da

    lp = _as_rows("lp", lp)
    target = da.asarray(_unwrap(target))
    if target.shape != lp.shape[:1]:
        raise StoreError(f"target {target.shape} does not match lp {lp.shape}")
    target = target.rechunk((lp.chunks[0],))
    stats = [dask.delayed(distribution_stats, pure=True)(blk, tgt)
             for blk, tgt in zip(lp.to_delayed().ravel(), target.to_delayed().ravel(), strict=True)]
    out: dict[str, da.Array] = {}
    for key, dtype in (("entropy_bits", np.float64), ("kl_to_uniform_bits", np.float64),
                       ("kl_uniform_to_model_bits", np.float64), ("nll_nats", np.float64),
                       ("correct", np.bool_)):
        out[key] = da.concatenate([da.from_delayed(s[key], shape=(n,), dtype=dtype)
                                   for s, n in zip(stats, lp.chunks[0], strict=True)])
    v = lp.shape[1]
    out["rank_sum"] = da.stack([da.from_delayed(s["rank_sum"], shape=(v,), dtype=np.float64)
                                for s in stats]).sum(axis=0)
    return out


def lazy_js_distance(lp_a: dask.array.Array, lp_b: dask.array.Array,
                     top_p: Sequence[float], rule: str = "reach") -> dask.array.Array:
    """:func:`js_distance` blockwise over dask arrays chunked along positions: (P, len(top_p))."""
    import dask.array as da

    a, b = _lazy_pair(lp_a, lp_b)
    ps = _check_top_p(top_p)
    return da.map_blocks(js_distance, a, b, ps, _check_rule(rule), dtype=np.float64,
                         chunks=(a.chunks[0], (len(ps),)))


def lazy_argmax_agreement(lp_a: dask.array.Array, lp_b: dask.array.Array) -> dask.array.Array:
    """:func:`argmax_agreement` blockwise over dask arrays chunked along positions: (P,) bool."""
    import dask.array as da

    a, b = _lazy_pair(lp_a, lp_b)
    return da.map_blocks(argmax_agreement, a, b, dtype=bool, drop_axis=1)


def _pairwise_js_block(*xs: np.ndarray, ps: tuple[float, ...], rule: str, slab_bytes: int) -> np.ndarray:
    return pairwise_js_distance(xs, ps, rule, slab_bytes=slab_bytes)


def _pairwise_argmax_block(*xs: np.ndarray) -> np.ndarray:
    return pairwise_argmax_agreement(xs)


def _lazy_members(lps: Sequence[Any]) -> list[dask.array.Array]:
    """Members as dask arrays with the vocabulary in one chunk and the positions chunked as the first's."""
    _no_members(lps)
    arrs = [_as_rows(f"lps[{k}]", lp) for k, lp in enumerate(lps)]
    _same_shapes(arrs)
    return [arrs[0]] + [x.rechunk({0: arrs[0].chunks[0]}) for x in arrs[1:]]


def lazy_pairwise_js_distance(lps: Sequence[Any], top_p: Sequence[float], rule: str = "reach",
                              *, slab_bytes: int = _SLAB_BYTES) -> dask.array.Array:
    """:func:`pairwise_js_distance` blockwise over M dask arrays (P, V): (pairs, P, len(top_p)).

    One task per chunk of positions reads that chunk of every member (chunks aligned to the
    first member's, vocabulary in one chunk) and computes every pair from one preparation per
    member; the output is chunked like the positions, with all pairs and levels in one chunk.
    Select a pair with ``out[k]`` (combinations order). Memory: the M input chunks, the output
    chunk and ``slab_bytes`` of preparations.
    """
    import dask.array as da

    arrs = _lazy_members(lps)
    ps = _check_top_p(top_p)
    rule = _check_rule(rule)
    n_pairs = len(arrs) * (len(arrs) - 1) // 2
    if n_pairs == 0:
        return da.empty((0, arrs[0].shape[0], len(ps)), chunks=((0,), arrs[0].chunks[0], (len(ps),)),
                        dtype=np.float64)
    args = [a for x in arrs for a in (x, "pv")]
    return da.blockwise(_pairwise_js_block, "kpj", *args, new_axes={"k": n_pairs, "j": len(ps)},
                        concatenate=True, dtype=np.float64, meta=np.empty((0, 0, 0), dtype=np.float64),
                        ps=ps, rule=rule, slab_bytes=slab_bytes)


def lazy_pairwise_argmax_agreement(lps: Sequence[Any]) -> dask.array.Array:
    """:func:`pairwise_argmax_agreement` blockwise over M dask arrays (P, V): (pairs, P) bool,
    chunked like the first member's positions."""
    import dask.array as da

    arrs = _lazy_members(lps)
    n_pairs = len(arrs) * (len(arrs) - 1) // 2
    if n_pairs == 0:
        return da.empty((0, arrs[0].shape[0]), chunks=((0,), arrs[0].chunks[0]), dtype=bool)
    args = [a for x in arrs for a in (x, "pv")]
    return da.blockwise(_pairwise_argmax_block, "kp", *args, new_axes={"k": n_pairs}, concatenate=True,
                        dtype=bool, meta=np.empty((0, 0), dtype=bool))
