"""The numerical core of the analyses (METHODS.md, "Analyses").

Three families of measurements, all pure functions of NumPy arrays:

- output distributions of one member (:func:`distribution_stats`) and of a pair of members at
  the same masked positions (:func:`js_distance`, :func:`argmax_agreement`), with lazy Dask
  versions that work chunk by chunk along positions so memory stays bounded by the chunk size;
- static-embedding stability between two members (:func:`topk_overlap`, :func:`local_spearman`,
  :func:`procrustes`, :func:`linear_cka`, :func:`rbf_cka`, :func:`weight_distance`);
- uncertainty over positions and member pairs (:func:`bootstrap_ci`, :func:`pair_mean_std`).

Speed matters for the static-embedding metrics (V x V similarity matrices, every k up to V-1,
every pair of members): a member's similarity matrix and neighbour order are computed once
(:func:`neighbours`, cached by content) and reused across pairs and ks.

Conventions: log-probabilities are natural logs; entropies and Jensen-Shannon values are in
bits; ties are broken by ascending token index everywhere (a stable sort), so every result is
deterministic.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from toolkit.errors import CheckpointError, ConfigError, StoreError

if TYPE_CHECKING:
    import dask.array

__all__ = [
    "Neighbours", "argmax_agreement", "bootstrap_ci", "clear_neighbour_cache", "cosine_similarity",
    "distribution_stats", "js_distance", "lazy_argmax_agreement", "lazy_distribution_stats",
    "lazy_js_distance", "linear_cka", "local_spearman", "neighbours", "pair_mean_std", "procrustes",
    "rbf_cka", "topk_neighbours", "topk_overlap", "weight_distance",
]

LN2 = math.log(2.0)
# Rows per slab in the eager distribution functions: float64 temporaries of a slab stay at a few
# MB each at V = 4096, so a dask chunk of any size costs little more than its own input.
_SLAB = 256


# --------------------------------------------------------------------------- sorting


def _desc_order(x: np.ndarray) -> np.ndarray:
    """Row-wise order of ``x`` (R, V), largest first, ties by ascending index.

    Same result as ``np.argsort(-x, axis=-1, kind="stable")``, 2-10x faster for float16 and
    float32: their bit patterns are mapped to unsigned integers whose order is the descending
    float order, then float16 keys go through NumPy's radix sort and float32 keys, packed with
    the column index into one uint64, through its (unstable but now tie-free) SIMD sort.
    """
    x = np.asarray(x)
    if x.dtype == np.float16 or x.dtype == np.float32:
        bits, uint = (16, np.uint16) if x.dtype == np.float16 else (32, np.uint32)
        u: Any = np.ascontiguousarray(x).view(uint)
        sign = uint(1 << (bits - 1))
        u = np.where(u == sign, uint(0), u)  # -0.0 -> +0.0: they compare equal
        # Negative floats: larger bit pattern = more negative = later. Positive: invert.
        key = np.where(u & sign, u, ~u & uint(sign - 1))
        if bits == 16:
            return np.argsort(key, axis=-1, kind="stable")
        packed = key.astype(np.uint64) << np.uint64(32)
        packed |= np.arange(x.shape[-1], dtype=np.uint64)
        packed.sort(axis=-1)
        return (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)
    return np.argsort(-x.astype(np.float64, copy=False), axis=-1, kind="stable")


def _inverse(order: np.ndarray, dtype: Any = np.intp) -> np.ndarray:
    """Row-wise inverse permutation: ``inv[i, order[i, r]] = r``."""
    inv = np.empty(order.shape, dtype=dtype)
    ranks = np.broadcast_to(np.arange(order.shape[-1], dtype=dtype), order.shape)
    np.put_along_axis(inv, order, ranks, axis=-1)
    return inv


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
        ``entropy_bits`` (P,) H(P) in bits; ``kl_to_uniform_bits`` (P,) log2|V| - H;
        ``nll_nats`` (P,) -log p(target); ``correct`` (P,) bool, top-1 (first index on ties)
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
           "rank_sum": np.zeros(v)}
    for s in range(0, n, _SLAB):
        rows = slice(s, s + _SLAB)
        x, p = _normalised(lp[rows])  # (R, V)
        with np.errstate(invalid="ignore"):
            plogp = p * x
        plogp[p == 0] = 0.0  # 0 * log 0 = 0 (log-probs of -inf)
        out["entropy_bits"][rows] = -plogp.sum(axis=1) / LN2
        t = target[rows].astype(np.intp)
        out["nll_nats"][rows] = -x[np.arange(len(t)), t]
        out["correct"][rows] = np.argmax(lp[rows], axis=1) == t
        out["rank_sum"] += np.sort(p, axis=1)[:, ::-1].sum(axis=0)
    out["kl_to_uniform_bits"] = math.log2(v) - out["entropy_bits"]
    return out


def _js_slab(a: np.ndarray, b: np.ndarray, ps: tuple[float, ...]) -> np.ndarray:
    """Jensen-Shannon distance (R, n_p) of one slab of rows; see :func:`js_distance`.

    With x, y the truncated distributions, 2 JSD (nats) = sum over tokens kept by both members
    of x log(2x / (x + y)) + y log(2y / (x + y)), plus ln 2 times the mass each member keeps
    alone (1 - its shared mass). So each level only needs logs on the shared tokens.
    """
    r, v = a.shape
    order_a, order_b = _desc_order(a), _desc_order(b)  # exp is monotone: sort the stored values
    pa, pb = _probs(a), _probs(b)  # (R, V) float64
    sa = np.take_along_axis(pa, order_a, axis=1)  # A's probabilities, descending
    cum_a = np.cumsum(sa, axis=1)
    cum_b = np.cumsum(np.take_along_axis(pb, order_b, axis=1), axis=1)
    # Everything below runs in A's sorted order: B's probability and B's rank of A's r-th token.
    qa = np.take_along_axis(pb, order_a, axis=1)
    rank_b_at_a = np.take_along_axis(_inverse(order_b, np.int32), order_a, axis=1)
    # A zero probability on either side makes the token "kept by one member only".
    rank_b_at_a[(sa == 0) | (qa == 0)] = v
    rows = np.arange(r)
    out = np.empty((r, len(ps)))
    for j, p in enumerate(ps):
        # Smallest prefix whose mass reaches p; p = 1 keeps all (cumsum may end at 1 - 1e-16).
        n_a = np.full(r, v) if p >= 1.0 else np.minimum((cum_a < p).sum(axis=1) + 1, v)
        n_b = np.full(r, v) if p >= 1.0 else np.minimum((cum_b < p).sum(axis=1) + 1, v)
        w = int(n_a.max())  # columns past every row's A-support hold no shared token
        both = (np.arange(w) < n_a[:, None]) & (rank_b_at_a[:, :w] < n_b[:, None])  # (R, w)
        row = np.repeat(rows, both.sum(axis=1))  # (K,) row of each shared token
        x = sa[:, :w][both]  # (K,)
        x /= cum_a[rows, n_a - 1][row]  # truncated and renormalised
        y = qa[:, :w][both]
        y /= cum_b[rows, n_b - 1][row]
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


def js_distance(lp_a: np.ndarray, lp_b: np.ndarray, top_p: Sequence[float]) -> np.ndarray:
    """Jensen-Shannon distance (base 2) between two members' distributions after top-p truncation.

    Each distribution is truncated separately: keep the smallest set of most probable tokens
    whose mass reaches p (ties by ascending token id), renormalise; p = 1.0 keeps everything.
    Rows are renormalised in float64 first; the computation is float64 throughout.

    Parameters
    ----------
    lp_a, lp_b : (P, V) float
        Natural-log probabilities of two members at the same positions.
    top_p : sequence of float in (0, 1]

    Returns
    -------
    (P, len(top_p)) float64
        sqrt(JSD) in [0, 1].
    """
    a, b = _check_pair(lp_a, lp_b)
    ps = _check_top_p(top_p)
    out = np.empty((a.shape[0], len(ps)))
    for s in range(0, a.shape[0], _SLAB):
        out[s:s + _SLAB] = _js_slab(a[s:s + _SLAB], b[s:s + _SLAB], ps)
    return out


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
                       ("nll_nats", np.float64), ("correct", np.bool_)):
        out[key] = da.concatenate([da.from_delayed(s[key], shape=(n,), dtype=dtype)
                                   for s, n in zip(stats, lp.chunks[0], strict=True)])
    v = lp.shape[1]
    out["rank_sum"] = da.stack([da.from_delayed(s["rank_sum"], shape=(v,), dtype=np.float64)
                                for s in stats]).sum(axis=0)
    return out


def lazy_js_distance(lp_a: dask.array.Array, lp_b: dask.array.Array,
                     top_p: Sequence[float]) -> dask.array.Array:
    """:func:`js_distance` blockwise over dask arrays chunked along positions: (P, len(top_p))."""
    import dask.array as da

    a, b = _lazy_pair(lp_a, lp_b)
    ps = _check_top_p(top_p)
    return da.map_blocks(js_distance, a, b, ps, dtype=np.float64, chunks=(a.chunks[0], (len(ps),)))


def lazy_argmax_agreement(lp_a: dask.array.Array, lp_b: dask.array.Array) -> dask.array.Array:
    """:func:`argmax_agreement` blockwise over dask arrays chunked along positions: (P,) bool."""
    import dask.array as da

    a, b = _lazy_pair(lp_a, lp_b)
    return da.map_blocks(argmax_agreement, a, b, dtype=bool, drop_axis=1)


# --------------------------------------------------------------------------- static embeddings


def _check_emb(name: str, emb: Any) -> np.ndarray:
    e = np.asarray(emb)
    if e.ndim != 2 or e.shape[0] < 2 or e.dtype.kind not in "fiu":
        raise StoreError(f"{name}: expected a (vocab >= 2, dim) embedding matrix, got {e.dtype} {e.shape}")
    if not np.isfinite(e).all():
        raise StoreError(f"{name}: embedding matrix contains NaN or inf; the member's training diverged, "
                         "retrain it or drop it from the run")
    return e


def cosine_similarity(emb: np.ndarray) -> np.ndarray:
    """(V, V) cosine similarity between the rows of ``emb`` (V, d).

    float64 input gives float64, anything else float32. An all-zero row (e.g. an untrained
    padding embedding) has similarity 0 with everything, as ``torch.nn.functional.normalize``
    gives.
    """
    e = _check_emb("emb", emb)
    e = e.astype(np.float64 if e.dtype == np.float64 else np.float32)
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    e = e / np.maximum(norm, np.finfo(e.dtype).tiny)
    return e @ e.T


@dataclass(frozen=True, eq=False)
class Neighbours:
    """One member's similarity matrix and neighbour order, computed once, reused across pairs and ks.

    Attributes
    ----------
    sim : (V, V) cosine similarity.
    order : (V, V) int; row i lists the tokens by decreasing similarity to i (ties by ascending
        id) with i itself last.
    rank : (V, V) int; inverse of ``order``: ``rank[i, order[i, r]] == r``.
    tie_row, tie_token, tie_run : (T,) int; every token that shares its similarity value with
        another token of the same row (float32 similarities do tie, about once per row at
        V = 4096), with the id of its run of equal values. Only rows where a run has two members
        inside a neighbour set need average ranks.
    """

    sim: np.ndarray
    order: np.ndarray
    rank: np.ndarray
    tie_row: np.ndarray
    tie_token: np.ndarray
    tie_run: np.ndarray

    @property
    def size(self) -> int:
        return int(self.sim.shape[0])


def _ties(srt: np.ndarray, order: np.ndarray, row0: int, run0: int) -> tuple[np.ndarray, ...]:
    """Runs of equal values in row-wise descending ``srt`` (R, n): (rows, tokens, run ids)."""
    eq = srt[:, 1:] == srt[:, :-1]  # (R, n - 1)
    member = np.zeros(srt.shape, dtype=bool)
    member[:, 1:] |= eq
    member[:, :-1] |= eq
    start = member.copy()
    start[:, 1:] &= ~eq  # a run starts where the previous value differs
    rows, cols = np.nonzero(member)  # row-major: each run's members are consecutive
    runs = np.cumsum(start[rows, cols]) - 1 + run0
    return rows + row0, order[rows, cols].astype(np.intp), runs


_CACHE: OrderedDict[tuple[Any, ...], Neighbours] = OrderedDict()
_CACHE_SIZE = 5  # one ensemble (paper N = 5): every pair then hits the cache


def clear_neighbour_cache() -> None:
    """Forget the cached :class:`Neighbours` (about 130 MB per member at V = 4096)."""
    _CACHE.clear()


def neighbours(emb: np.ndarray | Neighbours) -> Neighbours:
    """Similarity matrix and neighbour order of one member's embedding matrix (V, d).

    Results are cached by the matrix content (the last 5), so calling the pairwise metrics
    with raw arrays for every pair of an ensemble computes each member's order only once.
    """
    if isinstance(emb, Neighbours):
        return emb
    e = _check_emb("emb", emb)
    e = np.ascontiguousarray(e)
    key = (e.shape, e.dtype.str, hashlib.blake2b(e.data, digest_size=16).digest())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    sim = cosine_similarity(e)
    v = sim.shape[0]
    itype = np.int16 if v <= np.iinfo(np.int16).max else np.int32
    order = np.empty((v, v), dtype=itype)
    ties: list[tuple[np.ndarray, ...]] = []
    n_runs = 0
    for s in range(0, v, _SLAB):
        block = sim[s:s + _SLAB].copy()  # (R, V)
        rows = np.arange(block.shape[0])
        block[rows, rows + s] = -np.inf  # self last
        o = _desc_order(block)
        order[s:s + _SLAB] = o
        srt = np.take_along_axis(block, o[:, :-1], axis=1)  # off-diagonal values, descending
        ties.append(_ties(srt, o[:, :-1], s, n_runs))
        if ties[-1][2].size:
            n_runs = int(ties[-1][2][-1]) + 1
    tie_row, tie_token, tie_run = (np.concatenate(t) for t in zip(*ties, strict=True))
    nb = Neighbours(sim=sim, order=order, rank=_inverse(order, itype),
                    tie_row=tie_row, tie_token=tie_token, tie_run=tie_run)
    _CACHE[key] = nb
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return nb


def _check_ks(ks: Sequence[int], v: int) -> list[int]:
    """ks clipped to V - 1 (the number of other tokens)."""
    ks = [int(k) for k in np.atleast_1d(np.asarray(ks))]
    if not ks or min(ks) < 1:
        raise ConfigError(f"analysis.topk = {ks}: every k must be a positive integer; fix the study file")
    return [min(k, v - 1) for k in ks]


def _pair(emb_a: Any, emb_b: Any) -> tuple[Neighbours, Neighbours]:
    a, b = neighbours(emb_a), neighbours(emb_b)
    if a.size != b.size:
        raise StoreError(f"emb_a has {a.size} tokens and emb_b {b.size}; compare members of the same "
                         "run (same tokenizer)")
    return a, b


def topk_neighbours(sim: np.ndarray, k: int) -> np.ndarray:
    """(V, k) indices of each token's k most similar tokens, most similar first, self excluded.

    Ties by ascending id; k larger than V - 1 is clipped to V - 1.
    """
    sim = np.asarray(sim)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 2:
        raise StoreError(f"sim: expected a square (V, V) similarity matrix with V >= 2, got {sim.shape}")
    v = sim.shape[0]
    (k,) = _check_ks([k], v)
    out = np.empty((v, k), dtype=np.intp)
    for s in range(0, v, _SLAB):
        block = sim[s:s + _SLAB].copy()
        rows = np.arange(block.shape[0])
        block[rows, rows + s] = -np.inf
        out[s:s + _SLAB] = _desc_order(block)[:, :k]
    return out


def topk_overlap(emb_a: np.ndarray | Neighbours, emb_b: np.ndarray | Neighbours,
                 ks: Sequence[int]) -> np.ndarray:
    """(len(ks), V) per-token Jaccard index of the two members' k-nearest-neighbour sets.

    Neighbours by cosine similarity, the token itself excluded, ties by ascending id; k above
    V - 1 is clipped. Average over tokens for the paper's value. Pass :class:`Neighbours`
    (or rely on :func:`neighbours`' cache) to reuse a member's neighbour order across pairs.
    """
    a, b = _pair(emb_a, emb_b)
    ks = _check_ks(ks, a.size)
    # B's rank of A's r-th neighbour: A's top-k and B's top-k share a token iff that rank < k.
    rank_b = np.take_along_axis(b.rank, a.order[:, :max(ks)], axis=1)  # (V, kmax)
    out = np.empty((len(ks), a.size))
    for i, k in enumerate(ks):
        inter = (rank_b[:, :k] < k).sum(axis=1)
        out[i] = inter / (2 * k - inter)
    return out


def _avg_ranks(x: np.ndarray, order: np.ndarray | None = None, presorted: bool = False) -> np.ndarray:
    """Row-wise ranks by decreasing value, ties given their average rank.

    Pearson correlation of these equals Spearman's rho (scipy.stats.rankdata "average" ranks
    increasing values; reversing both sides leaves the correlation unchanged). ``order``: a
    known decreasing order of each row; ``presorted``: the rows already are in that order.
    """
    n = x.shape[1]
    if presorted:
        srt = x
    else:
        order = _desc_order(x) if order is None else order
        srt = np.take_along_axis(x, order, axis=1)
    avg = np.broadcast_to(np.arange(n, dtype=np.float64), srt.shape).copy()  # ordinal ranks
    # Ties are rare: find the runs of equal neighbours and give their members the mean rank.
    row, col = np.nonzero(srt[:, 1:] == srt[:, :-1])  # srt[row, col] == srt[row, col + 1]
    if row.size:
        new = np.ones(row.size, dtype=bool)  # a pair not chained to the previous one starts a run
        new[1:] = (row[1:] != row[:-1]) | (col[1:] != col[:-1] + 1)
        end = np.append(new[1:], True)
        first, last = col[new], col[end] + 1  # per run
        length = last - first + 1
        members = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
        avg[np.repeat(row[new], length), np.repeat(first, length) + members] = \
            np.repeat(0.5 * (first + last), length)
    if presorted:
        return avg
    assert order is not None
    ranks = np.empty(x.shape)
    np.put_along_axis(ranks, order, avg, axis=1)
    return ranks


def _ordinal_ranks(x: np.ndarray) -> np.ndarray:
    """Row-wise ranks 0..n-1, ties by position (what an argsort-and-scatter rank transform gives)."""
    return _inverse(np.argsort(x, axis=1, kind="stable")).astype(np.float64)


def _pearson(ra: np.ndarray, rb: np.ndarray, eps: float = 0.0) -> np.ndarray:
    ra = ra - ra.mean(axis=1, keepdims=True)
    rb = rb - rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1)) + eps
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=1) / den


def _spearman_from(a: Neighbours, b: Neighbours, ks: list[int], authors: bool) -> np.ndarray:
    """(len(ks), V) Spearman rho on A's top-k neighbours of every token, per token."""
    v = a.size
    rank_b = np.take_along_axis(b.rank, a.order[:, :max(ks)], axis=1)  # (V, kmax) B-rank of A's r-th
    # Tied values of either member, located by A's rank (membership in A's neighbour sets).
    tie_row = np.concatenate([a.tie_row, b.tie_row])
    tie_rank_a = a.rank[tie_row, np.concatenate([a.tie_token, b.tie_token])]
    b_run0 = int(a.tie_run.max()) + 1 if a.tie_run.size else 0
    tie_run = np.concatenate([a.tie_run, b.tie_run + b_run0])
    run_row = np.zeros(int(tie_run.max()) + 1 if tie_run.size else 0, dtype=np.intp)
    run_row[tie_run] = tie_row
    out = np.empty((len(ks), v))
    for i, k in enumerate(ks):
        # Without ties both rank vectors are permutations of 0..k-1: A's ranks are the positions
        # r, B's the order of rank_b within the prefix. With s = argsort of the prefix,
        # sum_r r * rankB(r) = sum_t t * s[t], and both variances are k (k^2 - 1) / 12.
        s = np.argsort(rank_b[:, :k], axis=1, kind="stable")  # (V, k) radix sort of small ints
        dot = s @ np.arange(k, dtype=s.dtype)  # exact in integers
        mean = (k - 1) / 2
        var = k * (k * k - 1) / 12
        cov = dot - k * mean * mean
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i] = cov / (var + 1e-8) if authors else cov / var
        # Rows where two tied values fall inside the set need real (average or ordinal) ranks.
        inside = np.bincount(tie_run[tie_rank_a < k], minlength=run_row.size)
        exact = np.unique(run_row[inside >= 2])
        if exact.size:
            cols = a.order[exact, :k]
            va = a.sim[exact[:, None], cols]  # (E, k) A's similarities, descending
            vb = b.sim[exact[:, None], cols]
            if authors:
                # Their second pass re-sorts the already restricted prefix by B and recomputes the
                # same correlation; it can differ only through how tied values get ordinal ranks.
                o2 = _desc_order(vb)
                va2, vb2 = np.take_along_axis(va, o2, axis=1), np.take_along_axis(vb, o2, axis=1)
                out[i, exact] = 0.5 * (_pearson(_ordinal_ranks(va), _ordinal_ranks(vb), 1e-8)
                                       + _pearson(_ordinal_ranks(va2), _ordinal_ranks(vb2), 1e-8))
            else:
                # s already is B's decreasing order of the set: no float sort needed.
                out[i, exact] = _pearson(_avg_ranks(va, presorted=True), _avg_ranks(vb, s[exact]))
    return out


