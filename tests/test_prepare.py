"""``toolkit prepare`` and ``toolkit corpus-stats`` end to end, on real files and real Zarr stores."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from toolkit import store
from toolkit.cli import main
from toolkit.config import load_study
from toolkit.corpora import open_corpus, split_assignment
from toolkit.entropy import entropy_profile
from toolkit.sequences import SPECIAL_TOKENS, TRAIN
from toolkit.study import Layout
from toolkit.tokenizers import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _write_inputs(folder: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(folder / "small.fa", "w") as f:
        for r in range(3):
            f.write(f">chr{r} test\n")
            seq = "".join(np.array(list("ACGTacgtN"))[rng.integers(0, 9, 12_000)])
            seq = seq[:5000] + "N" * 4 + seq[5000:]  # a short N run stays inside a piece
            for i in range(0, len(seq), 60):
                f.write(seq[i:i + 60] + "\n")
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "fast", "slow", "Zürich"]
    with open(folder / "docs.txt", "w", encoding="utf-8") as f:
        for _ in range(120):
            f.write(" ".join(rng.choice(words, int(rng.integers(5, 40)))) + ".\n")


STUDY = """
[study]
name = "tiny"
output_dir = {output_dir}
[corpora.dna]
source = "small.fa"
train_records = 30
eval_records = 8
dna = {{ piece_min = 300, piece_max = 700, keep_softmask = true }}
[corpora.text]
source = "docs.txt"
train_records = 100
eval_records = 15
[corpora.markov]
source = "synthetic:markov"
train_records = {markov_train}
eval_records = 20
synthetic = {{ order = 2, entropy_rate = 1.2, records = {markov_records}, length = {markov_length} }}
[runs.dna-k3]
corpus = "dna"
tokenizer = "kmer3"
[runs.dna-bpe]
corpus = "dna"
tokenizer = "bpe64"
[runs.text-char]
corpus = "text"
tokenizer = "char"
[runs.text-bpe]
corpus = "text"
tokenizer = "bpe40"
[runs.markov-char]
corpus = "markov"
tokenizer = "char"
"""


def _study_file(folder: Path, markov_records: int = 100, markov_length: int = 300) -> Path:
    _write_inputs(folder)
    path = folder / "study.toml"
    # json.dumps gives a valid TOML basic string for any path (spaces, quotes)
    path.write_text(STUDY.format(markov_records=markov_records, markov_length=markov_length,
                                 markov_train=max(markov_records - 30, 1),
                                 output_dir=json.dumps(str(folder / "out"))))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Spaces and quotes in the path: every path the toolkit builds must survive them.
    folder = tmp_path_factory.mktemp("prep") / "a 'weird' dir"
    folder.mkdir()
    path = _study_file(folder)
    assert main(["prepare", str(path)]) == 0
    return path


def test_stores_open_lazily_and_match_an_independent_encoding(prepared: Path) -> None:
    study = load_study(prepared)
    layout = Layout(study)
    for run in study.runs.values():
        folder = layout.tokens_dir(run.corpus, run.tokenizer)
        assert (folder / "complete.json").exists()
        ds = store.open_dataset(folder / "tokens.zarr", "tokens")
        assert hasattr(ds["tokens"].data, "dask")  # lazy until the edge
        group = zarr.open_group(str(folder / "tokens.zarr"), mode="r")
        attrs = dict(group.attrs)
        tok = load_tokenizer(folder / "tokenizer.json")
        digest = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
        assert attrs["tokenizer_hash"] == tok.hash == digest
        assert attrs["tokenizer"] == run.tokenizer == tok.spec
        assert attrs["vocab_size"] == tok.vocab_size and attrs["special_tokens"] == SPECIAL_TOKENS
        tokens = np.asarray(group["tokens"][...])
        offsets = np.asarray(group["offsets"][...])
        assert tokens.dtype == np.uint16 and offsets[0] == 0 and offsets[-1] == len(tokens)
        # Re-read the corpus and re-encode every record with the saved tokenizer.
        records = list(open_corpus(run.corpus, study).records())
        assert len(offsets) == len(records) + 1
        for r, rec in enumerate(records):
            assert tokens[offsets[r]:offsets[r + 1]].tolist() == tok.encode(rec.seq).tolist()
        assert np.asarray(group["record_symbols"][...]).tolist() == [len(r.seq) for r in records]
        # where each record comes from: FASTA pieces name their chromosome and where they were cut
        names = np.asarray(group["record_name"][...]).tolist()
        assert names == [r.id.rpartition(":")[0] if run.corpus == "dna" else r.id for r in records]
        starts = np.asarray(group["record_start"][...])
        assert starts.tolist() == [r.start for r in records]
        assert (np.asarray(group["record_end"][...]) - starts).tolist() == [len(r.seq) for r in records]
        if run.corpus == "dna":  # piece ids are <record>:<start>-<end>
            assert [f"{n}:{s}-{s + len(r.seq)}" for n, s, r in zip(names, starts, records, strict=True)] \
                == [r.id for r in records]
        else:
            assert not starts.any()
        assert np.asarray(group["token_text"][...]).tolist() == tok.id_to_token()
        split = np.asarray(group["split"][...])
        assert np.array_equal(split, split_assignment(len(records), study.corpora[run.corpus]))
        assert attrs["split"]["train_records"] == int((split == TRAIN).sum())
        # The stored profile is the profile of the training split's tokens.
        train = [tokens[offsets[r]:offsets[r + 1]] for r in np.flatnonzero(split == TRAIN)]
        ref = entropy_profile(train, n_symbols=sum(len(records[r].seq) for r in np.flatnonzero(split == TRAIN)),
                              vocab_size=tok.vocab_size)
        prof = attrs["entropy_profile"]
        for key in ("tokens", "unigram_bits", "conditional_bits", "contexts_seen", "symbols_per_token"):
            assert prof[key] == pytest.approx(ref[key]), key
        assert prof["compression_bits_per_symbol"] > 0


def test_softmask_flags_follow_lowercase_bases(prepared: Path) -> None:
    study = load_study(prepared)
    folder = Layout(study).tokens_dir("dna", "kmer3")
    group = store.open_store(folder / "tokens.zarr", "tokens")
    flags = np.asarray(group["softmasked"][...])
    offsets = np.asarray(group["offsets"][...])
    tok = load_tokenizer(folder / "tokenizer.json")
    records = list(open_corpus("dna", study).records())
    assert 0 < flags.mean() < 1
    for r in (0, len(records) // 2, len(records) - 1):
        rec = records[r]
        _, starts, ends = tok.encode_spans(rec.seq)
        want = [int(rec.softmask[a:b].any()) for a, b in zip(starts, ends, strict=True)]
        assert flags[offsets[r]:offsets[r + 1]].tolist() == want


def test_prepare_writes_the_evaluation_masks(prepared: Path) -> None:
    """Each unit's folder holds its token store, tokenizer, marker and the masks of the current
    settings, which evaluate opens (and the marker records their digest)."""
    import json as _json

    from toolkit.masks import CHECKED_ATTRS, masks_path, open_masks

    study = load_study(prepared)
    layout = Layout(study)
    for name, run in study.runs.items():
        folder = layout.tokens_dir(run.corpus, run.tokenizer)
        path = masks_path(study, name)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["complete.json", path.name, "tokenizer.json", "tokens.zarr"])
        assert open_masks(study, name) == path
        attrs = dict(store.open_store(path, "masks").attrs)
        assert attrs["tokenizer_hash"] == store.open_store(folder / "tokens.zarr", "tokens").attrs["tokenizer_hash"]
        assert {k: attrs[k] for k in CHECKED_ATTRS if k != "tokenizer_hash"} == {
            "seq_len": study.eval_seq_len, "mask_seed": study.analysis.mask_seed,
            "distribution_mask_rate": study.analysis.distribution_mask_rate,
            "fisher_mask_rate": study.analysis.fisher_mask_rate, "eval_records": study.analysis.eval_records,
            "fisher_records": study.analysis.fisher_records,
            "contextual_records": study.analysis.contextual_records}
        marker = _json.loads((folder / "complete.json").read_text())
        assert set(marker["outputs"]) == {"tokenizer", "tokens", "profile", "masks"}


def test_prepare_is_idempotent_and_force_rebuilds(prepared: Path) -> None:
    study = load_study(prepared)
    marker = Layout(study).prepare_marker("text", "char")
    before = marker.stat().st_mtime_ns, marker.read_text()
    assert main(["prepare", str(prepared)]) == 0
    assert (marker.stat().st_mtime_ns, marker.read_text()) == before
    time.sleep(0.01)
    assert main(["prepare", str(prepared), "--force"]) == 0
    assert marker.stat().st_mtime_ns != before[0]
    assert store.open_store(marker.parent / "tokens.zarr", "tokens")  # still valid
    # hidden leftovers: none but the units' lock files (kept: removing a flock file races)
    leftovers = [p.name for p in marker.parent.parent.iterdir()
                 if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []


def test_kill_mid_prepare_leaves_nothing_complete(tmp_path: Path) -> None:
    path = _study_file(tmp_path)
    fasta = tmp_path / "small.fa"
    content = fasta.read_bytes()
    # A named pipe as the corpus: the prepare blocks on it, deterministically in the middle
    # of building its unit (tokenizer saved, store not yet written), where it is killed.
    fasta.unlink()
    os.mkfifo(fasta)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "unit", str(path), "prepare", "dna--kmer3",
                             "--out", str(out)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list((out / "tokens").glob(".dna--kmer3.tmp-*/tokenizer.json")):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "prepare never started its unit"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()
    assert not (out / "tokens" / "dna--kmer3").exists()
    assert not list(out.rglob("complete.json"))
    assert list((out / "tokens").glob(".dna--kmer3.tmp-*"))  # the dead prepare's folder
    # Prepare again with the real file: the dead folder is removed and the unit completes.
    fasta.unlink()
    fasta.write_bytes(content)
    study = load_study(path, [f"study.output_dir={json.dumps(str(out))}"])
    from toolkit.prepare import prepare_unit

    final = prepare_unit(study, "dna", "kmer3")
    assert (final / "complete.json").exists()
    assert store.open_store(final / "tokens.zarr", "tokens").attrs["n_records"] > 0
    assert not list((out / "tokens").glob(".dna--kmer3.tmp-*"))  # the dead folder is gone


def test_unwritable_output_is_one_line_store_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _study_file(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should go")
    assert main(["prepare", str(path), "--out", str(blocker / "study")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(blocker) in err and "writable" in err
    assert blocker.read_text().startswith("a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _study_file(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["prepare", str(path), "--out", str(ro / "study")]) == 2
    finally:
        ro.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(ro) in err


def test_bad_vocabulary_and_bad_corpus_are_one_line_errors(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _write_inputs(tmp_path)
    assert main(["corpus-stats", str(tmp_path / "docs.txt"), "--tokenizer", "bpe5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "special tokens" in err
    assert main(["corpus-stats", str(tmp_path / "small.fa"), "--tokenizer", "kmer2x"]) == 2
    assert "unknown tokenizer" in capsys.readouterr().err
    study = tmp_path / "bad.toml"
    study.write_text('[study]\nname = "bad"\n[corpora.c]\nsource = "missing.fa"\n'
                     '[runs.r]\ncorpus = "c"\ntokenizer = "kmer3"\n')
    assert main(["prepare", str(study), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing.fa" in err
    assert not list((tmp_path / "o").rglob("complete.json"))


CONTRACT = {"tokens", "symbols_per_token", "unigram_bits", "conditional_bits",
            "compression_bits_per_symbol", "analytic_entropy_rate_bits_per_symbol"}


def test_corpus_stats_json_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_inputs(tmp_path)
    assert main(["corpus-stats", str(tmp_path / "small.fa"), "--tokenizer", "kmer3", "--json",
                 "--orders", "2"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof.keys() >= CONTRACT
    assert prof["kind"] == "dna" and len(prof["conditional_bits"]) == 2
    assert prof["analytic_entropy_rate_bits_per_symbol"] is None
    assert 1.5 < prof["symbols_per_token"] < 3.0  # N and run remainders are single bases
    assert main(["corpus-stats", str(tmp_path / "docs.txt"), "--tokenizer", "bpe40"]) == 0
    table = capsys.readouterr().out
    assert "bits/token" in table and "tokens/context" in table


def test_corpus_stats_markov_estimate_hits_the_analytic_rate(capsys: pytest.CaptureFixture[str]) -> None:
    # Default synthetic source: order 2, 1.5 bits/symbol over ACGT.
    assert main(["corpus-stats", "synthetic:markov", "--max-records", "300", "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    rate = prof["analytic_entropy_rate_bits_per_symbol"]
    assert rate == pytest.approx(1.5, abs=1e-5)
    assert prof["tokens"] == 300 * 1000 and prof["symbols_per_token"] == 1.0
    assert prof["conditional_bits"][1] == pytest.approx(rate, abs=0.02)  # j = order = 2
    assert prof["conditional_bits"][0] > rate + 0.05  # one symbol of context is not enough
    assert prof["unigram_bits"] > prof["conditional_bits"][0]
    assert prof["compression_bits_per_symbol"] > rate  # lzma is an upper bound


@pytest.mark.slow
def test_prepare_builtin_arabidopsis_kmer6(tmp_path: Path) -> None:
    path = tmp_path / "thaliana.toml"
    path.write_text('[study]\nname = "thaliana"\n[corpora.thaliana]\n'
                    'source = "builtin:arabidopsis-thaliana-chr1"\nmax_records = 2000\n'
                    'train_records = 1800\neval_records = 200\n'
                    '[runs.k6]\ncorpus = "thaliana"\ntokenizer = "kmer6"\n')
    assert main(["prepare", str(path), "--out", str(tmp_path / "out")]) == 0
    study = load_study(path, [f"study.output_dir={json.dumps(str(tmp_path / 'out'))}"])
    folder = Layout(study).tokens_dir("thaliana", "kmer6")
    group = store.open_store(folder / "tokens.zarr", "tokens")
    attrs = dict(group.attrs)
    assert attrs["vocab_size"] == 4106 and attrs["provenance"][0]["sha256"]
    offsets = np.asarray(group["offsets"][...])
    split = np.asarray(group["split"][...])
    assert len(split) == 2000 and (split == 0).sum() == 1800 and (split == 1).sum() == 200
    first = next(iter(open_corpus("thaliana", study).records()))
    tok = load_tokenizer(folder / "tokenizer.json")
    assert np.asarray(group["tokens"][: offsets[1]]).tolist() == tok.encode(first.seq).tolist()
    prof = attrs["entropy_profile"]
    assert 5.5 < prof["symbols_per_token"] <= 6.0
    assert 1.8 < prof["unigram_bits_per_symbol"] < 2.0  # genomic DNA is close to 2 bits per base
    assert prof["conditional_bits"][0] < prof["unigram_bits"]


def test_bpe_trains_on_an_even_sample_of_the_training_records(tmp_path: Path) -> None:
    """corpora.X.tokenizer_train_records bounds what BPE training holds: the tokenizer a
    study prepares equals one trained directly on the evenly spaced sample."""
    import json as _json

    from toolkit.config import load_study
    from toolkit.corpora import open_corpus, split_assignment
    from toolkit.prepare import tokenizer_sample
    from toolkit.study import Layout
    from toolkit.tokenizers import build_tokenizer
    from toolkit.units import prepare_study

    split = np.array([0, 0, 1, 0, 0, 0, 2, 0, 0, 0], dtype=np.uint8)
    chosen = tokenizer_sample(split, 3)
    assert np.flatnonzero(chosen).tolist() == [0, 5, 9]  # training records 1st, 5th (of 8) and last
    assert tokenizer_sample(split, None).sum() == 8 and tokenizer_sample(split, 100).sum() == 8

    path = tmp_path / "s.toml"
    path.write_text(f"""
[study]
name = "bpe-sample"
output_dir = "{tmp_path / 'out'}"
[corpora.wiki]
source = "builtin:wikipedia-vital"
max_records = 120
train_records = 100
eval_records = 20
tokenizer_train_records = 7
[runs.r]
corpus = "wiki"
tokenizer = "bpe300"
""")
    study = load_study(path)
    prepare_study(study)
    corpus = open_corpus("wiki", study)
    records = [r.seq for r in corpus.records()]
    pick = np.flatnonzero(tokenizer_sample(split_assignment(len(records), study.corpora["wiki"]), 7))
    direct = build_tokenizer("bpe300", "text", iter([records[i] for i in pick]))
    saved = _json.loads((Layout(study).run_tokens_dir("r") / "tokenizer.json").read_text())
    assert saved["model"]["vocab"] == _json.loads(direct._json)["model"]["vocab"]
    everything = build_tokenizer("bpe300", "text", iter(records[:100]))
    assert _json.loads(everything._json)["model"]["vocab"] != saved["model"]["vocab"]
