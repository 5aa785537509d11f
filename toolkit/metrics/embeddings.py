"""Static-embedding stability between two members.

Cosine similarity (:func:`cosine_similarity`), each member's neighbour order computed once and
cached by content (:class:`Neighbours`, :func:`neighbours`, :func:`clear_neighbour_cache`),
nearest neighbours (:func:`topk_neighbours`), per-token top-k overlap (:func:`topk_overlap`)
and local Spearman correlation (:func:`local_spearman`), and whole-matrix alignment
(:func:`procrustes`, :func:`linear_cka`, :func:`rbf_cka`). Ties are broken by ascending token
index everywhere.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from toolkit.errors import ConfigError, StoreError
from toolkit.metrics.sorting import _SLAB, _desc_order, _inverse

__all__ = [
    "Neighbours", "clear_neighbour_cache", "cosine_similarity", "linear_cka", "local_spearman",
    "neighbours", "procrustes", "rbf_cka", "topk_neighbours", "topk_overlap",
]


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

    ``symmetric`` (docs/methods.md): for token i, rho between A's and B's similarity values on A's
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