def local_spearman(emb_a: np.ndarray | Neighbours, emb_b: np.ndarray | Neighbours, ks: Sequence[int],
                   variant: Literal["symmetric", "authors"] = "symmetric") -> np.ndarray:
    """(len(ks), V) per-token local Spearman correlation between two members' similarities.

    ``symmetric`` (METHODS.md): for token i, rho between A's and B's similarity values on A's
    top-k neighbours of i (average ranks for ties), the same on B's top-k, and the mean of both.
    ``authors``: the lbcb-sci/GFMs value, which only ever uses A's top-k (its second direction
    re-uses the subset already restricted to A's neighbours), ordinal ranks and a 1e-8 added to
    the denominator; it is not symmetric in (A, B).

    Spearman over one value is undefined: k = 1 gives NaN with ``symmetric`` (as does a token
    whose similarities are all equal, e.g. an all-zero embedding), 0 with ``authors`` (their
    epsilon). Average over tokens with ``np.nanmean``.
    """
    if variant not in ("symmetric", "authors"):
        raise ConfigError(f"analysis.spearman_variant = {variant!r}; choose 'symmetric' or 'authors'")
    a, b = _pair(emb_a, emb_b)
    ks = _check_ks(ks, a.size)
    if variant == "authors":
        return _spearman_from(a, b, ks, authors=True)
    return 0.5 * (_spearman_from(a, b, ks, authors=False) + _spearman_from(b, a, ks, authors=False))


