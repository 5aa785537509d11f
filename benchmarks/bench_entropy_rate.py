"""The entropy-rate interval on sources of known rate: coverage, accuracy, time.

``python -m benchmarks entropy_rate`` runs the full validation grid: order-1..5 Markov
sources over ACGT at rates 0.1, 0.5, 1.0, 1.5 and 2.0 bits/base (1 M bases each, in
10 kb records), tokenized with char, kmer3 and kmer6, plus a 20-letter alphabet at
orders 1 and 2 (char). For every source it prints the analytic rate, the point
estimate, the interval and its width, whether the interval contains the rate, and
whether a narrow interval (< 0.05 bits/symbol) has its point within 0.02; then the
coverage and accuracy over the grid and the time per source. ``tests/test_entropy_rate.py``
runs a subset of the same grid in CI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

DNA = "ACGT"
PROTEIN = "ACDEFGHIKLMNPQRSTVWY"
TIGHT = 0.05
ACCURATE = 0.02


@dataclass(frozen=True)
class Outcome:
    alphabet: str
    order: int
    rate: float
    spec: str
    point: float
    low: float
    high: float
    seconds: float
    method: str

    @property
    def covered(self) -> bool:
        return self.low - 1e-12 <= self.rate <= self.high + 1e-12

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def accurate(self) -> bool:
        """Within ACCURATE where the interval is narrower than TIGHT (vacuously true otherwise)."""
        return self.width >= TIGHT or abs(self.point - self.rate) <= ACCURATE

    def line(self) -> str:
        flags = ("ok" if self.covered else "MISSED") + ("" if self.accurate else " POINT-OFF")
        return (f"{len(self.alphabet):>2}-letter order {self.order} rate {self.rate:<4} {self.spec:<13} "
                f"point {self.point:.4f} [{self.low:.4f}, {self.high:.4f}] width {self.width:.4f} "
                f"{flags} ({self.seconds:.1f} s)")


def run_source(alphabet: str, order: int, rate: float, spec: str, symbols: int = 1_000_000,
               record_length: int = 10_000) -> Outcome:
    """Generate a Markov source of known rate, tokenize it, estimate its rate."""
    from toolkit.config import CorpusConfig, SyntheticConfig
    from toolkit.corpora.synthetic import MarkovCorpus
    from toolkit.entropy.rate import entropy_rate, rate_view
    from toolkit.tokenizers import build_tokenizer

    cfg = CorpusConfig(source="synthetic:markov", synthetic=SyntheticConfig(
        alphabet=alphabet, order=order, entropy_rate=rate, records=symbols // record_length,
        length=record_length))
    source = MarkovCorpus("grid", cfg)
    seqs = [r.seq for r in source.records()]
    kind = "dna" if set(alphabet) <= set(DNA) else "text"
    tok = build_tokenizer(spec, kind, seqs)  # type: ignore[arg-type]
    ids, lengths = tok.encode_flat(seqs)
    split, spt = rate_view(spec, tok.id_to_token())
    n_symbols = sum(len(s) for s in seqs)
    t0 = time.perf_counter()
    est = entropy_rate(ids, lengths, tok.vocab_size, spt or n_symbols / len(ids),
                       raw_sample="".join(seqs)[:1_000_000].encode(), split_ids=split,
                       symbol_records=seqs)
    assert source.analytic_entropy_rate is not None
    return Outcome(alphabet, order, float(source.analytic_entropy_rate), spec,
                   est["entropy_rate_bits_per_symbol"], est["entropy_rate_low"], est["entropy_rate_high"],
                   time.perf_counter() - t0, est["entropy_rate_method"])


def full_grid() -> list[tuple[str, int, float, str]]:
    grid = [(DNA, order, rate, spec) for order in (1, 2, 3, 4, 5) for rate in (0.1, 0.5, 1.0, 1.5, 2.0)
            for spec in ("char", "kmer3", "kmer6")]
    grid += [(PROTEIN, order, rate, "char") for order in (1, 2) for rate in (0.5, 1.5, 2.5, 3.5, 4.2)]
    return grid


def main() -> None:
    outcomes = []
    for alphabet, order, rate, spec in full_grid():
        out = run_source(alphabet, order, rate, spec)
        outcomes.append(out)
        print(out.line(), flush=True)
    n = len(outcomes)
    covered = sum(o.covered for o in outcomes)
    tight = [o for o in outcomes if o.width < TIGHT]
    accurate = sum(abs(o.point - o.rate) <= ACCURATE for o in tight)
    err = np.array([abs(o.point - o.rate) for o in tight]) if tight else np.zeros(1)
    print(f"coverage: {covered}/{n} intervals contain the analytic rate")
    print(f"narrow (< {TIGHT} bits/symbol): {len(tight)}/{n}; point within {ACCURATE}: {accurate}/{len(tight)}; "
          f"|point - rate| median {np.median(err):.4f}, max {err.max():.4f}")
    widths = np.array([o.width for o in outcomes])
    print(f"width: median {np.median(widths):.4f}, max {widths.max():.4f} bits/symbol; "
          f"time per 1 M-symbol source: median {np.median([o.seconds for o in outcomes]):.1f} s")
