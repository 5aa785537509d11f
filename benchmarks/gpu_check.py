"""GPU readiness check (issue 11): one time-boxed run that says how the toolkit does on a GPU.

Run it through ``bash benchmarks/gpu_check.sh`` (its header says how on a cluster node and on
the project's device machine); ``--smoke`` is the seconds-long CPU run that CI uses. It measures,
printing labelled lines and writing every number to one JSON file (``--out``):

- ``env``: torch / CUDA / cuDNN / transformers versions, device name, driver, the float32
  matmul precision in force, the assumed dense peak (table :data:`PEAKS`) and a measured
  square-matmul rate per dtype (the ceiling a real model can approach);
- ``train``: tokens/s, MFU and peak memory of the toolkit's own training loop
  (:func:`toolkit.train.train_member`, unmodified, on a synthetic token store) against
  ``transformers.Trainer`` with the same BertConfig, batch, sequence length, optimiser
  family and autocast dtype, for shapes ``bert-base``, ``20M``, ``tiny`` in fp32 and bf16,
  and the ratio toolkit / HF;
- ``fisher``: the per-example empirical Fisher (:func:`toolkit.fisher.fisher_traces`, and
  :func:`toolkit.fisher.fisher_diagonal`, which the study stores by default) on bert-base
  against one plain forward+backward of the same batch (``fair``: the toolkit's masked-head
  training step; ``hf``: ``model(**batch).loss.backward()``);
- ``study``: a tiny study run end to end with ``python -m toolkit run --executor local``,
  checking every member trained and evaluated on the expected device (``training.device =
  "auto"`` must pick ``cuda`` when a GPU is visible).

How the toolkit's loop is timed, honestly: it runs as it does in a study, logging a progress
line every ``window`` steps; a logging handler notes the wall clock at each line (each step
ends with ``float(loss)``, a device sync), and once ``--seconds`` have passed after the
warm-up steps it raises SIGUSR2, the toolkit's own preemption signal: the loop finishes the
step, checkpoints and exits 75. Throughput = steps between the first line at or after the
warm-up and the last line x batch x seq_len / the wall time between them (every synthetic
record fills the sequence, so there is no padding). HF Trainer is timed alike: a callback
syncs the device every ``window`` steps, notes the clock and stops training once as long
has been measured.

MFU = (6 N + 12 L T d) x tokens/s / peak, with N the trainable parameters (tied embeddings
once), L layers, T sequence length, d hidden size: 6 N for the matmuls of forward and
backward, 12 L T d for attention's QK^T and AV. Both contenders are credited with the same
FLOPs per token (the toolkit's masked-only MLM head does fewer), so the MFU ratio is the
throughput ratio. The peak is the datasheet dense figure of the device's dtype: ``bf16`` for
bf16 autocast; for fp32, ``tf32`` if torch's float32 matmul precision is not ``highest``,
else plain ``fp32`` (the toolkit does not enable TF32).

A global deadline (``--budget``) governs it all: an item whose estimated cost does not fit
in the time left is recorded as ``SKIPPED (time budget)``, never started. The JSON file is
rewritten after every item, so a killed run still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FALLBACK_VOCAB = 4101  # 4^6 k-mers + 5 special tokens, should the toolkit's kmer6 not build
SHAPES = ("bert-base", "20M", "tiny")
PRECISIONS = ("fp32", "bf16")
CONTENDERS = ("toolkit", "hf_trainer")
EXIT_PREEMPTED = 75  # toolkit.train.EXIT_PREEMPTED

# Dense (not 2:4 sparse) datasheet peaks in TFLOP/s; the first entry whose key is in the
# device name wins, so the specific names come before the generic ones.
PEAKS: tuple[tuple[str, dict[str, float | None]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("V100", {"bf16": None, "tf32": None, "fp32": 15.7}),  # no bf16 / tf32 tensor cores
)
WHEELS = ("zarr", "numcodecs", "donfig", "google-crc32c", "crc32c", "dask", "partd", "locket",
          "submitit")
"""The toolkit's dependencies missing from the device machine's image (see gpu_check.sh)."""

FLOPS_FORMULA = ("model FLOPs per trained token = 6*N + 12*L*T*d (N trainable parameters, tied "
                 "embeddings once; L layers; T sequence length; d hidden size); MFU = that x "
                 "tokens/s / dense peak of the dtype")

STUDY_TOML = """\
# Written by benchmarks/gpu_check.py: the tests' tiny study (tests/conftest.py TINY_STUDY)
# on the local executor.
[study]
name = "gpu-check"
seeds = [1, 2]
output_dir = "{out}"

[corpora.markov]
source = "synthetic:markov"
train_records = 48
eval_records = 16
synthetic = {{ alphabet = "ACGT", order = 2, entropy_rate = 1.2, records = 64, length = 300 }}

[runs.r]
corpus = "markov"
tokenizer = "kmer3"

[model]
shape = "tiny"

