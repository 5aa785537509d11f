"""Published masked LMs with their own tokenizers: BERT (another vocabulary), RoBERTa, ESM.

Tiny randomly initialised checkpoints (two init seeds per architecture, one tokenizer
each) are saved with ``save_pretrained`` into temporary folders, like downloaded
models would be, and a real study adopts them through the unit model with
``tokenizer = "checkpoint"``: the corpus is tokenized by each checkpoint's own
tokenizer, and predictions, embeddings and Fisher are computed for each architecture.
No model hub is ever contacted.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import study_toml
from toolkit.config import load_study
from toolkit.dispatch import run_study
from toolkit.errors import ConfigError
from toolkit.study import Layout, Member
from toolkit.units import run_unit, unit_states

SEQ_LEN = 24
KMERS = ["".join(t) for t in itertools.product("ACGT", repeat=3)]
DNA = ["ACGTTGCAAGCTTGACCATGGTACGATCGATTGCA", "TTGACCAGTACGGATCCATGCAAGTTCGA",
       "GGGCCCAATTTACGTACGATCGGCTAGCTAAC", "CATCATGATGACGTTTGCAGCGATCGATTACG"]
TINY: dict[str, Any] = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 32, "hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0}


def _bert(folder: Path, seed: int, permute: bool = False) -> None:
    """DNABERT-like: WordPiece over single bases and 3-mers, specials NOT at the toolkit's ids."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    words = list("ACGTN") + [f"##{b}" for b in "ACGTN"] + KMERS + [f"##{k}" for k in KMERS]
    if permute:  # same size, other ids: another tokenizer
        words = words[::-1]
    vocab = ["[UNK]", "[CLS]", "[SEP]", *words[:7], "[PAD]", "[MASK]", *words[7:]]
    folder.mkdir(parents=True)
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=False)
    tok.save_pretrained(str(folder))
    torch.manual_seed(seed)
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), pad_token_id=tok.pad_token_id,
                               max_position_embeddings=SEQ_LEN, **TINY)).save_pretrained(str(folder))


