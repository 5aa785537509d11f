"""The entropy profile against independent references: scipy, naive float64 loops, formulas."""

from __future__ import annotations

import json
import lzma
import math
from collections import Counter

import numpy as np
import pytest
import scipy.stats

from toolkit.entropy import (
    conditional_entropies,
    entropy_profile,
    miller_madow_bits,
    plugin_entropy_bits,
)


def _random_records(rng: np.random.Generator, vocab: int, n_records: int, max_len: int) -> list[np.ndarray]:
    # Skewed unigram distribution and a little order-1 structure, so every term matters.
    p = rng.dirichlet(np.full(vocab, 0.5))
    out = []
    for _ in range(n_records):
        n = int(rng.integers(0, max_len))
        x = rng.choice(vocab, size=n, p=p)
        flip = rng.random(n) < 0.3
        x[1:][flip[1:]] = (x[:-1][flip[1:]] + 1) % vocab
        out.append(x.astype(np.int32))
    return out


def _naive_conditional(records: list[np.ndarray], j: int) -> tuple[float, float, int, int]:
    """H(X_t | j previous tokens of the same record), float64 loops over Python tuples."""
    joint: Counter[tuple[int, ...]] = Counter()
    ctx: Counter[tuple[int, ...]] = Counter()
    for rec in records:
        r = [int(v) for v in rec]
        for t in range(j, len(r)):
            joint[tuple(r[t - j:t + 1])] += 1
            ctx[tuple(r[t - j:t])] += 1
    n = sum(joint.values())
    h = 0.0
    for gram, c in joint.items():
        h -= c / n * math.log2(c / ctx[gram[:-1]])
    mm = h + (len(joint) - len(ctx)) / (2 * n * math.log(2))
    return h, mm, len(ctx), n