[training]
steps = {steps}
batch_size = 8
seq_len = 64
checkpoint_every_steps = 6
eval_every_steps = 6
eval_batches = 1
log_every_steps = 2
fisher_flow = [0.5]
device = "{device}"

[analysis]
eval_records = 16
batch_size = 8
fisher_records = 8
contextual_records = 8
bootstrap = 10
top_p = [0.5, 1.0]
topk = [1, 3]

[dispatch]
executor = "local"
max_parallel = 2
"""


# --------------------------------------------------------------------------- plumbing


class Deadline:
    """The global time budget: items that would not fit are skipped, not started."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def fits(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


BUDGET_SKIP = "SKIPPED (time budget)"


class Report:
    """The JSON document, rewritten atomically after every item."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path, self.doc = path, doc
        path.parent.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(_json_safe(self.doc), indent=2, default=str, allow_nan=False)
                       + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def _json_safe(x: Any) -> Any:
    """Non-finite floats as null: strict JSON for any reader."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: Any, into: dict[str, Any], key: str = "peak_memory_bytes") -> Iterator[None]:
    """``torch.cuda.max_memory_allocated`` over the block (None on the CPU)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        into[key] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _quiet_logs() -> None:
    """Toolkit INFO records reach our clock handler but are not printed; warnings are."""
    tk = logging.getLogger("toolkit")
    tk.setLevel(logging.INFO)
    tk.propagate = False
    if not any(getattr(h, "_gpu_check", False) for h in tk.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setLevel(logging.WARNING)
        # The measured loop is stopped with its preemption signal on purpose: not news.
        h.addFilter(lambda r: "received; checkpoint saved" not in r.getMessage())
        h._gpu_check = True  # type: ignore[attr-defined]
        tk.addHandler(h)
    logging.getLogger("transformers").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- environment


def environment(device: Any) -> dict[str, Any]:
    import numpy
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "executable": sys.executable,
        "host": platform.node(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__, "numpy": numpy.__version__,
        "device": str(device), "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import toolkit

        env["toolkit"] = toolkit.__version__
    except Exception as e:  # the env block must never stop the check
        env["toolkit"] = f"import failed: {e}"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=10, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, total_memory_bytes=props.total_memory)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
            env["driver"] = out.stdout.split(",")[1].strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            env["nvidia_smi"], env["driver"] = f"unavailable: {e}", None
    else:
        env.update(device_name=platform.processor() or platform.machine(), driver=None)
    return env


def peak_table(device_name: str) -> dict[str, Any]:
    """The dense peaks assumed for this device (TFLOP/s per dtype), with the table key used."""
    for key, peaks in PEAKS:
        if key.lower() in device_name.lower():
            return {"table_key": key, **peaks}
    return {"table_key": None, "bf16": None, "tf32": None, "fp32": None}


def peak_dtype(precision: str) -> str:
    """The table column a run is held against: bf16, or tf32 / fp32 as torch's setting says."""
    import torch

    if precision == "bf16":
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def matmul_rate(device: Any, smoke: bool) -> dict[str, float | None]:
    """Measured TFLOP/s of a square matmul per dtype: the ceiling a model's matmuls approach."""
    import torch

    n = 512 if smoke or device.type != "cuda" else 8192
    out: dict[str, float | None] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and device.type != "cuda":
            out[name] = None
            continue
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        _sync(device)
        reps = 3 if smoke else 10
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        out[name] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
        del a, b
    return out


# --------------------------------------------------------------------------- synthetic data


@functools.cache
def kmer6() -> Any:
    """The toolkit's kmer6 tokenizer (the paper's DNA-6mer run), or None if it will not build."""
    try:
        from toolkit.tokenizers import build_tokenizer

        return build_tokenizer("kmer6", "dna")
    except Exception as e:  # the measurements do not need it: a placeholder hash then
        print(f"[train] no kmer6 tokenizer ({type(e).__name__}: {e}); vocabulary {FALLBACK_VOCAB}")
        return None


def vocab_size() -> int:
    """The synthetic data's vocabulary: kmer6's, special tokens included."""
    tok = kmer6()
    return int(tok.vocab_size) if tok is not None else FALLBACK_VOCAB


def model_facts(shape: str, seq_len: int) -> dict[str, Any]:
    """Parameters and FLOPs per trained token of a toolkit shape (built on the meta device)."""
    import torch
    from transformers import BertForMaskedLM

    from toolkit.config import ModelConfig
    from toolkit.model import bert_config, n_parameters

    cfg = bert_config(ModelConfig(shape=shape), vocab_size(), max_positions=seq_len)  # type: ignore[arg-type]
    with torch.device("meta"):
        model = BertForMaskedLM(cfg)
    n = n_parameters(model)
    layers, d = cfg.num_hidden_layers, cfg.hidden_size
    return {"n_parameters": n, "layers": layers, "hidden": d,
            "flops_per_token": 6 * n + 12 * layers * seq_len * d}


