"""Training throughput: this toolkit's loop versus HuggingFace ``Trainer``, on CPU.

Same data (a Markov token store, records longer than the sequence length, as with the
paper's DNA pieces), same ``tiny`` model config and initialisation, same batch, same
number of optimizer steps, same optimiser and schedule. Three contenders, interleaved
round by round because this machine's speed swings:

- ``toolkit``: :func:`toolkit.train.train_member` (masked-only MLM head);
- ``toolkit-fullhead``: the same loop with the head applied to every position,
  ``model(...).logits[positions]`` (what the masked-only head saves);
- ``hf-trainer``: ``transformers.Trainer`` with ``DataCollatorForLanguageModeling``.

Throughput is non-padding tokens per second of wall time around the whole training
call (data, masking, optimiser, the toolkit's final writes included; evaluation and
periodic checkpoints switched off for all). Prints medians and ratios; never asserts.
Run: ``python -m benchmarks train`` (threads: ``BENCH_THREADS``, default 1, because
oversubscribed threads on a shared machine swamp the measurement).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 4096
SEQ_LEN = 128
BATCH = 16
STEPS = 40
ROUNDS = 3
N_TRAIN = 1500


def _study(root: Path) -> Any:
    from toolkit.config import study_from_dict

    raw = {"study": {"name": "bench", "seeds": [1], "data_seed": 0, "output_dir": str(root)},
           "corpora": {"c": {"source": "synthetic:markov", "train_records": N_TRAIN, "eval_records": 10}},
           "runs": {"r": {"corpus": "c", "tokenizer": "kmer6", "model": {"shape": "tiny"}}},
           "training": {"steps": STEPS, "batch_size": BATCH, "seq_len": SEQ_LEN, "lr": 1e-3,
                        "checkpoint_every_steps": 10**9, "checkpoint_every_minutes": 1e9,
                        "eval_every_steps": 10**9, "eval_batches": 1, "log_every_steps": 10**9,
                        "fisher_flow": [], "device": "cpu"}}
    return study_from_dict(raw, where="bench")


def _write_tokens(study: Any) -> list[np.ndarray]:
    """A token store of order-1 Markov records of 150-400 tokens; returns the train records."""
    from toolkit import store
    from toolkit.study import Layout, run_tokenizer, write_json_atomic

    rng = np.random.default_rng(0)
    n = VOCAB - 5
    succ = rng.integers(0, n, size=(n, 8))
    lengths = rng.integers(150, 400, size=N_TRAIN + 10)
    records = []
    for length in lengths:
        choice = rng.integers(8, size=length)
        tok = np.empty(length, dtype=np.int64)
        tok[0] = rng.integers(n)
        for i in range(1, length):
            tok[i] = succ[tok[i - 1], choice[i]]
        records.append(tok + 5)
    layout = Layout(study)
    attrs = {"corpus": "c", "source": "synthetic:markov", "kind": "dna", "tokenizer": "kmer6",
             "tokenizer_hash": "0" * 64, "vocab_size": VOCAB,
             "special_tokens": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4},
             "provenance": [], "split": {}, "entropy_profile": {}, "toolkit_version": "bench"}
    with store.writing(layout.run_tokens_store("r"), "tokens", attrs, overwrite=True) as g:
        store.create_array(g, "tokens", "tokens", data=np.concatenate(records).astype(np.uint16))
        store.create_array(g, "tokens", "offsets",
                           data=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        store.create_array(g, "tokens", "split",
                           data=np.array([0] * N_TRAIN + [1] * 10, dtype=np.uint8))
        store.create_array(g, "tokens", "record_symbols", data=lengths.astype(np.int64))
    write_json_atomic(layout.prepare_marker(study.runs["r"].corpus, run_tokenizer(study, "r")), {})
    return records[:N_TRAIN]


def _run_toolkit(study: Any, full_head: bool) -> tuple[float, int]:
    from toolkit import train
    from toolkit.study import Layout, Member

    member = Member("r", 1)
    shutil.rmtree(Layout(study).member_dir(member), ignore_errors=True)
    real = train.masked_logits
    if full_head:
        def full(model: Any, ids: Any, att: Any, sel: Any) -> Any:
            return model(input_ids=ids, attention_mask=att).logits[sel]  # (B, T, V) -> (M, V)
        train.masked_logits = full
    try:
        t0 = time.perf_counter()
        train.train_member(study, member)
        wall = time.perf_counter() - t0
    finally:
        train.masked_logits = real
    marker = json.loads(Layout(study).train_marker(member).read_text())
    return wall, marker["tokens_seen"]


def _hf_setup(study: Any, records: list[np.ndarray]) -> tuple[Any, Any]:
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    from toolkit.sequences import CLS, SEP

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab.update({f"t{i}": i for i in range(5, VOCAB)})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                  pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    # The same sequences as the toolkit's truncate mode: [CLS] first seq_len-2 tokens [SEP].
    data = [{"input_ids": [CLS, *r[:SEQ_LEN - 2].tolist(), SEP]} for r in records]
    if any(len(d["input_ids"]) != SEQ_LEN for d in data):
        raise ValueError("benchmark records must fill the sequence length")
    collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm=True, mlm_probability=0.15)
    return data, collator


def _run_trainer(study: Any, data: list[dict], collator: Any, out: Path) -> tuple[float, int]:
    from transformers import Trainer, TrainingArguments

    from toolkit.model import build_model

    t = study.training
    model = build_model(study.runs["r"].model, VOCAB, seed=1, max_positions=SEQ_LEN)
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             learning_rate=t.lr, lr_scheduler_type="cosine",
                             warmup_steps=t.warmup_ratio,  # a fraction below 1 is a ratio (v5)
                             max_grad_norm=t.grad_clip, weight_decay=0.0, save_strategy="no",
                             logging_strategy="no", report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    # Every record fills the sequence (checked in _hf_setup): no padding in any batch.
    return wall, STEPS * BATCH * SEQ_LEN


def main() -> None:
    import torch

    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    logging.getLogger("toolkit").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        study = _study(root / "study")
        records = _write_tokens(study)
        data, collator = _hf_setup(study, records)
        print(f"tiny BERT, V={VOCAB}, seq_len {SEQ_LEN}, batch {BATCH}, {STEPS} steps, "
              f"{threads} thread(s), {ROUNDS} interleaved rounds", flush=True)
        rates: dict[str, list[float]] = {"toolkit": [], "toolkit-fullhead": [], "hf-trainer": []}
        if importlib.util.find_spec("accelerate") is None:
            print("hf-trainer skipped: transformers.Trainer needs `pip install accelerate`", flush=True)
            del rates["hf-trainer"]
        for r in range(ROUNDS):
            for name in rates:
                if name == "hf-trainer":
                    wall, tokens = _run_trainer(study, data, collator, root / "hf")
                else:
                    wall, tokens = _run_toolkit(study, full_head=name == "toolkit-fullhead")
                rates[name].append(tokens / wall)
                print(f"  round {r + 1} {name:17s} {tokens / wall:9.0f} tok/s ({wall:.2f} s)", flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        for name, value in med.items():
            print(f"median {name:17s} {value:9.0f} non-padding tok/s")
        if "hf-trainer" in med:
            print(f"ratio toolkit / hf-trainer            {med['toolkit'] / med['hf-trainer']:.2f} "
                  "(target >= 1.0)")
        print(f"ratio masked-only head / full head    {med['toolkit'] / med['toolkit-fullhead']:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