@pytest.mark.parametrize("vocab,orders,seed", [(4, 4, 0), (13, 3, 1), (300, 2, 2)])
def test_conditional_matches_naive_loop(vocab: int, orders: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    records = _random_records(rng, vocab, 60, 120)
    prof = entropy_profile(records, n_symbols=1000, vocab_size=vocab, orders=orders, max_tokens=None)
    for j in range(1, orders + 1):
        h, mm, contexts, n = _naive_conditional(records, j)
        assert prof["conditional_bits_plugin"][j - 1] == pytest.approx(h, abs=1e-9)
        assert prof["conditional_bits"][j - 1] == pytest.approx(mm, abs=1e-9)
        assert prof["contexts_seen"][j - 1] == contexts
        assert prof["context_coverage"][j - 1] == pytest.approx(n / contexts)


def test_dense_reindexing_for_huge_vocabularies_matches_naive() -> None:
    # V = 2^20: V^3 overflows the int64 key space, forcing the dense re-indexing path.
    rng = np.random.default_rng(3)
    vocab = 1 << 20
    records = [rng.integers(vocab - 6, vocab, size=int(rng.integers(5, 80))) for _ in range(40)]
    got = conditional_entropies(np.concatenate(records), np.array([len(r) for r in records]), vocab, 4)
    for j in range(1, 5):
        h, mm, contexts, _ = _naive_conditional(records, j)
        assert got[j - 1]["plugin"] == pytest.approx(h, abs=1e-9)
        assert got[j - 1]["miller_madow"] == pytest.approx(mm, abs=1e-9)
        assert got[j - 1]["contexts"] == contexts


def test_contexts_do_not_cross_records() -> None:
    # Each record alone is deterministic (0 1 0 1 ...), the boundary pair (1 -> 1) would not be.
    records = [np.array([0, 1, 0, 1, 0, 1]), np.array([1, 0, 1, 0])]
    prof = entropy_profile(records, n_symbols=10, vocab_size=2, orders=2)
    assert prof["conditional_bits_plugin"] == [0.0, 0.0]
    assert prof["context_positions"] == [8, 6]


def test_unigram_against_scipy_and_miller_madow_formula() -> None:
    rng = np.random.default_rng(4)
    records = _random_records(rng, 50, 30, 200)
    flat = np.concatenate(records)
    counts = np.bincount(flat, minlength=50)
    prof = entropy_profile(records, n_symbols=3 * len(flat), vocab_size=50, orders=1)
    assert prof["unigram_bits"] == pytest.approx(scipy.stats.entropy(counts, base=2), abs=1e-12)
    m, n = np.count_nonzero(counts), counts.sum()
    assert prof["unigram_bits_mm"] == pytest.approx(
        scipy.stats.entropy(counts, base=2) + (m - 1) / (2 * n * math.log(2)), abs=1e-12)
    assert miller_madow_bits(counts) == pytest.approx(prof["unigram_bits_mm"])
    assert plugin_entropy_bits(counts) == pytest.approx(prof["unigram_bits"])
    assert prof["symbols_per_token"] == pytest.approx(3.0)
    assert prof["unigram_bits_per_symbol"] == pytest.approx(prof["unigram_bits"] / 3)
    assert prof["tokens"] == len(flat) and prof["vocab_used"] == m


def test_max_tokens_caps_estimation_but_counts_every_token() -> None:
    rng = np.random.default_rng(5)
    records = _random_records(rng, 7, 40, 100)
    total = sum(len(r) for r in records)
    prof = entropy_profile(iter(records), n_symbols=total, vocab_size=7, orders=1, max_tokens=500)
    assert prof["tokens"] == 500 and prof["tokens_total"] == total
    assert prof["symbols_per_token"] == pytest.approx(1.0)
    flat = np.concatenate(records)[:500]
    assert prof["unigram_bits"] == pytest.approx(scipy.stats.entropy(np.bincount(flat), base=2))


def test_compression_and_analytic_rate_and_json() -> None:
    rng = np.random.default_rng(6)
    raw = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, size=200_000)].tobytes()
    prof = entropy_profile([np.array([1, 2, 3])], n_symbols=3, vocab_size=5, orders=2,
                           raw_sample=raw, analytic_entropy_rate=1.25)
    expected = 8 * len(lzma.compress(raw, format=lzma.FORMAT_RAW,
                                     filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}])) / len(raw)
    assert prof["compression_bits_per_symbol"] == pytest.approx(expected)
    # uniform random bases: lzma cannot beat 2 bits and should not be far above
    assert 1.95 < prof["compression_bits_per_symbol"] < 2.5
    assert prof["analytic_entropy_rate_bits_per_symbol"] == 1.25
    assert json.loads(json.dumps(prof, allow_nan=False)) == prof
    empty = entropy_profile([], n_symbols=0, vocab_size=5, orders=2)
    assert empty["unigram_bits"] is None and empty["compression_bits_per_symbol"] is None
    json.dumps(empty, allow_nan=False)


def test_out_of_range_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="token ids"):
        entropy_profile([np.array([0, 9])], n_symbols=2, vocab_size=5)


def test_reliability_flag_follows_samples_per_context_and_outcome() -> None:
    rng = np.random.default_rng(7)
    small = [rng.integers(0, 4, 1000) for _ in range(20)]  # 4 outcomes, ~5000 tokens per context
    prof = entropy_profile(small, n_symbols=20_000, vocab_size=4, orders=3)
    assert prof["conditional_reliable"] == [True, True, True]
    # i.i.d. over 300 tokens: one token of context gives ~65 samples per context < 10 * 300
    wide = [rng.integers(0, 300, 1000) for _ in range(20)]
    prof = entropy_profile(wide, n_symbols=20_000, vocab_size=300, orders=1)
    assert prof["conditional_reliable"] == [False]
    # ...and the flagged estimate is indeed far below the true 8.23 bits
    assert prof["conditional_bits"][0] < prof["unigram_bits"] - 0.5
