"""The entropy rate of a token stream, as a point estimate inside an interval.

Three kinds of evidence, each with what it can and cannot say:

- **Conditional entropies** ``H_j = H(X_t | j previous tokens)`` (Miller-Madow corrected
  plug-in, :func:`toolkit.entropy.estimators.conditional_entropies`) decrease with ``j`` towards the
  rate and equal it from the source's memory on. Where the data suffice (every context
  seen about 10 times per possible next token, "reliable" orders) the estimate has a small
  bias. A *plateau* is the first reliable order from which the estimate stops falling (the
  drop to the next reliable order is within two standard errors): there the source's
  memory is resolved, and the smallest plug-in estimate (biased low) of the reliable
  orders from the plateau on, minus two standard errors, is the **lower side**. Without a
  plateau nothing bounds the rate from below (a source with longer memory than the data
  resolve can have any lower rate; natural text and genomes are such sources): the lower
  side is then 0 and the method says so.
- **Held-out cross-entropy** of smoothed order-k models (interpolated Witten-Bell, fitted
  on the first 80% of the tokens, k chosen on the first half of the rest, scored on the
  second half). A model's cross-entropy on fresh data from a stationary source is at
  least the entropy rate, so this (plus two standard errors) is an **upper side**.
- **A universal compressor** (PPMd, ``pyppmd``) on a raw sample: a code length, so also an
  upper side, independent of the tokenizer. (lzma stays in the profile as the crude bound
  it always was; it is looser than PPMd everywhere measured and is not used here.)

The evidence comes from two *views* of the corpus when the tokens are not characters: the
token stream (k-mer runs split at their single-base and N tokens, :func:`split_runs`) and
a symbol stream of the raw records, one token per character. Both bound the same rate per
symbol, so the interval is the intersection: the larger lower side, the smallest upper one.

The **point estimate** is the Miller-Madow estimate at the plateau of the view giving the
lower side, clipped into the interval; without a plateau it is the smallest held-out
cross-entropy, an upper side, and the interval from 0 says how little is known.

Standard errors treat positions as independent, except at the plateau where batch means
over contiguous blocks are used when larger (slowly mixing sources); "two standard
errors" is checked on a grid of sources with known rates (tests/test_entropy_rate.py,
``python -m benchmarks entropy_rate``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from toolkit.entropy.estimators import RELIABLE_SAMPLES_PER_OUTCOME, conditional_entropies

_LN2 = math.log(2.0)
HELD_OUT_FRACTION = 0.2
MAX_ORDER = 16
PPMD_ORDERS = (2, 4, 6, 8, 12, 16)
BATCHES = 10
"""Contiguous blocks for batch-means standard errors."""


def witten_bell_cross_entropy(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, max_order: int,
                              train_fraction: float = 1 - HELD_OUT_FRACTION) -> dict[str, Any]:
    """Held-out cross-entropy (bits per token) of interpolated Witten-Bell models of order 0..K.

    The first ``train_fraction`` of the tokens fit the counts; the rest is held out, its
    first half to choose the order, its second half to score it. Contexts never cross a
    record boundary or the train/held-out cut.

    Returns
    -------
    dict
        ``select`` and ``score``: cross-entropy per order (lists of K + 1), ``order`` (the
        chosen k), ``bits`` (its score), ``se`` (standard error of that score), ``positions``
        (scored positions).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    cut = int(n * train_fraction)
    first = np.zeros(n, dtype=bool)  # (N,) record starts, the cut included
    if n:
        first[np.cumsum(lengths[:-1])] = True
        first[0] = True
        if cut < n:
            first[cut] = True
    held = np.arange(cut, n)  # (H,) held-out positions
    half = cut + (n - cut) // 2
    is_train = np.arange(n) < cut
    p_prev = np.full(len(held), 1.0 / vocab_size)  # order -1: uniform
    select: list[float] = []
    score: list[float] = []
    losses: list[np.ndarray] = []
    ctx = np.zeros(n, dtype=np.int64)  # (N,) id of the order-j context ending before t
    valid = np.ones(n, dtype=bool)  # (N,) t has j predecessors in its record
    for j in range(max_order + 1):
        if j > 0:
            valid[1:] = valid[:-1] & ~first[1:]
            valid[0] = False
            at = np.flatnonzero(valid)
            if not len(at):
                break
            pair = ctx[at - 1] * vocab_size + tokens[at - 1]
            _, inverse = np.unique(pair, return_inverse=True)
            ctx[:] = -1
            ctx[at] = inverse
        fit = valid & is_train
        joint = np.unique(ctx[fit] * vocab_size + tokens[fit], return_counts=True)  # sorted keys, counts
        keys, counts = joint
        c_of = keys // vocab_size
        starts = np.flatnonzero(np.r_[True, c_of[1:] != c_of[:-1]]) if len(keys) else np.zeros(0, np.int64)
        ctx_keys = c_of[starts]
        ctx_total = np.add.reduceat(counts, starts) if len(keys) else np.zeros(0, np.int64)
        ctx_types = np.diff(np.r_[starts, len(keys)])
        p = p_prev.copy()
        ok = valid[held]
        if ok.any() and len(keys):
            hk = ctx[held[ok]] * vocab_size + tokens[held[ok]]
            i = np.minimum(np.searchsorted(keys, hk), len(keys) - 1)
            c_cx = np.where(keys[i] == hk, counts[i], 0)
            ci = np.minimum(np.searchsorted(ctx_keys, ctx[held[ok]]), len(ctx_keys) - 1)
            seen = ctx_keys[ci] == ctx[held[ok]]
            C = np.where(seen, ctx_total[ci], 0).astype(np.float64)
            T = np.where(seen, ctx_types[ci], 0).astype(np.float64)
            mixed = (c_cx + T * p_prev[ok]) / np.maximum(C + T, 1.0)
            p[ok] = np.where(C > 0, mixed, p_prev[ok])
        loss = -np.log2(p)
        select.append(float(loss[held < half].mean()) if (held < half).any() else float("nan"))
        score.append(float(loss[held >= half].mean()) if (held >= half).any() else float("nan"))
        losses.append(loss[held >= half])
        p_prev = p
    finite = [s if math.isfinite(s) else math.inf for s in select]
    k = int(np.argmin(finite)) if select else 0
    scored = losses[k] if losses else np.zeros(0)
    se = float(scored.std(ddof=1) / math.sqrt(len(scored))) if len(scored) > 1 else float("inf")
    if len(scored) >= 20 * BATCHES:  # batch means: neighbouring positions are not independent
        means = np.array([b.mean() for b in np.array_split(scored, BATCHES)])
        se = max(se, float(means.std(ddof=1) / math.sqrt(BATCHES)))
    return {"select": select, "score": score, "order": k, "bits": score[k] if score else float("nan"),
            "se": se, "positions": int(len(scored))}


