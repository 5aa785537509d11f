"""What a study will cost before it runs: ``toolkit plan STUDY``.

Per stage and in total: units, CPU-hours and GPU-hours, peak memory per unit, disk per
store kind, and warnings where ``[dispatch.resources]`` are too small. Every number comes
from the study's settings, a measurement, or an assumption that :class:`Plan` lists
(``Plan.assumptions``, printed under the table), so a user can see what to calibrate.

How the numbers are made
------------------------
- Corpus shape: the run's token store when it is already prepared (exact); else the
  corpus itself, read for at most ``sample_seconds`` (exact when it ends inside that
  time, otherwise mean record length measured on the records read and the record count
  assumed to be ``train_records + eval_records``); else (source not on this machine) the
  DNA piece lengths of the study file or an assumed text document length.
- Tokens per symbol: 1 (char), ``1/k`` plus the remainder bases (``kmer<k>``), 1
  (``kmer<k>-overlap``), measured ratios of the demo's BPE stores for ``bpe<V>``.
- Compute: model FLOPs per token from the shape (:func:`flops_per_token`, the usual
  matmul count: ``2 x`` multiply-adds forward, ``3 x`` forward for training, attention
  ``4 L T h`` forward) divided by an effective device throughput (:data:`DEVICES`, or a
  calibration file written by ``benchmarks/gpu_check.sh``).
- Memory: parameters, optimiser state and activations (Korthikanti et al. 2022, per layer
  ``b T (34 h + 5 a T)`` bytes at 16 bits, doubled at 32 bits) over a measured process
  baseline.
- Disk: array shapes from the schemas' dimensions times item size times a compression
  ratio measured on the demo's stores (:data:`COMPRESSION`).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.config import CorpusConfig, DispatchConfig, StudyConfig, effective_shape
from toolkit.errors import ConfigError, CorpusError
from toolkit.study import Layout, prepare_keys, run_tokenizer
from toolkit.tokenizers.spec import TOKENIZER_PATTERN, tokenizer_vocab_size
from toolkit.train import iter_flow_steps, total_steps

GIB = 1024 ** 3

# --------------------------------------------------------------------------- assumptions

BPE_SYMBOLS_PER_TOKEN = {"dna": 5.14, "text": 3.68}
"""Symbols per BPE token at V = 4096, measured on the demo's stores (A. thaliana chr1,
Wikipedia extracts); other V scale with log2(V) / 12."""

TEXT_CHARS_PER_RECORD = 2500.0
"""Assumed mean document length when a text source cannot be read here."""

COMPRESSION: dict[str, Any] = {"tokens": 0.70, "masks": 0.30, "predictions": {"float32": 0.85, "float16": 0.92},
               "embeddings": 0.93, "fisher": 0.90, "checkpoints": 1.0}
"""Stored/raw bytes per store kind, measured on the demo's stores (CRC32C + zstd)."""

PROCESS_BASELINE_BYTES = int(1.5 * GIB)
"""Resident memory of a unit's Python process before its data (torch, transformers, zarr
imported; measured RSS of a tiny unit on the development machine)."""

CUDA_CONTEXT_BYTES = int(0.8 * GIB)
"""GPU memory a CUDA context and the caching allocator's slack take (assumed)."""

WRITE_BYTES_PER_S = 84e6
"""Rate at which a unit writes a store (raw bytes per second): the predictions writer measured
end to end, zstd compression and the SHA-256 inventory included, on one core of the
development machine (``python -m benchmarks scale``: 84 MB/s; the disk was not the limit)."""

# CPU rates, per core, measured on the 2-core development machine (logs of `make demo`).
PREPARE_SYMBOLS_PER_S = 2.5e6
"""Corpus read + k-mer/char encoding, symbols per second per core (demo prepare logs)."""
BPE_TRAIN_SYMBOLS_PER_S = 0.12e6
"""BPE (V 4096) training, symbols of its training sample per second (measured: 9.0 M bases
of A. thaliana in 74.5 s on the loaded development machine)."""
BPE_TRAIN_BYTES_PER_SYMBOL = 64.0
"""Peak memory of BPE training per symbol of its training sample (measured: 60-67 bytes on
2.3 and 9.0 M bases of A. thaliana, HF tokenizers)."""
ENTROPY_TOKENS_PER_S = 1.0e6
"""Entropy profile, tokens x orders per second (demo: 0.87 M tokens, 4 orders in 1.0 s, 3.5 M/s)."""
DISTRIBUTION_ELEMENTS_PER_S = 1.3e7
"""Pairwise distribution measures: (member pairs + members) x positions x vocabulary per
second per core (demo analyse logs: 3 members, 2,600 positions, V 4,096 in 2.5 s on 2 cores)."""
EMBEDDING_ELEMENTS_PER_S = 2.7e8
"""Static-embedding comparisons: member pairs x V^2 x hidden per second per core (demo:
4 s per pair at V 4,096, hidden 128, on 2 cores)."""
UNIT_OVERHEAD_S = {"prepare": 3.0, "train": 8.0, "evaluate": 12.0, "measure": 6.0, "analyse": 20.0}
"""Fixed seconds of a unit beyond its work: process start, imports, loading models and stores
(measured: the tiny study's units on the development machine take 3 / 8 / 13 / 21 s while
their work is planned at well under a second; a measure unit imports no model code, and the
analyse unit's 20 s are mostly the report's figures)."""
FISHER_OVERHEAD = 1.25
"""Per-example Fisher with full diagonal over one forward+backward (benchmarks/bench_fisher.py: 1.13-1.24)."""


