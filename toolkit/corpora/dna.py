"""DNA records: validation, IUPAC codes to ``N``, segments at long ``N`` runs, pieces
cut by the rule of the package docstring (:mod:`toolkit.corpora`), and the FASTA reader.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from toolkit.config import DnaConfig
from toolkit.corpora.base import Record
from toolkit.corpora.files import _Reader
from toolkit.errors import CorpusError

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
    """Turns one record's cleaned bases, fed in chunks, into pieces (package docstring rule).

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
        return Record(f"{self.rid}:{start}-{start + b - a}", self.buf[a:b].decode("ascii"), mask,
                      source=self.rid, start=start)

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
    """Pieces of every record of a FASTA file (see the package docstring)."""
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