def ppmd_bits_per_symbol(raw: bytes, symbols: int | None = None) -> tuple[float, int] | None:
    """Smallest PPMd (variant H) code length over :data:`PPMD_ORDERS`, bits per symbol; and its order.

    None when ``pyppmd`` is not installed or ``raw`` is empty.
    """
    try:
        import pyppmd
    except ImportError:
        return None
    if not raw:
        return None
    mem = min(1 << 28, max(1 << 20, 32 * len(raw)))
    best = min((len(pyppmd.compress(raw, max_order=o, mem_size=mem)), o) for o in PPMD_ORDERS)
    return 8.0 * best[0] / (symbols or len(raw)), best[1]


def split_runs(tokens: np.ndarray, lengths: np.ndarray, split_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove the ``split_ids`` tokens and cut records where they were.

    A k-mer tokenizer ends each run of bases with up to k - 1 single-base tokens and
    gives N its own token: at those positions the token stream says "a record or run
    ends here", surprise that belongs to the tokenization, not to the source (at 10 kb
    records and h = 0.1 bits/base it adds 0.002 bits/base). Rates are estimated on the
    runs of full k-mers between them.
    """
    tokens = np.asarray(tokens)
    drop = np.isin(tokens, split_ids)  # (N,)
    record = np.repeat(np.arange(len(lengths)), lengths)  # (N,) record of each token
    # a new run starts at each record start and after each dropped token
    start = np.ones(len(tokens), dtype=bool)
    if len(tokens):
        start[1:] = (record[1:] != record[:-1]) | drop[:-1]
    keep = ~drop
    run_id = np.cumsum(start)[keep]
    kept = tokens[keep]
    if not len(kept):
        return kept, np.zeros(0, dtype=np.int64)
    new_lengths = np.diff(np.flatnonzero(np.r_[True, run_id[1:] != run_id[:-1], True]))
    return kept, new_lengths.astype(np.int64)


def rate_view(spec: str, token_texts: list[str]) -> tuple[np.ndarray | None, float | None]:
    """``(split_ids, symbols_per_token)`` for :func:`entropy_rate` under a tokenizer.

    ``kmer<k>``: the single-base and N tokens split runs and every kept token is ``k``
    symbols; ``kmer<k>-overlap``: the same split, one new symbol per token. Other
    tokenizers (char, bpe, a checkpoint's): ``(None, None)``, use the measured mean.
    """
    from toolkit.tokenizers.spec import N_SPECIALS, TOKENIZER_PATTERN

    m = TOKENIZER_PATTERN.match(spec)
    if m is None or not m.group("k"):
        return None, None
    k = int(m.group("k"))
    split = np.array([i for i, t in enumerate(token_texts) if i >= N_SPECIALS and len(t) != k], dtype=np.int64)
    return split, (1.0 if m.group("overlap") else float(k))


def symbol_view(records: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, lengths, alphabet size): records as one id per character (dense over those seen)."""
    lengths = np.array([len(r) for r in records], dtype=np.int64)
    codes = np.frombuffer("".join(records).encode("utf-32-le"), dtype=np.uint32)
    alphabet, ids = np.unique(codes, return_inverse=True)
    return ids.astype(np.int64), lengths, max(int(len(alphabet)), 1)


def view_evidence(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, spt: float,
                  max_order: int = MAX_ORDER) -> dict[str, Any]:
    """One view's side of the interval, in bits per symbol: the plateau of its conditional
    entropies (if any) and its held-out Witten-Bell cross-entropy."""
    used = int(np.count_nonzero(np.bincount(tokens, minlength=vocab_size))) if len(tokens) else 0
    need = RELIABLE_SAMPLES_PER_OUTCOME * max(used, 1)
    cond = conditional_entropies(tokens, lengths, vocab_size, max_order, stop_below=need)
    orders = [_unigram(tokens, vocab_size), *cond]  # orders[j]: j tokens of context
    for o in orders:
        o["reliable"] = bool(o["coverage"] >= need and o["positions"] > 0)
    reliable = [j for j, o in enumerate(orders) if o["reliable"]]
    plateau = next((j for j in reliable if j + 1 in reliable and orders[j]["miller_madow"]
                    - orders[j + 1]["miller_madow"] <= 2 * math.hypot(orders[j]["se"], orders[j + 1]["se"])),
                   None)
    low = point = None
    if plateau is not None:
        # The independent-positions error underestimates slowly mixing sources: batch means
        # of the plug-in estimate over contiguous blocks, at the plateau the lower side rests on.
        batch_se = _batch_se(tokens, lengths, vocab_size, plateau)
        for j in reliable:
            if j >= plateau:
                orders[j]["se"] = max(orders[j]["se"], batch_se)
        low = max(0.0, min(orders[j]["plugin"] - 2 * orders[j]["se"] for j in reliable if j >= plateau)) / spt
        point = orders[plateau]["miller_madow"] / spt
    deepest = max((j for j, o in enumerate(orders) if o["positions"] > 0), default=0)
    wb = witten_bell_cross_entropy(tokens, lengths, vocab_size, max(deepest, 1))
    return {"plateau_order": plateau, "low": low, "point": point,
            "heldout": wb["bits"] / spt, "heldout_high": (wb["bits"] + 2 * wb["se"]) / spt,
            "heldout_order": wb["order"], "deepest_order": deepest,
            "orders": [{"order": j, "miller_madow": o["miller_madow"] / spt, "plugin": o["plugin"] / spt,
                        "se": o["se"] / spt, "coverage": o["coverage"], "reliable": o["reliable"]}
                       for j, o in enumerate(orders)]}


def entropy_rate(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, symbols_per_token: float, *,
                 raw_sample: bytes | None = None, raw_sample_symbols: int | None = None,
                 max_order: int = MAX_ORDER, split_ids: np.ndarray | None = None,
                 symbol_records: list[str] | None = None) -> dict[str, Any]:
    """The entropy rate with its interval, in bits per symbol (module docstring).

    Parameters
    ----------
    tokens, lengths
        (N,) token ids of the records concatenated and (R,) their lengths.
    vocab_size
        Every id is below it.
    symbols_per_token
        Symbols (bases, characters) per token, to convert bits per token to per symbol
        (of the tokens kept: ``k`` for k-mers with ``split_ids``).
    raw_sample, raw_sample_symbols
        Raw symbols for PPMd (and how many symbols they hold, if not one byte each).
    max_order
        Deepest context (tokens) tried; orders stop earlier once undersampled.
    split_ids
        Tokens that end runs rather than continue them (:func:`split_runs`).
    symbol_records
        Raw records: a second view, one token per character, whose evidence is combined
        with the token view's (both bound the same rate per symbol).

    Returns
    -------
    dict
        ``entropy_rate_bits_per_symbol``, ``entropy_rate_low``, ``entropy_rate_high``,
        ``entropy_rate_method`` and the evidence: ``views`` (per view: plateau order,
        orders with MM/plug-in/SE per symbol, held-out Witten-Bell), ``ppmd``.
    """
    spt = symbols_per_token if symbols_per_token and math.isfinite(symbols_per_token) else 1.0
    tokens = np.asarray(tokens)
    if split_ids is not None and len(split_ids):
        tokens, lengths = split_runs(tokens, lengths, split_ids)
    views = {"tokens": view_evidence(tokens, lengths, vocab_size, spt, max_order)}
    if symbol_records and (spt != 1.0 or split_ids is not None):
        ids, sym_lengths, alphabet = symbol_view(symbol_records)
        views["symbols"] = view_evidence(ids, sym_lengths, alphabet, 1.0, max_order)
    ppmd = ppmd_bits_per_symbol(raw_sample, raw_sample_symbols) if raw_sample else None
    highs = {f"held-out Witten-Bell order {v['heldout_order']} on {name} + 2 SE": v["heldout_high"]
             for name, v in views.items()}
    if ppmd is not None:
        highs[f"PPMd order {ppmd[1]} code length"] = ppmd[0]
    high_by = min(highs, key=lambda k: highs[k])
    high = highs[high_by]
    lows = {name: v["low"] for name, v in views.items() if v["low"] is not None}
    if lows:
        low_by = max(lows, key=lambda k: lows[k])
        v = views[low_by]
        low = min(lows[low_by], high)
        point = min(max(v["point"], low), high)
        method = (f"Miller-Madow H(X | {v['plateau_order']} previous) on {low_by} at the plateau of "
                  f"the conditional entropies; low: its reliable orders from there minus 2 SE; "
                  f"high: {high_by}")
    else:
        best = min(views.values(), key=lambda v: v["heldout"])
        low = 0.0
        point = min(best["heldout"], high)
        method = (f"held-out Witten-Bell order {best['heldout_order']}, an upper side: no plateau among "
                  f"the reliable orders of any view (orders up to "
                  f"{', '.join(str(v['deepest_order']) for v in views.values())}), so the data do not "
                  f"resolve the source's memory and give no lower side; high: {high_by}")
    main = views.get(low_by if lows else "tokens", views["tokens"])
    return {
        "entropy_rate_bits_per_symbol": point,
        "entropy_rate_low": low,
        "entropy_rate_high": high,
        "entropy_rate_method": method,
        "plateau_order": main["plateau_order"] if lows else None,
        "heldout_bits_per_symbol": min(v["heldout"] for v in views.values()),
        "heldout_order": min(views.values(), key=lambda v: v["heldout"])["heldout_order"],
        "views": views,
        "ppmd_bits_per_symbol": ppmd[0] if ppmd else None,
        "ppmd_order": ppmd[1] if ppmd else None,
    }


def _batch_se(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, order: int) -> float:
    """Standard error of the order-``order`` plug-in estimate from :data:`BATCHES` contiguous blocks."""
    n = len(tokens)
    if n < BATCHES * 1000:
        return 0.0
    ends = np.cumsum(lengths)
    cuts = np.linspace(0, n, BATCHES + 1).astype(np.int64)
    estimates = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        inner = ends[(ends > a) & (ends < b)]  # record ends inside the block
        block_lengths = np.diff(np.r_[a, inner, b])
        block = tokens[a:b]
        if order == 0:
            estimates.append(_unigram(block, vocab_size)["plugin"])
        else:
            res = conditional_entropies(block, block_lengths[block_lengths > 0], vocab_size, order)
            estimates.append(res[-1]["plugin"])
    est = np.array([e for e in estimates if math.isfinite(e)])
    return float(est.std(ddof=1) / math.sqrt(len(est))) if len(est) > 1 else 0.0


def _unigram(tokens: np.ndarray, vocab_size: int) -> dict[str, Any]:
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64) if len(tokens) else np.zeros(1)
    n = counts.sum()
    if n == 0:
        return {"plugin": math.nan, "miller_madow": math.nan, "se": math.inf, "coverage": 0.0, "positions": 0}
    nz = counts[counts > 0]
    loss = -np.log2(nz / n)
    h = float((nz * loss).sum() / n)
    var = float((nz * loss ** 2).sum() / n - h * h)
    return {"plugin": h, "miller_madow": h + (len(nz) - 1) / (2 * n * _LN2),
            "se": math.sqrt(max(var, 0.0) / n), "coverage": float(n), "positions": int(n)}
