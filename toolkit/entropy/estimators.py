"""Entropy estimators on token counts (the pieces of :mod:`toolkit.entropy.profile`).

- :func:`plugin_entropy_bits` / :func:`miller_madow_bits`: the entropy of a histogram;
- :func:`conditional_entropies`: ``H(X_t | X_{t-j} .. X_{t-1})`` for ``j = 1..J``, plug-in
  and Miller-Madow corrected, with the contexts seen and the tokens per context;
- :func:`compression_bits_per_symbol`: the lzma (preset 9) rate of a raw sample.

Contexts never cross record boundaries. Estimation is vectorised: n-grams are integer
keys (``key_j = key_{j-1} * V + token``; re-indexed densely when they would overflow
int64) counted with ``np.unique``.

Miller-Madow: ``H_MM = H_plugin + (m - 1) / (2 N)`` nats for m observed bins and N
samples. For a conditional entropy ``H(ctx, x) - H(ctx)`` over the same N positions
the correction is ``(m_joint - m_ctx) / (2 N)`` nats: the sum over contexts of each
context's own correction, weighted by its frequency.
"""

from __future__ import annotations

import logging
import lzma
import math

import numpy as np

log = logging.getLogger("toolkit.entropy")

_LN2 = math.log(2.0)
_KEY_LIMIT = 1 << 62  # keep n-gram keys (times the vocabulary) inside int64
RELIABLE_SAMPLES_PER_OUTCOME = 10


def plugin_entropy_bits(counts: np.ndarray) -> float:
    """Plug-in (maximum likelihood) entropy in bits of a histogram (zeros ignored)."""
    c = np.asarray(counts)
    n = float(c.sum(dtype=np.float64))
    if n <= 0:
        return float("nan")
    # H = log2 N - sum c log2 c / N; bins with c = 1 add nothing to the sum, and at long
    # contexts most bins are singletons, so only the others go through log2.
    big = c[c > 1].astype(np.float64)
    return float(math.log2(n) - np.dot(big, np.log2(big)) / n)


def miller_madow_bits(counts: np.ndarray) -> float:
    """Miller-Madow corrected entropy in bits: plug-in + (m - 1) / (2 N ln 2)."""
    c = np.asarray(counts)
    c = c[c > 0]
    n = float(c.sum())
    return plugin_entropy_bits(c) + (len(c) - 1) / (2.0 * n * _LN2) if n > 0 else float("nan")


def compression_bits_per_symbol(raw: bytes, symbols: int | None = None) -> float | None:
    """lzma (preset 9, raw LZMA2 stream: no container overhead) bits per symbol of ``raw``."""
    if not raw:
        return None
    # Preset 9 with its 64 MiB dictionary needs ~700 MB; a dictionary as large as the
    # sample compresses identically, with memory proportional to the sample.
    dict_size = min(1 << 26, max(1 << 12, 1 << (len(raw) - 1).bit_length()))
    packed = lzma.compress(raw, format=lzma.FORMAT_RAW,
                           filters=[{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": dict_size}])
    return 8.0 * len(packed) / (symbols or len(raw))


def conditional_entropies(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int,
                          orders: int, stop_below: float | None = None,
                          extra: int = 0) -> list[dict[str, float]]:
    """For j = 1..orders: H(X_t | previous j tokens) over positions with j predecessors in the record.

    Parameters
    ----------
    tokens
        (N,) token ids of all records concatenated, each below ``vocab_size``.
    lengths
        (R,) tokens per record (sum N); contexts never cross records.
    stop_below, extra
        Stop ``extra`` orders after the first order whose coverage (positions per context)
        is below ``stop_below`` (that order included); None computes every order.

    Returns
    -------
    One dict per j: ``plugin``, ``miller_madow`` (bits per token), ``se`` (standard error
    of the plug-in estimate, positions taken as independent), ``contexts`` (distinct
    contexts seen), ``positions`` (predicted positions), ``coverage`` (positions per context).

    Memory: about 40 bytes per token at the peak (int64 keys, sorted n-grams, counts).
    """
    n = len(tokens)
    first = np.zeros(n, dtype=bool)  # (N,) record starts
    first[np.cumsum(lengths[:-1])] = True
    if n:
        first[0] = True  # position 0 never has a predecessor, at any order
    # ok[t]: t has j predecessors in its record (j = the current order); ok_j = ~first & ok_{j-1}[t-1]
    ok = ~first
    del first
    key = tokens.astype(np.int64)  # (N,) id of the j-gram ending at t
    span = vocab_size  # every key is below span
    out = []
    for j in range(1, orders + 1):
        if j > 1:
            ok[1:] &= ok[:-1].copy()  # copy: the shifted operands overlap
        m = int(np.count_nonzero(ok))
        if m == 0:
            out.append({"plugin": float("nan"), "miller_madow": float("nan"), "se": float("inf"),
                        "contexts": 0, "positions": 0, "coverage": 0.0})
            continue
        sel = ok[1:]
        # (M,) the (j+1)-gram ending at each target: its j-gram context, then the target.
        # In place, and the next order's keys are written before sorting: peak memory is
        # a few int64 arrays of N, not one per expression.
        joint = key[:-1][sel]
        joint *= vocab_size
        joint += tokens[1:][sel]
        key[1:][sel] = joint  # positions outside sel are never read again as contexts
        joint.sort()
        new = np.empty(m, dtype=bool)  # (M,) first occurrence of each distinct n-gram
        new[0] = True
        np.not_equal(joint[1:], joint[:-1], out=new[1:])
        firsts = np.flatnonzero(new)
        del new
        uniq = joint[firsts]  # (U,) distinct (j+1)-grams, sorted
        del joint
        counts = np.diff(firsts, append=m)
        del firsts
        # Sorted n-grams have their contexts (uniq // V) in runs: sum the counts per run.
        ctx_of = uniq // vocab_size
        change = np.empty(len(uniq), dtype=bool)
        change[0] = True
        np.not_equal(ctx_of[1:], ctx_of[:-1], out=change[1:])
        del ctx_of
        run_starts = np.flatnonzero(change)
        del change
        ctx_counts = np.add.reduceat(counts, run_starts)
        plugin = plugin_entropy_bits(counts) - plugin_entropy_bits(ctx_counts)
        mm = plugin + (len(counts) - len(ctx_counts)) / (2.0 * m * _LN2)
        # Standard error: the spread of each position's loss -log2(n(c, x) / n(c)).
        loss = np.log2(np.repeat(ctx_counts, np.diff(run_starts, append=len(counts)))) - np.log2(counts)
        second = float(np.dot(counts, loss * loss)) / m
        se = math.sqrt(max(second - plugin * plugin, 0.0) / m)
        del loss, run_starts
        coverage = m / len(ctx_counts)
        out.append({"plugin": max(plugin, 0.0), "miller_madow": max(mm, 0.0), "se": se,
                    "contexts": len(ctx_counts), "positions": m, "coverage": coverage})
        del counts, ctx_counts
        if stop_below is not None and coverage < stop_below:
            if extra <= 0:
                break
            extra -= 1
            stop_below = math.inf  # count the extra orders down from here
        if j == orders:
            break
        if span * vocab_size * vocab_size < _KEY_LIMIT:
            span *= vocab_size
        else:  # re-index densely so keys stay small (any vocabulary, any order)
            key[1:][sel] = np.searchsorted(uniq, key[1:][sel])
            span = len(uniq)
        del uniq
    return out