@dataclass(frozen=True)
class Device:
    """Effective training/inference throughput of one device, in FLOP/s."""

    name: str
    flops: dict[str, float]
    """Effective FLOP/s by precision (``fp32``, ``bf16``); for ``cpu``: per core."""
    memory_bytes: int | None
    source: str


DEVICES: dict[str, Device] = {
    "cpu": Device("CPU core", {"fp32": 4.0e10, "bf16": 1.0e10}, None,
                  "measured: the toolkit's training step of the tiny model, 14,500 tokens/s at "
                  "3.2 MFLOP/token on one core of the development machine (bf16 on CPU: assumed 4x slower)"),
    "cuda": Device("NVIDIA H100 80GB (assumed)", {"fp32": 0.5 * 67e12, "bf16": 0.35 * 989e12}, 80 * GIB,
                   "assumed: datasheet dense peak x utilisation (fp32 on CUDA cores: 67 TFLOP/s x 0.5, "
                   "the toolkit does not enable TF32; bf16 tensor cores: 989 TFLOP/s x 0.35); not yet "
                   "measured: run benchmarks/gpu_check.sh on your GPU and pass --calibration"),
}


def load_calibration(path: Path) -> dict[str, Device]:
    """Devices with measured throughputs, from a JSON file.

    The file holds ``{"cuda": {"name": ..., "flops": {"fp32": F, "bf16": F}, "memory_bytes": M},
    "cpu": {...}}`` (either key may be left out); ``benchmarks/gpu_check.sh`` writes one.

    Raises
    ------
    ConfigError
        The file is missing, not JSON, or a throughput is not a positive number.
    """
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--calibration {path}: cannot read it ({e.strerror or e})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"--calibration {path}: not valid JSON ({e})") from e
    devices = dict(DEVICES)
    if not isinstance(doc, dict):
        raise ConfigError(f"--calibration {path}: expected an object with 'cuda' and/or 'cpu'")
    doc = doc.get("calibration", doc)
    for kind in ("cpu", "cuda"):
        entry = doc.get(kind)
        if entry is None:
            continue
        flops = entry.get("flops") if isinstance(entry, dict) else None
        if not isinstance(flops, dict) or not flops or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in flops.values()):
            raise ConfigError(f"--calibration {path}: {kind}.flops must map precisions to positive FLOP/s")
        merged = {**devices[kind].flops, **{k: float(v) for k, v in flops.items()}}
        mem = entry.get("memory_bytes", devices[kind].memory_bytes)
        devices[kind] = Device(str(entry.get("name", devices[kind].name)), merged,
                               int(mem) if mem else None, f"measured ({path})")
    return devices


# --------------------------------------------------------------------------- model arithmetic


def n_parameters(shape: dict[str, int], vocab: int) -> int:
    """Parameters of a BERT MLM with tied embeddings and one token type (toolkit.model)."""
    L, h, ff, P = (shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"],
                   shape["max_position_embeddings"])
    embeddings = vocab * h + P * h + h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * ff + ff) + (ff * h + h) + 2 * h
    head = h * h + h + 2 * h + vocab
    return embeddings + L * layer + head


def flops_per_token(shape: dict[str, int], vocab: int, seq: float, head_fraction: float,
                    train: bool) -> float:
    """Model FLOPs per input token: ``2 x`` the matmul multiply-adds, attention included.

    ``head_fraction`` is the fraction of positions the MLM head (transform + decoder) runs
    on (the toolkit runs it on masked positions only); training counts ``3 x`` forward.
    """
    L, h, ff = shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"]
    forward = 2 * (L * (4 * h * h + 2 * h * ff) + head_fraction * (h * h + h * vocab)) + 4 * L * seq * h
    return 3 * forward if train else forward


def activation_bytes(shape: dict[str, int], batch: int, seq: float, vocab: int, head_fraction: float,
                     precision: str, train: bool) -> float:
    """Activation memory of one batch (Korthikanti et al. 2022; ``/ 4`` without backward).

    The ``5 a T`` attention-matrix term of the paper is left out: PyTorch's SDPA kernels
    (which the toolkit's models use) do not keep the T x T attention probabilities.
    """
    L, h = shape["num_hidden_layers"], shape["hidden_size"]
    width = 2.0 if precision == "fp32" else 1.0
    per_layer = batch * seq * 34 * h * width
    head = batch * seq * head_fraction * vocab * 4 * (3 if train else 1)
    total = L * per_layer + head + batch * seq * h * 4 * 4
    return total if train else total / 4


