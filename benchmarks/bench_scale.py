"""Rehearsal at scale: prepare, evaluate (store writes) and analyse, measured at growing sizes and
extrapolated to the paper's setting (issue 12).

``python -m benchmarks scale`` (or ``make bench BENCH=scale``) measures on this machine

1. **prepare**: ``kmer6`` and ``bpe4096`` token stores of a synthetic Markov DNA FASTA of
   30, 100 and 300 Mbases (``BENCH_SCALE_MAX=3000`` adds 3 Gbases), each size and tokenizer
   through the toolkit's real path (a study TOML with a FASTA corpus, ``toolkit.config.load_study``,
   ``toolkit.prepare.prepare_unit``) in its own process: wall time, peak RSS of that process
   (``os.wait4``), and the peak RSS per phase: BPE training (bounded by
   ``corpora.X.tokenizer_train_records``), encoding, the entropy profile (bounded by
   ``analysis.entropy_max_tokens``). A power law ``y = c * size**b`` is fitted to time and memory, and
   an affine law (fixed + per Mbase) to the CPU time of the two largest sizes; both are extrapolated
   to 3 Gbases (2,000,000 records of 1-2 kb).
2. **evaluate**: the predictions store writer (``store.writing`` + ``store.create_array`` +
   ``toolkit.evaluate._RowWriter``, as ``write_predictions`` uses them) on synthetic float16
   log-probabilities, vocab 4096: chunk lengths 512 / 2048 / 8192 positions with the schema's
   compressor and the schema's chunking with other compressors, interleaved rounds; write MB/s,
   open (the full SHA-256 verification the analysis does) and Dask read MB/s chunk by chunk, bytes
   on disk. Then one full member store: 10,000 records x 512 tokens x 15% = 768,000 positions.
3. **analyse**: ``distribution_run`` and ``embedding_run`` (``toolkit.analyse.distributions`` and
   ``.embeddings``: the work of the distributions and embeddings shards) over synthetic member stores of 131,072 positions x 4096 (1 GiB
   float16 per member: 25% of the paper's 512,000-position distribution set at 10% masking), with 2 and
   then 3 members (1 and 3 pairs: per-member and per-pair costs separate) and 3 members at 12,288
   positions (the fixed cost and the exponent), each in its own process with its peak RSS against a
   stated limit (8 GiB per worker); the costs are extrapolated to 15 members (105 pairs) x 3 runs at
   768,000 positions (and to jobs/paper.toml's 5 members).

``BENCH_SCALE_MAX`` (Mbases, default 300) caps the prepare sizes; ``BENCH_SCALE_QUICK=1`` runs
tiny sizes (the smoke test); ``BENCH_SCALE_PARTS=prepare,evaluate,analyse`` picks the parts;
``BENCH_SCALE_RESULTS=FILE`` keeps the prepare processes' raw results (JSON lines, every phase).
Work files go to ``/tmp/bench_scale`` (``BENCH_SCALE_DIR``) and are deleted at the end. The default
took 19.5 minutes at load average 2-3 on a 2-core machine. Never asserts on time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MB = 1e6
MIB = 1 << 20
GIB = 1 << 30

# The paper's setting (docs/methods.md, jobs/paper.toml).
PAPER_MBASES = 3000.0  # 2,000,000 records of 1-2 kb per corpus
PAPER_EVAL_RECORDS, PAPER_SEQ_LEN, PAPER_MASK_RATE = 10_000, 512, 0.15
PAPER_POSITIONS = int(PAPER_EVAL_RECORDS * PAPER_SEQ_LEN * PAPER_MASK_RATE)  # 768,000
PAPER_MEMBERS, PAPER_RUNS, VOCAB, PAPER_DIM = 15, 3, 4096, 768
WORKER_LIMIT = 8 * GIB  # the memory a worker (one analyse or prepare job) is stated to have

CHUNKS = (512, 2048, 8192)
COMPRESSORS = ("schema", "none", "zstd3", "blosc-lz4-shuffle", "blosc-zstd-bitshuffle")


def _quick() -> bool:
    return os.environ.get("BENCH_SCALE_QUICK", "") not in ("", "0")


def workdir() -> Path:
    return Path(os.environ.get("BENCH_SCALE_DIR", "/tmp/bench_scale"))


# --------------------------------------------------------------------------- fits


def fit_power_law(sizes: Any, values: Any) -> tuple[float, float]:
    """Least-squares fit of ``log y = log c + b log x``: returns ``(b, c)`` (``y = c * x**b``)."""
    x = np.log(np.asarray(sizes, dtype=np.float64))
    y = np.log(np.asarray(values, dtype=np.float64))
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("a power-law fit needs at least two distinct sizes")
    b, log_c = np.polyfit(x, y, 1)
    return float(b), float(math.exp(log_c))


def fit_affine(sizes: Any, values: Any) -> tuple[float, float]:
    """Least-squares ``y = a + b x``: returns ``(a, b)``. A fixed cost (BPE training on a bounded
    sample) makes a power law's exponent fall below 1 at small sizes; this extrapolates that case."""
    b, a = np.polyfit(np.asarray(sizes, dtype=np.float64), np.asarray(values, dtype=np.float64), 1)
    return float(a), float(b)


