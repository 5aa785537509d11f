"""The data-side entropy profile of a tokenized corpus (the "entropy" axis of the study).

For a stream of token records the profile reports

- the unigram entropy ``H(X)`` (plug-in, bits per token and per symbol),
- the conditional entropies ``H(X_t | X_{t-j} .. X_{t-1})`` for ``j = 1..J`` in bits per
  token, plug-in and Miller-Madow corrected, with how many distinct contexts were seen
  and how many tokens each context had on average (``context_coverage``): where the
  coverage falls to a few tokens per context the estimate is biased low and stops
  being trustworthy,
- the lzma (preset 9) compression rate of a raw sample, in bits per symbol, a crude
  upper bound of the entropy rate that does not depend on the tokenizer,
- the analytic entropy rate of a synthetic source when it is known.

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
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_LN2 = math.log(2.0)
_KEY_LIMIT = 1 << 62  # keep n-gram keys (times the vocabulary) inside int64
RELIABLE_SAMPLES_PER_OUTCOME = 10
RATE_MAX_TOKENS = 2_000_000
PROFILE_FORMAT = 2
"""Bumped when a profile gains or changes keys: token stores with an older one are re-prepared."""


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


def _collect(token_records: Iterable[np.ndarray], max_tokens: int | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Concatenate records up to ``max_tokens`` (the last one cut); count every token seen."""
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    kept = total = records = 0
    for rec in token_records:
        rec = np.asarray(rec)
        total += len(rec)
        records += 1
        if max_tokens is not None and kept >= max_tokens:
            continue  # keep counting the rest for symbols_per_token
        take = rec if max_tokens is None else rec[: max_tokens - kept]
        if len(take):
            parts.append(take)
            lengths.append(len(take))
            kept += len(take)
    tokens = np.zeros(kept, dtype=np.int32)  # (N,) filled part by part: no list of copies
    pos = 0
    for part in parts:
        tokens[pos:pos + len(part)] = part
        pos += len(part)
    return tokens, np.asarray(lengths, dtype=np.int64), total, records


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


def _rate(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, spt: float, raw: bytes | None,
          raw_symbols: int | None, split_ids: np.ndarray | None, max_tokens: int,
          symbol_records: list[str] | None) -> dict[str, Any]:
    """The entropy-rate keys of a profile (None where nothing could be estimated)."""
    from toolkit.entropy_rate import entropy_rate

    keys = ("entropy_rate_bits_per_symbol", "entropy_rate_low", "entropy_rate_high", "entropy_rate_method",
            "entropy_rate_plateau_order", "entropy_rate_heldout_bits_per_symbol", "entropy_rate_heldout_order",
            "entropy_rate_ppmd_bits_per_symbol", "entropy_rate_tokens")
    if len(tokens) < 2 or not math.isfinite(spt) or spt <= 0:
        return dict.fromkeys(keys)
    if len(tokens) > max_tokens:  # whole records first, the last one cut
        ends = np.cumsum(lengths)
        keep = int(np.searchsorted(ends, max_tokens, side="right"))
        lengths = np.r_[lengths[:keep], max_tokens - (ends[keep - 1] if keep else 0)]
        lengths = lengths[lengths > 0]
        tokens = tokens[:max_tokens]
    r = entropy_rate(tokens, lengths, vocab_size, spt, raw_sample=raw, raw_sample_symbols=raw_symbols,
                     split_ids=split_ids, symbol_records=symbol_records)
    finite = (lambda x: None if x is None or not math.isfinite(x) else float(x))  # noqa: E731
    return {"entropy_rate_bits_per_symbol": finite(r["entropy_rate_bits_per_symbol"]),
            "entropy_rate_low": finite(r["entropy_rate_low"]),
            "entropy_rate_high": finite(r["entropy_rate_high"]),
            "entropy_rate_method": r["entropy_rate_method"],
            "entropy_rate_plateau_order": r["plateau_order"],
            "entropy_rate_heldout_bits_per_symbol": finite(r["heldout_bits_per_symbol"]),
            "entropy_rate_heldout_order": int(r["heldout_order"]),
            "entropy_rate_ppmd_bits_per_symbol": finite(r["ppmd_bits_per_symbol"]),
            "entropy_rate_tokens": int(len(tokens))}


