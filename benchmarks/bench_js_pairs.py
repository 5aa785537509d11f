"""Benchmark of the pairwise Jensen-Shannon distance (``python -m benchmarks js_pairs``).

An ensemble of M members in {3, 5, 10} at P = 4096 positions over V = 4096 tokens, float16
log-probs resembling model outputs (log-softmax of a shared logit field plus per-member noise,
with a per-row temperature: peaked and flat rows), the paper's 11 top-p levels, rule ``reach``.
Old: one eager :func:`toolkit.metrics.js_distance` per pair (each member's rows sorted and
prepared M - 1 times). New: :func:`toolkit.metrics.pairwise_js_distance` (each member prepared
once per slab, then every pair). The two alternate ``REPEATS`` times per M (old first, then new
first, ...) since this machine's speed swings; results are checked equal bit for bit, and the
median ratio new/old per M is printed, of wall time and of CPU time (``time.process_time``,
the reproducible figure on a shared machine). Never asserts on time.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence

import numpy as np

MEMBERS = (3, 5, 10)
POSITIONS = 4096
VOCAB = 4096
REPEATS = 3
TOP_P = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the paper's levels


def ensemble(m: int, positions: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """M members' (positions, vocab) float16 log-probs: members share most of their logits."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((positions, vocab)).astype(np.float32)
    temperature = rng.uniform(0.5, 4.0, (positions, 1)).astype(np.float32)  # flat to peaked rows
    out = []
    for _ in range(m):
        logits = (base + 0.5 * rng.standard_normal((positions, vocab)).astype(np.float32)) * temperature
        logits -= logits.max(axis=1, keepdims=True)
        lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        out.append(lp.astype(np.float16))
    return out


def old(lps: Sequence[np.ndarray], top_p: Sequence[float]) -> np.ndarray:
    """One eager js_distance per pair, as the analysis did: (pairs, P, n_p)."""
    from toolkit import metrics

    return np.stack([metrics.js_distance(lps[i], lps[j], top_p)
                     for i, j in itertools.combinations(range(len(lps)), 2)])


def new(lps: Sequence[np.ndarray], top_p: Sequence[float]) -> np.ndarray:
    from toolkit import metrics

    return metrics.pairwise_js_distance(lps, top_p)


def run(members: Sequence[int] = MEMBERS, positions: int = POSITIONS, vocab: int = VOCAB,
        repeats: int = REPEATS, top_p: Sequence[float] = TOP_P) -> dict[int, dict[str, float]]:
    """Interleaved timings per M: median wall seconds of old and new, the median ratio new/old
    of wall times (``ratio``) and of CPU times (``cpu_ratio``)."""
    results: dict[int, dict[str, float]] = {}
    for m in members:
        lps = ensemble(m, positions, vocab, seed=m)
        t_old, t_new, ratios, cpu_ratios = [], [], [], []
        for rep in range(repeats):
            times: dict[str, float] = {}
            cpu: dict[str, float] = {}
            outs: dict[str, np.ndarray] = {}
            for name in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                fn = old if name == "old" else new
                t0, c0 = time.perf_counter(), time.process_time()
                outs[name] = fn(lps, top_p)
                times[name] = time.perf_counter() - t0
                cpu[name] = time.process_time() - c0
            if not np.array_equal(outs["old"], outs["new"]):
                raise AssertionError(f"M = {m}: pairwise_js_distance differs from js_distance per pair")
            t_old.append(times["old"])
            t_new.append(times["new"])
            ratios.append(times["new"] / times["old"])
            cpu_ratios.append(cpu["new"] / cpu["old"])
            print(f"  M = {m:2d} rep {rep + 1}/{repeats}: old {times['old']:7.2f} s (CPU {cpu['old']:7.2f} s), "
                  f"new {times['new']:7.2f} s (CPU {cpu['new']:7.2f} s), new/old {ratios[-1]:.3f} "
                  f"(CPU {cpu_ratios[-1]:.3f})", flush=True)
        pairs = m * (m - 1) // 2
        results[m] = {"old_s": statistics.median(t_old), "new_s": statistics.median(t_new),
                      "ratio": statistics.median(ratios), "cpu_ratio": statistics.median(cpu_ratios),
                      "pairs": pairs}
    return results


def main() -> None:
    print(f"pairwise JS distance: P = {POSITIONS} positions x V = {VOCAB}, {len(TOP_P)} top-p levels, "
          f"rule reach, {REPEATS} interleaved repeats", flush=True)
    results = run()
    print(f"{'M':>3} {'pairs':>5} {'old s':>8} {'new s':>8} {'new/old':>8} {'CPU new/old':>12} "
          f"{'old ms/pos/pair':>16} {'new ms/pos/pair':>16}")
    for m, r in results.items():
        per = 1e3 / (POSITIONS * r["pairs"])
        print(f"{m:3d} {int(r['pairs']):5d} {r['old_s']:8.2f} {r['new_s']:8.2f} {r['ratio']:8.3f} {r['cpu_ratio']:12.3f} "
              f"{r['old_s'] * per:16.3f} {r['new_s'] * per:16.3f}")