def synthetic_records(n: int, seq_len: int, seed: int = 0) -> list[Any]:
    """Random-token records of seq_len - 2 tokens (plus [CLS]/[SEP]: exactly seq_len, no padding)."""
    import numpy as np

    from toolkit.tokenizers.spec import N_SPECIALS

    rng = np.random.default_rng(seed)
    return list(rng.integers(N_SPECIALS, vocab_size(), size=(n, seq_len - 2), dtype=np.int64))


def bench_study(root: Path, shape: str, precision: str, batch: int, seq_len: int, n_records: int,
                device: str, window: int) -> Any:
    from toolkit.config import study_from_dict

    raw = {"study": {"name": "gpu-check", "seeds": [1], "data_seed": 0, "output_dir": str(root)},
           "corpora": {"c": {"source": "synthetic:markov", "train_records": n_records,
                             "eval_records": 8}},
           "runs": {"r": {"corpus": "c", "tokenizer": "kmer6", "model": {"shape": shape}}},
           "training": {"steps": 100_000, "batch_size": batch, "seq_len": seq_len, "lr": 1e-4,
                        "warmup_ratio": 0.0, "schedule": "constant", "grad_clip": 0.5,
                        "precision": precision, "device": device,
                        "checkpoint_every_steps": 10**9, "checkpoint_every_minutes": 1e9,
                        "eval_every_steps": 10**9, "eval_batches": 1, "log_every_steps": window,
                        "fisher_flow": []}}
    return study_from_dict(raw, where="gpu_check")