def extrapolate(sizes: Any, values: Any, at: float) -> tuple[float, float]:
    """The fitted exponent and the value the fit predicts at size ``at``."""
    b, c = fit_power_law(sizes, values)
    return b, c * at**b


def _fmt_s(s: float) -> str:
    if s >= 7200:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


# --------------------------------------------------------------------------- child processes


def run_child(code: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh Python process; return its last stdout line (JSON) plus ``wall_s``
    ``cpu_s`` (user + system) and ``max_rss`` (bytes) of that process alone (``os.wait4``)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"child failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res.update(wall_s=wall, max_rss=usage.ru_maxrss * 1024, cpu_s=usage.ru_utime + usage.ru_stime)
    return res


class RssSampler:
    """Peak RSS of this process per named phase, sampled every 50 ms in a thread."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.proc = psutil.Process()
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        rss = self.proc.memory_info().rss
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def enter(self, phase: str) -> None:
        self._sample()
        now = time.perf_counter()
        self.times[self.phase] = self.times.get(self.phase, 0.0) + now - self._t
        self._t, self.phase = now, phase
        self._sample()

    def stop(self) -> dict[str, Any]:
        self.enter("end")
        self._stop.set()
        self._thread.join()
        return {"phase_peak_rss": self.peaks, "phase_seconds": self.times}


# --------------------------------------------------------------------------- 1. prepare


def write_markov_fasta(path: Path, mbases: float, *, seed: int = 0, order: int = 5,
                       entropy_rate: float = 1.9, chrom_mbases: float = 25.0) -> int:
    """Stream a synthetic order-``order`` Markov DNA FASTA of about ``mbases`` Mbases to ``path``.

    The transition matrix is the toolkit's ``synthetic:markov`` one (``markov_transitions``,
    real DNA is about 1.9 bits/base); chromosomes of ``chrom_mbases`` are written in 80-column
    lines, 4,096 chains of 2,048 bases at a time (8 Mbases in memory, never the genome).
    Returns the number of bases written.
    """
    from toolkit.config import SyntheticConfig
    from toolkit.corpora.synthetic import markov_transitions

    p, pi, _ = markov_transitions(SyntheticConfig(alphabet="ACGT", order=order,
                                                  entropy_rate=entropy_rate, seed=seed))
    n_ctx = p.shape[0]
    cum = np.cumsum(p, axis=1)
    cum[:, -1] = 1.0
    pi_cum = np.cumsum(pi)
    pi_cum[-1] = 1.0
    lut = np.frombuffer(b"ACGT", dtype=np.uint8)
    total = int(mbases * MB)
    chrom = max(1, int(chrom_mbases * MB))
    rows, length = 4096, 2048
    rng = np.random.default_rng(seed)
    written = in_chrom = n_chrom = 0
    pending = b""
    with open(path, "wb", buffering=1 << 22) as f:
        while written < total:
            ctx = np.minimum(np.searchsorted(pi_cum, rng.random(rows), side="right"), n_ctx - 1)
            out = np.empty((rows, length), dtype=np.uint8)
            for t in range(length):
                y = (rng.random(rows)[:, None] >= cum[ctx]).sum(axis=1)
                out[:, t] = y
                ctx = (ctx * 4 + y) % n_ctx
            block = lut[out].tobytes()[: total - written]
            written += len(block)
            pending += block
            while pending:
                if in_chrom == 0:
                    f.write(f">chr{n_chrom} synthetic order-{order} Markov\n".encode())
                    n_chrom += 1
                take = min(len(pending), chrom - in_chrom)
                piece, pending = pending[:take], pending[take:]
                # 80-column lines (a piece continuing a chromosome starts a new line: FASTA allows it)
                lines = [piece[i:i + 80] for i in range(0, len(piece), 80)]
                f.write(b"\n".join(lines) + b"\n")
                in_chrom += take
                if in_chrom >= chrom:
                    in_chrom = 0
    return written


PREPARE_STUDY = """\
[study]
name = "scale"
output_dir = {out}

