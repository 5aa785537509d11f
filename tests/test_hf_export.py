"""Exported model folders are complete HuggingFace folders: weights, config and tokenizer.

Every toolkit tokenizer is exported (``Tokenizer.save_pretrained``), loaded back with
``AutoTokenizer.from_pretrained(folder)`` and must give exactly the toolkit's ids on
random records full of corner cases (N, lower case, other symbols, lengths not divisible
by k, the empty record, unicode text). Then a real tiny study trains one member of three
runs (DNA 3-mers, DNA characters, text BPE): every exported folder (``best``, ``final``,
each Fisher-flow snapshot) loads with ``AutoModelForMaskedLM`` and ``AutoTokenizer``,
which reproduces the training sequences, ``pipeline("fill-mask")`` runs on it verbatim
and agrees with a direct forward pass, and ``checksums.json`` covers the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import TINY_STUDY
from toolkit.checkpoint import EXPORT_META, model_positions, verify_export
from toolkit.config import load_study
from toolkit.corpora import open_corpus
from toolkit.errors import CheckpointError
from toolkit.sequences import CLS, MASK, SEP, TRAIN, UNK, load_sequences
from toolkit.store import open_store
from toolkit.study import Layout, Member
from toolkit.tokenizers import Tokenizer, build_tokenizer
from toolkit.units import run_unit

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "Zürich", "naïve", "日本語", "🙂", "x-ray",
         "can't", "42"]


def _auto(tok: Tokenizer, folder: Path, max_len: int = 512) -> Any:
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder, model_max_length=max_len)
    return AutoTokenizer.from_pretrained(str(folder))


def _dna_records(rng: np.random.Generator, n: int) -> list[str]:
    """Mostly ACGT, with N runs, soft-masked (lower-case) bases, IUPAC and other symbols."""
    alphabet = np.array(list("ACGT" * 8 + "NN" + "acgtn" + "RY-?*[] é€\n\t"))
    out = ["", "A", "N", "a", "ACG", "ACGT", "ACGTA", "NNNN", "ACGTNACGT", "€", "acgt"]
    for _ in range(n):
        out.append("".join(rng.choice(alphabet, int(rng.integers(0, 40)))))
    return out


def _text_records(rng: np.random.Generator, n: int) -> list[str]:
    out = ["", " ", "a", "Zürich", "\u00a0x\t\ny  z", "🙂🙂", "e\u0301"]  # combining accent
    for _ in range(n):
        out.append(" ".join(rng.choice(WORDS, int(rng.integers(0, 12)))) + rng.choice(["", ".", "!"]))
    return out


DNA_TRAIN = ["ACGTTGCAAGCTTGACCATGGTACGATCGATTGCANNACGT", "TTGACCAGTACGGATCCATGCAAGTTCGA" * 3,
             "GGGCCCAATTTACGTACGATCGGCTAGCTAAC" * 2]
TEXT_TRAIN = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
SPECS = [("dna", "char"), ("dna", "kmer1"), ("dna", "kmer2"), ("dna", "kmer3"), ("dna", "kmer5"),
         ("dna", "kmer6"), ("dna", "kmer1-overlap"), ("dna", "kmer2-overlap"), ("dna", "kmer3-overlap"),
         ("dna", "kmer6-overlap"), ("dna", "bpe40"), ("text", "char"), ("text", "bpe60")]


@pytest.mark.parametrize(("kind", "spec"), SPECS, ids=[f"{k}-{s}" for k, s in SPECS])
def test_autotokenizer_gives_the_toolkit_ids(kind: str, spec: str, tmp_path: Path) -> None:
    tok = build_tokenizer(spec, kind, DNA_TRAIN if kind == "dna" else TEXT_TRAIN)  # type: ignore[arg-type]
    auto = _auto(tok, tmp_path / "export", max_len=10)
    rng = np.random.default_rng(0)
    records = _dna_records(rng, 300) if kind == "dna" else _text_records(rng, 300)
    expected = [ids.tolist() for ids in tok.encode_batch(records)]
    assert auto(records, add_special_tokens=False)["input_ids"] == expected
    assert auto(records)["input_ids"] == [[CLS, *ids, SEP] for ids in expected]
    # truncation=True cuts to model_max_length with the specials, as truncate mode cut
    # records to seq_len - 2 tokens.
    assert auto(records, truncation=True)["input_ids"] == [[CLS, *ids[:8], SEP] for ids in expected]
    # A pair is framed as packed records are: [CLS] a [SEP] b [SEP], all token types 0.
    pair = auto(records[20], records[21], return_token_type_ids=True)
    assert pair["input_ids"] == [CLS, *expected[20], SEP, *expected[21], SEP]
    assert set(pair["token_type_ids"]) == {0}
    assert len(auto) == tok.vocab_size
    assert auto.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (auto.pad_token_id, auto.unk_token_id, auto.cls_token_id, auto.sep_token_id,
            auto.mask_token_id) == (0, 1, 2, 3, 4)
    assert sorted(auto.all_special_ids) == [0, 1, 2, 3, 4]


def test_long_records_and_every_k(tmp_path: Path) -> None:
    """Records of thousands of bases with N runs, and every k of both k-mer kinds."""
    rng = np.random.default_rng(1)
    long = ["".join(rng.choice(list("ACGT" * 30 + "N"), 5000)), "ACGT" * 1000 + "N" * 7 + "TTG" * 333]
    for k in range(1, 9):
        for spec in (f"kmer{k}", f"kmer{k}-overlap"):
            tok = build_tokenizer(spec, "dna")
            auto = _auto(tok, tmp_path / spec)
            records = long + _dna_records(rng, 60)
            assert auto(records, add_special_tokens=False)["input_ids"] == \
                [ids.tolist() for ids in tok.encode_batch(records)], spec


def test_the_text_of_a_special_token_is_that_token(tmp_path: Path) -> None:
    """The one documented difference: HuggingFace reads "[MASK]" in the input as the mask
    (fill-mask needs it); the toolkit's char and k-mer encoders read its characters."""
    tok = build_tokenizer("kmer3", "dna")
    auto = _auto(tok, tmp_path / "k3")
    text = "ACGTTG[MASK]CCA"
    assert auto(text)["input_ids"] == [CLS, *tok.encode("ACGTTG").tolist(), MASK, *tok.encode("CCA").tolist(), SEP]
    assert tok.encode(text).tolist()[2:8] == [UNK, UNK, 5, UNK, UNK, UNK]  # [ M A S K ]: A is a base