def write_token_store(study: Any, records: list[Any]) -> None:
    """The run's token store (schema ``tokens``) holding ``records`` as training data."""
    import numpy as np

    from toolkit import store
    from toolkit.study import Layout, run_tokenizer, write_json_atomic

    n_eval = 8
    eval_records = synthetic_records(n_eval, len(records[0]) + 2, seed=1)
    allrec = [*records, *eval_records]
    lengths = np.array([len(r) for r in allrec], dtype=np.int64)
    layout = Layout(study)
    layout.run_tokens_dir("r").mkdir(parents=True, exist_ok=True)
    # The real kmer6 tokenizer beside the store, as `toolkit prepare` leaves it (training
    # exports it with the model).
    tok = kmer6()
    tokenizer_hash = "0" * 64
    if tok is not None:
        tok.save(layout.run_tokenizer_file("r"))
        tokenizer_hash = tok.hash
    attrs = {"corpus": "c", "source": "synthetic:markov", "kind": "dna", "tokenizer": "kmer6",
             "tokenizer_hash": tokenizer_hash, "vocab_size": vocab_size(),
             "special_tokens": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4},
             "provenance": [], "split": {}, "entropy_profile": {}, "toolkit_version": "gpu-check"}
    with store.writing(layout.run_tokens_store("r"), "tokens", attrs, overwrite=True) as g:
        store.create_array(g, "tokens", "tokens", data=np.concatenate(allrec).astype(np.uint16))
        store.create_array(g, "tokens", "offsets",
                           data=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        store.create_array(g, "tokens", "split",
                           data=np.array([0] * len(records) + [1] * n_eval, dtype=np.uint8))
        store.create_array(g, "tokens", "record_symbols", data=lengths)
    write_json_atomic(layout.prepare_marker(study.runs["r"].corpus, run_tokenizer(study, "r")), {})


# --------------------------------------------------------------------------- training


class Clock:
    """Wall-clock marks (time, step) of a training loop, and when to stop it."""

    def __init__(self, warmup: int, seconds: float, hard_s: float) -> None:
        self.warmup, self.seconds = warmup, seconds
        self.hard_until = time.perf_counter() + hard_s
        self.marks: list[tuple[float, int]] = []
        self.logged_tps: list[float] = []

    def mark(self, step: int) -> bool:
        """Note the clock at ``step``; True once enough has been measured (or the hard cap hit)."""
        now = time.perf_counter()
        self.marks.append((now, step))
        start = self._start()
        return (start is not None and now - start[0] >= self.seconds) or now > self.hard_until

    def _start(self) -> tuple[float, int] | None:
        return next((m for m in self.marks if m[1] >= self.warmup), None)

    def result(self, tokens_per_step: int) -> dict[str, Any]:
        start = self._start()
        if start is None or self.marks[-1][1] <= start[1]:
            raise RuntimeError(f"too few steps measured (marks at steps {[s for _, s in self.marks]}, "
                               f"warm-up {self.warmup}); raise --seconds")
        (t0, s0), (t1, s1) = start, self.marks[-1]
        return {"warmup_steps": s0, "measured_steps": s1 - s0, "measured_seconds": t1 - t0,
                "tokens_per_s": (s1 - s0) * tokens_per_step / (t1 - t0)}


class _ToolkitClock(logging.Handler):
    """Reads the toolkit loop's progress lines; asks it to stop with its preemption signal."""

    STEP = re.compile(r" step (\d+)/\d+ loss ")
    TPS = re.compile(r"(\d+(?:\.\d+)?) tok/s")

    def __init__(self, clock: Clock) -> None:
        super().__init__(logging.INFO)
        self.clock = clock
        self.stop_sent = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        m = self.STEP.search(message)
        if not m:
            return
        tps = self.TPS.search(message)
        if tps:
            self.clock.logged_tps.append(float(tps.group(1)))
        if self.clock.mark(int(m.group(1))) and not self.stop_sent:
            self.stop_sent = True
            # The toolkit's own preemption path: finish this step, checkpoint, exit 75.
            signal.raise_signal(signal.SIGUSR2)


def run_toolkit(root: Path, shape: str, precision: str, batch: int, seq_len: int,
                records: list[Any], device: Any, opts: argparse.Namespace) -> dict[str, Any]:
    """Throughput of :func:`toolkit.train.train_member` (the real loop), time-boxed."""
    from toolkit import train
    from toolkit.study import Layout, Member

    study = bench_study(root, shape, precision, batch, seq_len, len(records), device.type, opts.window)
    write_token_store(study, records)
    clock = Clock(opts.warmup, opts.seconds, hard_s=opts.seconds * 4 + 120)
    handler = _ToolkitClock(clock)
    logger = logging.getLogger("toolkit")
    logger.addHandler(handler)
    # Until the loop installs its own handler, a stray SIGUSR2 must not kill us.
    old = signal.signal(signal.SIGUSR2, lambda *_: None)
    out: dict[str, Any] = {}
    try:
        with peak_memory(device, out):
            try:
                train.train_member(study, Member("r", 1))
            except SystemExit as e:
                if e.code != EXIT_PREEMPTED or not handler.stop_sent:
                    raise  # not our stop: a SIGTERM from outside (the wrapper's timeout) ends the run
                out["stopped_by"] = "SIGUSR2 (toolkit preemption)"
            else:
                out["stopped_by"] = "step budget"
    finally:
        logger.removeHandler(handler)
        signal.signal(signal.SIGUSR2, old)
        shutil.rmtree(Layout(study).member_dir(Member("r", 1)), ignore_errors=True)
    out.update(clock.result(batch * seq_len))
    later = clock.logged_tps[1:] or clock.logged_tps
    out["toolkit_logged_tokens_per_s_median"] = statistics.median(later) if later else None
    return out


def run_hf(root: Path, shape: str, precision: str, batch: int, seq_len: int, records: list[Any],
           device: Any, opts: argparse.Namespace) -> dict[str, Any]:
    """Throughput of ``transformers.Trainer`` on the same model config, data shape and dtype."""
    from tokenizers import Tokenizer, models
    from transformers import (
        DataCollatorForLanguageModeling,
        PreTrainedTokenizerFast,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.trainer_callback import PrinterCallback

    from toolkit.config import ModelConfig
    from toolkit.model import build_model
    from toolkit.sequences import CLS, SEP

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab.update({f"t{i}": i for i in range(5, vocab_size())})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                  pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    data = [{"input_ids": [CLS, *r.tolist(), SEP]} for r in records]  # exactly seq_len each
    collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm=True, mlm_probability=0.15)
    clock = Clock(opts.warmup, opts.seconds, hard_s=opts.seconds * 4 + 120)
    window = opts.window

    class Stop(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.global_step % window == 0:
                _sync(device)
                if clock.mark(state.global_step):
                    control.should_training_stop = True
            return control

    model = build_model(ModelConfig(shape=shape), vocab_size(), seed=1,  # type: ignore[arg-type]
                        max_positions=seq_len)
    args = TrainingArguments(output_dir=str(root / "hf"), max_steps=100_000,
                             per_device_train_batch_size=batch, learning_rate=1e-4,
                             lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.5,
                             weight_decay=0.0, bf16=precision == "bf16", save_strategy="no",
                             logging_strategy="no", report_to=[], use_cpu=device.type != "cuda",
                             seed=0, dataloader_num_workers=0, disable_tqdm=True)
    out: dict[str, Any] = {}
    with peak_memory(device, out):
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                          callbacks=[Stop()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training dict line is noise here
        trainer.train()
    del trainer, model
    out.update(clock.result(batch * seq_len))
    out["stopped_by"] = "callback"
    return out


def train_sweep(report: Report, deadline: Deadline, device: Any, opts: argparse.Namespace,
                peaks: dict[str, Any]) -> None:
    doc = report.doc["train"] = {
        "batch_size": opts.batch, "seq_len": opts.seq_len, "vocab_size": vocab_size(),
        "warmup_steps": opts.warmup, "measure_seconds": opts.seconds, "window_steps": opts.window,
        "flops_formula": FLOPS_FORMULA, "results": {}}
    results = doc["results"]
    for shape in SHAPES:
        results[shape] = {p: {c: skipped("not reached") for c in CONTENDERS} for p in PRECISIONS}
    report.save()
    root = Path(tempfile.mkdtemp(prefix="gpu-check-train-"))
    try:
        records = synthetic_records(opts.records, opts.seq_len)
        for shape in SHAPES:
            facts = model_facts(shape, opts.seq_len)
            for precision in PRECISIONS:
                cell = results[shape][precision]
                for contender in CONTENDERS:
                    cell[contender] = _one_train(root, shape, precision, contender, records, facts,
                                                 device, opts, deadline, peaks)
                    report.save()
                a, b = cell["toolkit"].get("tokens_per_s"), cell["hf_trainer"].get("tokens_per_s")
                cell["ratio_toolkit_over_hf"] = _finite(a / b) if a and b else None
                if cell["ratio_toolkit_over_hf"] is not None:
                    print(f"[train] {shape:9s} {precision:4s} ratio toolkit/HF tokens/s: "
                          f"{cell['ratio_toolkit_over_hf']:.2f}", flush=True)
                report.save()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _one_train(root: Path, shape: str, precision: str, contender: str, records: list[Any],
               facts: dict[str, Any], device: Any, opts: argparse.Namespace, deadline: Deadline,
               peaks: dict[str, Any]) -> dict[str, Any]:
    label = f"[train] {shape:9s} {precision:4s} {contender:10s}"
    if opts.smoke and shape not in opts.smoke_shapes:
        print(f"{label}: SKIPPED (smoke mode)", flush=True)
        return skipped("SKIPPED (smoke mode)")
    if precision == "bf16" and device.type != "cuda":
        print(f"{label}: SKIPPED (bf16 autocast needs CUDA)", flush=True)
        return skipped("SKIPPED (bf16 autocast needs CUDA)")
    # Setup, warm-up and (toolkit) the preemption checkpoint, beyond the measured seconds.
    estimate = opts.seconds + (35 if shape == "bert-base" else 20) * (0.2 if opts.smoke else 1)
    if not deadline.fits(estimate + opts.reserve):
        print(f"{label}: {BUDGET_SKIP}", flush=True)
        return skipped(BUDGET_SKIP)
    fn = run_toolkit if contender == "toolkit" else run_hf
    t0 = time.perf_counter()
    try:
        out = fn(root / f"{shape}-{precision}-{contender}", shape, precision, opts.batch,
                 opts.seq_len, records, device, opts)
    except Exception as e:
        print(f"{label}: ERROR {type(e).__name__}: {e}", flush=True)
        return {"status": "error", "reason": f"{type(e).__name__}: {e}"[:2000],
                "wall_seconds": time.perf_counter() - t0}
    finally:
        gc.collect()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
    column = peak_dtype(precision)
    peak = peaks.get(column)
    mfu = facts["flops_per_token"] * out["tokens_per_s"] / (peak * 1e12) if peak else None
    out.update(status="ok", wall_seconds=time.perf_counter() - t0, **facts, peak_dtype=column,
               peak_tflops=peak, mfu=mfu, model_tflops=facts["flops_per_token"] * out["tokens_per_s"] / 1e12)
    mfu_s = f"MFU {100 * mfu:5.1f}% of {peak:g} TFLOP/s {column}" if mfu is not None else "MFU n/a (no peak)"
    print(f"{label}: {out['tokens_per_s']:12,.0f} tok/s  {out['model_tflops']:7.2f} TFLOP/s  {mfu_s}  "
          f"peak mem {_gib(out['peak_memory_bytes'])}  ({out['measured_steps']} steps in "
          f"{out['measured_seconds']:.1f} s after {out['warmup_steps']} warm-up; {out['wall_seconds']:.0f} s "
          "wall)", flush=True)
    return out


# --------------------------------------------------------------------------- Fisher


def fisher_check(report: Report, deadline: Deadline, device: Any, opts: argparse.Namespace) -> None:
    import torch

    from benchmarks.bench_fisher import baselines
    from toolkit.config import ModelConfig
    from toolkit.fisher import fisher_diagonal, fisher_traces
    from toolkit.model import build_model

    shape = opts.fisher_shape
    doc: dict[str, Any] = {"shape": shape, "batch": opts.fisher_batch, "seq_len": opts.seq_len,
                           "estimator": "per-example", "precision": "fp32 (eval mode, no dropout)"}
    report.doc["fisher"] = doc
    estimate = opts.seconds * 2 + (40 if not opts.smoke else 5)
    if not deadline.fits(estimate + opts.reserve):
        print(f"[fisher] {shape}: {BUDGET_SKIP}", flush=True)
        doc.update(skipped(BUDGET_SKIP))
        report.save()
        return
    t_start = time.perf_counter()
    try:
        model = build_model(ModelConfig(shape=shape), vocab_size(), seed=0,
                            max_positions=opts.seq_len).to(device).eval()
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(5, vocab_size(), (opts.fisher_batch, opts.seq_len), generator=gen)  # (B, T)
        chosen = torch.rand(ids.shape, generator=gen) < 0.15
        batch = {"input_ids": torch.where(chosen, torch.full_like(ids, 4), ids),
                 "attention_mask": torch.ones_like(ids),
                 "labels": torch.where(chosen, ids, torch.full_like(ids, -100))}
        batch = {k: v.to(device) for k, v in batch.items()}
        cases: dict[str, Callable[[], Any]] = {
            **baselines(model, batch),
            "per_example": functools.partial(fisher_traces, model, [batch]),
            "per_example_diagonal": functools.partial(fisher_diagonal, model, [batch]),
        }
        memory: dict[str, Any] = {}
        for name, fn in cases.items():  # warm-up, and each case's peak memory alone
            with peak_memory(device, memory, name):
                fn()
                _sync(device)
        times: dict[str, list[float]] = {k: [] for k in cases}
        t0 = time.perf_counter()
        while len(times["fair"]) < opts.fisher_reps_max and (
                len(times["fair"]) < 2 or time.perf_counter() - t0 < opts.seconds):
            for name, fn in cases.items():
                _sync(device)
                s = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - s)
        del model, batch, cases
    except Exception as e:
        print(f"[fisher] {shape}: ERROR {type(e).__name__}: {e}", flush=True)
        doc.update(status="error", reason=f"{type(e).__name__}: {e}"[:2000])
        report.save()
        return
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def paired(key: str, base: str) -> float:
        return statistics.median(t / b for t, b in zip(times[key], times[base], strict=True))

    doc.update(status="ok", reps=len(times["fair"]), wall_seconds=time.perf_counter() - t_start,
               median_seconds={k: statistics.median(v) for k, v in times.items()},
               ratios={f"{k}_over_{b}": paired(k, b) for k in ("per_example", "per_example_diagonal")
                       for b in ("fair", "hf")},
               peak_memory_bytes=memory,
               baselines={"fair": "toolkit training step without the optimiser: masked-position "
                                  "head + cross entropy + backward",
                          "hf": "model(**batch).loss.backward(), HF's full (B, T, V) head"})
    med, r = doc["median_seconds"], doc["ratios"]
    print(f"[fisher] {shape} B={opts.fisher_batch} T={opts.seq_len}, {doc['reps']} interleaved reps; "
          f"median seconds: fair {med['fair']:.4f}, hf {med['hf']:.4f}, per-example traces "
          f"{med['per_example']:.4f}, per-example diagonal {med['per_example_diagonal']:.4f}", flush=True)
    print(f"[fisher] ratio per-example Fisher / plain forward+backward (fair): {r['per_example_over_fair']:.2f} "
          f"(diagonal {r['per_example_diagonal_over_fair']:.2f}); vs hf full head: "
          f"{r['per_example_over_hf']:.2f} (diagonal {r['per_example_diagonal_over_hf']:.2f})", flush=True)
    print("[fisher] peak memory: " + ", ".join(f"{k} {_gib(v)}" for k, v in memory.items()), flush=True)
    report.save()


# --------------------------------------------------------------------------- study end to end


def study_check(report: Report, deadline: Deadline, device: Any, opts: argparse.Namespace) -> None:
    doc: dict[str, Any] = {"expected_device": device.type}
    report.doc["study"] = doc
    need = opts.study_timeout * (0.5 if not opts.smoke else 1.0)
    if not deadline.fits(need + opts.reserve):
        print(f"[study] tiny study end to end: {BUDGET_SKIP}", flush=True)
        doc.update(skipped(BUDGET_SKIP))
        report.save()
        return
    root = Path(tempfile.mkdtemp(prefix="gpu-check-study-"))
    study_file = root / "study.toml"
    # On a GPU the study asks for "auto": the check is that auto picks cuda.
    study_file.write_text(STUDY_TOML.format(out=root / "out", steps=12,
                                            device="auto" if device.type == "cuda" else device.type),
                          encoding="utf-8")
    timeout = max(10.0, min(opts.study_timeout, deadline.left() - opts.reserve))
    cmd = [sys.executable, "-m", "toolkit", "run", str(study_file), "--executor", "local"]
    doc.update(command=" ".join(cmd), timeout_seconds=timeout)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=os.environ.copy())
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the units it started
        output, _ = proc.communicate()
        doc["timed_out"] = True
    wall = time.perf_counter() - t0
    doc.update(returncode=proc.returncode, wall_seconds=wall, log_tail=output[-3000:])
    try:
        doc.update(_study_outcome(study_file, device.type))
    except Exception as e:
        doc.update(status="error", reason=f"reading the study's outputs: {type(e).__name__}: {e}")
    if proc.returncode != 0 and doc.get("status") == "ok":
        doc.update(status="error", reason=f"toolkit run exited {proc.returncode}")
    shutil.rmtree(root, ignore_errors=True)
    print(f"[study] tiny study end to end (local executor): {doc['status'].upper()} in {wall:.1f} s; "
          f"devices {doc.get('devices')} (expected {device.type})"
          + (f"; {doc['reason']}" if doc.get("reason") else ""), flush=True)
    if doc["status"] != "ok":
        print("[study] log tail:\n" + output[-3000:], flush=True)
    report.save()


def _study_outcome(study_file: Path, expected: str) -> dict[str, Any]:
    """Every member's train and evaluate device, and whether the whole study completed."""
    from toolkit import store
    from toolkit.config import load_study
    from toolkit.study import Layout, members

    study = load_study(study_file)
    layout = Layout(study)
    devices: dict[str, Any] = {}
    problems = []
    for member in members(study):
        ev = layout.evaluate_marker(member)
        tr = layout.member_store(member, "train")
        if not layout.train_marker(member).is_file() or not tr.exists():
            problems.append(f"{member.id}: not trained")
            continue
        devices[f"{member.id} train"] = store.open_store(tr, "train", verify="size").attrs.get("device")
        if not ev.is_file():
            problems.append(f"{member.id}: not evaluated")
            continue
        devices[f"{member.id} evaluate"] = json.loads(ev.read_text(encoding="utf-8")).get("device")
    if not layout.analyse_marker.is_file():
        problems.append("analyse marker missing")
    wrong = {k: v for k, v in devices.items() if v != expected}
    if wrong:
        problems.append(f"ran on {wrong}, expected {expected}")
    out: dict[str, Any] = {"devices": devices, "status": "ok" if not problems else "failed"}
    if problems:
        out["reason"] = "; ".join(problems)
    return out


# --------------------------------------------------------------------------- wheels


def download_wheels(dest: Path) -> int:
    """Fetch (here, where pip reaches an index) the wheels the device image lacks, same versions."""
    from importlib.metadata import version

    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [x for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64", "manylinux1_x86_64") for x in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *pins]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="seconds-long CPU-sized run (CI)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default $OUT/gpu_check.json if OUT is set, else studies/gpu_check.json)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--budget", type=float, default=None,
                   help="global deadline in seconds (default 420; smoke 300, for a loaded CI machine)")
    p.add_argument("--seconds", type=float, default=None,
                   help="measured seconds per training run after warm-up (default 8; smoke 0.5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10; smoke 2)")
    p.add_argument("--window", type=int, default=None, help="steps between clock marks (default 5; smoke 1)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 64, the paper's; smoke 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; smoke 32)")
    p.add_argument("--fisher-batch", type=int, default=None, help="Fisher batch (default 32; smoke 4)")
    p.add_argument("--study-timeout", type=float, default=None, help="seconds (default 150; smoke 200)")
    p.add_argument("--skip", action="append", default=[], choices=["train", "fisher", "study", "matmul"])
    p.add_argument("--download-wheels", type=Path, metavar="DIR", default=None,
                   help="only fetch the wheels the device machine lacks into DIR, then exit")
    o = p.parse_args(argv)
    smoke = o.smoke
    for name, gpu, cpu in (("budget", 420.0, 300.0), ("seconds", 8.0, 0.5), ("warmup", 10, 2),
                           ("window", 5, 1), ("batch", 64, 4), ("seq_len", 512, 32),
                           ("fisher_batch", 32, 4), ("study_timeout", 150.0, 200.0)):
        if getattr(o, name) is None:
            setattr(o, name, cpu if smoke else gpu)
    o.smoke_shapes = ("tiny",)
    o.fisher_shape = "tiny" if smoke else "bert-base"
    o.fisher_reps_max = 3 if smoke else 20
    o.records = max(256, o.batch * 16)  # 16 steps per epoch
    o.reserve = 2.0 if smoke else 10.0  # kept back for writing the report
    if o.out is None:
        o.out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path(
            "studies/gpu_check.json")
    return o


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.download_wheels is not None:
        return download_wheels(opts.download_wheels)
    deadline = Deadline(opts.budget)
    import torch

    from toolkit.model import pick_device

    if opts.smoke and opts.device == "cpu":
        torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is fastest
    device = pick_device(opts.device)
    _quiet_logs()
    env = environment(device)
    peaks = peak_table(env.get("device_name") or "") if device.type == "cuda" else {
        "table_key": None, "bf16": None, "tf32": None, "fp32": None}
    doc: dict[str, Any] = {"schema": "gpu_check/1", "mode": "smoke" if opts.smoke else "full",
                           "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           "budget_seconds": opts.budget, "env": env, "peak_tflops": peaks,
                           "skipped_for_budget": []}
    report = Report(opts.out, doc)
    print(f"[env] torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}), transformers "
          f"{env['transformers']}, python {env['python']}, toolkit {env.get('toolkit')}", flush=True)
    print(f"[env] device {device}: {env.get('device_name')}; driver {env.get('driver')}; "
          f"float32 matmul precision {env['float32_matmul_precision']}", flush=True)
    print(f"[env] assumed dense peak TFLOP/s (table key {peaks['table_key']!r}): bf16 {peaks['bf16']}, "
          f"tf32 {peaks['tf32']}, fp32 {peaks['fp32']}", flush=True)
    print(f"[env] {FLOPS_FORMULA}", flush=True)
    if "matmul" not in opts.skip:
        env["matmul_tflops_measured"] = rates = matmul_rate(device, opts.smoke)
        print("[env] measured square-matmul TFLOP/s: " + ", ".join(
            f"{k} {v:.1f}" if v is not None else f"{k} n/a" for k, v in rates.items()), flush=True)
    report.save()
    # The study first: it is the readiness gate (does the toolkit run on this GPU at all) and
    # the item whose duration is least known; then the Fisher; then the training sweep,
    # bert-base first, so that what a short budget drops is the small shapes.
    items: tuple[tuple[str, Callable[[], None]], ...] = (
        ("study", lambda: study_check(report, deadline, device, opts)),
        ("fisher", lambda: fisher_check(report, deadline, device, opts)),
        ("train", lambda: train_sweep(report, deadline, device, opts, peaks)))
    for name, run in items:
        if name in opts.skip:
            doc[name] = skipped("--skip")
            continue
        try:
            run()
        except Exception as e:  # one broken item must not cost the others
            print(f"[{name}] ERROR {type(e).__name__}: {e}", flush=True)
            doc[name] = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:2000]}
        report.save()
    doc["skipped_for_budget"] = _budget_skips(doc)
    doc["calibration"] = _calibration(doc, device)
    doc["wall_seconds"] = deadline.elapsed()
    report.save()
    _summary(doc)
    print(f"[done] {deadline.elapsed():.0f} s of a {opts.budget:.0f} s budget; JSON: {opts.out}", flush=True)
    return 0


