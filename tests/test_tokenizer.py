"""Tokenizers: numpy encoders == the saved HuggingFace file == naive Python references."""

from __future__ import annotations

import functools
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from toolkit.errors import ConfigError, StoreError
from toolkit.sequences import SPECIAL_TOKENS, UNK
from toolkit.tokenizers import build_tokenizer, load_tokenizer


def _random_dna(rng: np.random.Generator, n: int) -> str:
    """Random bases with N runs of 1-12, so ACGT runs have every remainder modulo k."""
    s = np.array(list("ACGT"))[rng.integers(0, 4, n)]
    for _ in range(max(1, n // 40)):
        i = int(rng.integers(0, max(n, 1)))
        s[i:i + int(rng.integers(1, 13))] = "N"
    return "".join(s)


def _dna_batch(seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    seqs = [_random_dna(rng, int(rng.integers(0, 400))) for _ in range(80)]
    # edge cases: empty, all N, shorter than k, one symbol, non-ACGTN symbols, newline, non-latin-1
    return seqs + ["", "N", "NNNNNNN", "A", "ACGTA", "ACGTACGTACGTA", "ACGRYACGTACGT",
                   "acgtACGTAC", "ACG\nTACGTACGT", "ACGTAC\u20acGTACGT", "ACGTACNACGTACG"]


@functools.cache
def _kmer_ids(k: int) -> dict[str, int]:
    return {"".join(t): 10 + i for i, t in enumerate(itertools.product("ACGT", repeat=k))}


def _naive_kmer(seq: str, k: int) -> list[int]:
    """The rule written out as a per-k-mer Python loop (independent of the implementation)."""
    kmer_id = _kmer_ids(k)
    single = {b: 5 + i for i, b in enumerate("ACGTN")}
    out, i = [], 0
    while i < len(seq):
        chunk = seq[i:i + k]
        if len(chunk) == k and all(ch in "ACGT" for ch in chunk):
            out.append(kmer_id[chunk])
            i += k
        else:
            out.append(single.get(seq[i], UNK) if k > 1 or seq[i] == "N" else kmer_id.get(seq[i], UNK))
            i += 1
    return out


def _naive_overlap(seq: str, k: int) -> list[int]:
    kmer_id = {"".join(t): 10 + i for i, t in enumerate(itertools.product("ACGT", repeat=k))}
    if len(seq) < k:
        return [5 + "ACGTN".index(ch) if ch in "ACGTN" else UNK for ch in seq]
    return [kmer_id.get(seq[i:i + k], UNK) for i in range(len(seq) - k + 1)]


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_kmer_numpy_equals_hf_file_and_naive_loop(k: int, tmp_path: Path) -> None:
    tok = build_tokenizer(f"kmer{k}", "dna")
    assert tok.vocab_size == 4**k + 10
    tok.save(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    seqs = _dna_batch(k)
    batch = tok.encode_batch(seqs)
    for seq, ids in zip(seqs, batch, strict=True):
        expected = _naive_kmer(seq, k)
        assert ids.dtype == np.int32
        assert ids.tolist() == expected, seq
        assert hf.encode(seq, add_special_tokens=False).ids == expected, seq
        assert tok.encode(seq).tolist() == expected
    # the regex the file uses is the documented rule
    pieces = [m.group() for m in re.finditer(f"[ACGT]{{{k}}}|.", seqs[0], re.S)]
    assert len(pieces) == len(batch[0])


def test_kmer_vocabulary_layout() -> None:
    tok = build_tokenizer("kmer6", "dna")
    names = tok.id_to_token()
    assert {names[i]: i for i in range(5)} == SPECIAL_TOKENS
    assert names[5:10] == list("ACGTN")
    assert names[10] == "AAAAAA" and names[11] == "AAAAAC" and names[-1] == "TTTTTT"
    assert len(names) == 4106


def test_kmer_spans_cover_the_record() -> None:
    tok = build_tokenizer("kmer4", "dna")
    for seq in _dna_batch(9):
        ids, starts, ends = tok.encode_spans(seq)
        assert "".join(seq[a:b] for a, b in zip(starts, ends, strict=True)) == seq
        names = tok.id_to_token()
        assert all(names[i] == seq[a:b] for i, a, b in zip(ids, starts, ends, strict=True) if i != UNK)


def test_kmer_large_batch_is_blocked_consistently(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny block size forces the multi-block path; results must not change.
    import toolkit.tokenizers.kmer as tk

    tok = build_tokenizer("kmer5", "dna")
    seqs = _dna_batch(11)
    whole, counts = tok.encode_flat(seqs)
    monkeypatch.setattr(tk, "_ENCODE_BLOCK", 500)
    monkeypatch.setattr(tk, "_ROW_BLOCK", 500)
    monkeypatch.setattr(tk, "_ROW_CHUNK", 7)
    blocked, counts2 = tok.encode_flat(seqs)
    assert np.array_equal(whole, blocked) and np.array_equal(counts, counts2)
    assert counts.tolist() == [len(_naive_kmer(s, 5)) for s in seqs]
    empty_ids, empty_counts = tok.encode_flat([])
    assert len(empty_ids) == 0 and len(empty_counts) == 0 and tok.encode_batch([]) == []


# Bytes whose bits 1-2 equal those of A/C/G/T (the row hash alone cannot tell them apart).
_LOOKALIKES = "@BDEFHIJKLMOPQRSUVWacgtn?\x00\x7f\xc1\xc3"


@pytest.mark.parametrize("k", [1, 2, 4, 5, 6, 7, 8])
def test_kmer_fast_rows_equal_run_encoder_and_naive(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The row-hash fast path (encode_flat) against the run-based encoder (which encode_spans
    # uses) and the naive loop, on clean and dirty records, several blocks and chunks.
    import toolkit.tokenizers.kmer as tk

    rng = np.random.default_rng(100 + k)
    seqs = _dna_batch(k)
    clean = ["".join(np.array(list("ACGT"))[rng.integers(0, 4, int(n))]) for n in rng.integers(0, 60, 60)]
    for i in range(40):  # one foreign byte (a look-alike of a base) at a random place of a clean record
        s = clean[int(rng.integers(0, len(clean)))]
        j = int(rng.integers(0, len(s) + 1))
        seqs.append(s[:j] + _LOOKALIKES[i % len(_LOOKALIKES)] + s[j:])
    # all-N records give many more tokens than rows: the output must grow past its spare room
    seqs += clean + ["A" * 8 * k, "T" * (k - 1), "\u20ac" * 3] + ["N" * 300] * 12
    order = rng.permutation(len(seqs))
    seqs = [seqs[i] for i in order]
    tok = build_tokenizer(f"kmer{k}", "dna")
    expected = [_naive_kmer(s, k) for s in seqs]
    for block, chunk in [(1 << 23, 1 << 14), (97, 5)]:
        monkeypatch.setattr(tk, "_ROW_BLOCK", block)
        monkeypatch.setattr(tk, "_ROW_CHUNK", chunk)
        ids, counts = tok.encode_flat(seqs)
        assert ids.dtype == np.int32 and counts.dtype == np.int64
        assert counts.tolist() == [len(e) for e in expected]
        assert ids.tolist() == [t for e in expected for t in e]
    for s in seqs[:30]:
        one = tok.encode(s)
        assert one.tolist() == tok.encode_spans(s)[0].tolist()
        assert one.base is None or one.base.nbytes <= 2 * one.nbytes  # holds no large spare buffer


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8])
def test_kmer_row_hash_tables(k: int) -> None:
    # The hash is injective on the 4^k k-mers and its tables map each k-mer's bytes back to it.
    from toolkit.tokenizers.kmer import _row_lut

    lut, word, full, mask, magic, shift = _row_lut(k)
    rng = np.random.default_rng(k)
    idx = rng.integers(0, 4**k, 500)
    kmers = ["".join("ACGT"[(int(i) >> (2 * (k - 1 - j))) & 3] for j in range(k)) for i in idx]
    words = np.array([int.from_bytes(s.encode(), "little") for s in kmers], dtype=np.uint64)
    h = (((words & full) & mask) * magic) >> shift
    assert lut[h.astype(np.intp)].tolist() == (10 + idx).tolist()
    assert np.array_equal(word[h.astype(np.intp)], words)
    used = np.flatnonzero(lut != UNK)
    assert len(used) == 4**k and sorted(lut[used].tolist()) == list(range(10, 10 + 4**k))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_overlap_windows_against_naive(k: int, tmp_path: Path) -> None:
    tok = build_tokenizer(f"kmer{k}-overlap", "dna")
    assert tok.vocab_size == 4**k + 10
    for seq, ids in zip(_dna_batch(20 + k), tok.encode_batch(_dna_batch(20 + k)), strict=True):
        assert ids.tolist() == _naive_overlap(seq, k), seq
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert again.spec == f"kmer{k}-overlap" and again.hash == tok.hash
    seq = _dna_batch(3)[0]
    assert again.encode(seq).tolist() == tok.encode(seq).tolist()


def test_char_tokenizer_text_and_dna(tmp_path: Path) -> None:
    train = ["Hello, world!", "Zürich is nice.\tyes"]
    tok = build_tokenizer("char", "text", train)
    chars = sorted(set("".join(train)))
    assert tok.vocab_size == 5 + len(chars)
    assert tok.id_to_token()[5:] == chars
    tok.save(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["Hello Zürich\n", "unseen: Ω [UNK] [MASK] !", ""]:
        expected = [5 + chars.index(c) if c in chars else UNK for c in text]
        assert tok.encode(text).tolist() == expected
        assert hf.encode(text, add_special_tokens=False).ids == expected
    dna = build_tokenizer("char", "dna", ["ACCA"])
    assert dna.id_to_token()[5:] == sorted("ACGTN")  # A C G T N always, even if unseen
    assert dna.encode("GNTX").tolist() == [7, 8, 9, UNK]


def test_bpe_trains_with_specials_first_and_exact_vocab(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), int(rng.integers(2, 9)))) for _ in range(400)]
    texts = [" ".join(rng.choice(words, 30)) for _ in range(300)]
    tok = build_tokenizer("bpe500", "text", iter(texts))
    assert tok.spec == "bpe500" and tok.vocab_size == 500
    names = tok.id_to_token()
    assert {names[i]: i for i in range(5)} == SPECIAL_TOKENS
    tok.save(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.get_vocab_size() == 500
    for t in texts[:20] + ["zzz unseen"]:
        ids = tok.encode(t)
        assert ids.tolist() == hf.encode(t, add_special_tokens=False).ids
        assert ids.min() >= 0 and ids.max() < 500
    assert UNK in tok.encode("zzz").tolist()


def test_bpe_dna_record_is_one_word_and_small_corpus_is_padded() -> None:
    rng = np.random.default_rng(1)
    seqs = ["".join(np.array(list("ACGT"))[rng.integers(0, 4, 300)]) for _ in range(20)]
    tok = build_tokenizer("bpe4096", "dna", seqs)
    # 20 random records cannot support 4091 merges: padded to exactly V with unreachable entries
    assert tok.vocab_size == 4096
    ids, starts, ends = tok.encode_spans(seqs[0])
    assert "".join(seqs[0][a:b] for a, b in zip(starts, ends, strict=True)) == seqs[0]
    assert ids.max() < 4096 and len(ids) < 300  # merges happen inside the one word
    assert all(not n.startswith("[unused") for n in np.array(tok.id_to_token())[ids])


def test_hash_stable_across_save_load_and_rebuild(tmp_path: Path) -> None:
    for spec, kind, train in [("kmer6", "dna", None), ("char", "text", ["abc d"]),
                              ("bpe60", "text", ["abc abd abe " * 20] * 5)]:
        a = build_tokenizer(spec, kind, train)
        b = build_tokenizer(spec, kind, train)
        assert a.hash == b.hash
        a.save(tmp_path / f"{spec}.json")
        loaded = load_tokenizer(tmp_path / f"{spec}.json")
        assert loaded.hash == a.hash and loaded.spec == a.spec and loaded.vocab_size == a.vocab_size
        loaded.save(tmp_path / f"{spec}-again.json")
        assert (tmp_path / f"{spec}-again.json").read_bytes() == (tmp_path / f"{spec}.json").read_bytes()
    a = build_tokenizer("char", "text", ["abc"])
    assert a.hash != build_tokenizer("char", "text", ["abd"]).hash


def test_bad_specs_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bpe4"):
        build_tokenizer("bpe4", "text", ["abc"])
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        build_tokenizer("wordpiece", "text", ["abc"])
    with pytest.raises(ConfigError, match="DNA"):
        build_tokenizer("kmer6", "text")
    with pytest.raises(ConfigError, match="trained"):
        build_tokenizer("char", "dna")
    with pytest.raises(ConfigError, match="k <= "):
        build_tokenizer("kmer14", "dna")
    with pytest.raises(StoreError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StoreError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(StoreError, match="not a tokenizer written by this toolkit"):
        load_tokenizer(tmp_path / "other.json")


def test_tokenizers_package_imports_no_later_stage() -> None:
    # The package sits under config and every stage: it may use toolkit.errors,
    # toolkit.plumbing (which imports only errors) and toolkit.sequences only (spec.py only
    # toolkit.errors, so config.py can import it). tests/test_layering.py checks every module.
    import ast
    import subprocess
    import sys

    import toolkit

    root = Path(toolkit.__file__).resolve().parents[1]
    code = "import sys, toolkit.tokenizers; print(' '.join(m for m in sys.modules if m.startswith('toolkit')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert {m for m in loaded if not m.startswith("toolkit.tokenizers")} <= {
        "toolkit", "toolkit.errors", "toolkit.plumbing", "toolkit.sequences"}
    spec = ast.parse((root / "toolkit" / "tokenizers" / "spec.py").read_text(encoding="utf-8"))
    used = {n.module for n in ast.walk(spec) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in used if m.startswith("toolkit")} == {"toolkit.errors"}


def test_bpe_training_gives_its_memory_back() -> None:
    """The BPE trainer's word counts are freed into the C allocator, which would keep them
    from the system while the corpus is encoded; train_bpe hands them back (glibc
    ``malloc_trim``). Measured in a fresh process: the bare HuggingFace trainer leaves its
    memory resident (so the check can fail), the toolkit's training does not."""
    import subprocess
    import sys

    script = """
import numpy as np, psutil, tokenizers
from tokenizers import models, pre_tokenizers, trainers
from toolkit.plumbing import release_freed_memory
from toolkit.tokenizers.bpe import train_bpe
rng = np.random.default_rng(0)
texts = ["".join(rng.choice(list("ACGT"), 5000)) for _ in range(300)]
rss = lambda: psutil.Process().memory_info().rss
r0 = rss()
hf = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
hf.pre_tokenizer = pre_tokenizers.Whitespace()
hf.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=4096, show_progress=False))
del hf
r1 = rss()
assert release_freed_memory()
r2 = rss()
train_bpe(4096, texts)
r3 = rss()
print(r1 - r0, r2 - r0, r3 - r2)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    kept, trimmed, toolkit_kept = (int(x) for x in out.stdout.split())
    mib = 1 << 20
    assert kept > 30 * mib, out.stdout  # the bare trainer leaves tens of MiB resident
    assert trimmed < kept / 2 and toolkit_kept < kept / 2, out.stdout
