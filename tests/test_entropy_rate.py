"""The entropy-rate interval: its pieces against naive references, and coverage on sources
of known rate (a subset of the grid ``python -m benchmarks entropy_rate`` runs in full)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from benchmarks.bench_entropy_rate import DNA, PROTEIN, run_source
from toolkit.entropy import conditional_entropies
from toolkit.entropy.rate import rate_view, split_runs, witten_bell_cross_entropy


def _naive_witten_bell(tokens: list[int], lengths: list[int], vocab: int, order: int,
                       train_fraction: float = 0.8) -> tuple[float, float]:
    """Interpolated Witten-Bell written out with dictionaries: (select, score) bits/token."""
    n = len(tokens)
    cut = int(n * train_fraction)
    starts = set(np.cumsum([0, *lengths[:-1]]).tolist()) | {cut}
    record_start = [0] * n  # index where t's record (or the held-out part) begins
    s = 0
    for t in range(n):
        if t in starts:
            s = t
        record_start[t] = s
    counts: dict[tuple, Counter] = {}
    for t in range(cut):
        for j in range(order + 1):
            if t - j < record_start[t]:
                break
            ctx = tuple(tokens[t - j:t])
            counts.setdefault(ctx, Counter())[tokens[t]] += 1

    def prob(t: int) -> float:
        p = 1.0 / vocab
        for j in range(order + 1):
            if t - j < record_start[t]:
                break
            c = counts.get(tuple(tokens[t - j:t]))
            if not c:
                continue
            total, types = sum(c.values()), len(c)
            p = (c[tokens[t]] + types * p) / (total + types)
        return p

    half = cut + (n - cut) // 2
    sel = [-math.log2(prob(t)) for t in range(cut, half)]
    score = [-math.log2(prob(t)) for t in range(half, n)]
    return float(np.mean(sel)), float(np.mean(score))


def test_witten_bell_matches_a_dictionary_implementation() -> None:
    rng = np.random.default_rng(3)
    vocab = 6
    lengths = [int(x) for x in rng.integers(5, 80, size=60)]
    # a sticky chain, so longer contexts matter
    tokens = [int(rng.integers(vocab))]
    for _ in range(sum(lengths) - 1):
        tokens.append(tokens[-1] if rng.random() < 0.6 else int(rng.integers(vocab)))
    got = witten_bell_cross_entropy(np.array(tokens), np.array(lengths), vocab, max_order=3)
    for order in range(4):
        select, score = _naive_witten_bell(tokens, lengths, vocab, order)
        assert got["select"][order] == pytest.approx(select, abs=1e-9)
        assert got["score"][order] == pytest.approx(score, abs=1e-9)
    assert got["order"] == int(np.argmin(got["select"]))


def test_conditional_standard_error_against_per_position_losses() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4, size=5000)
    lengths = np.array([2500, 2500])
    got = conditional_entropies(tokens, lengths, 4, 2)
    for j, res in enumerate(got, start=1):
        pairs = Counter()
        ctxs = Counter()
        events = []
        for r0 in (0, 2500):
            rec = tokens[r0:r0 + 2500].tolist()
            for t in range(j, len(rec)):
                key = (tuple(rec[t - j:t]), rec[t])
                pairs[key] += 1
                ctxs[key[0]] += 1
                events.append(key)
        losses = np.array([-math.log2(pairs[e] / ctxs[e[0]]) for e in events])
        assert res["plugin"] == pytest.approx(losses.mean(), abs=1e-9)
        assert res["se"] == pytest.approx(losses.std() / math.sqrt(len(losses)), rel=1e-6)


def test_split_runs_removes_split_tokens_and_cuts_records_there() -> None:
    tokens = np.array([10, 11, 5, 12, 13, 14, 6, 7, 15])
    lengths = np.array([5, 4])  # records [10 11 5 12 13] [14 6 7 15]
    kept, new = split_runs(tokens, lengths, np.array([5, 6, 7]))
    assert kept.tolist() == [10, 11, 12, 13, 14, 15]
    assert new.tolist() == [2, 2, 1, 1]


def test_rate_view_per_tokenizer() -> None:
    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "A", "C", "N", "AAA", "AAC"]
    split, spt = rate_view("kmer3", names)
    assert split is not None and split.tolist() == [5, 6, 7] and spt == 3.0
    split, spt = rate_view("kmer3-overlap", names)
    assert split is not None and split.tolist() == [5, 6, 7] and spt == 1.0
    assert rate_view("char", names) == (None, None)
    assert rate_view("bpe4096", names) == (None, None)


CI_GRID = [
    (DNA, 1, 0.1, "char"), (DNA, 3, 1.0, "char"), (DNA, 5, 1.9, "char"),
    (DNA, 2, 0.5, "kmer3"), (DNA, 5, 1.5, "kmer3"),
    (DNA, 3, 0.1, "kmer6"), (DNA, 4, 1.0, "kmer6"),
    (DNA, 4, 1.5, "kmer3-overlap"),
    (PROTEIN, 1, 2.5, "char"), (PROTEIN, 2, 3.5, "char"),
]


@pytest.mark.slow
@pytest.mark.parametrize("alphabet, order, rate, spec", CI_GRID)
def test_interval_contains_the_analytic_rate(alphabet: str, order: int, rate: float, spec: str) -> None:
    """1 M symbols of a Markov source: the interval contains the rate; a narrow one
    (< 0.05 bits/symbol) has its point within 0.02."""
    out = run_source(alphabet, order, rate, spec)
    assert out.covered, out.line()
    assert out.accurate, out.line()


def test_undersampled_source_gets_a_wide_interval_that_says_so() -> None:
    """20 letters, order 2, 60 k symbols: 400 contexts x 20 outcomes cannot be resolved;
    the interval is wide and still contains the rate, and the method says why."""
    out = run_source(PROTEIN, 2, 3.5, "char", symbols=60_000, record_length=2_000)
    assert out.covered, out.line()
    assert out.width > 0.2
    assert "no plateau" in out.method
