"""Shared fixtures, and the helpers that more than one test module uses (test modules import
them from here, never from each other). Real components only: real files, real Zarr stores,
real tiny models. Heavy imports (torch, the toolkit) stay inside the helpers."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch

    from toolkit.config import StudyConfig
    from toolkit.study import Layout, Member

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the tiny study


def study_doc(name: str, out: str | Path | None = None, *, seeds: tuple[int, ...] | list[int] = (1, 2),
              runs: dict[str, str] | None = None, adopted: bool = False, corpus: dict | None = None,
              model: dict | None = None, training: dict | None = None, analysis: dict | None = None,
              dispatch: dict | None = None) -> dict[str, Any]:
    """The tiny study as a document (what its TOML file parses to): a Markov corpus
    ``markov``, tiny members, the debug executor; about 15 s end to end on 2 cores.

    ``out`` is ``study.output_dir`` (none when ``None``); ``runs`` maps run names to their
    tokenizers on ``markov`` (default ``{"r": "kmer3"}``). ``adopted``: the members adopt
    published checkpoints (``runs.*.checkpoints``, added by the caller), so there is no
    ``[model]`` and ``[training]`` only sets ``batch_size`` and ``seq_len``. ``corpus``,
    ``model``, ``training``, ``analysis`` and ``dispatch`` update those tables (nested
    tables are merged; a key set to ``None`` is dropped).
    """
    study: dict[str, Any] = {"name": name, "seeds": list(seeds)}
    if out is not None:
        study["output_dir"] = str(out)
    doc: dict[str, Any] = {
        "study": study,
        "corpora": {"markov": {"source": "synthetic:markov", "train_records": 48, "eval_records": 16,
                               "synthetic": {"alphabet": "ACGT", "order": 2, "entropy_rate": 1.2,
                                             "records": 64, "length": 300}}},
        "runs": {run: {"corpus": "markov", "tokenizer": tok}
                 for run, tok in ({"r": "kmer3"} if runs is None else runs).items()},
        "model": {"shape": "tiny"},
        "training": {"steps": 12, "batch_size": 8, "seq_len": 64, "checkpoint_every_steps": 6,
                     "eval_every_steps": 6, "eval_batches": 1, "log_every_steps": 2, "fisher_flow": [0.5]},
        "analysis": {"eval_records": 16, "batch_size": 8, "fisher_records": 8, "contextual_records": 8,
                     "bootstrap": 10, "top_p": [0.5, 1.0], "topk": [1, 3]},
        "dispatch": {"executor": "debug"},
    }
    if adopted:
        del doc["model"]
        doc["training"] = {k: doc["training"][k] for k in ("batch_size", "seq_len")}
    for table, updates in (("model", model), ("training", training), ("analysis", analysis),
                           ("dispatch", dispatch)):
        _merge(doc.setdefault(table, {}), updates)
    _merge(doc["corpora"]["markov"], corpus)
    return {k: v for k, v in doc.items() if v}


def study_toml(name: str, out: str | Path | None = None, **settings: Any) -> str:
    """:func:`study_doc` as TOML text (same arguments)."""
    return toml_text(study_doc(name, out, **settings))


def _merge(base: dict, updates: dict | None) -> dict:
    for key, value in (updates or {}).items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def toml_text(doc: dict[str, Any]) -> str:
    """A study document as TOML: one ``[table]`` per table, and a table of plain values
    inside a table that also has plain values inline (``synthetic = { ... }``)."""
    blocks: list[str] = []

    def table(path: list[str], d: dict[str, Any]) -> None:
        plain = {k: v for k, v in d.items() if not isinstance(v, dict)}
        inline = {k: v for k, v in d.items() if isinstance(v, dict) and plain
                  and not any(isinstance(x, dict) for x in v.values())}
        if path and (plain or inline):
            blocks.append("\n".join([f"[{'.'.join(map(_toml_key, path))}]",
                                      *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in {**plain, **inline}.items())]))
        for k, v in d.items():
            if isinstance(v, dict) and k not in inline:
                table([*path, k], v)

    table([], doc)
    return "\n\n".join(blocks) + "\n"


TINY_STUDY = (study_toml("{name}", "{out}").replace("{", "{{").replace("}", "}}")
              .replace("{{name}}", "{name}").replace("{{out}}", "{out}"))
"""The tiny study (:func:`study_doc`) as a template: ``TINY_STUDY.format(name=..., out=...)``."""


def tiny_doc(root: Path, seeds: int = 3, **dispatch: object) -> dict[str, Any]:
    """A study with two synthetic corpora, two runs and ``seeds`` members per run (no files
    needed, nothing run: the dispatcher's tests), ``dispatch`` its [dispatch] table."""
    return {
        "study": {"name": "tiny", "seeds": list(range(1, seeds + 1)), "output_dir": str(root)},
        "corpora": {
            "m1": {"source": "synthetic:markov", "train_records": 40, "eval_records": 8,
                   "synthetic": {"records": 48, "length": 200, "order": 1, "entropy_rate": 1.5}},
            "m2": {"source": "synthetic:markov", "train_records": 40, "eval_records": 8,
                   "synthetic": {"records": 48, "length": 200, "order": 2, "entropy_rate": 1.0, "seed": 3}},
        },
        "runs": {"r1": {"corpus": "m1", "tokenizer": "kmer3"}, "r2": {"corpus": "m2", "tokenizer": "kmer3"}},
        "dispatch": dict(dispatch),
    }


def tiny_study(root: Path, seeds: int = 3, **dispatch: object):  # type: ignore[no-untyped-def]
    """:func:`tiny_doc` as a StudyConfig."""
    from toolkit.config import study_from_dict

    return study_from_dict(tiny_doc(root, seeds, **dispatch), where="test")


# --------------------------------------------------------------------------- training


def make_train_study(root: Path, *, vocab: int = 64, checkpoints: list[str] | None = None,
               **training: object) -> StudyConfig:
    """A one-run (``r``), two-seed study with a tiny model, and its token store under ``root``
    (:func:`write_token_store`): what training is tested on, no prepare stage needed."""
    from toolkit.config import study_from_dict

    train_cfg = {"steps": 12, "batch_size": 8, "seq_len": 32, "lr": 3e-3, "warmup_ratio": 0.1,
                 "checkpoint_every_steps": 4, "eval_every_steps": 4, "eval_batches": 2,
                 "log_every_steps": 2, "fisher_flow": [0.25, 0.5, 0.75], **training}
    run = {"corpus": "c", "tokenizer": "kmer2",
           "model": {"shape": "tiny", "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 64}}
    if checkpoints:
        run["checkpoints"] = checkpoints
    raw = {"study": {"name": "t", "seeds": [1, 2], "data_seed": 7, "output_dir": str(root)},
           "corpora": {"c": {"source": "synthetic:markov", "train_records": 150, "eval_records": 30}},
           "runs": {"r": run}, "training": train_cfg}
    study = study_from_dict(raw, where="test")
    write_token_store(study, vocab)
    return study


def write_token_store(study: StudyConfig, vocab: int, n_train: int = 150, n_eval: int = 30,
                      seed: int = 0) -> Path:
    """A real tokens.zarr (schema storage_schemas/tokens.json) of first-order Markov records."""
    import numpy as np

    from toolkit import store
    from toolkit.study import Layout
    from toolkit.tokenizers import build_tokenizer
    from toolkit.units import get_unit, mark_complete, unit_inputs, unit_states

    rng = np.random.default_rng(seed)
    n = vocab - 5
    # Sparse transitions: each token is followed by one of 3 successors, so the data is learnable.
    succ = rng.integers(0, n, size=(n, 3))
    lengths = rng.integers(10, 60, size=n_train + n_eval)
    records = []
    for length in lengths:
        tok = [int(rng.integers(n))]
        for _ in range(length - 1):
            tok.append(int(succ[tok[-1], rng.integers(3)]))
        records.append(np.array(tok) + 5)
    tokens = np.concatenate(records).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    split = np.array([0] * n_train + [1] * n_eval, dtype=np.uint8)
    folder = Layout(study).run_tokens_dir("r")
    # A real tokenizer of exactly `vocab` ids (a character vocabulary): exported models carry it.
    tok = build_tokenizer("char", "text", ["".join(chr(0x4E00 + i) for i in range(vocab - 5))])
    assert tok.vocab_size == vocab
    attrs = {"corpus": "c", "source": "synthetic:markov", "kind": "dna", "tokenizer": "kmer2",
             "tokenizer_hash": tok.hash, "vocab_size": vocab,
             "special_tokens": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4},
             "provenance": [], "split": {"method": "sequential", "seed": 0,
                                         "train_records": n_train, "eval_records": n_eval},
             "entropy_profile": {}, "toolkit_version": "test"}
    with store.writing(folder / "tokens.zarr", "tokens", attrs, overwrite=True) as g:
        store.create_array(g, "tokens", "tokens", data=tokens)
        store.create_array(g, "tokens", "offsets", data=offsets)
        store.create_array(g, "tokens", "split", data=split)
        store.create_array(g, "tokens", "record_symbols", data=lengths.astype(np.int64) * 2)
    # A tokenizer file, the evaluation masks and the prepare unit's real marker, so the unit
    # model sees the prepare unit done and `toolkit train` runs on this store.
    tok.save(folder / "tokenizer.json")
    from toolkit.masks import write_masks

    write_masks(study, "c", "kmer2")
    unit = get_unit(study, "prepare", "c--kmer2")
    unit.marker.unlink(missing_ok=True)
    mark_complete(study, unit, unit_inputs(study, unit, unit_states(study)), {"tokens": int(tokens.size)})
    return folder



# --------------------------------------------------------------------------- Fisher information

BERT_VOCAB = 50
"""The vocabulary of :func:`tiny_bert`; ids 0-4 are the specials ([PAD] = 0)."""
BERT_MASK = 4
"""The [MASK] id of :func:`masked_batches`."""
IGNORE = -100
"""The label of a position that is not predicted."""


def tiny_bert(*, layers: int = 2, hidden: int = 32, tied: bool = True, seed: int = 0) -> Any:
    """A random float64 BertForMaskedLM of :data:`BERT_VOCAB` ids, biases random too."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=BERT_VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=32, tie_word_embeddings=tied)
    model = BertForMaskedLM(config).double()
    with torch.no_grad():  # HF zero-initialises biases: randomise so none is trivially exact
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


def masked_batches(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Two masked-LM batches for :func:`tiny_bert`: padding, one sequence with nothing
    masked, token types in the first, explicit position ids in the second."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for n_seq, length, types in ((6, 16, True), (5, 12, False)):
        ids = torch.randint(5, BERT_VOCAB, (n_seq, length), generator=gen)  # (B, T)
        attention = torch.ones_like(ids)
        attention[1, length - 5:] = 0  # padded tail
        attention[3, length - 2:] = 0
        chosen = (torch.rand(n_seq, length, generator=gen) < 0.15) & attention.bool()
        chosen[:, 1] = True  # every sequence has a masked token ...
        chosen[2] = False  # ... but this one: skipped, not counted
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
        inputs = torch.where(chosen, torch.full_like(ids, BERT_MASK), ids)  # MASK repeats: shared rows
        inputs = torch.where(attention.bool(), inputs, torch.zeros_like(ids))  # PAD = 0
        inputs[4, 3] = 0  # an attended PAD: nn.Embedding still gives its row no gradient
        batch = {"input_ids": inputs, "attention_mask": attention, "labels": labels}
        if types:
            batch["token_type_ids"] = torch.randint(0, 2, (n_seq, length), generator=gen)
        else:  # explicit positions, shifted per sequence
            shift = torch.randint(0, 4, (n_seq, 1), generator=gen)
            batch["position_ids"] = torch.arange(length).expand(n_seq, length) + shift
        batches.append(batch)
    return batches


def per_example_grads(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """One backward per sequence with a masked token (the definition, no tricks)."""
    import torch

    model.eval()
    named = list(model.named_parameters())
    grads = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            row = {k: v[i:i + 1] for k, v in batch.items()}
            if not bool((row["labels"] != IGNORE).any()):
                continue
            loss = model(**row).loss  # HF: mean cross-entropy over the masked tokens
            g = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            grads.append({n: torch.zeros_like(p) if gi is None else gi
                          for (n, p), gi in zip(named, g, strict=True)})
    return grads


def naive_per_example(model: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The per-example estimator by its definition: the mean of squared per-sequence gradients."""
    import torch

    grads = per_example_grads(model, batches)
    return {n: torch.stack([g[n] ** 2 for g in grads]).mean(0) for n in grads[0]}


def naive_batch(model: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The paper's estimator as written: squared batch gradients / masked tokens."""
    import torch

    model.eval()
    named = list(model.named_parameters())
    sums = {n: torch.zeros_like(p) for n, p in named}
    tokens = 0
    for batch in batches:
        loss = model(**batch).loss
        g = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), gi in zip(named, g, strict=True):
            if gi is not None:
                sums[n] += gi ** 2
        tokens += int((batch["labels"] != IGNORE).sum())
    return {n: s / tokens for n, s in sums.items()}



# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def weird_tmp_path(tmp_path: Path) -> Path:
    """A temporary folder whose path has spaces and quotes (submitit's habit)."""
    path = tmp_path / "we ird 'quoted' \"dir\""
    path.mkdir()
    return path


@pytest.fixture
def one_torch_thread():  # type: ignore[no-untyped-def]
    """One intra-op thread: tiny models on a shared 2-core machine are many times faster."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real single-node SLURM cluster for the whole session (see tests/slurm_cluster.py)."""
    from tests.slurm_cluster import SlurmCluster

    if os.geteuid() != 0 and not all(map(shutil.which, ("slurmctld", "slurmd"))):
        pytest.skip("SLURM daemons are not installed and this user cannot install them")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


WHEEL_SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "toolkit", "storage_schemas")
"""What the wheel build reads: pyproject.toml names README.md; setup.py copies storage_schemas/."""


def build_toolkit_wheel(tmp: Path, env: dict[str, str] | None = None) -> Path:
    """Build the toolkit wheel from a copy of the sources in ``tmp``; return its path.

    A copy, so that no stale ``build/`` of the checkout leaks in; ``--no-build-isolation``,
    so that the venv's setuptools builds it and nothing is downloaded.
    """
    import subprocess
    import sys

    src, dist = tmp / "src", tmp / "dist"
    src.mkdir(parents=True)
    for name in WHEEL_SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(dist), str(src)], cwd=tmp, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    (wheel,) = dist.glob("toolkit-*.whl")
    return wheel