# --------------------------------------------------------------------------- corpus shapes


@dataclass(frozen=True)
class RunShape:
    """What the plan knows of one run's data, and how it knows it."""

    n_records: int
    n_train: int
    n_eval: int
    symbols: float
    """Symbols (bases, characters) of all records tokenized."""
    train_lengths: np.ndarray
    """Tokens per training record (a sample, or all of them)."""
    eval_lengths: np.ndarray
    vocab: int
    how: str


def _symbols_per_token(spec: str, kind: str, vocab: int) -> float:
    m = TOKENIZER_PATTERN.match(spec)
    if m is None or spec == "char":
        return 1.0
    if m.group("v"):
        return BPE_SYMBOLS_PER_TOKEN[kind] * math.log2(max(vocab, 16)) / 12
    return 1.0  # overlap k-mers: one token per position (k-mer lengths handled below)


def _tokens_of(lengths: np.ndarray, spec: str, kind: str, vocab: int) -> np.ndarray:
    m = TOKENIZER_PATTERN.match(spec)
    if m is not None and m.group("k"):
        k = int(m.group("k"))
        if spec.endswith("-overlap"):
            return np.maximum(lengths - k + 1, 0)
        return lengths // k + lengths % k  # remainder bases become single-base tokens
    return np.ceil(lengths / _symbols_per_token(spec, kind, vocab))


def _from_store(path: Path, marker: Path) -> RunShape | None:
    """The shape of an already prepared token store (its prepare unit's ``marker`` written),
    or None."""
    from toolkit import store

    if not marker.is_file():
        return None
    try:
        g = store.open_store(path, "tokens", verify="none")
        offsets = np.asarray(g["offsets"][...])
        split = np.asarray(g["split"][...])
        symbols = float(np.asarray(g["record_symbols"][...]).sum())
        vocab = int(g.attrs["vocab_size"])
    except Exception:  # noqa: BLE001 - a damaged store plans like a missing one
        return None
    lengths = np.diff(offsets)
    return RunShape(len(split), int((split == 0).sum()), int((split == 1).sum()), symbols,
                    lengths[split == 0], lengths[split == 1], vocab, f"measured: token store {path.parent.name}")


def _sample_corpus(study: StudyConfig, corpus: str, seconds: float) -> tuple[np.ndarray, bool, str, str]:
    """Record lengths (symbols) of the corpus, read for at most ``seconds``; exhausted?; how
    they are known; the corpus kind (``dna`` or ``text``)."""
    from toolkit.corpora import open_corpus

    cfg = study.corpora[corpus]
    kind: str
    if cfg.source.startswith("synthetic:"):
        s = cfg.synthetic
        n = s.records if cfg.max_records is None else min(s.records, cfg.max_records)
        kind = cfg.kind if cfg.kind != "auto" else open_corpus(corpus, study).kind
        return np.full(n, s.length, dtype=np.int64), True, "exact: synthetic source", kind
    try:
        src = open_corpus(corpus, study)
        lengths: list[int] = []
        t0 = time.perf_counter()
        done = True
        for rec in src.records():
            lengths.append(len(rec.seq))
            if time.perf_counter() - t0 > seconds:
                done = False
                break
        kind = src.kind
    except CorpusError as e:
        dna = cfg.dna
        kind = _settings_kind(cfg)
        if kind == "text":
            mean, what = TEXT_CHARS_PER_RECORD, f"{TEXT_CHARS_PER_RECORD:.0f} characters per document"
            lengths_arr = np.full(1000, mean)
        else:
            lengths_arr = np.linspace(dna.piece_min, dna.piece_max, 1000)
            what = f"DNA pieces uniform in [{dna.piece_min}, {dna.piece_max}] bases"
        return (lengths_arr.astype(np.int64), False,
                f"assumed ({e.__class__.__name__}: source not readable here): {what}", kind)
    arr = np.asarray(lengths, dtype=np.int64)
    how = (f"exact: all {len(arr):,} records read" if done else
           f"measured: mean of the first {len(arr):,} records ({kind}); record count assumed "
           "train_records + eval_records")
    return arr, done, how, kind