[corpora.dna]
source = {fasta}
train_records = {train}
eval_records = {eval}
tokenizer_train_records = {tok_records}
dna = {{ piece_min = 1000, piece_max = 2000 }}

[runs.r]
corpus = "dna"
tokenizer = "{tokenizer}"
"""


def _mark_phases(sampler: Any, module: Any, name: str, during: str, after: str) -> None:
    """Replace ``module.name`` by the same function that marks phase ``during`` while it runs
    and ``after`` once it returns (or raises)."""
    real = getattr(module, name)

    def marked(*args: Any, **kwargs: Any) -> Any:
        sampler.enter(during)
        try:
            return real(*args, **kwargs)
        finally:
            sampler.enter(after)

    setattr(module, name, marked)


def prepare_child(fasta: str, out: str, tokenizer: str, records: int, tok_records: int) -> None:
    """In a fresh process: one prepare unit of the FASTA; prints JSON (phases, tokens, records)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    sampler = RssSampler()
    sampler.enter("imports")
    import zarr

    import toolkit.entropy
    import toolkit.tokenizers
    from toolkit.config import load_study
    from toolkit.prepare import prepare_unit
    from toolkit.study import Layout

    eval_records = max(1, min(10_000, records // 20))
    path = Path(out) / "study.toml"
    path.write_text(PREPARE_STUDY.format(
        out=json.dumps(out), fasta=json.dumps(fasta), train=max(1, records - eval_records),
        eval=eval_records, tok_records=tok_records, tokenizer=tokenizer))
    study = load_study(path)
    # Phase marks around the real functions: tokenizer training, then encoding; the data-side
    # entropy profile after encoding.
    _mark_phases(sampler, toolkit.tokenizers, "build_tokenizer", "tokenizer", "encode")
    _mark_phases(sampler, toolkit.entropy, "entropy_profile", "profile", "finish")
    sampler.enter("count")  # BPE: the counting pass; kmer: goes straight to encode
    t0 = time.perf_counter()
    folder = prepare_unit(study, "dna", tokenizer)
    seconds = time.perf_counter() - t0
    phases = sampler.stop()
    attrs = dict(zarr.open_group(str(Layout.tokens_store_in(folder)), mode="r").attrs)
    line = json.dumps({"seconds": seconds, **phases, "symbols": attrs["n_symbols"], "tokenizer": tokenizer,
                       "tokens": attrs["n_tokens"], "records": attrs["n_records"]})
    with open(Path(out).parent / "results.jsonl", "a", encoding="utf-8") as f:  # every phase, raw
        f.write(line + "\n")
    print(line)


def measure_prepare(fasta: Path, mbases: float, tokenizer: str, out: Path,
                    tok_records: int) -> dict[str, Any]:
    """One prepare unit in its own process (expected records: 1.5 kb pieces)."""
    out.mkdir(parents=True, exist_ok=True)
    records = max(40, int(mbases * MB / 1500))
    code = ("import sys; from benchmarks.bench_scale import prepare_child; "
            "prepare_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))")
    env = {"TOKENIZERS_PARALLELISM": "true"}
    res = run_child(code, str(fasta), str(out), tokenizer, str(records), str(tok_records), env=env)
    shutil.rmtree(out, ignore_errors=True)
    res.update(mbases=mbases, tokenizer=tokenizer)
    return res


def bench_prepare(sizes: list[float], tokenizers: tuple[str, ...], tok_records: int,
                  root: Path) -> list[dict[str, Any]]:
    results = []
    for mbases in sizes:
        fasta = root / f"markov-{mbases:g}Mb.fa"
        t0 = time.perf_counter()
        n = write_markov_fasta(fasta, mbases, seed=int(mbases))
        print(f"  wrote {fasta.name}: {n / MB:.1f} Mbases, {fasta.stat().st_size / MB:.0f} MB "
              f"in {time.perf_counter() - t0:.1f} s (not counted)", flush=True)
        for tok in tokenizers:
            r = measure_prepare(fasta, mbases, tok, root / f"prep-{tok}-{mbases:g}", tok_records)
            peaks = r["phase_peak_rss"]
            tok_peak = peaks.get("tokenizer") if tok.startswith("bpe") else None
            print(f"  prepare {mbases:>6g} Mb {tok:>8}: {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s CPU "
                  f"({r['symbols'] / r['seconds'] / MB:5.2f} Mbases/s in prepare_unit), "
                  f"peak RSS {r['max_rss'] / MIB:6.0f} MiB"
                  + (f", BPE training peak {tok_peak / MIB:6.0f} MiB "
                     f"({r['phase_seconds'].get('tokenizer', 0):.1f} s)" if tok_peak else "")
                  + f"; peak RSS encoding {peaks.get('encode', 0) / MIB:.0f} MiB, entropy profile "
                  f"{peaks.get('profile', 0) / MIB:.0f} MiB"
                  + f"; {r['records']} records, {r['tokens']} tokens", flush=True)
            results.append(r)
        fasta.unlink()
    return results


def report_prepare(results: list[dict[str, Any]], target: float = PAPER_MBASES) -> list[str]:
    lines = []
    for tok in sorted({r["tokenizer"] for r in results}):
        rs = [r for r in results if r["tokenizer"] == tok]
        if len({r["mbases"] for r in rs}) < 2:
            continue
        size = [r["mbases"] for r in rs]
        bt, t_at = extrapolate(size, [r["wall_s"] for r in rs], target)
        bc, c_at = extrapolate(size, [r["cpu_s"] for r in rs], target)
        bm, m_at = extrapolate(size, [r["max_rss"] for r in rs], target)
        bt, bc, bm = (round(x, 2) + 0.0 for x in (bt, bc, bm))  # no "-0.00"
        line = (f"prepare {tok}: wall ~ size^{bt:.2f}, CPU ~ size^{bc:.2f}, peak RSS ~ size^{bm:.2f}; "
                f"at {target:g} Mbases: {_fmt_s(t_at)} wall, {_fmt_s(c_at)} CPU, peak RSS {m_at / GIB:.2f} GiB")
        a, slope = fit_affine(size[-2:], [r["cpu_s"] for r in rs][-2:])
        line += (f"; affine from the two largest sizes (fixed costs: BPE training, the capped entropy "
                 f"profile): {a:.0f} s + {slope:.3f} s/Mbase CPU -> {_fmt_s(a + slope * target)} CPU at {target:g}")
        tok_peaks = [r["phase_peak_rss"].get("tokenizer") for r in rs]
        if tok.startswith("bpe") and all(tok_peaks):
            bb, b_at = extrapolate(size, tok_peaks, target)
            line += f"; BPE-training peak ~ size^{bb:.2f} ({b_at / GIB:.2f} GiB at {target:g})"
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- 2. evaluate writes


def synthetic_log_probs(rows: int, vocab: int, seed: int = 0, scale: float = 0.5) -> np.ndarray:
    """``(rows, vocab)`` float16 log-softmax of ``scale`` x normal logits (near uniform, DNA-like)."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((rows, vocab))).astype(np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logits.astype(np.float16)


def _codecs(name: str) -> tuple[Any, ...]:
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    from toolkit import store

    if name == "schema":
        return store._compressors()
    # Every alternative keeps the CRC32C the toolkit relies on for integrity.
    return {
        "none": (Crc32cCodec(),),
        "zstd3": (ZstdCodec(level=3, checksum=False), Crc32cCodec()),
        "blosc-lz4-shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2),
                              Crc32cCodec()),
        "blosc-zstd-bitshuffle": (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=2),
                                  Crc32cCodec()),
    }[name]


def pool_windows(n_pos: int, pool_len: int, batch: int) -> list[tuple[int, int]]:
    """The (start, rows) windows of the pool written, batch by batch: a varying window each time."""
    out, done, k = [], 0, 0
    while done < n_pos:
        m = min(batch, n_pos - done, pool_len)
        out.append(((k * 7919) % (pool_len - m + 1), m))
        done += m
        k += 1
    return out


def write_predictions_store(path: Path, pool: np.ndarray, n_pos: int, *, chunk: int | None = None,
                            compressor: str = "schema", batch: int = 1536) -> dict[str, Any]:
    """Write a predictions store of ``n_pos`` positions as ``evaluate.write_predictions`` does
    (``store.writing``, ``store.create_array``, ``_RowWriter`` fed ``batch`` rows at a time),
    rows cycled from ``pool``. ``chunk=None`` keeps the schema's chunking. Returns seconds and bytes."""
    from toolkit import store
    from toolkit.evaluate import _RowWriter

    vocab = pool.shape[1]
    attrs = {"member": "r/seed1", "run": "r", "seed": 1, "checkpoint": "best",
             "tokenizer_hash": "bench", "vocab_size": vocab}
    targets = np.asarray(np.argmax(pool, axis=1), dtype=np.int32)
    t0, c0 = time.perf_counter(), time.process_time()
    with store.writing(path, "predictions", attrs, overwrite=True) as g:
        if compressor == "schema":
            arr = store.create_array(g, "predictions", "log_probs", shape=(n_pos, vocab),
                                     dtype="float16", chunks=None if chunk is None else (chunk, vocab))
        else:
            arr = g.create_array("log_probs", shape=(n_pos, vocab), chunks=(chunk or 2048, vocab),
                                 dtype="float16", dimension_names=["position", "vocab"],
                                 compressors=_codecs(compressor), fill_value=0, overwrite=True)
        writer = _RowWriter(arr)
        for lo, m in pool_windows(n_pos, len(pool), batch):
            writer.add(pool[lo:lo + m])
        writer.flush()
        t_data = time.perf_counter() - t0
        reps = -(-n_pos // len(targets))
        store.create_array(g, "predictions", "target", data=np.tile(targets, reps)[:n_pos])
    seconds = time.perf_counter() - t0  # including validation, consolidation and the inventory
    cpu = time.process_time() - c0
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"seconds": seconds, "cpu_seconds": cpu, "data_seconds": t_data, "bytes_on_disk": size,
            "raw_bytes": n_pos * vocab * 2}


def read_predictions_store(path: Path) -> dict[str, Any]:
    """Open as the analysis does (``store.open_dataset``: full SHA-256 verification), then reduce
    ``log_probs`` chunk by chunk with Dask (a row max, one pass). Returns seconds of each."""
    import dask

    from toolkit import store

    t0 = time.perf_counter()
    ds = store.open_dataset(path, "predictions", chunks={})
    t_open = time.perf_counter() - t0
    lp = ds["log_probs"].data
    t1, c1 = time.perf_counter(), time.process_time()
    with dask.config.set(scheduler="threads"):
        total = float(lp.max(axis=1).astype("f8").sum().compute())
    t_read = time.perf_counter() - t1
    return {"open_seconds": t_open, "read_seconds": t_read, "read_cpu_seconds": time.process_time() - c1,
            "checksum": total,
            "dask_chunks": int(lp.numblocks[0])}


def bench_evaluate(root: Path, n_pos: int, full_pos: int, rounds: int) -> dict[str, Any]:
    """Interleaved rounds over chunk lengths x compressors, then one full member store."""
    pool = synthetic_log_probs(16_384 if not _quick() else 2048, VOCAB)
    configs = [(c, "schema") for c in CHUNKS] + [(2048, c) for c in COMPRESSORS if c != "schema"]
    stats: dict[tuple[int, str], list[dict[str, Any]]] = {cfg: [] for cfg in configs}
    for r in range(rounds):
        for chunk, comp in configs:
            path = root / f"pred-{chunk}-{comp}.zarr"
            w = write_predictions_store(path, pool, n_pos, chunk=chunk, compressor=comp)
            w.update(read_predictions_store(path))
            stats[(chunk, comp)].append(w)
            shutil.rmtree(path)
        print(f"  round {r + 1}/{rounds} done", flush=True)
    print(f"  {n_pos} positions x {VOCAB} float16 ({n_pos * VOCAB * 2 / MIB:.0f} MiB raw) per store; "
          "medians over rounds (MB/s of raw float16 bytes):")
    print(f"  {'chunk':>6} {'compressor':>22} {'write MB/s':>10} {'(data)':>7} {'(CPU)':>6} {'open MB/s':>9} "
          f"{'dask read MB/s':>14} {'on disk':>8} {'ratio':>6}")
    table = []
    for (chunk, comp), rs in stats.items():
        raw = rs[0]["raw_bytes"]
        row = {"chunk": chunk, "compressor": comp,
               "write_mb_s": statistics.median(raw / x["seconds"] / MB for x in rs),
               "write_data_mb_s": statistics.median(raw / x["data_seconds"] / MB for x in rs),
               "write_cpu_mb_s": statistics.median(raw / x["cpu_seconds"] / MB for x in rs),
               "open_mb_s": statistics.median(raw / x["open_seconds"] / MB for x in rs),
               "read_mb_s": statistics.median(raw / x["read_seconds"] / MB for x in rs),
               "bytes_on_disk": rs[0]["bytes_on_disk"], "ratio": raw / rs[0]["bytes_on_disk"]}
        table.append(row)
        print(f"  {chunk:>6} {comp:>22} {row['write_mb_s']:>10.0f} {row['write_data_mb_s']:>7.0f} "
              f"{row['write_cpu_mb_s']:>6.0f} "
              f"{row['open_mb_s']:>9.0f} {row['read_mb_s']:>14.0f} {row['bytes_on_disk'] / MIB:>6.0f}Mi "
              f"{row['ratio']:>6.2f}")
    # One whole member store at the paper's size with the schema's settings.
    path = root / "pred-full.zarr"
    full = write_predictions_store(path, pool, full_pos)
    full.update(read_predictions_store(path))
    shutil.rmtree(path)
    raw = full["raw_bytes"]
    print(f"  full member store: {full_pos} positions ({raw / GIB:.2f} GiB raw): write {full['seconds']:.1f} s "
          f"({raw / full['seconds'] / MB:.0f} MB/s; array data alone {raw / full['data_seconds'] / MB:.0f} MB/s; "
          f"{full['cpu_seconds']:.1f} s CPU), "
          f"open+verify {full['open_seconds']:.1f} s, dask read {full['read_seconds']:.1f} s "
          f"({raw / full['read_seconds'] / MB:.0f} MB/s), {full['bytes_on_disk'] / GIB:.2f} GiB on disk",
          flush=True)
    return {"table": table, "full": full}


# --------------------------------------------------------------------------- 3. analyse


def build_analysis_study(root: Path, n_pos: int, members: int, vocab: int = VOCAB, dim: int = PAPER_DIM,
                         contextual: int = 256) -> Any:
    """A study with one run of ``members`` members whose predictions and embeddings stores are
    synthetic (as tests/test_analyse.py builds them) at the given size; returns the StudyConfig."""
    from toolkit import store
    from toolkit.config import study_from_dict
    from toolkit.evaluate import _RowWriter
    from toolkit.study import Layout, Member

    raw = {"study": {"name": "scale", "seeds": list(range(1, members + 1)), "output_dir": str(root)},
           "corpora": {"dna": {"source": "dna.fa", "kind": "dna"}},
           "runs": {"r": {"corpus": "dna", "tokenizer": "bpe4096"}}}
    study = study_from_dict(raw, where="bench_scale")
    layout = Layout(study)
    rng = np.random.default_rng(7)
    block = 2048
    shared_seed = 11
    target = rng.integers(5, vocab, n_pos).astype(np.int32)
    base_emb = rng.standard_normal((vocab, dim)).astype(np.float32)
    base_ctx = rng.standard_normal((contextual, dim)).astype(np.float32)
    for seed in study.seeds:
        m = Member("r", seed)
        common = {"member": m.id, "run": "r", "seed": seed, "tokenizer_hash": "bench"}
        mrng = np.random.default_rng(100 + seed)
        with store.writing(layout.member_store(m, "predictions"), "predictions",
                           {**common, "checkpoint": "best", "vocab_size": vocab}, overwrite=True) as g:
            arr = store.create_array(g, "predictions", "log_probs", shape=(n_pos, vocab), dtype="float16")
            writer = _RowWriter(arr)
            for lo in range(0, n_pos, block):
                m_rows = min(block, n_pos - lo)
                # shared "knowledge" (same for every member, per block) plus member noise
                shared = np.random.default_rng([shared_seed, lo]).standard_normal((m_rows, vocab),
                                                                                   dtype=np.float32)
                logits = 1.5 * shared + 0.7 * mrng.standard_normal((m_rows, vocab), dtype=np.float32)
                logits -= logits.max(axis=1, keepdims=True)
                logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
                writer.add(logits.astype(np.float16))
            writer.flush()
            store.create_array(g, "predictions", "target", data=target)
        with store.writing(layout.member_store(m, "embeddings"), "embeddings", {**common, "checkpoint": "best"},
                           overwrite=True) as g:
            store.create_array(g, "embeddings", "word_embeddings",
                               data=base_emb + mrng.standard_normal(base_emb.shape, dtype=np.float32))
            store.create_array(g, "embeddings", "contextual",
                               data=base_ctx + mrng.standard_normal(base_ctx.shape, dtype=np.float32))
    return study


def analysis_functions() -> tuple[Any, Any]:
    """``distribution_run`` and ``embedding_run``: the work of the distributions and embeddings shards."""
    from toolkit.analyse.distributions import distribution_run
    from toolkit.analyse.embeddings import embedding_run

    return distribution_run, embedding_run


def analyse_child(root: str, n_pos: int, members: int, which: str) -> None:
    """In a fresh process: distribution_run or embedding_run over the first ``members`` members."""
    import dask

    from toolkit.config import study_from_dict
    from toolkit.study import Member

    raw = {"study": {"name": "scale", "seeds": list(range(1, members + 1)), "output_dir": root},
           "corpora": {"dna": {"source": "dna.fa", "kind": "dna"}},
           "runs": {"r": {"corpus": "dna", "tokenizer": "bpe4096"}}}
    study = study_from_dict(raw, where="bench_scale")
    ms = [Member("r", s) for s in study.seeds]
    distribution_run, embedding_run = analysis_functions()
    fn = distribution_run if which == "distribution" else embedding_run
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        out = fn(study, "r", ms)
    seconds = time.perf_counter() - t0
    keys = ("js_distance", "argmax_agreement", "entropy_bits", "topk_overlap", "cka_linear")
    summary = {k: np.asarray(out[k]).round(4).tolist() for k in keys if k in out}
    print(json.dumps({"seconds": seconds, "summary": summary}))


def measure_analyse(root: Path, n_pos: int, members: int, which: str) -> dict[str, Any]:
    code = ("import sys; from benchmarks.bench_scale import analyse_child; "
            "analyse_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])")
    return run_child(code, str(root), str(n_pos), str(members), which)


def fit_costs(t_small3: float, t_big2: float, t_big3: float, small: int, big: int) -> dict[str, float]:
    """``t = fixed + positions * (member * n + pair * n(n-1)/2)`` from three runs: 3 members at
    ``small`` positions, 2 and 3 members at ``big``. Returns seconds per position per member and per
    pair, and the fixed seconds (clamped at 0: noise on a shared machine can make one negative)."""
    u = (t_big3 - t_small3) / (3 * (big - small))  # member + pair
    v = (t_big3 - t_big2) / big  # member + 2 pair
    pair, member = max(v - u, 0.0), max(2 * u - v, 0.0)
    fixed = max(t_small3 - small * 3 * u, 0.0)
    return {"member": member, "pair": pair, "fixed": fixed}


def predict_costs(c: dict[str, float], members: int, positions: int) -> float:
    return c["fixed"] + positions * (c["member"] * members + c["pair"] * members * (members - 1) / 2)


def _print_analyse(which: str, n: int, n_pos: int, r: dict[str, Any]) -> None:
    pairs = n * (n - 1) // 2
    raw = n * n_pos * VOCAB * 2
    extra = ""
    if which == "distribution":
        extra = (f", {n * n_pos / r['seconds']:.0f} member-positions/s, "
                 f"{raw / r['seconds'] / GIB:.3f} GiB/s of float16 read")
    print(f"  {which}_run {n} members ({pairs} pair{'s' if pairs > 1 else ''}) x {n_pos} positions: "
          f"{r['seconds']:.1f} s wall, {r['cpu_s']:.1f} s CPU ({pairs / r['seconds']:.3f} pairs/s{extra}), "
          f"peak RSS {r['max_rss'] / GIB:.2f} GiB ({r['max_rss'] / WORKER_LIMIT:.0%} of the "
          f"{WORKER_LIMIT / GIB:.0f} GiB worker limit); {r['summary']}", flush=True)


def bench_analyse(root: Path, small: int, big: int, full_pos: int) -> dict[str, Any]:
    """distribution_run at (3, small), (2, big), (3, big) members x positions; embedding_run with
    2 and 3 members (its cost does not depend on positions). Extrapolated to the paper."""
    for n_pos in (small, big):
        t0 = time.perf_counter()
        build_analysis_study(root / str(n_pos), n_pos, 3)
        print(f"  built 3 members x {n_pos} positions x {VOCAB} float16 ({n_pos * VOCAB * 2 / GIB:.2f} GiB "
              f"each) and embeddings ({VOCAB} x {PAPER_DIM}) in {time.perf_counter() - t0:.1f} s "
              "(not counted)", flush=True)
    res: dict[tuple[str, int, int], dict[str, Any]] = {}
    for which, n, n_pos in (("distribution", 3, small), ("distribution", 2, big),
                            ("distribution", 3, big), ("embedding", 2, small), ("embedding", 3, small)):
        r = measure_analyse(root / str(n_pos), n_pos, n, which)
        res[(which, n, n_pos)] = r
        _print_analyse(which, n, n_pos, r)
    pairs = PAPER_MEMBERS * (PAPER_MEMBERS - 1) // 2
    out: dict[str, Any] = {"runs": {f"{w}-{n}-{p}": v for (w, n, p), v in res.items()}}
    d3 = [res[("distribution", 3, small)], res[("distribution", 3, big)]]
    for key, label in (("seconds", "wall"), ("cpu_s", "CPU")):
        b, _ = fit_power_law([small, big], [r[key] for r in d3])
        c = fit_costs(d3[0][key], res[("distribution", 2, big)][key], d3[1][key], small, big)
        e2, e3 = res[("embedding", 2, small)][key], res[("embedding", 3, small)][key]
        e_pair = max(e3 - e2, 0.0) / 2  # 3 pairs - 1 pair
        e_fixed = max(e2 - e_pair, 0.0)
        dist_full = PAPER_RUNS * predict_costs(c, PAPER_MEMBERS, full_pos)
        emb_full = PAPER_RUNS * (e_fixed + pairs * e_pair)
        five = PAPER_RUNS * predict_costs(c, 5, full_pos)  # jobs/paper.toml: 5 seeds, 10 pairs a run
        print(f"  {label}: distribution_run (3 members) ~ positions^{b:.2f} from {small} to {big}; per "
              f"1,000 positions {1000 * c['member']:.2f} s per member + {1000 * c['pair']:.2f} s per pair "
              f"(+ {c['fixed']:.1f} s fixed); embedding_run {e_pair:.1f} s per pair (+ {e_fixed:.1f} s)")
        print(f"  {label}: extrapolated to {PAPER_RUNS} runs x {PAPER_MEMBERS} members ({pairs} pairs) x "
              f"{full_pos} positions, one worker like this one: distribution {_fmt_s(dist_full)}, "
              f"embedding {_fmt_s(emb_full)}; with jobs/paper.toml's 5 members a run: distribution "
              f"{_fmt_s(five)}", flush=True)
        out[label] = {"exponent": b, **c, "embedding_pair": e_pair, "distribution_full_s": dist_full,
                      "embedding_full_s": emb_full}
    print(f"  (the paper's predictions: {PAPER_RUNS * PAPER_MEMBERS * full_pos * VOCAB * 2 / GIB:.0f} GiB "
          "of float16 read once per analysis)")
    return out


# --------------------------------------------------------------------------- main


def settings() -> dict[str, Any]:
    """Sizes of this run: quick (smoke test) or real, capped by ``BENCH_SCALE_MAX`` (Mbases)."""
    if _quick():
        return {"sizes": [0.2, 0.6, 2.0], "tok_records": 400, "eval_pos": 4096, "full_pos": 8192,
                "rounds": 1, "analyse_small": 2048, "analyse_big": 4096, "parts": _parts()}
    cap = float(os.environ.get("BENCH_SCALE_MAX", "300"))
    sizes = [s for s in (30.0, 100.0, 300.0, 3000.0) if s <= cap] or [cap]
    return {"sizes": sizes, "tok_records": 20_000, "eval_pos": 32_768, "full_pos": PAPER_POSITIONS,
            "rounds": 2, "analyse_small": 12_288, "analyse_big": 131_072, "parts": _parts()}


def _parts() -> list[str]:
    """``BENCH_SCALE_PARTS`` (comma-separated): which of prepare, evaluate, analyse to run."""
    parts = [p.strip() for p in os.environ.get("BENCH_SCALE_PARTS", "prepare,evaluate,analyse").split(",")]
    unknown = set(parts) - {"prepare", "evaluate", "analyse"}
    if unknown:
        raise ValueError(f"BENCH_SCALE_PARTS: unknown part(s) {sorted(unknown)}")
    return parts


def main() -> None:
    import platform

    cfg = settings()
    root = workdir()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; load {os.getloadavg()}; work dir {root}")
    print(f"settings: {cfg}")
    parts = cfg["parts"]
    try:
        if "prepare" in parts:
            print("1. prepare (kmer6, bpe4096; each in its own process)", flush=True)
            prep = bench_prepare(cfg["sizes"], ("kmer6", "bpe4096"), cfg["tok_records"], root)
            for line in report_prepare(prep):
                print("  " + line)
            if cfg["sizes"][-1] < PAPER_MBASES:
                print(f"  ({PAPER_MBASES:g} Mbases not measured (BENCH_SCALE_MAX=3000 measures it): "
                      "extrapolated by the fits above)")
            print(f"  load {os.getloadavg()}", flush=True)
        if "evaluate" in parts:
            print("2. evaluate: predictions store writes", flush=True)
            bench_evaluate(root, cfg["eval_pos"], cfg["full_pos"], cfg["rounds"])
            print(f"  load {os.getloadavg()}", flush=True)
        if "analyse" in parts:
            print("3. analyse: distribution_run and embedding_run (each in its own process)", flush=True)
            bench_analyse(root / "analyse", cfg["analyse_small"], cfg["analyse_big"], PAPER_POSITIONS)
            print(f"  load {os.getloadavg()}", flush=True)
    finally:
        keep = os.environ.get("BENCH_SCALE_RESULTS")  # the raw per-process results (JSON lines)
        if keep and (root / "results.jsonl").exists():
            shutil.copy(root / "results.jsonl", keep)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
