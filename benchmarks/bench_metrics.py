"""Benchmarks of toolkit.metrics (``python -m benchmarks metrics``).

1. Static-embedding stability of an ensemble of 5 members of 4096 x 768 (10 pairs, top-k overlap
   and symmetric local Spearman at k in {1, 3, 5, 10, 20, 50, 100, 1000, 4000}) against the
   straightforward reference: a per-token Python loop with a top-k per row (as in the authors'
   code) and scipy.stats.spearmanr. The reference runs on a sample of tokens of every pair,
   interleaved with the fast pairs, and is scaled to the whole vocabulary (its cost is linear in
   tokens); results are compared on the sample.
2. Top-p Jensen-Shannon distance over a predictions store larger than the memory allowed
   (2 members x 131072 positions x 4096 float16, 2.1 GB) with ``lazy_js_distance`` on the dask
   threaded scheduler (2 workers), in a subprocess whose peak RSS is sampled with psutil,
   against ``js_distance`` on NumPy arrays of a store that fits in memory (also subprocesses,
   interleaved: one before each eighth of the lazy run). The big store is deleted afterwards.

Prints ratios and peak memory; never asserts on time.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

V, D, MEMBERS = 4096, 768, 5
KS = (1, 3, 5, 10, 20, 50, 100, 1000, 4000)
SAMPLE_TOKENS = 24
TOP_P = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CHUNK = 2048  # positions per Zarr chunk (the predictions schema's default): 16 MB per member
BIG_POSITIONS = 64 * CHUNK  # 2 x 131072 x 4096 x 2 bytes = 2.1 GB
SMALL_POSITIONS = 2 * CHUNK  # the in-memory baseline: 2 x 32 MB
SEGMENTS = 8
MEMORY_LIMIT = 1 << 30
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- static embeddings


def _reference_pair(sim_a: np.ndarray, sim_b: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token loop as in the authors' code: top-k per row and k, sets, scipy Spearman."""
    from scipy import stats

    def top(sim: np.ndarray, i: int, k: int) -> np.ndarray:
        order = np.argsort(-sim[i], kind="stable")
        return order[order != i][:k]

    overlap = np.empty((len(KS), len(tokens)))
    spearman = np.full((len(KS), len(tokens)), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j, k in enumerate(KS):
            for t, i in enumerate(tokens):
                na, nb = top(sim_a, i, k), top(sim_b, i, k)
                sa, sb = set(na.tolist()), set(nb.tolist())
                overlap[j, t] = len(sa & sb) / len(sa | sb)
                if k > 1:
                    rho_a = stats.spearmanr(sim_a[i, na], sim_b[i, na]).statistic
                    rho_b = stats.spearmanr(sim_a[i, nb], sim_b[i, nb]).statistic
                    spearman[j, t] = 0.5 * (rho_a + rho_b)
    return overlap, spearman


def bench_static() -> None:
    from toolkit import metrics

    rng = np.random.default_rng(0)
    base = rng.standard_normal((V, D)).astype(np.float32)
    embs = [base + rng.standard_normal((V, D)).astype(np.float32) for _ in range(MEMBERS)]
    for e in embs:
        e[0] = 0.0  # the padding embedding never trains: constant similarities, exercised too
    tokens = np.linspace(0, V - 1, SAMPLE_TOKENS).astype(int)
    pairs = list(itertools.combinations(range(MEMBERS), 2))
    print(f"static embeddings: {MEMBERS} members of {V} x {D}, {len(pairs)} pairs, ks {KS}; "
          f"reference on {SAMPLE_TOKENS} tokens per pair, scaled x{V / SAMPLE_TOKENS:.0f}", flush=True)

    metrics.clear_neighbour_cache()
    t0 = time.perf_counter()
    nbs = [metrics.neighbours(e) for e in embs]  # similarity + neighbour order, once per member
    fast = time.perf_counter() - t0
    sims = [nb.sim for nb in nbs]  # the reference computes the same matrices once per member too
    t0 = time.perf_counter()
    for e in embs:
        metrics.cosine_similarity(e)
    reference = time.perf_counter() - t0
    worst, overlap_equal = 0.0, True
    for a, b in pairs:  # interleaved: the machine's speed swings
        t0 = time.perf_counter()
        ref_overlap, ref_spearman = _reference_pair(sims[a], sims[b], tokens)
        reference += (time.perf_counter() - t0) * V / SAMPLE_TOKENS
        t0 = time.perf_counter()
        overlap = metrics.topk_overlap(nbs[a], nbs[b], KS)
        spearman = metrics.local_spearman(nbs[a], nbs[b], KS)
        fast += time.perf_counter() - t0
        overlap_equal &= bool(np.array_equal(overlap[:, tokens], ref_overlap))
        got = spearman[:, tokens]
        if not np.array_equal(np.isnan(got), np.isnan(ref_spearman)):
            worst = float("inf")
        worst = max(worst, float(np.nanmax(np.abs(got - ref_spearman))))
        print(f"  pair {a}-{b}: mean top-10 overlap {overlap[3].mean():.4f}, local Spearman k=10 "
              f"{np.nanmean(spearman[3]):.4f}", flush=True)
    print(f"  fast {fast:.1f} s, reference (extrapolated) {reference:.0f} s: {reference / fast:.1f}x faster "
          f"(target >= 20x); top-k overlap identical: {overlap_equal}; local Spearman max |diff| {worst:.1e}")
    t0 = time.perf_counter()
    metrics.procrustes(embs[0], embs[1])
    t1 = time.perf_counter()
    metrics.linear_cka(embs[0], embs[1])
    t2 = time.perf_counter()
    print(f"  per pair, for scale: procrustes {t1 - t0:.2f} s, linear CKA {t2 - t1:.2f} s", flush=True)
    metrics.clear_neighbour_cache()


# --------------------------------------------------------------------------- Jensen-Shannon over a store


def _write_store(path: Path, seed: int, positions: int, pool: np.ndarray) -> None:
    """A predictions store of ``positions`` rows drawn from a pool of log-prob rows, vocab rolled
    per chunk (content barely matters for speed; generating 2 GB of fresh softmaxes would)."""
    from toolkit import store

    rng = np.random.default_rng(seed)
    attrs = {"member": f"bench/seed{seed}", "run": "bench", "seed": seed, "checkpoint": "final",
             "tokenizer_hash": "0" * 64, "vocab_size": V}
    with store.writing(path, "predictions", attrs) as group:
        arr = store.create_array(group, "predictions", "log_probs", shape=(positions, V), dtype="float16",
                                 chunks=(CHUNK, V))
        for s in range(0, positions, CHUNK):
            rows = pool[rng.integers(0, len(pool), CHUNK)]
            arr[s:s + CHUNK] = np.roll(rows, int(rng.integers(V)), axis=1)
        store.create_array(group, "predictions", "target", data=rng.integers(0, V, positions).astype(np.int32))


def _child(mode: str, folder: str, segments: int) -> None:
    """Runs in a subprocess and prints JSON lines {"rows": ..., "seconds": ...}.

    ``numpy``: one eager run on the small store read into memory. ``lazy``: the big store in
    ``segments`` consecutive slices of one lazy computation, each started by a line on stdin so the
    parent can run a baseline between them (the machine's speed swings over minutes).
    """
    from toolkit import metrics, store

    folder_path = Path(folder)
    if mode == "numpy":
        sys.stdin.readline()
        a, b = (store.open_store(folder_path / f"small{s}.zarr", "predictions")["log_probs"][...] for s in (1, 2))
        t0 = time.perf_counter()
        out = metrics.js_distance(a, b, TOP_P)
        print(json.dumps({"rows": int(out.shape[0]), "seconds": time.perf_counter() - t0}), flush=True)
        return
    a, b = (store.open_dataset(folder_path / f"big{s}.zarr", "predictions", chunks={})["log_probs"].data
            for s in (1, 2))
    js = metrics.lazy_js_distance(a, b, TOP_P)  # one graph over the whole store
    step = -(-js.shape[0] // segments)
    for s in range(0, js.shape[0], step):
        sys.stdin.readline()
        t0 = time.perf_counter()
        out = js[s:s + step].compute(scheduler="threads", num_workers=2)
        print(json.dumps({"rows": int(out.shape[0]), "seconds": time.perf_counter() - t0}), flush=True)


class _Child:
    """A benchmark child process whose peak RSS a thread samples every 20 ms with psutil."""

    def __init__(self, mode: str, folder: Path) -> None:
        import threading

        import psutil

        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_metrics", "--child", mode,
                                      str(folder), str(SEGMENTS)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.peak = 0
        self._ps = psutil.Process(self.proc.pid)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        import psutil

        while self.proc.poll() is None:
            try:
                self.peak = max(self.peak, self._ps.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    def step(self) -> dict:
        """Let the child run one step; the JSON line it prints."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark child failed with exit code {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        code = self.proc.wait()
        self._sampler.join()
        if code:
            raise RuntimeError(f"benchmark child failed with exit code {code}")


def bench_js() -> None:
    from scipy.special import log_softmax

    rng = np.random.default_rng(1)
    # A mix of peaky (text-like) and flat (DNA-like) distributions.
    temperature = rng.uniform(0.3, 4.0, (2048, 1))
    pool = log_softmax(rng.standard_normal((2048, V)) * temperature, axis=1).astype(np.float16)
    folder = Path(tempfile.mkdtemp(prefix="bench_metrics_"))
    try:
        t0 = time.perf_counter()
        for seed in (1, 2):
            _write_store(folder / f"small{seed}.zarr", seed, SMALL_POSITIONS, pool)
            _write_store(folder / f"big{seed}.zarr", seed + 10, BIG_POSITIONS, pool)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"jensen-shannon: stores written in {time.perf_counter() - t0:.0f} s (big: 2 x {BIG_POSITIONS} x {V} "
              f"float16 = {2 * BIG_POSITIONS * V * 2 / 1e9:.2f} GB, {size / 1e9:.2f} GB on disk compressed), "
              f"{len(TOP_P)} top-p levels; the lazy run in {SEGMENTS} segments, each after an in-memory run",
              flush=True)
        lazy = _Child("lazy", folder)
        base_rows = base_s = lazy_rows = lazy_s = 0.0
        base_peak, ratios = 0, []
        try:
            for _ in range(SEGMENTS):
                child = _Child("numpy", folder)
                base = child.step()
                child.close()
                base_peak = max(base_peak, child.peak)
                seg = lazy.step()
                base_rows, base_s = base_rows + base["rows"], base_s + base["seconds"]
                lazy_rows, lazy_s = lazy_rows + seg["rows"], lazy_s + seg["seconds"]
                ratios.append((seg["rows"] / seg["seconds"]) / (base["rows"] / base["seconds"]))
        finally:
            lazy.close()
        rate_base, rate_lazy = base_rows / base_s, lazy_rows / lazy_s
        print(f"  in-memory NumPy ({SMALL_POSITIONS} rows, {SEGMENTS} runs): {rate_base:.0f} rows/s, peak RSS "
              f"{base_peak / 2**20:.0f} MiB")
        print(f"  lazy dask over the whole store ({BIG_POSITIONS} rows, chunks of {CHUNK}, 2 threads): "
              f"{rate_lazy:.0f} rows/s in {lazy_s:.0f} s, peak RSS {lazy.peak / 2**20:.0f} MiB "
              f"({'under' if lazy.peak < MEMORY_LIMIT else 'OVER'} the 1 GiB limit)")
        print(f"  throughput ratio lazy / in-memory: {rate_lazy / rate_base:.2f} (target >= 0.5; per segment "
              f"{min(ratios):.2f}..{max(ratios):.2f})", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    bench_static()
    bench_js()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