def _roberta(folder: Path, seed: int) -> None:
    """Byte-level BPE trained here on DNA, wrapped as a RoBERTa tokenizer (<s> <pad> </s> <unk> <mask>)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    folder.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(DNA * 4, vocab_size=300, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    tok = RobertaTokenizerFast(vocab=json.loads((folder / "vocab.json").read_text()), merges=merges)
    tok.save_pretrained(str(folder))
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, max_position_embeddings=SEQ_LEN + 2, **TINY)
    RobertaForMaskedLM(cfg).save_pretrained(str(folder))


def _esm(folder: Path, seed: int) -> None:
    """Nucleotide-Transformer-like: an ESM masked LM with an EsmTokenizer of 3-mers and bases."""
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    folder.mkdir(parents=True)
    vocab = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", *KMERS, *"ACGTN"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = EsmTokenizer(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(str(folder))
    torch.manual_seed(seed)
    cfg = EsmConfig(vocab_size=len(vocab), pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id,
                    position_embedding_type="rotary", max_position_embeddings=SEQ_LEN + 2,
                    token_dropout=False, emb_layer_norm_before=False, **TINY)
    EsmForMaskedLM(cfg).save_pretrained(str(folder))


BUILDERS = {"bert": _bert, "roberta": _roberta, "esm": _esm}



def study_text(out: Path, seeds: tuple[int, ...] = (1, 2)) -> str:
    """The tiny study without runs (the tests add theirs) whose members adopt checkpoints:
    a smaller, shorter corpus, sequences of SEQ_LEN tokens."""
    return study_toml("external", out, seeds=seeds, runs={}, adopted=True,
                      corpus={"train_records": 8, "eval_records": 24,
                              "synthetic": {"entropy_rate": 1.4, "records": 32, "length": 60}},
                      training={"seq_len": SEQ_LEN},
                      analysis={"eval_records": 24, "fisher_records": 6})


def _run(name: str, folders: list[Path]) -> str:
    return (f'\n[runs.{name}]\ncorpus = "markov"\ntokenizer = "checkpoint"\n'
            f"checkpoints = {json.dumps([str(f) for f in folders])}\n")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    base = tmp_path_factory.mktemp("hub")
    out: dict[str, list[Path]] = {}
    for arch, build in BUILDERS.items():
        out[arch] = []
        for seed in (1, 2):
            folder = base / f"{arch}-seed{seed}"
            build(folder, seed)
            out[arch].append(folder)
    return out


@pytest.fixture(scope="module")
def finished(checkpoints: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("study")
    path = base / "study.toml"
    text = study_text(base / "out")
    path.write_text(text + "".join(_run(arch, folders) for arch, folders in checkpoints.items()))
    study = load_study(path)
    run_study(study)
    return study


def test_every_architecture_gets_finite_measures(finished: Any) -> None:
    import xarray as xr

    from toolkit import store

    states = unit_states(finished)
    assert {u.id: s.state for (_, _), s in states.items() for u in [s.unit]
            if s.state != "done"} == {}
    summary = xr.open_zarr(Layout(finished).summary, consolidated=False)
    runs = [str(r) for r in summary["run"].values]
    assert runs == ["bert", "roberta", "esm"]
    for name in ("kl_to_uniform_bits", "entropy_bits", "perplexity", "js_distance", "fisher_share"):
        values = np.asarray(summary[name].values, dtype=np.float64)
        assert np.isfinite(values).all(), (name, values)
    entropy = summary["entropy_bits"].values
    vocab = summary["vocab_size"].values
    assert ((entropy > 0) & (entropy <= np.log2(vocab) + 1e-6)).all()
    assert (summary["js_distance"].sel(top_p=1.0).values > 0).all()  # two init seeds disagree
    shares = summary["fisher_share"]
    for run in runs:
        per_run = shares.sel(run=run)
        assert float(per_run.sum()) == pytest.approx(1.0, rel=1e-4), run
        assert (per_run.values > 0).all(), run
        for seed in (1, 2):
            # Per member: the groups found in each architecture's parameter names.
            fisher = store.open_store(Layout(finished).member_dir(Member(run, seed)) / "fisher.zarr", "fisher")
            assert [str(g) for g in fisher["group"][...]] == ["embeddings", "layer.0", "layer.1", "head"]
            trace = np.asarray(fisher["fisher_trace"][...])  # (estimator, step, group)
            assert np.isfinite(trace).all() and (trace > 0).all(), (run, seed)


def test_token_store_holds_the_checkpoint_tokenizers_own_ids(finished: Any,
                                                              checkpoints: dict[str, list[Path]]) -> None:
    from transformers import AutoTokenizer

    from toolkit import store
    from toolkit.corpora import open_corpus

    records = [r.seq for r in open_corpus("markov", finished).records()]
    layout = Layout(finished)
    for arch, folders in checkpoints.items():
        folder = layout.run_tokens_dir(arch)
        assert folder.name == f"markov--checkpoint-{arch}"
        group = store.open_store(folder / "tokens.zarr", "tokens")
        tok = AutoTokenizer.from_pretrained(str(folders[0]), local_files_only=True)
        offsets = np.asarray(group["offsets"][...])
        tokens = np.asarray(group["tokens"][...])
        assert len(offsets) == len(records) + 1
        for i, seq in enumerate(records):
            want = tok(seq, add_special_tokens=False)["input_ids"]
            assert tokens[offsets[i]:offsets[i + 1]].tolist() == want, (arch, i)
        specials = group.attrs["special_tokens"]
        assert specials["[MASK]"] == tok.mask_token_id and specials["[PAD]"] == tok.pad_token_id
        assert group.attrs["tokenizer"] == f"checkpoint-{arch}"
        # Evaluation inputs are framed and masked with the checkpoint's own special ids.
        masks = [p for p in folder.glob("masks-*.zarr")]
        assert len(masks) == 1
        m = store.open_store(masks[0], "masks")
        ids = np.asarray(m["distribution/input_ids"][...])
        labels = np.asarray(m["distribution/labels"][...])
        assert (ids[:, 0] == specials["[CLS]"]).all()
        assert ((ids == tok.mask_token_id) == (labels != -100)).all()
        assert not np.isin(labels[labels != -100], tok.all_special_ids).any()
        marker = json.loads((folder / "complete.json").read_text())
        assert marker["tokenizer_hash"] == group.attrs["tokenizer_hash"]
        n = json.loads(layout.evaluate_marker(Member(arch, 1)).read_text())["n_positions"]
        assert n > 0 and math.isfinite(n)


def test_two_tokenizers_in_one_run_are_refused(checkpoints: dict[str, list[Path]], tmp_path: Path) -> None:
    other = tmp_path / "bert-other"
    _bert(other, 2, permute=True)  # same vocabulary size, other ids
    path = tmp_path / "study.toml"
    path.write_text(study_text(tmp_path / "out") + _run("mixed", [checkpoints["bert"][0], other]))
    study = load_study(path)
    with pytest.raises(ConfigError) as e:
        run_unit(study, "prepare", "markov--checkpoint-mixed")
    message = str(e.value)
    assert "\n" not in message
    assert "runs.mixed.checkpoints" in message and "another tokenizer" in message and "bert-other" in message


def test_checkpoint_tokenizer_needs_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(study_text(tmp_path / "out") + '\n[runs.x]\ncorpus = "markov"\ntokenizer = "checkpoint"\n')
    with pytest.raises(ConfigError, match=r"runs.x.tokenizer = 'checkpoint' needs runs.x.checkpoints.*cannot be trained"):
        load_study(path)


@pytest.mark.parametrize("arch", ["bert", "roberta", "esm"])
def test_masked_logits_and_per_sequence_fisher_match_the_definitions(
        arch: str, checkpoints: dict[str, list[Path]]) -> None:
    """Head-only logits equal the full forward's; the generic per-example Fisher is exact."""
    import torch.nn.functional as F

    from toolkit.fisher import _PerSequence, fisher_traces
    from toolkit.model import load_model, masked_logits

    model = load_model(checkpoints[arch][0]).double()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 40, (3, 10), generator=gen)
    att = torch.ones_like(ids)
    att[2, 7:] = 0
    ids[2, 7:] = model.config.pad_token_id
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[0, [1, 4]] = where[1, 2] = where[2, [3, 5, 6]] = True
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=att).logits[where]  # (M, V)
        torch.testing.assert_close(masked_logits(model, ids, att, where), full)
    labels = torch.full_like(ids, -100)
    labels[where] = torch.randint(5, 40, (int(where.sum()),), generator=gen)
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels}
    named = list(model.named_parameters())
    want = {n: 0.0 for n, _ in named}
    for i in range(3):  # the definition: mean over sequences of |grad of its mean masked loss|^2
        sel = labels[i] != -100
        logits = model(input_ids=ids[i:i + 1], attention_mask=att[i:i + 1]).logits[0, sel]
        grads = torch.autograd.grad(F.cross_entropy(logits, labels[i, sel]), [p for _, p in named],
                                    allow_unused=True)
        for (n, _), g in zip(named, grads, strict=True):
            want[n] += 0.0 if g is None else float((g * g).sum()) / 3
    got = fisher_traces(model, [batch], "per-example")
    tiny = 1e-12 * max(want.values())  # key biases: zero in exact arithmetic, rounding noise here
    assert got.parameters == pytest.approx(want, rel=1e-9, abs=tiny)
    assert list(got.groups) == ["embeddings", "layer.0", "layer.1", "head"]
    if arch == "bert":  # the one-pass BERT engine and the per-sequence loop agree
        sums = {id(p): torch.zeros((), dtype=torch.float64) for _, p in named}
        _PerSequence(model, named, sums, False).run(batch, (labels != -100).sum(1))
        for n, p in named:
            assert float(sums[id(p)]) / 3 == pytest.approx(got.parameters[n], rel=1e-9, abs=tiny)