def _calibration(doc: dict[str, Any], device: Any) -> dict[str, Any]:
    """What ``toolkit plan --calibration`` reads: the toolkit loop's effective FLOP/s per precision.

    Counted with the plan's own FLOP model (:func:`toolkit.plan.flops_per_token`: the MLM
    head on masked positions only), from the largest shape measured, so that the plan
    divides the same FLOPs by a measured rate.
    """
    from toolkit.model import SHAPES as MODEL_SHAPES
    from toolkit.plan import flops_per_token

    train = doc.get("train", {})
    kind = "cuda" if getattr(device, "type", str(device)) == "cuda" else "cpu"
    flops: dict[str, float] = {}
    source: dict[str, str] = {}
    for precision in PRECISIONS:
        for shape in SHAPES:  # largest first
            cell = train.get("results", {}).get(shape, {}).get(precision, {}).get("toolkit", {})
            if cell.get("status") == "ok" and cell.get("tokens_per_s"):
                per_token = flops_per_token(MODEL_SHAPES[shape], train["vocab_size"], train["seq_len"],
                                            0.15, train=True)
                rate = per_token * cell["tokens_per_s"]
                flops[precision] = rate / (doc["env"].get("torch_threads") or 1) if kind == "cpu" else rate
                source[precision] = f"{shape}, batch {train['batch_size']} x {train['seq_len']}"
                break
    if not flops:
        return {}
    entry: dict[str, Any] = {"name": doc["env"].get("device_name") or doc["env"].get("device"),
                             "flops": flops, "measured_on": source}
    if kind == "cuda":
        import torch

        entry["memory_bytes"] = int(torch.cuda.get_device_properties(0).total_memory)
    return {kind: entry}


