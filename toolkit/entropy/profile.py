"""The data-side entropy profile of a tokenized corpus (the "entropy" axis of the study).

For a stream of token records the profile reports

- the unigram entropy ``H(X)`` (plug-in, bits per token and per symbol),
- the conditional entropies ``H(X_t | X_{t-j} .. X_{t-1})`` for ``j = 1..J`` in bits per
  token, plug-in and Miller-Madow corrected (:mod:`toolkit.entropy.estimators`), with
  how many distinct contexts were seen and how many tokens each context had on average
  (``context_coverage``): where the coverage falls to a few tokens per context the
  estimate is biased low and stops being trustworthy,
- the lzma (preset 9) compression rate of a raw sample, in bits per symbol, a crude
  upper bound of the entropy rate that does not depend on the tokenizer,
- the entropy rate with its interval (:mod:`toolkit.entropy.rate`),
- the analytic entropy rate of a synthetic source when it is known.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from toolkit.entropy.estimators import (
    RELIABLE_SAMPLES_PER_OUTCOME,
    compression_bits_per_symbol,
    conditional_entropies,
    miller_madow_bits,
    plugin_entropy_bits,
)
from toolkit.entropy.rate import entropy_rate

log = logging.getLogger("toolkit.entropy")

RATE_MAX_TOKENS = 2_000_000
PROFILE_FORMAT = 2
"""Bumped when a profile gains or changes keys: token stores with an older one are re-prepared."""


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


def _rate(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, spt: float, raw: bytes | None,
          raw_symbols: int | None, split_ids: np.ndarray | None, max_tokens: int,
          symbol_records: list[str] | None) -> dict[str, Any]:
    """The entropy-rate keys of a profile (None where nothing could be estimated)."""
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
        (:func:`toolkit.entropy.rate.rate_view`); None: no split, the measured mean.
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
        the entropy rate with its interval (:func:`toolkit.entropy.rate.entropy_rate`):
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