def test_checkpoint_tokenizer_files_are_sources_of_the_prepare_unit(
        finished: Any, checkpoints: dict[str, list[Path]]) -> None:
    from toolkit.units import _source_files, get_unit

    files = _source_files(finished, get_unit(finished, "prepare", "markov--checkpoint-roberta"))
    names = {(p.parent, p.name) for p in files}
    for folder in checkpoints["roberta"]:
        assert {(folder, "tokenizer.json"), (folder, "vocab.json"), (folder, "merges.txt")} <= names
        assert (folder, "model.safetensors") not in names


def test_replacing_a_tokenizer_file_makes_the_token_store_stale(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    _bert(folder, 1)
    path = tmp_path / "study.toml"
    path.write_text(study_text(tmp_path / "out", seeds=(1,)) + _run("one", [folder]))
    study = load_study(path)
    key = "markov--checkpoint-one"
    run_unit(study, "prepare", key)
    state = {s.unit.id: (s.state, s.reason) for s in unit_states(study).values()}
    assert state[f"prepare:{key}"] == ("done", "")
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text() + " ")
    state = {s.unit.id: (s.state, s.reason) for s in unit_states(study).values()}
    assert state[f"prepare:{key}"] == ("stale", "source file(s) tokenizer_config.json changed")


def test_adopted_members_export_the_checkpoints_own_tokenizer(finished: Any) -> None:
    """An adopted member's exported folders carry the tokenizer its token store was built
    with: AutoTokenizer loads it from the folder alone, with the same identity."""
    from toolkit.checkpoint import verify_export
    from toolkit.store import open_store
    from toolkit.tokenizers import load_checkpoint_tokenizer

    layout = Layout(finished)
    for arch in BUILDERS:
        group = open_store(layout.run_tokens_dir(arch) / "tokens.zarr", "tokens")
        for name in ("final", "best"):
            folder = layout.checkpoints_dir(Member(arch, 1)) / name
            assert verify_export(folder)
            assert "tokenizer_config.json" in json.loads((folder / "checksums.json").read_text())["files"]
            assert load_checkpoint_tokenizer(folder).hash == group.attrs["tokenizer_hash"]