def run_shape(study: StudyConfig, run: str, sample_seconds: float = 3.0,
              _cache: dict[str, Any] | None = None) -> RunShape:
    """The data side of ``run``: records, symbols and tokens per record."""
    cfg = study.runs[run]
    tok = run_tokenizer(study, run)
    layout = Layout(study)
    measured = _from_store(layout.tokens_store(cfg.corpus, tok), layout.prepare_marker(cfg.corpus, tok))
    if measured is not None:
        return measured
    cache = _cache if _cache is not None else {}
    if cfg.corpus not in cache:
        cache[cfg.corpus] = _sample_corpus(study, _base_corpus(study.corpora, cfg.corpus), sample_seconds)
    lengths, exact, how, kind = cache[cfg.corpus]
    ccfg = study.corpora[cfg.corpus]
    if exact:
        n_records = len(lengths)
        n_eval = min(ccfg.eval_records, n_records // 2) if n_records < ccfg.train_records + ccfg.eval_records \
            else ccfg.eval_records
        n_train = min(ccfg.train_records, n_records - n_eval)
    else:
        n_train, n_eval = ccfg.train_records, ccfg.eval_records
        n_records = n_train + n_eval
    vocab = tokenizer_vocab_size(tok) if not tok.startswith("checkpoint-") else -1
    if vocab < 0:
        vocab = 4 + 5 if kind == "dna" else 256  # char: alphabet + specials (assumed for text)
    toks = _tokens_of(lengths, tok, kind, vocab)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(toks), size=min(len(toks), 20000), replace=False) if len(toks) else np.array([], int)
    sample = toks[pick] if len(toks) else np.zeros(1)
    symbols = float(lengths.mean() if len(lengths) else 0.0) * n_records
    if tok.startswith("bpe"):
        how += f"; {_symbols_per_token(tok, kind, vocab):.2f} symbols per BPE token (assumed, demo stores)"
    return RunShape(n_records, n_train, n_eval, symbols, sample, sample, vocab, how)


def _base_corpus(corpora: dict[str, CorpusConfig], corpus: str) -> str:
    """The corpus whose records ``corpus`` reads (through ``shuffle:`` sources)."""
    seen = set()
    while corpora[corpus].source.startswith("shuffle:") and corpus not in seen:
        seen.add(corpus)
        corpus = corpora[corpus].source.split(":", 1)[1]
    return corpus


def _settings_kind(cfg: Any) -> str:
    """``dna`` or ``text`` from a corpus's settings alone (its source cannot be read here)."""
    if cfg.kind != "auto":
        return str(cfg.kind)
    if cfg.format in ("jsonl", "json", "text"):
        return "text"
    return "dna" if cfg.format == "fasta" or re.search(r"\.(fa|fna|fasta)(\.gz)?$", cfg.source) else "text"


# --------------------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    units: int = 0
    cpu_hours: float = 0.0
    gpu_hours: float = 0.0
    peak_memory_bytes: int = 0
    """Host memory of the hungriest unit of the stage."""
    gpu_memory_bytes: int = 0
    """GPU memory of the hungriest unit (0: the stage runs on CPUs)."""
    unit_hours: float = 0.0
    """Wall-clock hours of the longest unit."""
    disk_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    def add(self, *, cpu: float = 0.0, gpu: float = 0.0, memory: float = 0.0, gpu_memory: float = 0.0,
            wall: float = 0.0, disk: float = 0.0) -> None:
        self.units += 1
        self.cpu_hours += cpu
        self.gpu_hours += gpu
        self.peak_memory_bytes = max(self.peak_memory_bytes, int(memory))
        self.gpu_memory_bytes = max(self.gpu_memory_bytes, int(gpu_memory))
        self.unit_hours = max(self.unit_hours, wall)
        self.disk_bytes += int(disk)

    def to_json(self) -> dict[str, Any]:
        return {"units": self.units, "cpu_hours": self.cpu_hours, "gpu_hours": self.gpu_hours,
                "peak_memory_bytes": self.peak_memory_bytes, "gpu_memory_bytes": self.gpu_memory_bytes,
                "unit_hours": self.unit_hours, "disk_bytes": self.disk_bytes, "warnings": list(self.warnings)}


STAGES = ("prepare", "train", "evaluate", "measure", "analyse")


@dataclass
class Plan:
    study: str
    stages: dict[str, StagePlan]
    disk_by_kind: dict[str, int]
    assumptions: list[str]

    @property
    def units(self) -> int:
        return sum(s.units for s in self.stages.values())

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk_by_kind.values())

    def to_json(self) -> dict[str, Any]:
        return {"study": self.study, "units": self.units, "disk_bytes": self.disk_bytes,
                "cpu_hours": sum(s.cpu_hours for s in self.stages.values()),
                "gpu_hours": sum(s.gpu_hours for s in self.stages.values()),
                "stages": {k: s.to_json() for k, s in self.stages.items()},
                "disk_by_kind": dict(self.disk_by_kind), "assumptions": list(self.assumptions)}


def _device(dispatch: DispatchConfig, training_device: str, stage: str) -> tuple[str, int]:
    """(``cuda`` or ``cpu``, cores) a unit of ``stage`` runs on, from its resources and
    ``training.device``."""
    res = dispatch.resources_for(stage)
    wants_gpu = res.gpus_per_node > 0 and training_device != "cpu"
    return ("cuda" if wants_gpu else "cpu"), max(1, res.cpus_per_task)


def _seconds(flops: float, device: Device, precision: str, cores: int, kind: str) -> float:
    rate = device.flops.get(precision) or device.flops["fp32"]
    return flops / (rate * (cores if kind == "cpu" else 1))


