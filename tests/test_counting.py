"""The counting baseline against a dictionary implementation, and against the optimal
predictor of a Markov source it should approach."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from toolkit.counting import baseline_cross_entropy


def _naive(train_rows: np.ndarray, eval_rows: np.ndarray, targets: np.ndarray, stop: np.ndarray,
           vocab: int, k: int) -> np.ndarray:
    """Interpolated Witten-Bell over the window ladder, written with dictionaries."""
    def window(row: np.ndarray, stop_row: np.ndarray, t: int) -> tuple[int, int]:
        a = 0
        while a < k and t - a - 1 >= 0 and not stop_row[t - a - 1]:
            a += 1
        b = 0
        while b < k and t + b + 1 < len(row) and not stop_row[t + b + 1]:
            b += 1
        return a, b

    counts: dict[tuple, Counter] = {}
    unigram = Counter()
    for row in train_rows:
        srow = row < 0
        for t in range(len(row)):
            if srow[t]:
                continue
            unigram[int(row[t])] += 1
            a, b = window(row, srow, t)
            for sa in range(a + 1):
                for sb in range(b + 1):
                    ctx = (sa, sb, tuple(row[t - sa:t].tolist()), tuple(row[t + 1:t + 1 + sb].tolist()))
                    counts.setdefault(ctx, Counter())[int(row[t])] += 1
    n, types = sum(unigram.values()), len(unigram)
    out = []
    for row, trow, srow in zip(eval_rows, targets, stop, strict=True):
        for t in range(len(row)):
            if trow[t] < 0:
                continue
            x = int(trow[t])
            p = (unigram[x] + types / vocab) / (n + types)
            a, b = window(row, srow, t)
            ladder = [p]
            prev_shape = (0, 0)
            for j in range(1, k + 1):
                shape = (min(j, a), min(j, b))
                if shape != prev_shape:
                    ctx = (*shape, tuple(row[t - shape[0]:t].tolist()), tuple(row[t + 1:t + 1 + shape[1]].tolist()))
                    c = counts.get(ctx)
                    if c:
                        total, kinds = sum(c.values()), len(c)
                        p = (c[x] + kinds * p) / (total + kinds)
                prev_shape = shape
                ladder.append(p)
            out.append([-math.log2(q) for q in ladder])
    return np.array(out).T


def test_matches_a_dictionary_implementation() -> None:
    rng = np.random.default_rng(1)
    vocab = 7
    train = rng.integers(0, vocab, size=(40, 30))
    train[rng.random(train.shape) < 0.05] = -1  # gaps end windows
    # a sticky chain so that contexts matter
    for r in train:
        for t in range(1, len(r)):
            if r[t] >= 0 and r[t - 1] >= 0 and rng.random() < 0.5:
                r[t] = r[t - 1]
    ev = rng.integers(0, vocab, size=(12, 30))
    masked = rng.random(ev.shape) < 0.2
    stop = masked | (rng.random(ev.shape) < 0.03)
    targets = np.where(masked, ev, -1)
    got = baseline_cross_entropy(train, ev, targets, stop, vocab, 3)
    want = _naive(train, ev, targets, stop, vocab, 3)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_approaches_the_optimal_predictor_of_a_markov_chain() -> None:
    """Order-1 chain over 4 symbols, both neighbours visible: the k >= 1 baseline's
    cross-entropy comes within 0.02 bits of the optimal P(x | l, r) ∝ P(x | l) P(r | x)."""
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.full(4, 0.3), size=4)  # (4, 4) transition matrix
    n = 400_000
    x = np.empty(n, dtype=np.int64)
    x[0] = 0
    u = rng.random(n)
    cum = P.cumsum(1)
    for t in range(1, n):
        x[t] = int(np.searchsorted(cum[x[t - 1]], u[t]))
    train = x[:300_000].reshape(-1, 100)
    ev = x[300_000:].reshape(-1, 100)
    masked = np.zeros(ev.shape, dtype=bool)
    masked[:, 1:-1:7] = True  # isolated masks, both neighbours visible
    targets = np.where(masked, ev, -1)
    got = baseline_cross_entropy(train, ev, targets, masked, 4, 2)
    rows, cols = np.nonzero(masked)
    left, right, true = ev[rows, cols - 1], ev[rows, cols + 1], ev[rows, cols]
    joint = P[left] * P[:, right].T  # (N, 4): P(x | l) P(r | x)
    optimal = -np.log2(joint[np.arange(len(true)), true] / joint.sum(1))
    assert got[1].mean() == pytest.approx(optimal.mean(), abs=0.02)
    assert got[0].mean() > got[1].mean() + 0.05  # context helps


@pytest.mark.slow
def test_summary_carries_the_baseline_beside_the_members(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A real tiny study: the summary's model cross-entropy is the members' mean -log2 p of the
    true token over the stored predictions, and learned-beyond-counting is the baseline minus it."""
    import toolkit
    from tests.conftest import TINY_STUDY
    from toolkit.config import load_study
    from toolkit.dispatch import run_study

    path = tmp_path / "s.toml"
    path.write_text(TINY_STUDY.format(name="s", out=tmp_path / "s"))
    study = load_study(path)
    run_study(study, executor="debug")
    tree = toolkit.open_results(tmp_path / "s")
    ds = tree["summary"].to_dataset().sel(run="r")
    pred = tree["predictions"].to_dataset().sel(run="r")
    lp = pred.log_probs.values.astype(np.float64)  # (member, position, vocab) natural log
    target = pred.target.values
    per_member = [-lp[m, np.arange(len(target)), target].mean() / math.log(2) for m in range(lp.shape[0])]
    assert float(ds.model_cross_entropy_bits) == pytest.approx(np.mean(per_member), rel=1e-6)
    assert float(ds.learned_beyond_counting_bits) == pytest.approx(
        float(ds.counting_baseline_bits) - float(ds.model_cross_entropy_bits), rel=1e-9)
    assert 0 < float(ds.counting_baseline_bits) < math.log2(int(ds.vocab_size))
    assert int(ds.counting_baseline_k) in range(0, 4)
    # a synthetic Markov source read with k-mers: the source's own predictor is shown too,
    # and nothing predicts the source better than the source (up to sampling noise)
    optimal = float(ds.optimal_cross_entropy_bits)
    assert 0 < optimal <= float(ds.counting_baseline_bits) + 0.05, (optimal, float(ds.counting_baseline_bits))


