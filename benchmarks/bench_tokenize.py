"""k-mer tokenization of A. thaliana chr1 (about 30 Mb) on one core, and the memory of preparing it.

``python -m benchmarks tokenize`` (or ``make bench BENCH=tokenize``) prints

- Mbases/s of the vectorised ``kmer6`` encoder (``encode_flat``, the row-hash fast path)
  over the whole chromosome (target >= 50),
- the speed-up over pure-Python per-k-mer loops measured in the same run on a slice
  (target >= 20x over the dict loop): a strong one (one dict lookup per k-mer) and a
  literal one (checks each base, computes the id), and over the HuggingFace tokenizer
  file on one thread; the process is pinned to one core, every implementation runs once
  untimed, then the rounds interleave them; ratios are per-round medians, with rates per
  CPU second (the machine is shared, so wall time mostly measures the neighbours) as
  well as per wall second,
- the peak memory of ``prepare`` for that chromosome (tracemalloc peak and RSS growth),
  measured in a fresh process, as MB and as a fraction of the chromosome's size.

Ratios only; nothing here asserts on wall time.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = "builtin:arabidopsis-thaliana-chr1"
K = 6
ROUNDS = 7
SLICE_BASES = 400_000  # the pure-Python loops run at about 2-40 Mbases/s
REPO = Path(__file__).resolve().parents[1]


def _one_thread() -> None:
    # One core: pin the process (so no thread of any library can use a second one) ...
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    # ... and set these before numpy / tokenizers start their pools (they read them once).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def python_kmer_loop(seq: str, kmer_ids: dict[str, int], single_ids: dict[str, int]) -> list[int]:
    """Baseline 1 (strong): one dictionary lookup per k-mer; a window with an N is not a key."""
    out = []
    i, n = 0, len(seq)
    while i < n:
        tid = kmer_ids.get(seq[i:i + K])
        if tid is not None:
            out.append(tid)
            i += K
        else:
            out.append(single_ids.get(seq[i], 1))
            i += 1
    return out


def python_literal_loop(seq: str) -> list[int]:
    """Baseline 2 (literal): the rule as written, checking each base and computing the id."""
    code = {"A": 0, "C": 1, "G": 2, "T": 3}
    out = []
    i, n = 0, len(seq)
    while i < n:
        window = seq[i:i + K]
        if len(window) == K and all(b in code for b in window):
            value = 0
            for b in window:
                value = value * 4 + code[b]
            out.append(10 + value)
            i += K
        else:
            out.append(5 + "ACGTN".index(seq[i]) if seq[i] in "ACGTN" else 1)
            i += 1
    return out


def _slice(seqs: list[str], bases: int) -> list[str]:
    out, size = [], 0
    for s in seqs[len(seqs) // 3:]:  # from the chromosome's middle, away from telomeric repeats
        out.append(s)
        size += len(s)
        if size >= bases:
            break
    return out


def measure_prepare_memory(out_dir: str) -> None:
    """Run in a fresh process: prepare the whole chromosome with kmer6, print peak memory as JSON."""
    import resource
    import tracemalloc

    import psutil

    from toolkit.config import study_from_dict
    from toolkit.prepare import prepare_unit
    from toolkit.study import Layout

    study = study_from_dict({
        "study": {"name": "bench", "output_dir": out_dir},
        "corpora": {"chr1": {"source": SOURCE, "train_records": 1_000_000, "eval_records": 200}},
        "runs": {"k6": {"corpus": "chr1", "tokenizer": f"kmer{K}"}},
    }, where="bench")
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    folder = prepare_unit(study, "chr1", f"kmer{K}")
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import zarr

    attrs = dict(zarr.open_group(str(Layout.tokens_store_in(folder)), mode="r").attrs)
    print(json.dumps({"tracemalloc_peak": peak, "rss_before": rss0,
                      "rss_peak_growth": max(maxrss1 - max(maxrss0, rss0), 0),
                      "seconds": seconds, "symbols": attrs["n_symbols"], "tokens": attrs["n_tokens"]}))


def main() -> None:
    _one_thread()
    import numpy as np

    from toolkit.corpora import open_source
    from toolkit.tokenizers import build_tokenizer

    t0 = time.perf_counter()
    seqs = [r.seq for r in open_source(SOURCE).records()]
    bases = sum(len(s) for s in seqs)
    print(f"read {SOURCE}: {len(seqs)} records, {bases / 1e6:.1f} Mbases in "
          f"{time.perf_counter() - t0:.1f} s (not counted below)")
    tok = build_tokenizer(f"kmer{K}", "dna")
    names = tok.id_to_token()
    kmer_ids = {t: i for i, t in enumerate(names) if len(t) == K}
    single_ids = {b: 5 + i for i, b in enumerate("ACGTN")}
    piece = _slice(seqs, SLICE_BASES)
    piece_bases = sum(len(s) for s in piece)
    # Same ids from all three implementations before anything is timed.
    ours = tok.encode_batch(piece)
    hf = tok.hf
    for s, ids in zip(piece[:50], ours[:50], strict=False):
        assert ids.tolist() == python_kmer_loop(s, kmer_ids, single_ids) == python_literal_loop(s)
        assert ids.tolist() == hf.encode(s, add_special_tokens=False).ids
    # The fast path against the run-based encoder (encode_spans) on every N-holding record
    # and a slice, and against the HF file on the whole chromosome.
    flat, counts = tok.encode_flat(seqs)
    starts = np.concatenate([[0], np.cumsum(counts)])
    check = [i for i, s in enumerate(seqs) if "N" in s] + list(range(len(seqs) // 2, len(seqs) // 2 + 300))
    for i in check:
        assert flat[starts[i]:starts[i + 1]].tolist() == tok.encode_spans(seqs[i])[0].tolist()
    hf_all = hf.encode_batch(seqs, add_special_tokens=False)
    assert counts.tolist() == [len(e.ids) for e in hf_all]
    assert np.array_equal(flat, np.fromiter(itertools.chain.from_iterable(e.ids for e in hf_all),
                                            dtype=np.int32, count=len(flat)))
    del hf_all

    # This machine is shared: report CPU time (the work done, one thread) and wall time.
    names_ = ("numpy", "python-dict", "python-literal", "hf-tokenizers")
    cpu: dict[str, list[float]] = {n: [] for n in names_}
    wall: dict[str, list[float]] = {n: [] for n in names_}
    runs = {
        "numpy": (lambda: tok.encode_flat(seqs), bases),
        "python-dict": (lambda: [python_kmer_loop(s, kmer_ids, single_ids) for s in piece], piece_bases),
        "python-literal": (lambda: [python_literal_loop(s) for s in piece], piece_bases),
        "hf-tokenizers": (lambda: hf.encode_batch(piece, add_special_tokens=False), piece_bases),
    }
    for fn, _ in runs.values():  # warm-up: first-call allocations and tables are not timed
        fn()
    for r in range(ROUNDS):  # interleaved: every round measures every implementation
        for name, (fn, size) in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(size / (time.process_time() - c0) / 1e6)
            wall[name].append(size / (time.perf_counter() - w0) / 1e6)
        print(f"round {r + 1} (Mbases/s, CPU time): "
              + ", ".join(f"{n} {cpu[n][-1]:.1f}" for n in names_), flush=True)
    ids, _ = tok.encode_flat(seqs)
    print(f"kmer{K} tokens: {len(ids)} ({bases / len(ids):.3f} bases/token)")
    med = {n: statistics.median(cpu[n]) for n in names_}
    print(f"numpy k-mer encoder: {med['numpy']:.1f} Mbases/s per CPU second, "
          f"{statistics.median(wall['numpy']):.1f} Mbases/s wall (target >= 50)")
    for base in names_[1:]:
        ratios = [f / s for f, s in zip(cpu["numpy"], cpu[base], strict=True)]
        wr = [f / s for f, s in zip(wall["numpy"], wall[base], strict=True)]
        print(f"speed-up over {base}: {statistics.median(ratios):.1f}x CPU time, "
              f"{statistics.median(wr):.1f}x wall (per round {', '.join(f'{x:.1f}' for x in ratios)})")

    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys; from benchmarks.bench_tokenize import measure_prepare_memory; "
                "measure_prepare_memory(sys.argv[1])")
        res = subprocess.run([sys.executable, "-c", code, tmp], cwd=REPO, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if res.returncode != 0:
            print(f"prepare memory measurement failed:\n{res.stderr[-2000:]}")
            return
        m = json.loads(res.stdout.strip().splitlines()[-1])
    mb = 1 << 20
    print(f"prepare {SOURCE} x kmer{K}: {m['symbols'] / 1e6:.1f} Mbases -> {m['tokens']} tokens "
          f"in {m['seconds']:.1f} s ({m['symbols'] / m['seconds'] / 1e6:.2f} Mbases/s end to end)")
    print(f"  tracemalloc peak {m['tracemalloc_peak'] / mb:.0f} MB "
          f"({m['tracemalloc_peak'] / m['symbols']:.2f} x the chromosome's bases); "
          f"RSS peak growth {m['rss_peak_growth'] / mb:.0f} MB "
          f"({m['rss_peak_growth'] / m['symbols']:.2f} x); process RSS before {m['rss_before'] / mb:.0f} MB")
    _ = np  # numpy imported under the one-thread settings above


if __name__ == "__main__":
    main()