def test_overlap_export_leaves_the_token_store_file_alone(tmp_path: Path) -> None:
    """The token store's tokenizer.json (its sha256 is the recorded tokenizer_hash) is unchanged;
    the export is another file, whose config names the store's tokenizer by that hash."""
    tok = build_tokenizer("kmer4-overlap", "dna")
    tok.save(tmp_path / "tokenizer.json")
    before = (tmp_path / "tokenizer.json").read_bytes()
    (tmp_path / "export").mkdir()
    tok.save_pretrained(tmp_path / "export", model_max_length=64)
    assert (tmp_path / "tokenizer.json").read_bytes() == before
    config = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert config["toolkit_tokenizer"] == "kmer4-overlap" and config["toolkit_tokenizer_hash"] == tok.hash
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 64
    assert json.loads((tmp_path / "export" / "special_tokens_map.json").read_text()) == {
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "mask_token": "[MASK]"}


# --------------------------------------------------------------------------- trained members

RUNS = {"r": "markov--kmer3", "dc": "markov--char", "tb": "text--bpe60"}
STUDY = (TINY_STUDY.replace("{name}", "hfexport").replace("seeds = [1, 2]", "seeds = [1]")
         .replace('shape = "tiny"', 'shape = "tiny"\nhidden_size = 32\nnum_hidden_layers = 1\n'
                  'num_attention_heads = 2\nintermediate_size = 64')
         + '\n[corpora.text]\nsource = "docs.txt"\ntrain_records = 40\neval_records = 8\n'
         + '\n[runs.dc]\ncorpus = "markov"\ntokenizer = "char"\n'
         + '\n[runs.tb]\ncorpus = "text"\ntokenizer = "bpe60"\n')


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One trained member of each run (12 steps, a best, a final and a flow snapshot)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("hf export")
    rng = np.random.default_rng(2)
    (base / "docs.txt").write_text("".join(" ".join(rng.choice(WORDS, int(rng.integers(3, 30)))) + ".\n"
                                           for _ in range(60)), encoding="utf-8")
    (base / "study.toml").write_text(STUDY.format(out=base / "out"))
    study = load_study(base / "study.toml")
    for run, unit in RUNS.items():
        run_unit(study, "prepare", unit)
        run_unit(study, "train", f"{run}/seed1")
    yield study
    torch.set_num_threads(n)


