"""``synthetic:markov``: an order-k Markov source tuned to a known entropy rate."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np

from toolkit.config import CorpusConfig, SyntheticConfig
from toolkit.corpora.base import Corpus, Record
from toolkit.corpora.files import log
from toolkit.errors import CorpusError
from toolkit.progress import LogProgress


def _row_entropy_bits(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of each row of a stochastic matrix; 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=-1)


def stationary_contexts(p: np.ndarray) -> np.ndarray:
    """Stationary distribution over the ``a**k`` contexts of an order-k chain.

    ``p`` is ``(a**k, a)``: row ``c`` is P(next symbol | context c), the context
    being the last k symbols as a base-a number (oldest symbol most significant).
    Solved exactly (sparse LU), so periodic or slowly mixing chains are fine.
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    n, a = p.shape
    nxt = (np.arange(n)[:, None] * a + np.arange(a)[None, :]) % n  # (n, a) next context
    # pi T = pi  <=>  (T^T - I) pi = 0, of rank n - 1: one equation is replaced by
    # pi[j] = 1 (then normalised). A dense "sum(pi) = 1" row would wreck the sparse
    # LU; j is a heavy context found by a few power steps, for conditioning.
    pi = np.full(n, 1.0 / n)
    for _ in range(64):
        pi = np.bincount(nxt.ravel(), weights=(pi[:, None] * p).ravel(), minlength=n)
    j = int(np.argmax(pi))
    rows = np.concatenate([nxt.ravel(), np.arange(n)])
    cols = np.concatenate([np.repeat(np.arange(n), a), np.arange(n)])
    vals = np.concatenate([p.ravel(), -np.ones(n)])
    keep = rows != j
    rows = np.append(rows[keep], j)
    cols = np.append(cols[keep], j)
    vals = np.append(vals[keep], 1.0)
    b = np.zeros(n)
    b[j] = 1.0
    pi = np.asarray(spsolve(csc_matrix((vals, (rows, cols)), shape=(n, n)), b), dtype=np.float64)
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def markov_transitions(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Transition matrix of ``synthetic:markov`` and its exact entropy rate.

    Rows are drawn from a flat Dirichlet (seeded by ``cfg.seed``), then tempered:
    ``P_beta ∝ P0**beta`` row-wise. ``beta = 0`` is the uniform chain (log2|A| bits);
    growing ``beta`` drives every row towards its argmax (0 bits). ``beta`` is
    solved for (Brent's method) so that the exact entropy rate ``sum_c pi(c) H(P(.|c))``
    equals ``cfg.entropy_rate`` to 1e-9.

    Returns
    -------
    p : (a**k, a) float64 transition matrix
    pi : (a**k,) stationary distribution over contexts
    rate : the exact entropy rate of ``p`` in bits per symbol
    """
    a, k = len(cfg.alphabet), cfg.order
    n = a**k
    if n * a > 20_000_000:
        raise CorpusError(f"synthetic:markov: alphabet {a} and order {k} give {n} contexts; "
                          "lower synthetic.order")
    h_max = math.log2(a)
    target = cfg.entropy_rate
    if not 0 < target <= h_max + 1e-9:
        raise CorpusError(f"synthetic:markov: entropy_rate {target} is outside (0, {h_max:.4f}] "
                          f"bits for an alphabet of {a} symbols")
    rng = np.random.default_rng(cfg.seed)
    logp0 = np.log(rng.dirichlet(np.ones(a), size=n))  # (n, a)

    def chain(beta: float) -> tuple[np.ndarray, np.ndarray, float]:
        z = beta * logp0
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        pi = stationary_contexts(p)
        return p, pi, float(pi @ _row_entropy_bits(p))

    if target >= h_max - 1e-12:
        return chain(0.0)
    lo, hi = 0.0, 1.0
    while chain(hi)[2] > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise CorpusError(f"synthetic:markov: entropy_rate {target} is too close to 0 for "
                              f"seed {cfg.seed}; use a larger rate or another seed")
    from scipy.optimize import brentq

    # H(beta) is usually smooth and decreasing on the bracket (Brent needs ~10
    # evaluations), but a sharpened chain can lock into cycles, where the rate jumps
    # and the root finder settles on the jump: check the result instead of trusting it.
    beta = brentq(lambda x: chain(x)[2] - target, lo, hi, xtol=1e-12, rtol=1e-12)
    best = chain(beta)
    if abs(best[2] - target) > 1e-6:
        raise CorpusError(f"synthetic:markov: seed {cfg.seed} cannot reach entropy_rate {target} "
                          f"(closest {best[2]:.6f} bits/symbol: the chain locks into cycles); "
                          "choose another synthetic.seed")
    return best


def _markov_records(cfg: SyntheticConfig, p: np.ndarray, pi: np.ndarray) -> Iterator[Record]:
    """``cfg.records`` records, generated in batches, all records of a batch at once.

    Batch b uses a generator seeded by (seed, b) and the batch size depends only on
    ``length``: a record does not depend on how many records are read.
    """
    a, k, n = len(cfg.alphabet), cfg.order, p.shape[0]
    cum = np.cumsum(p, axis=1)  # (n, a)
    cum[:, -1] = 1.0
    pi_cum = np.cumsum(pi)
    pi_cum[-1] = 1.0
    lut = np.array([ord(c) for c in cfg.alphabet], dtype="<u4")
    powers = a ** np.arange(k - 1, -1, -1)  # (k,) digit weights, oldest first
    # Up to 4096 records at a time, at most ~16M symbols in memory.
    batch = max(1, min(4096, (1 << 24) // cfg.length))
    progress = LogProgress(desc="generating synthetic:markov", total=cfg.records, unit="records", logger=log)
    for b in range(math.ceil(cfg.records / batch)):
        rng = np.random.default_rng([cfg.seed, 1 + b])
        m = min(batch, cfg.records - b * batch)
        out = np.empty((m, cfg.length), dtype=np.uint8 if a <= 256 else np.int32)  # (R, L)
        # Start in the stationary distribution: the sample is a stationary process.
        ctx = np.minimum(np.searchsorted(pi_cum, rng.random(m), side="right"), n - 1)  # (R,)
        first = (ctx[:, None] // powers[None, :]) % a  # (R, k)
        out[:, :min(k, cfg.length)] = first[:, :cfg.length]
        for t in range(k, cfg.length):
            u = rng.random(m)[:, None]  # (R, 1)
            y = (u >= cum[ctx]).sum(axis=1)  # (R,) inverse CDF
            out[:, t] = y
            ctx = (ctx * a + y) % n
        text = lut[out]  # (R, L) code points
        for i in range(m):
            yield Record(f"markov:{b * batch + i}", text[i].tobytes().decode("utf-32-le"))
        progress.moveto(b * batch + m)


class MarkovCorpus(Corpus):
    """``synthetic:markov``: an order-k Markov source with a known entropy rate."""

    def __init__(self, name: str, config: CorpusConfig) -> None:
        syn = config.synthetic
        if len(set(syn.alphabet)) != len(syn.alphabet) or len(syn.alphabet) < 2:
            raise CorpusError(f"corpus {name}: synthetic.alphabet {syn.alphabet!r} needs at least "
                              "2 distinct symbols")
        if syn.order < 0 or syn.records < 1 or syn.length < 1:
            raise CorpusError(f"corpus {name}: synthetic.order must be >= 0 and records, length >= 1")
        self.p, self.pi, rate = markov_transitions(syn)
        kind: Literal["dna", "text"] = "dna" if set(syn.alphabet) <= set("ACGTN") else "text"
        super().__init__(name, kind, config, analytic_entropy_rate=rate)

    def _generate(self) -> Iterator[Record]:
        return _markov_records(self.config.synthetic, self.p, self.pi)