# --------------------------------------------------------------------------- the analysed study
# Every store analyse reads, written directly (synthetic, seeded): tests of the analysis,
# the results API and the report share it.

RUNS = {
    # vocab: tokenizer_vocab_size(bpe64) and (kmer2) = 4**2 + 5 + 5
    "text-bpe": dict(corpus="wiki", tokenizer="bpe64", kind="text", vocab=64, scale=3.0,
                     noise=0.3, layers=2, emb_noise=0.3, fisher=(1.0, 4.0, 1.0)),
    "dna-kmer2": dict(corpus="genome", tokenizer="kmer2", kind="dna", vocab=26, scale=0.3,
                      noise=1.0, layers=1, emb_noise=1.5, fisher=(6.0, 1.0, 0.5)),
}
N_POSITIONS = 300
DIM = 16
N_CONTEXTUAL = 24
FLOW_STEPS = (10, 20, 30)


def make_study(root: Path, seeds: tuple[int, ...] = (1, 2, 3),
               complete: dict[str, tuple[int, ...]] | None = None,
               runs: dict[str, dict] | None = None) -> StudyConfig:
    """Write a study folder with every store analyse reads; returns its StudyConfig.

    ``complete`` maps a run to the seeds that get an evaluate marker (default: all);
    the others get every store but no marker, as a member still being evaluated.
    ``runs`` defaults to :data:`RUNS` (each run on its own corpus).
    """
    import scipy.special

    from toolkit.config import study_from_dict
    from toolkit.study import Layout, Member

    runs = RUNS if runs is None else runs
    raw = {
        "study": {"name": "synthetic", "seeds": list(seeds), "output_dir": str(root)},
        "corpora": {r["corpus"]: {"source": f"{r['corpus']}.txt", "kind": r["kind"]}
                    for r in runs.values()},
        "runs": {name: {"corpus": r["corpus"], "tokenizer": r["tokenizer"]} for name, r in runs.items()},
        "analysis": {"topk": [1, 3, 5, 10, 40], "top_p": [0.1, 0.5, 0.9, 1.0], "bootstrap": 50},
    }
    study = study_from_dict(raw, where="synthetic")
    layout = Layout(study)
    rng = np.random.default_rng(1234)
    for run, spec in runs.items():
        vocab = spec["vocab"]
        _write_tokens(layout.run_tokens_dir(run) / "tokens.zarr", run, spec, rng)
        shared = rng.normal(size=(N_POSITIONS, vocab))  # what every member learnt in common
        probs = scipy.special.softmax(spec["scale"] * shared, axis=1)
        target = np.array([rng.choice(vocab, p=p) for p in probs], np.int32)
        base_emb = rng.normal(size=(vocab, DIM))
        base_ctx = rng.normal(size=(N_CONTEXTUAL, DIM))
        for seed in seeds:
            m = Member(run, seed)
            done = complete is None or seed in complete.get(run, seeds)
            _write_member(layout, m, spec, rng, shared, target, base_emb, base_ctx, done)
    return study