def plan_study(study: StudyConfig, *, devices: dict[str, Device] | None = None,
               sample_seconds: float = 3.0) -> Plan:
    """Estimate every stage of ``study`` (nothing is written).

    Parameters
    ----------
    study
        The resolved study.
    devices
        Throughputs (:data:`DEVICES`, or :func:`load_calibration`).
    sample_seconds
        How long each corpus may be read to measure its record lengths.
    """
    p = _Planner(study, devices or DEVICES)
    cache: dict[str, Any] = {}
    shapes = {run: run_shape(study, run, sample_seconds, cache) for run in study.runs}
    for run, s in shapes.items():
        p.notes.append(f"run {run}: {s.n_records:,} records ({s.n_train:,} train, {s.n_eval:,} eval), "
                       f"{s.symbols / 1e6:,.1f} M symbols; {s.how}")
    for corpus, tok in prepare_keys(study):
        p.prepare(corpus, tok, shapes[next(r for r in study.runs if study.runs[r].corpus == corpus
                                   and run_tokenizer(study, r) == tok)])
    for run, s in shapes.items():
        p.member(run, s)
    p.analyse(shapes)
    p.check_resources()
    return Plan(study.name, p.stages, {k: int(v) for k, v in p.disk.items()},
                [*p.notes, *_assumption_lines(study.dispatch, study.training.device, p.devices)])


@dataclass(frozen=True)
class _Eval:
    """One run's evaluation sets under the study's analysis settings."""

    records: int
    seq_len: int
    mean_tokens: float
    positions: float
    fisher: int
    contextual: int

    @classmethod
    def of(cls, study: StudyConfig, s: RunShape) -> _Eval:
        a = study.analysis
        T = study.eval_seq_len
        n = min(a.eval_records or s.n_eval, s.n_eval)
        lengths = np.minimum(s.eval_lengths, T - 2) if len(s.eval_lengths) else np.zeros(1)
        mean = float(lengths[lengths > 0].mean()) if (lengths > 0).any() else 1.0
        positions = n * max(1.0, math.floor(a.distribution_mask_rate * mean + 0.5))
        return cls(n, T, mean, positions, min(a.fisher_records, n), min(a.contextual_records, n))