def _standardised(name: str, x: Any) -> np.ndarray:
    x = _check_emb(name, x).astype(np.float64)
    x = x - x.mean(axis=0)
    norm = np.linalg.norm(x)
    if norm == 0:
        raise StoreError(f"{name}: all rows are identical, nothing to align")
    return x / norm


def procrustes(emb_a: np.ndarray, emb_b: np.ndarray) -> tuple[float, float]:
    """Orthogonal Procrustes alignment of B onto A, as ``scipy.spatial.procrustes``.

    Both matrices are centred and scaled to unit Frobenius norm, B is rotated (and scaled)
    optimally onto A. Returns ``(disparity, mean row-wise cosine)``: the sum of squared
    differences after alignment, in [0, 1], and the mean cosine between matching rows.
    """
    x, y = _standardised("emb_a", emb_a), _standardised("emb_b", emb_b)
    if x.shape != y.shape:
        raise StoreError(f"emb_a {x.shape} and emb_b {y.shape} differ in shape; compare members of the "
                         "same run")
    u, s, vt = np.linalg.svd(y.T @ x)  # (d, d): argmin_R ||y R - x|| = u @ vt
    y = (y @ (u @ vt)) * s.sum()
    disparity = float(((x - y) ** 2).sum())
    nx = np.maximum(np.linalg.norm(x, axis=1), 1e-12)
    ny = np.maximum(np.linalg.norm(y, axis=1), 1e-12)
    return disparity, float(((x * y).sum(axis=1) / (nx * ny)).mean())