def _budget_skips(doc: dict[str, Any]) -> list[str]:
    out = []
    for shape, by_p in doc.get("train", {}).get("results", {}).items():
        for precision, cell in by_p.items():
            out += [f"train/{shape}/{precision}/{c}" for c in CONTENDERS
                    if cell[c].get("reason") == BUDGET_SKIP]
    out += [k for k in ("fisher", "study") if doc.get(k, {}).get("reason") == BUDGET_SKIP]
    return out


def _summary(doc: dict[str, Any]) -> None:
    print("[summary] training tokens/s (MFU) and toolkit/HF ratio:", flush=True)
    for shape, by_p in doc.get("train", {}).get("results", {}).items():
        for precision, cell in by_p.items():
            parts = []
            for c in CONTENDERS:
                r = cell[c]
                if r.get("status") == "ok":
                    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
                    parts.append(f"{c} {r['tokens_per_s']:,.0f} ({mfu})")
                else:
                    parts.append(f"{c} {r.get('reason') or r.get('status')}")
            ratio = cell.get("ratio_toolkit_over_hf")
            print(f"[summary]   {shape:9s} {precision:4s} " + "; ".join(parts)
                  + (f"; ratio {ratio:.2f}" if ratio is not None else ""), flush=True)
    f = doc.get("fisher", {})
    if f.get("status") == "ok":
        print(f"[summary] Fisher per-example / fair forward+backward ({f['shape']}): "
              f"{f['ratios']['per_example_over_fair']:.2f}", flush=True)
    s = doc.get("study", {})
    print(f"[summary] tiny study: {s.get('status')} ({s.get('wall_seconds', 0):.1f} s, devices "
          f"{sorted(set((s.get('devices') or {}).values()))})", flush=True)
    if doc["skipped_for_budget"]:
        print(f"[summary] SKIPPED (time budget): {', '.join(doc['skipped_for_budget'])}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