def entropy_profile(token_records: Iterable[np.ndarray], *, n_symbols: int, vocab_size: int,
                    orders: int = 4, raw_sample: bytes | None = None,
                    analytic_entropy_rate: float | None = None,
                    max_tokens: int | None = 20_000_000,
                    raw_sample_symbols: int | None = None,
                    rate_split_ids: np.ndarray | None = None,
                    rate_symbols_per_token: float | None = None,
                    rate_max_tokens: int = RATE_MAX_TOKENS,
                    rate_symbol_records: list[str] | None = None) -> dict[str, Any]:
    """The data-side entropy profile of a stream of token records.

    Parameters
    ----------
    token_records
        Token ids of each record (no specials), e.g. the training split of a token store.
    n_symbols
        Bases or characters of ALL records given (for symbols per token).
    vocab_size
        Vocabulary size; every id must be below it.
    orders
        J: conditional entropies for context lengths 1..J.
    raw_sample
        Raw symbols (bytes) for the compression estimate; None skips it.
    analytic_entropy_rate
        Exact entropy rate of the source in bits per symbol, when known (synthetic).
    max_tokens
        Estimate from at most this many tokens (whole records first); tokens beyond it are
        still counted for ``tokens_total`` and ``symbols_per_token``.
    raw_sample_symbols
        Symbols in ``raw_sample`` when it is not one byte per symbol (UTF-8 text).
    rate_split_ids, rate_symbols_per_token
        How the tokenizer's stream maps to symbols for the entropy rate
        (:func:`toolkit.entropy_rate.rate_view`); None: no split, the measured mean.
    rate_symbol_records
        Raw records (up to about 1 M symbols): the rate is also estimated one token per
        character, and both views' evidence combined.
    rate_max_tokens
        The entropy-rate interval is estimated on at most this many tokens (whole
        records first): it fits order after order, and 2 M tokens resolve an order-7
        DNA context in seconds.

    Returns
    -------
    dict
        JSON-serialisable: ``tokens``, ``tokens_total``, ``records``, ``symbols``,
        ``symbols_per_token``, ``unigram_bits``, ``unigram_bits_mm``,
        ``unigram_bits_per_symbol``, ``conditional_bits`` (Miller-Madow, j = 1..J),
        ``conditional_bits_plugin``, ``conditional_bits_per_symbol``, ``contexts_seen``,
        ``context_coverage``, ``conditional_reliable``, ``compression_bits_per_symbol``,
        ``analytic_entropy_rate_bits_per_symbol``, ``vocab_size``, ``orders``, ``max_tokens``;
        the entropy rate with its interval (:func:`toolkit.entropy_rate.entropy_rate`):
        ``entropy_rate_bits_per_symbol``, ``entropy_rate_low``, ``entropy_rate_high``,
        ``entropy_rate_method``, ``entropy_rate_plateau_order``,
        ``entropy_rate_heldout_bits_per_symbol``, ``entropy_rate_heldout_order``,
        ``entropy_rate_ppmd_bits_per_symbol``, ``entropy_rate_tokens``.
    """
    if orders < 0:
        raise ValueError("orders must be >= 0")
    t0 = time.perf_counter()
    tokens, lengths, total, records = _collect(token_records, max_tokens)
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}); got [{tokens.min()}, {tokens.max()}]")
    spt = n_symbols / total if total else float("nan")
    unigram = np.bincount(tokens, minlength=vocab_size)
    cond = conditional_entropies(tokens, lengths, vocab_size, orders)
    h1 = plugin_entropy_bits(unigram) if len(tokens) else float("nan")
    used = int(np.count_nonzero(unigram))

    def clean(x: float | None) -> float | None:  # JSON has no NaN
        return None if x is None or not math.isfinite(x) else float(x)

    profile = {
        "tokens": int(len(tokens)),
        "tokens_total": int(total),
        "records": int(records),
        "symbols": int(n_symbols),
        "symbols_per_token": clean(spt),
        "vocab_size": int(vocab_size),
        "vocab_used": used,
        "orders": int(orders),
        "max_tokens": max_tokens,
        "unigram_bits": clean(h1),
        "unigram_bits_mm": clean(miller_madow_bits(unigram)) if len(tokens) else None,
        "unigram_bits_per_symbol": clean(h1 / spt) if total else None,
        "conditional_bits": [clean(c["miller_madow"]) for c in cond],
        "conditional_bits_plugin": [clean(c["plugin"]) for c in cond],
        "conditional_bits_per_symbol": [clean(c["miller_madow"] / spt) if total else None for c in cond],
        "contexts_seen": [int(c["contexts"]) for c in cond],
        "context_positions": [int(c["positions"]) for c in cond],
        "context_coverage": [clean(c["coverage"]) for c in cond],
        # Rule of thumb: a context needs about 10 samples per possible next token before the
        # (even Miller-Madow corrected) plug-in estimate stops being biased low.
        "conditional_reliable": [bool(c["coverage"] >= RELIABLE_SAMPLES_PER_OUTCOME * max(used, 1))
                                 for c in cond],
        "compression_bits_per_symbol": clean(compression_bits_per_symbol(raw_sample, raw_sample_symbols))
        if raw_sample else None,
        "compression_sample_symbols": int(raw_sample_symbols or len(raw_sample)) if raw_sample else 0,
        "analytic_entropy_rate_bits_per_symbol": clean(analytic_entropy_rate)
        if analytic_entropy_rate is not None else None,
        **_rate(tokens, lengths, vocab_size, rate_symbols_per_token or spt, raw_sample, raw_sample_symbols,
                rate_split_ids, rate_max_tokens, rate_symbol_records),
    }
    log.info("entropy profile: %d tokens, %d orders in %.1f s", len(tokens), orders,
             time.perf_counter() - t0)
    return profile