def _write_tokens(path: Path, run: str, spec: dict, rng: np.random.Generator) -> None:
    import scipy.stats

    from toolkit import store

    vocab = spec["vocab"]
    tokens = rng.integers(5, vocab, size=2000).astype(np.uint16)
    counts = np.bincount(tokens, minlength=vocab)
    unigram = float(scipy.stats.entropy(counts, base=2))
    spt = 2.0 if spec["kind"] == "dna" else 3.7
    profile = {
        "tokens": int(tokens.size), "symbols_per_token": spt, "unigram_bits": unigram,
        "unigram_bits_per_symbol": unigram / spt,
        "conditional_bits": sorted(rng.uniform(0.5, unigram, size=3).tolist(), reverse=True),
        "conditional_bits_plugin": [0.0, 0.0, 0.0], "contexts_seen": [10, 100, 1000],
        # the last order is undersampled (fewer than 10 tokens per context) for the DNA-like run
        "context_coverage": [200.0, 20.0, 2.0 if spec["kind"] == "dna" else 12.0],
        "compression_bits_per_symbol": float(rng.uniform(1.5, 2.5)),
        "analytic_entropy_rate_bits_per_symbol": None, "vocab_size": vocab,
        "entropy_rate_bits_per_symbol": float(rng.uniform(0.5, 1.0)), "entropy_rate_low": 0.4,
        "entropy_rate_high": 1.1, "entropy_rate_method": f"test method {run}",
        "entropy_rate_plateau_order": 2 if spec["kind"] == "dna" else None,
        "entropy_rate_heldout_bits_per_symbol": 1.05, "entropy_rate_ppmd_bits_per_symbol": 1.2,
    }
    attrs = {
        "corpus": spec["corpus"], "source": "synthetic", "kind": spec["kind"],
        "tokenizer": spec["tokenizer"], "tokenizer_hash": f"hash-{run}", "vocab_size": vocab,
        "special_tokens": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4},
        "provenance": [], "split": {"method": "sequential", "seed": 0, "train_records": 15,
                                    "eval_records": 5},
        "entropy_profile": profile, "toolkit_version": "test",
    }
    with store.writing(path, "tokens", attrs) as g:
        store.create_array(g, "tokens", "tokens", data=tokens)
        store.create_array(g, "tokens", "offsets", data=np.arange(0, 2001, 100, dtype=np.int64))
        store.create_array(g, "tokens", "split", data=np.array([0] * 15 + [1] * 5, np.uint8))
        store.create_array(g, "tokens", "record_symbols", data=np.full(20, int(100 * spt), np.int64))