def _exports(study: Any, run: str) -> list[Path]:
    folder = Layout(study).checkpoints_dir(Member(run, 1))
    flow = sorted((folder / "flow").iterdir())
    assert len(flow) == 1  # fisher_flow = [0.5]
    return [folder / "best", folder / "final", *flow]


@pytest.mark.parametrize("run", list(RUNS))
def test_every_exported_folder_loads_with_auto_classes(trained: Any, run: str) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    group = open_store(Layout(trained).run_tokens_dir(run) / "tokens.zarr", "tokens")
    for folder in _exports(trained, run):
        assert verify_export(folder)
        listed = set(json.loads((folder / EXPORT_META).read_text())["files"])
        assert TOKENIZER_FILES | {"config.json", "model.safetensors"} <= listed
        assert listed == {p.name for p in folder.iterdir()} - {EXPORT_META}
        model = AutoModelForMaskedLM.from_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert len(tok) == model.config.vocab_size == int(group.attrs["vocab_size"])
        assert tok.model_max_length == model_positions(model)
        assert tok.mask_token_id == MASK and tok.pad_token_id == model.config.pad_token_id == 0
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["toolkit_tokenizer_hash"] == group.attrs["tokenizer_hash"]


@pytest.mark.parametrize("run", list(RUNS))
def test_autotokenizer_reproduces_the_training_sequences(trained: Any, run: str) -> None:
    """The exported tokenizer, on the corpus' own records, gives the token store's ids and,
    cut to seq_len, exactly the training sequences (truncate mode)."""
    from transformers import AutoTokenizer

    layout = Layout(trained)
    tok = AutoTokenizer.from_pretrained(str(layout.checkpoints_dir(Member(run, 1)) / "final"))
    group = open_store(layout.run_tokens_dir(run) / "tokens.zarr", "tokens")
    corpus = trained.runs[run].corpus
    records = [r.seq for r in open_corpus(corpus, trained).records()]
    offsets = np.asarray(group["offsets"][...])
    tokens = np.asarray(group["tokens"][...])
    assert len(records) == len(offsets) - 1
    stored = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    assert tok(records, add_special_tokens=False)["input_ids"] == stored
    seq_len = trained.training.seq_len
    seqs = load_sequences(group, TRAIN, seq_len)
    ids, mask = seqs.batch(np.arange(len(seqs)))
    got = tok([records[i] for i in seqs.record_ids], truncation=True, max_length=seq_len)["input_ids"]
    assert got == [row[m.astype(bool)].tolist() for row, m in zip(ids, mask, strict=True)]


@pytest.mark.parametrize(("run", "text"), [("r", "ACGTTGCAAGCT[MASK]GACCATGGTACG"),
                                           ("dc", "ACGTTGCAAG[MASK]TTGACC"),
                                           ("tb", "the cat [MASK] on the mat.")])
def test_fill_mask_pipeline_runs_verbatim_and_agrees_with_the_model(trained: Any, run: str, text: str) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    folder = str(Layout(trained).checkpoints_dir(Member(run, 1)) / "final")
    fill = pipeline("fill-mask", model=folder)
    got = fill(text, top_k=5)
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, enc["input_ids"][0].tolist().index(MASK)]  # (V,)
    probs = torch.softmax(logits.double(), -1)
    top = torch.topk(probs, 5)
    assert [g["token"] for g in got] == top.indices.tolist()
    np.testing.assert_allclose([g["score"] for g in got], top.values.numpy(), rtol=1e-4)
    assert all(g["token_str"] == tok.decode([g["token"]]) for g in got)


def test_checksums_catch_a_damaged_tokenizer_file(trained: Any, tmp_path: Path) -> None:
    folder = tmp_path / "final"
    shutil.copytree(Layout(trained).checkpoints_dir(Member("r", 1)) / "final", folder)
    path = folder / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\n")  # same size, other bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: does not match its sha256"):
        verify_export(folder)
    (folder / "special_tokens_map.json").unlink()
    with pytest.raises(CheckpointError, match=r"special_tokens_map\.json: missing"):
        verify_export(folder)