def _cka_pair(name_x: str, x: Any, name_y: str, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise StoreError(f"{name_x} {x.shape} and {name_y} {y.shape}: CKA needs two 2-D matrices with the "
                         "same number (>= 2) of rows (examples)")
    return _check_emb(name_x, x).astype(np.float64), _check_emb(name_y, y).astype(np.float64)


def _cka_from_centred(kx: np.ndarray, ky: np.ndarray) -> float:
    num = (kx * ky).sum()
    den = math.sqrt((kx * kx).sum() * (ky * ky).sum())
    return float(num / den) if den > 0 else float("nan")


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment between representations ``x`` (n, d1) and ``y`` (n, d2).

    Rows are examples. Computed in feature space, ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),
    which equals HSIC(XX^T, YY^T) / sqrt(HSIC(XX^T, XX^T) HSIC(YY^T, YY^T)). NaN if either is constant.
    """
    x, y = _cka_pair("x", x, "y", y)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    xy, xx, yy = y.T @ x, x.T @ x, y.T @ y
    den = np.linalg.norm(xx) * np.linalg.norm(yy)
    return float((xy * xy).sum() / den) if den > 0 else float("nan")


def _rbf_gram(x: np.ndarray, sigma: float | None, name: str) -> np.ndarray:
    sq = (x * x).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * (x @ x.T), 0.0)  # (n, n) squared distances
    np.fill_diagonal(d2, 0.0)
    median = float(np.median(np.sqrt(d2[np.triu_indices(len(x), 1)])))
    if median == 0:
        raise StoreError(f"{name}: median pairwise distance is 0 (mostly identical rows); RBF CKA undefined")
    bandwidth = median * (1.0 if sigma is None else sigma)
    k = np.exp(-d2 / (2 * bandwidth * bandwidth))
    # Centre: H K H with H = I - 11^T / n.
    return k - k.mean(axis=0) - k.mean(axis=1, keepdims=True) + k.mean()


def rbf_cka(x: np.ndarray, y: np.ndarray, sigma: float | None = None) -> float:
    """RBF-kernel centred kernel alignment between ``x`` (n, d1) and ``y`` (n, d2), rows examples.

    The kernel is exp(-||a - b||^2 / (2 s^2)) with s = ``sigma`` x the median distance between
    distinct rows (each matrix its own median); ``sigma=None`` uses the median itself.
    Costs O(n^2) memory (n = 4096: a few hundred MB).
    """
    if sigma is not None and not sigma > 0:
        raise ConfigError(f"analysis.rbf_sigma = {sigma}: must be positive (or unset for the median)")
    x, y = _cka_pair("x", x, "y", y)
    return _cka_from_centred(_rbf_gram(x, sigma, "x"), _rbf_gram(y, sigma, "y"))


def _as_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor, without importing torch here
        t = t.detach().cpu()
        if getattr(t, "dtype", None) is not None and "bfloat16" in str(t.dtype):
            t = t.float()
        t = t.numpy()
    return np.asarray(t)


def weight_distance(state_a: Mapping[str, Any], state_b: Mapping[str, Any]) -> float:
    """Relative L2 distance between two members' weights: ||a - b|| / ((||a|| + ||b||) / 2).

    Over every floating-point entry of the two state dicts (torch tensors or arrays; integer
    buffers such as position ids are skipped). 0 for identical weights, about sqrt(2) for
    independent initialisations of equal scale.
    """
    if set(state_a) != set(state_b):
        diff = sorted(set(state_a) ^ set(state_b))
        raise CheckpointError(f"the two state dicts differ in parameters ({', '.join(diff[:5])}); compare "
                              "members of the same run")
    dd = na = nb = 0.0
    for name in state_a:
        a, b = _as_numpy(state_a[name]), _as_numpy(state_b[name])
        if a.dtype.kind != "f":
            continue
        if a.shape != b.shape:
            raise CheckpointError(f"parameter '{name}' has shape {a.shape} in one member and {b.shape} in "
                                  "the other; compare members of the same run")
        a, b = a.astype(np.float64), b.astype(np.float64)
        dd += float(((a - b) ** 2).sum())
        na += float((a * a).sum())
        nb += float((b * b).sum())
    scale = 0.5 * (math.sqrt(na) + math.sqrt(nb))
    return math.sqrt(dd) / scale if scale > 0 else 0.0


# --------------------------------------------------------------------------- uncertainty


def bootstrap_ci(values: np.ndarray, n_boot: int = 200, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (axis 0).

    NaN entries are dropped first (e.g. k = 1 Spearman). Resampling runs in blocks, so memory
    stays bounded for millions of positions. Returns (nan, nan) when nothing is left.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"analysis.confidence = {confidence}: must lie strictly between 0 and 1")
    if n_boot < 1:
        raise ConfigError(f"analysis.bootstrap = {n_boot}: need at least 1 resample")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    per_block = max(1, 4_000_000 // n)  # about 32 MB of indices per block
    for s in range(0, n_boot, per_block):
        m = min(per_block, n_boot - s)
        means[s:s + m] = x[rng.integers(0, n, size=(m, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def pair_mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof = 0, as the authors report) over member pairs.

    A NaN value propagates (skip undefined metrics before calling); no values gives (nan, nan).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=0))