def _write_member(layout: Layout, m: Member, spec: dict, rng: np.random.Generator,
                  shared: np.ndarray, target: np.ndarray, base_emb: np.ndarray,
                  base_ctx: np.ndarray, complete: bool) -> None:
    import scipy.special
    from safetensors.numpy import save_file

    from toolkit import store
    from toolkit.study import write_json_atomic

    d = layout.member_dir(m)
    vocab = spec["vocab"]
    common = {"member": m.id, "run": m.run, "seed": m.seed, "tokenizer_hash": f"hash-{m.run}"}
    logits = spec["scale"] * (shared + spec["noise"] * rng.normal(size=shared.shape))
    lp = scipy.special.log_softmax(logits, axis=1).astype(np.float16)  # (P, V)
    with store.writing(d / "predictions.zarr", "predictions",
                       {**common, "checkpoint": "final", "vocab_size": vocab}) as g:
        # small chunks so that the lazy reduction really runs over several blocks
        store.create_array(g, "predictions", "log_probs", data=lp, chunks=(64, vocab))
        store.create_array(g, "predictions", "target", data=target)
    word = (base_emb + spec["emb_noise"] * rng.normal(size=base_emb.shape)).astype(np.float32)
    ctx = (base_ctx + spec["emb_noise"] * rng.normal(size=base_ctx.shape)).astype(np.float32)
    with store.writing(d / "embeddings.zarr", "embeddings", {**common, "checkpoint": "final"}) as g:
        store.create_array(g, "embeddings", "word_embeddings", data=word)
        store.create_array(g, "embeddings", "contextual", data=ctx)
    groups = ["embeddings", *[f"layer.{i}" for i in range(spec["layers"])], "head"]
    weight = np.array([spec["fisher"][0]] + [spec["fisher"][1]] * spec["layers"] + [spec["fisher"][2]])
    trace = rng.gamma(2.0, size=(2, len(FLOW_STEPS), len(groups))) * weight  # (E, S, G)
    params = [f"param.{g}" for g in groups]
    with store.writing(d / "fisher.zarr", "fisher",
                       {**common, "n_sequences": 8, "n_masked_tokens": 40}) as g:
        store.create_array(g, "fisher", "estimator", data=np.array(["batch", "per-example"]))
        store.create_array(g, "fisher", "step", data=np.array(FLOW_STEPS, np.int64))
        store.create_array(g, "fisher", "group", data=np.array(groups))
        store.create_array(g, "fisher", "parameter", data=np.array(params))
        store.create_array(g, "fisher", "parameter_group", data=np.array(groups))
        store.create_array(g, "fisher", "fisher_trace", data=trace)
        store.create_array(g, "fisher", "parameter_trace", data=trace)
    steps = np.arange(0, 31, 5, dtype=np.int64)
    loss = (math.log(vocab) * np.exp(-steps / 20) + rng.uniform(0, 0.2, steps.size)).astype(np.float32)
    with store.writing(d / "train.zarr", "train", {
            **common, "data_seed": 0, "model_config": {}, "n_parameters": 100, "final_step": 30,
            "tokens_seen": 1000, "tokens_per_second": 10.0, "device": "cpu",
            "best_eval_loss": float(loss.min())}) as g:
        store.create_array(g, "train", "step", data=steps)
        store.create_array(g, "train", "loss", data=loss)
        store.create_array(g, "train", "lr", data=np.full(steps.size, 1e-3, np.float32))
        store.create_array(g, "train", "tokens_seen", data=steps * 10)
        store.create_array(g, "train", "eval_step", data=np.array([30], np.int64))
        store.create_array(g, "train", "eval_loss", data=loss[-1:])
    final = d / "checkpoints" / "final"
    final.mkdir(parents=True)
    save_file({"bert.embeddings.word_embeddings.weight": word,
               "cls.predictions.bias": rng.normal(size=vocab).astype(np.float32)},
              str(final / "model.safetensors"))
    write_json_atomic(layout.train_marker(m), {"member": m.id, "final": "checkpoints/final",
                                               "best": "checkpoints/final", "flow": [],
                                               "final_step": 30})
    if complete:
        write_json_atomic(layout.evaluate_marker(m), {"member": m.id})