def _brute_optimal(p: np.ndarray, pi: np.ndarray, order: int, alphabet: str, ids: np.ndarray,
                   labels: np.ndarray, texts: list[str]) -> list[float]:
    """Enumerate every filling of the masked tokens of one sequence (short sequences only)."""
    import itertools

    a = len(alphabet)
    pieces = []  # (known symbols or None, true symbols, position of mask)
    for i, y in zip(ids.tolist(), labels.tolist(), strict=True):
        if y >= 0:
            pieces.append((None, texts[y]))
        elif i >= 5:
            pieces.append((texts[i], None))

    def prob(sym: str) -> float:
        # order unseen symbols before, in the stationary distribution
        total = 0.0
        for ctx in range(a ** order):
            q, c = pi[ctx], ctx
            for ch in sym:
                y = alphabet.index(ch)
                q *= p[c, y]
                c = (c * a + y) % (a ** order)
            total += q
        return total

    masked = [j for j, (known, _) in enumerate(pieces) if known is None]
    out = []
    for m in masked:
        def fill(choice: dict[int, str]) -> str:
            return "".join(choice.get(j, known or "") for j, (known, _) in enumerate(pieces))
        others = [j for j in masked if j != m]
        lens = {j: len(pieces[j][1]) for j in masked}
        num = den = 0.0
        for combo in itertools.product(*[["".join(w) for w in itertools.product(alphabet, repeat=lens[j])]
                                         for j in masked]):
            choice = dict(zip(masked, combo, strict=True))
            pr = prob(fill(choice))
            den += pr
            if choice[m] == pieces[m][1]:
                num += pr
        out.append(-math.log2(num / den))
        del others
    return out


def test_markov_optimal_predictor_matches_enumeration() -> None:
    from toolkit.corpora.synthetic import stationary_contexts
    from toolkit.counting import markov_optimal_bits

    rng = np.random.default_rng(5)
    alphabet, order = "AC", 2
    p = rng.dirichlet(np.full(2, 0.7), size=4)
    pi = stationary_contexts(p)
    texts = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "A", "C", "AA", "AC", "CA", "CC"]
    ids = np.array([[2, 7, 4, 10, 4, 6, 3, 0],     # [CLS] AA [MASK] CC [MASK] C [SEP] pad
                    [2, 4, 9, 8, 4, 3, 0, 0]])     # [CLS] [MASK] CA AC [MASK] [SEP]
    labels = np.full(ids.shape, -100)
    labels[0, 2], labels[0, 4] = 9, 5   # CA, A
    labels[1, 1], labels[1, 4] = 8, 10  # AC, CC
    got = markov_optimal_bits(p, pi, alphabet, ids, labels, texts, np.arange(5))
    want = [*_brute_optimal(p, pi, order, alphabet, ids[0], labels[0], texts),
            *_brute_optimal(p, pi, order, alphabet, ids[1], labels[1], texts)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