class _Planner:
    """Accumulates units, hours, memory, disk and warnings stage by stage."""

    def __init__(self, study: StudyConfig, devices: dict[str, Device]) -> None:
        self.study, self.devices = study, devices
        self.stages = {s: StagePlan() for s in STAGES}
        self.disk: dict[str, float] = dict.fromkeys(
            ("tokens", "masks", "checkpoints", "train", "predictions", "embeddings", "fisher", "shards", "summary"), 0.0)
        self.notes: list[str] = []

    def prepare(self, corpus: str, tok: str, s: RunShape) -> None:
        """One corpus x tokenizer: read, (train BPE,) encode, entropy profile, evaluation masks."""
        a = self.study.analysis
        limit = self.study.corpora[corpus].tokenizer_train_records
        n_tokens = _total_tokens(s)
        secs = s.symbols / PREPARE_SYMBOLS_PER_S
        mem = float(PROCESS_BASELINE_BYTES + 16 * 4 * 2 ** 22)  # zarr chunk buffers
        if tok.startswith("bpe"):
            sampled = s.n_train if limit is None else min(s.n_train, limit)
            train_symbols = s.symbols * sampled / max(s.n_records, 1)
            secs += train_symbols / BPE_TRAIN_SYMBOLS_PER_S
            mem = max(mem, PROCESS_BASELINE_BYTES + train_symbols * BPE_TRAIN_BYTES_PER_SYMBOL)
        secs += min(a.entropy_max_tokens, n_tokens) * a.entropy_orders / ENTROPY_TOKENS_PER_S
        item = 2 if s.vocab <= 65536 else 4
        # + tokenizer, profile, inventory and metadata files (about 40 kB measured)
        size = (n_tokens * item + s.n_records * (8 + 1 + 8)) * COMPRESSION["tokens"] + 64 * s.vocab + 40e3
        self.disk["tokens"] += size
        # The evaluation masks (one store per token store): every set's inputs, masks and
        # labels, and the distribution set's position list.
        e = _Eval.of(self.study, s)
        masks = (e.records * e.seq_len * 9 + e.fisher * e.seq_len * 9 + e.contextual * e.seq_len * 5
                 + e.positions * 12) * COMPRESSION["masks"]
        self.disk["masks"] += masks
        # Built in memory: ids, attention, random keys and two argsorts per (sequence, position).
        mem = max(mem, PROCESS_BASELINE_BYTES + e.records * e.seq_len * 40.0)
        secs += UNIT_OVERHEAD_S["prepare"]
        self.stages["prepare"].add(cpu=secs / 3600, memory=mem, wall=secs / 3600, disk=size + masks)

    def member(self, run: str, s: RunShape) -> None:
        """Train and evaluate units of ``run`` (one per seed)."""
        study, t = self.study, self.study.training
        shape, vocab = effective_shape(study.runs[run].model), s.vocab
        params = n_parameters(shape, vocab)
        kind, cores = _device(study.dispatch, t.device, "train")
        room = t.seq_len - 2
        lengths = np.minimum(s.train_lengths, room) if len(s.train_lengths) else np.zeros(1)
        n_seq = int(s.n_train * (lengths > 0).mean())
        mean_len = float(lengths[lengths > 0].mean()) if (lengths > 0).any() else 1.0
        if t.packing:
            n_seq, mean_len = max(1, math.ceil(s.n_train * mean_len / room)), float(room)
        steps = total_steps(t, max(n_seq, 1), mean_len)
        batch = t.batch_size * t.grad_accum
        # A batch is trimmed to its longest sequence: about the b/(b+1) quantile of lengths.
        padded = min(float(t.seq_len), float(np.quantile(lengths + 2, batch / (batch + 1))))
        evals = steps // t.eval_every_steps + 1
        flops = steps * batch * padded * flops_per_token(shape, vocab, padded, t.mlm_probability, train=True) \
            + evals * t.eval_batches * t.batch_size * padded * flops_per_token(
                shape, vocab, padded, t.mlm_probability, train=False)
        secs = _seconds(flops, self.devices[kind], t.precision, cores, kind) + UNIT_OVERHEAD_S["train"]
        act = activation_bytes(shape, t.batch_size, padded, vocab, t.mlm_probability, t.precision, train=True)
        state = params * 16.0  # fp32 weights, gradients, AdamW moments
        reader = 16 * 2 ** 23  # the token reader's chunk cache
        host, gmem = ((PROCESS_BASELINE_BYTES + params * 4 * 3 + reader, state + act + CUDA_CONTEXT_BYTES)
                      if kind == "cuda" else (PROCESS_BASELINE_BYTES + state + act + reader, 0.0))
        n_flow = len(set(iter_flow_steps(t.fisher_flow, steps)))
        ckpt = params * 4.0 * (2 + n_flow) + 2 * params * 12.0 + 2 * 16 * vocab  # exports + 2 resume
        log = 20e3 + 40 * (steps // t.log_every_steps + evals)
        for _ in study.seeds:
            self.stages["train"].add(cpu=(secs * cores if kind == "cpu" else 0) / 3600,
                                     gpu=(secs if kind == "cuda" else 0) / 3600,
                                     memory=host, gpu_memory=gmem, wall=secs / 3600, disk=ckpt + log)
            self.disk["checkpoints"] += ckpt
            self.disk["train"] += log
        limit = study.dispatch.resources_for("train").time_minutes
        if study.dispatch.executor == "slurm" and secs / 60 > limit:
            self.stages["train"].warnings.append(
                f"run {run}: a member needs about {secs / 3600:.1f} h but dispatch.resources.train."
                f"time_minutes is {limit}: each member will requeue about "
                f"{math.ceil(secs / 60 / limit) - 1} time(s), resuming from its last checkpoint")
        snapshots = len(set(iter_flow_steps(t.fisher_flow, steps)) | {steps})
        self._evaluate(run, shape, vocab, params, _Eval.of(study, s), snapshots)
        self.notes.append(f"run {run}: model {study.runs[run].model.shape} ({params:,} parameters, "
                          f"vocabulary {vocab:,}), {steps:,} steps of {batch} x {padded:.0f} tokens")

    def _evaluate(self, run: str, shape: dict[str, int], vocab: int, params: int, e: _Eval,
                  snapshots: int) -> None:
        study, t, a = self.study, self.study.training, self.study.analysis
        kind, cores = _device(study.dispatch, t.device, "evaluate")
        per_seq = e.mean_tokens + 2
        flops = (e.records * per_seq * flops_per_token(shape, vocab, e.seq_len, a.distribution_mask_rate, False)
                 + e.contextual * per_seq * flops_per_token(shape, vocab, e.seq_len, 0.0, False)
                 + snapshots * len(a.fisher_estimators) * e.fisher * per_seq * FISHER_OVERHEAD
                 * flops_per_token(shape, vocab, e.seq_len, a.fisher_mask_rate, True))
        pred = e.positions * vocab * (4 if a.prediction_dtype == "float32" else 2)
        secs = (_seconds(flops, self.devices[kind], t.precision, cores, kind) + pred / WRITE_BYTES_PER_S
                + UNIT_OVERHEAD_S["evaluate"])
        n_diag = _diagonal_parameters(a.fisher_diagonal, shape, vocab, params)
        fisher = n_diag * 4 * len(a.fisher_estimators) * snapshots * COMPRESSION["fisher"] + 50e3
        emb = (vocab + e.contextual) * shape["hidden_size"] * 4 * COMPRESSION["embeddings"]
        pred_size = pred * COMPRESSION["predictions"][a.prediction_dtype] + e.positions * 4
        act = activation_bytes(shape, a.batch_size, e.seq_len, vocab, a.fisher_mask_rate, t.precision, True)
        chunk = 2048 * vocab * 4 * 3  # one predictions chunk and its float64 log-softmax
        diag = n_diag * 4 * 2  # per-estimator diagonal accumulators
        host, gmem = ((PROCESS_BASELINE_BYTES + params * 4 * 2 + chunk,
                       params * 4 * 3 + diag + act + CUDA_CONTEXT_BYTES) if kind == "cuda" else
                      (PROCESS_BASELINE_BYTES + params * 4 * 3 + diag + act + chunk, 0.0))
        for _ in study.seeds:
            self.stages["evaluate"].add(cpu=(secs * cores if kind == "cpu" else 0) / 3600,
                                        gpu=(secs if kind == "cuda" else 0) / 3600, memory=host,
                                        gpu_memory=gmem, wall=secs / 3600, disk=fisher + emb + pred_size)
        n = len(study.seeds)
        self.disk["predictions"] += pred_size * n
        self.disk["fisher"] += fisher * n
        self.disk["embeddings"] += emb * n
        _resource_warnings(study.dispatch, "evaluate", self.stages["evaluate"], secs, host, run)
        self.notes.append(f"run {run}: {e.positions:,.0f} evaluation positions, {snapshots} Fisher snapshots")

    def analyse(self, shapes: dict[str, RunShape]) -> None:
        """The measure units (one per run and family: the pairwise distribution and embedding
        measures are the work) and the analyse unit that reduces their shards."""
        from toolkit.analyse.shards import FAMILIES

        study = self.study
        _, cores = _device(study.dispatch, study.training.device, "measure")
        m = len(study.seeds)
        pairs = m * (m - 1) / 2
        stage = self.stages["measure"]
        for run, s in shapes.items():
            h = effective_shape(study.runs[run].model)["hidden_size"]
            work = {"distributions": (pairs + m) * _Eval.of(study, s).positions * s.vocab / DISTRIBUTION_ELEMENTS_PER_S,
                    "embeddings": pairs * s.vocab ** 2 * h / EMBEDDING_ELEMENTS_PER_S}
            memory = {"distributions": PROCESS_BASELINE_BYTES + 2 * 2048 * s.vocab * 8 * 4 * cores,
                      "embeddings": PROCESS_BASELINE_BYTES + 3 * s.vocab ** 2 * 8 + m * s.vocab * h * 8}
            for family in FAMILIES:
                secs = work.get(family, 0.0) / cores + UNIT_OVERHEAD_S["measure"]
                mem = memory.get(family, float(PROCESS_BASELINE_BYTES))
                shard = 2e4 + (s.vocab * 8 if family == "distributions" else 0)  # rank curve; scalars
                self.disk["shards"] += shard
                stage.add(cpu=secs * cores / 3600, memory=mem, wall=secs / 3600, disk=shard)
                _resource_warnings(study.dispatch, "measure", stage, secs, mem, run)
        _, cores = _device(study.dispatch, study.training.device, "analyse")
        secs = UNIT_OVERHEAD_S["analyse"]
        # per run: vocabulary-long curves (float64) and per-member tables; report figures apart
        summary = 2e5 + sum(s.vocab * 8 * 4 + m * 50e3 for s in shapes.values())
        self.disk["summary"] += summary
        self.stages["analyse"].add(cpu=secs * cores / 3600, memory=PROCESS_BASELINE_BYTES, wall=secs / 3600,
                                   disk=summary)
        _resource_warnings(study.dispatch, "analyse", self.stages["analyse"], secs, PROCESS_BASELINE_BYTES, None)

    def check_resources(self) -> None:
        """Memory and time-limit warnings of prepare and train, GPU memory of train and evaluate."""
        study, stages = self.study, self.stages
        for stage in ("prepare", "train"):
            _memory_warning(study.dispatch, stage, stages[stage], stages[stage].peak_memory_bytes)
        prep = stages["prepare"]
        if study.dispatch.executor == "slurm" and prep.unit_hours * 60 > study.dispatch.resources_for(
                "prepare").time_minutes:
            prep.warnings.append(f"the longest prepare unit needs about {prep.unit_hours:.1f} h: raise "
                                 f"dispatch.resources.prepare.time_minutes to at least "
                                 f"{math.ceil(prep.unit_hours * 72)}")
        for stage in ("train", "evaluate"):
            kind, _ = _device(study.dispatch, study.training.device, stage)
            cap = self.devices[kind].memory_bytes
            if kind == "cuda" and cap and stages[stage].gpu_memory_bytes > cap:
                stages[stage].warnings.append(
                    f"needs about {stages[stage].gpu_memory_bytes / GIB:.0f} GiB of GPU memory, more than "
                    f"the {cap / GIB:.0f} GiB of {self.devices[kind].name}: lower the batch size and raise "
                    "training.grad_accum")


def _total_tokens(s: RunShape) -> float:
    per_record = float(np.concatenate([s.train_lengths, s.eval_lengths]).mean()) \
        if len(s.train_lengths) + len(s.eval_lengths) else 0.0
    return per_record * s.n_records


def _diagonal_parameters(d: str | tuple[str, ...], shape: dict[str, int], vocab: int, params: int) -> int:
    """Parameters whose Fisher diagonal is stored (``analysis.fisher_diagonal = d``)."""
    if d == "none":
        return 0
    if d == "all":
        return params
    h, L = shape["hidden_size"], shape["num_hidden_layers"]
    per_layer = (params - (vocab * h + shape["max_position_embeddings"] * h + 3 * h)
                 - (h * h + 3 * h + vocab)) // max(L, 1)
    sizes = {"embeddings": vocab * h + shape["max_position_embeddings"] * h + 3 * h,
             "head": h * h + 3 * h + vocab}
    return sum(sizes.get(g, per_layer) for g in d)


def _resource_warnings(dispatch: DispatchConfig, stage: str, plan: StagePlan, secs: float, memory: float,
                       run: str | None) -> None:
    res = dispatch.resources_for(stage)
    where = f"run {run}: " if run else ""
    if dispatch.executor == "slurm" and secs / 60 > res.time_minutes:
        plan.warnings.append(f"{where}a unit needs about {secs / 3600:.1f} h but dispatch.resources.{stage}."
                             f"time_minutes is {res.time_minutes}: raise it to at least "
                             f"{math.ceil(secs / 60 * 1.2)}")
    _memory_warning(dispatch, stage, plan, memory, where)


def _memory_warning(dispatch: DispatchConfig, stage: str, plan: StagePlan, memory: float, where: str = "") -> None:
    res = dispatch.resources_for(stage)
    if res.mem_gb is not None and memory > res.mem_gb * GIB:
        text = (f"{where}a unit peaks at about {memory / GIB:.1f} GiB of memory but dispatch.resources."
                f"{stage}.mem_gb is {res.mem_gb:g}: raise it to at least {math.ceil(memory / GIB * 1.2)}")
        if text not in plan.warnings:
            plan.warnings.append(text)


def _assumption_lines(dispatch: DispatchConfig, training_device: str, devices: dict[str, Device]) -> list[str]:
    used = {_device(dispatch, training_device, s)[0] for s in ("train", "evaluate")}
    lines = [f"{k}: {devices[k].name}, {', '.join(f'{p} {v / 1e12:.2f} TFLOP/s' for p, v in devices[k].flops.items())}"
             f"{' per core' if k == 'cpu' else ''} effective; {devices[k].source}" for k in sorted(used | {"cpu"})]
    lines += [
        "FLOPs per token: 2 x matmul multiply-adds (4h^2 + 2h*ffn per layer, the MLM head on masked "
        "positions only) + 4*L*T*h attention; training 3 x forward",
        f"CPU stages: prepare {PREPARE_SYMBOLS_PER_S / 1e6:.1f} M symbols/s (+ BPE training "
        f"{BPE_TRAIN_SYMBOLS_PER_S / 1e6:.1f} M symbols/s), analyse {DISTRIBUTION_ELEMENTS_PER_S:.1e} "
        f"distribution and {EMBEDDING_ELEMENTS_PER_S:.1e} embedding elements/s per core (demo logs)",
        f"disk: stored/raw ratios {json.dumps(COMPRESSION)} (demo stores); predictions written at "
        f"{WRITE_BYTES_PER_S / 1e6:.0f} MB/s",
        f"memory: {PROCESS_BASELINE_BYTES / GIB:.1f} GiB process baseline, 16 bytes per parameter in "
        "training (weights, gradients, AdamW), activations per Korthikanti et al. 2022 without the attention matrix (SDPA)",
    ]
    return lines


# --------------------------------------------------------------------------- text output


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_plan(plan: Plan) -> str:
    """The plan as a table, its warnings and assumptions."""
    rows = [f"plan for study {plan.study}: {plan.units} units, {_size(plan.disk_bytes)} on disk",
            f"{'stage':<9} {'units':>5} {'CPU-h':>9} {'GPU-h':>9} {'unit h':>8} {'memory/unit':>12} "
            f"{'GPU mem/unit':>12} {'disk':>9}"]
    for name, s in plan.stages.items():
        rows.append(f"{name:<9} {s.units:>5} {s.cpu_hours:>9.2f} {s.gpu_hours:>9.2f} {s.unit_hours:>8.2f} "
                    f"{_size(s.peak_memory_bytes):>12} {_size(s.gpu_memory_bytes) if s.gpu_memory_bytes else '-':>12} "
                    f"{_size(s.disk_bytes):>9}")
    cpu = sum(s.cpu_hours for s in plan.stages.values())
    gpu = sum(s.gpu_hours for s in plan.stages.values())
    rows.append(f"{'total':<9} {plan.units:>5} {cpu:>9.2f} {gpu:>9.2f} {'':>8} {'':>12} {'':>12} "
                f"{_size(plan.disk_bytes):>9}")
    rows.append("disk by store kind: " + ", ".join(f"{k} {_size(v)}" for k, v in plan.disk_by_kind.items() if v))
    warnings = [f"  {name}: {w}" for name, s in plan.stages.items() for w in s.warnings]
    if warnings:
        rows += ["warnings:", *warnings]
    rows += ["assumptions:", *(f"  - {line}" for line in plan.assumptions)]
    return "\n".join(rows)


__all__ = ["DEVICES", "Device", "Plan", "StagePlan", "flops_per_token", "format_plan", "load_calibration",
           "n_parameters", "plan_study", "run_shape"]