def test_a_checkpoint_is_checked_by_tokenizer_identity_not_vocabulary_size(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run with a toolkit tokenizer (kmer3) adopting BERT checkpoints: one saved with kmer3
    is adopted (and exports it); one saved with kmer3-overlap, the same 74 tokens at the same
    ids but other ids on every record, is refused although its vocabulary size fits; one
    saved without a tokenizer can only be checked by size, which a warning says."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from toolkit.errors import CheckpointError
    from toolkit.tokenizers import build_tokenizer
    from toolkit.train import train_member

    folders = {}
    for spec in ("kmer3", "kmer3-overlap", None):
        folder = folders[spec] = tmp_path / f"bert-{spec}"
        torch.manual_seed(1)
        BertForMaskedLM(BertConfig(vocab_size=74, pad_token_id=0, **TINY)).save_pretrained(folder)
        if spec is not None:
            build_tokenizer(spec, "dna").save_pretrained(folder, model_max_length=512)
    path = tmp_path / "study.toml"
    path.write_text(study_text(tmp_path / "out", seeds=(1, 2, 3)) + '\n[runs.x]\ncorpus = "markov"\ntokenizer = "kmer3"\n'
                    + f"checkpoints = {json.dumps([str(f) for f in folders.values()])}\n")
    study = load_study(path)
    run_unit(study, "prepare", "markov--kmer3")
    train_member(study, Member("x", 1))
    final = Layout(study).checkpoints_dir(Member("x", 1)) / "final"
    assert AutoTokenizer.from_pretrained(str(final))("ACGTAC", add_special_tokens=False)["input_ids"] == [16, 59]
    with pytest.raises(CheckpointError) as e:
        train_member(study, Member("x", 2))
    message = str(e.value)
    assert "\n" not in message and "bert-kmer3-overlap" in message
    assert "not run 'x''s kmer3" in message and 'runs.x.tokenizer = "checkpoint"' in message
    assert not Layout(study).train_marker(Member("x", 2)).exists()
    train_member(study, Member("x", 3))
    assert "no tokenizer saved with the checkpoint; only its vocabulary size" in caplog.text