def marked(study: StudyConfig) -> list[Member]:
    """The members :func:`make_study` gave an evaluate marker. Its stores are written
    directly, not by units, so the unit model would call them stale: analyse is told
    which members are complete instead."""
    from toolkit.study import Layout, members

    layout = Layout(study)
    return [m for m in members(study) if layout.evaluate_marker(m).exists()]


def summary(study: StudyConfig):
    from toolkit import store
    from toolkit.study import Layout

    return store.open_dataset(Layout(study).summary, "summary", chunks={}).compute()


def stored(study: StudyConfig, run: str, seed: int, kind: str):
    from toolkit import store
    from toolkit.study import Layout, Member

    return store.open_store(Layout(study).member_dir(Member(run, seed)) / f"{kind}.zarr", kind)


_SHARED: dict[str, StudyConfig] = {}


def shared_study(factory: pytest.TempPathFactory) -> StudyConfig:
    """One analysed study (every member complete) per session, shared by the analyse, results
    and report tests, which only read it."""
    from toolkit.analyse import analyse_study
    from toolkit.study import Layout

    if "study" not in _SHARED:
        study = make_study(factory.mktemp("study"))
        assert analyse_study(study, marked(study)) == Layout(study).summary
        _SHARED["study"] = study
    return _SHARED["study"]


def assert_same_summary(a_path: Path, b_path: Path) -> None:
    """Two summary stores hold the same variables and attributes, bit for bit (NaN where NaN)."""
    from toolkit import store

    a = store.open_dataset(a_path, "summary", chunks={}).compute()
    b = store.open_dataset(b_path, "summary", chunks={}).compute()
    assert set(a.variables) == set(b.variables) and len(a.variables) > 60
    for name in a.variables:
        x, y = a[name].values, b[name].values
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
    assert dict(a.attrs) == dict(b.attrs)
