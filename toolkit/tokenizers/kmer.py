"""The ``kmer<k>`` and ``kmer<k>-overlap`` tokenizers: :class:`KmerTokenizer`, its
vectorised numpy encoders and the k-mer vocabulary.

``kmer<k>`` (paper's 6-mer tokenizer)
    ids 0..4 specials, 5..9 the single bases ``A C G T N``, then the ``4**k`` k-mers in
    lexicographic order (``AA..A`` = 10). Scanning left to right, the regex
    ``[ACGT]{k}|.`` decides the tokens: within each maximal ACGT run of length L,
    ``L // k`` k-mers from the run start, then ``L % k`` single bases; every ``N`` is a
    single base and any other character is one ``[UNK]``. Encoding is vectorised
    with numpy, no per-base Python loop: ids without spans (``encode``, ``encode_flat``)
    for k <= 8 hash each k-byte row of the padded records with one multiply and a lookup
    table (about 1 Gbase/s on one core, see ``_ROW_MAGIC``); spans, k > 8 and records
    holding N or other symbols work per run of ACGT.
``kmer<k>-overlap``
    Same vocabulary. Every window of k symbols (stride 1) is one token, so a record of
    length L gives ``L - k + 1`` tokens; a window that contains anything other than
    ``ACGT`` (e.g. an ``N``) is ``[UNK]``. A record shorter than k falls back to single
    bases. The token store's ``tokenizer.json`` carries the vocabulary, but its
    pre-tokenizer cannot produce overlapping windows: loaded with
    ``tokenizers.Tokenizer.from_file`` it encodes non-overlapping k-mers. Use
    :func:`toolkit.tokenizers.load_tokenizer`, or the exported tokenizer
    (:meth:`~toolkit.tokenizers.base.Tokenizer.to_hf`), whose normaliser writes the
    windows out (:func:`_overlap_rules`), for the exact ids.

Here: the byte -> symbol code tables, the run-based encoder (``KmerTokenizer._nonoverlap``:
spans, k > 8, records holding N or other symbols), the row-hash fast path of ``kmer<k>``
for k <= 8 (``_ROW_MAGIC``, :func:`_row_lut`, :func:`_hash_rows`), the stride-1 windows of
``kmer<k>-overlap`` and the HuggingFace normaliser of the overlap windows.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from toolkit.sequences import UNK
from toolkit.tokenizers.base import (
    BASES,
    Tokenizer,
    _model_vocab,
    _record_index,
    _specials,
    _word_level_json,
)

_KMER_REGEX = "[ACGT]{{{k}}}|(?m:.)"  # Oniguruma: (?m) makes '.' match newlines too
_KMER_REGEX_RE = re.compile(r"^\[ACGT\]\{(\d+)\}\|\(\?m:\.\)$")  # recognises _KMER_REGEX in a file

_ENCODE_BLOCK = 1 << 22  # symbols per vectorised block: bounds the temporaries (~100 MB)

# Byte -> code: A C G T = 0..3, N = 4, anything else = 5 (one [UNK]).
_CODES = np.full(256, 5, dtype=np.uint8)
for _i, _b in enumerate(b"ACGTN"):
    _CODES[_b] = _i
_OTHER = 5
_SEPARATOR = 6  # between records in a batch: ends runs, yields no token
_CODES_TABLE = bytes(_CODES.tolist())  # bytes.translate: far faster than a numpy gather
_SINGLE_IDS = _CODES.astype(np.int32) + 5  # A C G T N = 5..9 (other symbols: records that are re-encoded)
_TABLE = bytes(np.where(np.arange(256) == ord("\n"), _SEPARATOR, _CODES).astype(np.uint8).tolist())


def _codes_of(seqs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated symbol codes (uint8) and record lengths; non-latin-1 chars are one code."""
    joined = "".join(seqs).encode("latin-1", errors="replace")
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    return np.frombuffer(joined.translate(_CODES_TABLE), dtype=np.uint8), lengths


def _kmer_values(c: np.ndarray, at: np.ndarray, k: int) -> np.ndarray:
    """Lexicographic index (int32, k <= 15) of the k-mer starting at each position ``at``;
    the codes there must be ACGT (0..3)."""
    val = np.take(c, at).astype(np.int32)  # np.take: much faster than c[at] for 1-D gathers
    idx = at.copy()
    for _ in range(k - 1):  # in place: k passes over the K starts, no temporaries
        idx += 1
        val <<= 2
        val |= np.take(c, idx)
    return val


# Fast path of kmer<k> for k <= 8 (issue 2: >= 20x a per-k-mer dict loop). Records are
# joined with 'A' padding so that every token of an all-ACGT record is one k-byte "row":
# the k-mers of the record, then one row per remainder base (the base's row is overwritten
# with its single-base id afterwards). A row is read as one unaligned little-endian uint64,
# bits 1-2 of each byte (A C G T -> 0 1 3 2) are kept, and one multiply by a "magic"
# constant gathers those 2k bits injectively into the top B bits: a 2**B lookup table gives
# the id. A second table gives the one ACGT word with those bits: a row equals it exactly
# when all its k bytes are ACGT. About 7 integer passes over the rows in cache-sized chunks,
# none per base. Records holding any other symbol (N, unknown) take the general path.
# {k: (B, multiplier)}; found by search, injectivity re-checked when the table is built.
_ROW_MAGIC = {
    1: (2, 0x2000000000000000),
    2: (4, 0x0820000000000000),
    3: (6, 0x0208200000000000),
    4: (8, 0x0082082000000000),
    5: (10, 0x2000208208000000),
    6: (13, 0x0004180060020000),
    7: (15, 0x00010A2000880020),
    8: (19, 0x0800108000801420),
}
_ROW_CHUNK = 1 << 14  # rows per pass: the temporaries of one chunk stay in L2 cache
_ROW_BLOCK = 1 << 19  # symbols per joined block: its two copies stay in cache too
_ROW_LUTS: dict[int, tuple[np.ndarray, np.ndarray, np.uint64, np.uint64, np.uint64, np.uint64]] = {}


def _row_lut(k: int) -> tuple[np.ndarray, np.ndarray, np.uint64, np.uint64, np.uint64, np.uint64]:
    """Tables and constants of the row hash of k-mers: (id of every hash (2**B,) int32,
    the ACGT word of every hash (2**B,) uint64, mask of the k bytes, mask of their bits 1-2,
    multiplier, shift)."""
    if k not in _ROW_LUTS:
        bits, magic = _ROW_MAGIC[k]
        index = np.arange(4**k, dtype=np.uint64)  # lexicographic k-mer index
        words = np.zeros(4**k, dtype=np.uint64)
        ascii_ = np.frombuffer(b"ACGT", dtype=np.uint8).astype(np.uint64)
        for j in range(k):  # base j (from the left) is byte j of the little-endian word
            code = (index >> np.uint64(2 * (k - 1 - j))) & np.uint64(3)
            words |= ascii_[code.astype(np.intp)] << np.uint64(8 * j)
        mask = np.uint64(sum(0x06 << (8 * j) for j in range(k)))
        shift = np.uint64(64 - bits)
        h = ((words & mask) * np.uint64(magic)) >> shift  # wraps modulo 2**64 by design
        if len(np.unique(h)) != 4**k:
            raise AssertionError(f"row hash of kmer{k} is not injective")
        lut = np.full(1 << bits, UNK, dtype=np.int32)
        lut[h.astype(np.intp)] = 10 + np.arange(4**k, dtype=np.int32)
        # Every masked row hashes to a used entry (its bits are some k-mer's), so unused
        # entries of the word table are never compared.
        word = np.zeros(1 << bits, dtype=np.uint64)
        word[h.astype(np.intp)] = words
        full = np.uint64((1 << (8 * k)) - 1)
        _ROW_LUTS[k] = (lut, word, full, mask, np.uint64(magic), shift)
    return _ROW_LUTS[k]


def _room(ids: np.ndarray, pos: int, end: int) -> np.ndarray:
    """``ids`` with room for ``end`` entries: a copy of its first ``pos`` into a larger one if needed."""
    if end <= len(ids):
        return ids
    bigger = np.empty(max(end, 2 * len(ids)), dtype=ids.dtype)
    bigger[:pos] = ids[:pos]
    return bigger


def _hash_rows(raw: bytes, k: int, ids: np.ndarray, bufs: np.ndarray) -> np.ndarray:
    """Id of every k-byte row of ``raw`` as a k-mer, written into ``ids`` (one per row).

    ``raw`` holds ``len(ids)`` rows and then at least 8 bytes of slack; ``bufs`` is
    scratch space, (4, rows per pass) uint64. Returns the (sorted) rows holding a byte other
    than ``ACGT``, whose ids are meaningless.
    """
    lut, word, full, mask, magic, shift = _row_lut(k)
    n_rows, chunk = len(ids), bufs.shape[1]
    same = bufs[3].view(bool)
    bad: list[np.ndarray] = []
    for r0 in range(0, n_rows, chunk):
        n = min(chunk, n_rows - r0)
        rows = np.ndarray((n,), dtype=np.uint64, buffer=raw, offset=r0 * k, strides=(k,))  # (n,)
        w, h, e = bufs[0, :n], bufs[1, :n], bufs[2, :n]
        np.copyto(w, rows)  # an unaligned strided read: copy first, then work aligned
        if k < 8:
            w &= full  # the row's k bytes
        np.bitwise_and(w, mask, out=h)
        h *= magic
        h >>= shift
        hi = h.view(np.int64)
        lut.take(hi, out=ids[r0:r0 + n], mode="clip")  # the method: no Python wrapper per call
        word.take(hi, out=e, mode="clip")
        np.equal(w, e, out=same[:n])
        if np.count_nonzero(same[:n]) != n:  # rare: rows with a symbol other than ACGT
            bad.append(np.flatnonzero(~same[:n]) + r0)
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


class KmerTokenizer(Tokenizer):
    """Non-overlapping (``kmer<k>``) or stride-1 (``kmer<k>-overlap``) k-mers."""

    def __init__(self, k: int, overlap: bool, json_text: str) -> None:
        super().__init__(f"kmer{k}" + ("-overlap" if overlap else ""), json_text)
        self.k = k
        self.overlap = overlap

    def _encode_spans(self, seqs: Sequence[str], spans: bool = True) -> tuple[Any, Any, Any, np.ndarray]:
        if not spans and not self.overlap and self.k in _ROW_MAGIC:
            return self._encode_fast(list(seqs))
        # Encode in blocks of whole records so temporaries stay bounded for huge batches.
        parts: list[tuple[Any, Any, Any, np.ndarray]] = []
        block: list[str] = []
        size = 0
        for s in seqs:
            block.append(s)
            size += len(s)
            if size >= _ENCODE_BLOCK:
                parts.append(self._encode_block(block, spans))
                block, size = [], 0
        if block or not parts:
            parts.append(self._encode_block(block, spans))
        if len(parts) == 1:
            return parts[0]
        return tuple(np.concatenate(p) if p[0] is not None else None  # type: ignore[return-value]
                     for p in zip(*parts, strict=True))

    def _hf_pipeline(self) -> Any:
        from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        if not self.overlap:  # the store's pre-tokenizer already gives the exact k-mers
            hf = super()._hf_pipeline()
            hf.decoder = decoders.Fuse()  # decode() gives the bases back, not k-mers spaced out
            return hf
        hf = HFTokenizer(models.WordLevel(_model_vocab(json.loads(self._json)), unk_token="[UNK]"))
        hf.normalizer = normalizers.Sequence([normalizers.Replace(Regex(pattern) if regex else pattern, content)
                                              for pattern, content, regex in _overlap_rules(self.k)])
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return hf

    def _encode_block(self, seqs: Sequence[str], spans: bool) -> tuple[Any, Any, Any, np.ndarray]:
        if not self.overlap:
            return self._nonoverlap(seqs, spans)
        c, lengths = _codes_of(seqs)
        starts, pos = _record_index(lengths)
        ids, tstart, tend = self._overlap(c, lengths, starts, pos)
        # Tokens never straddle records, so each token belongs to the record of its start.
        rec = np.searchsorted(starts, tstart, side="right") - 1
        counts = np.bincount(rec, minlength=len(seqs)).astype(np.int64)
        local = tstart - starts[rec] if len(rec) else tstart
        return ids, local, local + (tend - tstart), counts

    def _encode_fast(self, seqs: list[str]) -> tuple[Any, Any, Any, np.ndarray]:
        """Ids and counts (no spans) of ``kmer<k>``, k <= 8, by :func:`_hash_rows` on blocks
        of records; the records that hold N or unknown symbols are re-encoded per run."""
        k = self.k
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        nk, nr = np.divmod(lengths, k)
        counts = nk + nr  # tokens of each record if it is all ACGT: one row each
        start = np.zeros(len(seqs) + 1, dtype=np.int64)  # first row (and id) of each record
        np.cumsum(counts, out=start[1:])
        # Layout: record r from row start[r], padded with 'A' to start[r + 1]; its remainder
        # bases open row start[r] + nk[r] (the partial row) and own that row and the next ones.
        pads = ["A" * p for p in range(k * k)]
        pieces = [""] * (2 * len(seqs))
        pieces[0::2] = seqs
        pieces[1::2] = map(pads.__getitem__, (counts * k - lengths).tolist())
        part = np.repeat(start[:-1] + nk, nr)  # (Q,) partial row of each remainder base
        rem = np.zeros(len(seqs) + 1, dtype=np.int64)  # remainder bases of records < r
        np.cumsum(nr, out=rem[1:])
        j = np.arange(len(part), dtype=np.int64) - np.repeat(rem[:-1], nr)  # base j of its row
        ends = np.cumsum(lengths)
        cuts = np.searchsorted(ends, np.arange(_ROW_BLOCK, int(ends[-1]) if len(ends) else 0, _ROW_BLOCK))
        edges = [0, *np.unique(cuts[(cuts > 0) & (cuts < len(seqs))]).tolist(), len(seqs)]
        # The output, filled block by block; records with N or unknown symbols are spliced
        # in per block, so later blocks shift without a copy of the whole output. A little
        # spare room absorbs their extra tokens (a bigger array is made if it does not).
        ids = np.empty(int(start[-1]) + int(start[-1]) // 64 + 1024, dtype=np.int32)
        bufs = np.empty((4, max(1, min(_ROW_CHUNK, int(start[-1])))), dtype=np.uint64)  # scratch
        pos = 0  # output index of the block's first token
        for a, b in itertools.pairwise(edges):
            lo, n, q0, q1 = int(start[a]), int(start[b] - start[a]), int(rem[a]), int(rem[b])
            # 8 bytes of slack: the uint64 read of the last row runs past its k bytes.
            raw = "".join([*pieces[2 * a:2 * b], "A" * 8]).encode("latin-1", errors="replace")
            ids = _room(ids, pos, pos + n)
            block = ids[pos:pos + n]
            bad = _hash_rows(raw, k, block, bufs)
            if q1 > q0:  # the remainder bases become single-base ids
                row = part[q0:q1] - lo
                base = np.frombuffer(raw, dtype=np.uint8)[row * k + j[q0:q1]]
                block[row + j[q0:q1]] = _SINGLE_IDS.take(base)
            if len(bad):
                spliced = self._splice(seqs, a, start[a:b + 1] - lo, block, bad, counts)
                ids = _room(ids, pos, pos + len(spliced))
                ids[pos:pos + len(spliced)] = spliced
                n = len(spliced)
            pos += n
        # A small result is copied, so that it does not pin the spare room of its array.
        return (ids[:pos] if len(ids) - pos <= pos // 16 else ids[:pos].copy()), None, None, counts

    def _splice(self, seqs: list[str], a: int, start: np.ndarray, block: np.ndarray, bad: np.ndarray,
                counts: np.ndarray) -> np.ndarray:
        """A block's ids with its dirty records (those holding the ``bad`` rows) re-encoded
        per run; ``start`` are the block's record offsets from ``a`` on, ``counts`` is updated."""
        dirty = np.unique(np.searchsorted(start, bad, side="right") - 1)
        sub_ids, _, _, sub_counts = self._nonoverlap([seqs[a + r] for r in dirty.tolist()], False)
        sub_start = np.cumsum(sub_counts) - sub_counts
        pieces, prev = [], 0
        for r, s0, n in zip(dirty.tolist(), sub_start.tolist(), sub_counts.tolist(), strict=True):
            pieces += [block[prev:start[r]], sub_ids[s0:s0 + n]]
            prev = int(start[r + 1])
        pieces.append(block[prev:])
        counts[a + dirty] = sub_counts
        return np.concatenate(pieces)

    def _nonoverlap(self, seqs: Sequence[str], spans: bool) -> tuple[Any, Any, Any, np.ndarray]:
        """Work per run of ACGT, not per base: only a few cheap passes touch every symbol.

        The output is laid out directly: each run contributes its k-mers then its
        remainder singles, and the other symbols (N, unknown) sit between runs, so every
        token's output index follows from cumulative counts (no sort, no per-base scatter).
        """
        k = self.k
        # Records joined by a separator that ends every run; it yields no token.
        raw = "\n".join(seqs).encode("latin-1", errors="replace")
        c = np.frombuffer(raw.translate(_TABLE), dtype=np.uint8)  # (n,) codes
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        rstart = np.zeros(len(seqs) + 1, dtype=np.int64)  # record r starts at rstart[r] in c
        np.cumsum(lengths + 1, out=rstart[1:])
        if raw.count(b"\n") != len(seqs) - 1:  # a record holds a newline: it is an [UNK]
            c = c.copy()
            c[c == _SEPARATOR] = _OTHER
            c[rstart[1:-1] - 1] = _SEPARATOR
        acgt = np.zeros(len(c) + 2, dtype=bool)
        np.less(c, 4, out=acgt[1:-1])
        edges = np.flatnonzero(acgt[1:] != acgt[:-1])  # alternating run starts and run ends
        run0, run1 = edges[0::2], edges[1::2]  # (R,) runs of ACGT: [run0, run1)
        nk = (run1 - run0) // k  # k-mers of each run
        r0 = run0 + k * nk  # start of each run's remainder
        nr = run1 - r0  # remainder singles of each run
        # k-mer values: the covered parts of the runs, compacted, are whole k-mers in a row.
        gaps = np.empty(2 * len(run0) + 1, dtype=np.int64)
        gaps[0:-1:2] = run0 - np.r_[0, r0[:-1]]
        gaps[1::2] = r0 - run0
        gaps[-1] = len(c) - (r0[-1] if len(r0) else 0)
        pattern = np.zeros(len(gaps), dtype=bool)
        pattern[1::2] = True
        kmers = c[np.repeat(pattern, gaps)].reshape(-1, k)  # (K, k)
        val = kmers[:, 0].astype(np.int32)
        for j in range(1, k):  # in place over columns: no temporaries
            val <<= 2
            val |= kmers[:, j]
        opos = np.flatnonzero(c >= 4)  # N, unknown symbols and separators
        oc = np.take(c, opos)
        keep = oc != _SEPARATOR
        opos, oc = opos[keep], oc[keep]
        # Output index of each run's first token: tokens of earlier runs + singles before it.
        per_run = nk + nr
        run_cum = np.zeros(len(run0) + 1, dtype=np.int64)
        np.cumsum(per_run, out=run_cum[1:])
        run_base = run_cum[:-1] + np.searchsorted(opos, run0)
        ids = np.empty(len(opos) + int(run_cum[-1]), dtype=np.int32)
        k_out = np.repeat(run_base - (np.cumsum(nk) - nk), nk)
        k_out += np.arange(len(k_out), dtype=np.int64)
        ids[k_out] = val + 10
        r_shift = np.cumsum(nr) - nr
        r_out = np.repeat(run_base + nk - r_shift, nr)
        r_pos = np.repeat(r0 - r_shift, nr)
        inner = np.arange(len(r_out), dtype=np.int64)
        r_out += inner
        r_pos += inner
        ids[r_out] = np.take(c, r_pos).astype(np.int32) + 5
        o_out = np.arange(len(opos), dtype=np.int64) + run_cum[np.searchsorted(run0, opos)]
        ids[o_out] = np.where(oc == 4, 9, UNK)
        # Tokens per record: runs and singles never straddle a separator.
        n_rec = len(seqs)
        counts = (np.bincount(np.searchsorted(rstart, run0, side="right") - 1, weights=per_run,
                              minlength=n_rec).astype(np.int64)
                  + np.bincount(np.searchsorted(rstart, opos, side="right") - 1, minlength=n_rec))
        if not spans:
            return ids, None, None, counts
        tpos = np.empty(len(ids), dtype=np.int64)  # symbol position of each token in c
        tpos[k_out] = np.repeat(run0 - k * (np.cumsum(nk) - nk), nk) + k * np.arange(len(k_out))
        tpos[r_out] = r_pos
        tpos[o_out] = opos
        local = tpos - np.repeat(rstart[:-1], counts)
        return ids, local, local + np.where(ids >= 10, k, 1), counts

    def _overlap(self, c: np.ndarray, lengths: np.ndarray, starts: np.ndarray,
                 pos_in_record: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self.k
        n = len(c)
        rec_len = np.repeat(lengths, lengths)
        short = rec_len < k  # records shorter than k: single bases
        window = ~short & (pos_in_record <= rec_len - k)
        tpos = np.flatnonzero(window | short)
        bad = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(c >= 4, out=bad[1:])
        is_win = window[tpos]
        wpos = tpos[is_win]
        clean = bad[wpos + k] - bad[wpos] == 0
        cc = c[tpos]
        ids = np.where(cc < _OTHER, 5 + cc.astype(np.int32), UNK).astype(np.int32)
        wid = np.full(len(wpos), UNK, dtype=np.int64)
        wid[clean] = 10 + _kmer_values(c, wpos[clean], k)
        ids[is_win] = wid.astype(np.int32)
        tend = tpos + np.where(is_win, k, 1)
        return ids, tpos, tend


# --------------------------------------------------------------------------- vocabulary


def _kmer_vocab(k: int) -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(_specials())}
    for b in BASES:
        # k = 1: the 1-mers A C G T own those strings; their single-base twins are unreachable.
        vocab[f"[single-{b}]" if k == 1 and b != "N" else b] = len(vocab)
    for t in itertools.product("ACGT", repeat=k):
        vocab["".join(t)] = len(vocab)
    return vocab


def kmer_tokenizer(k: int, overlap: bool) -> KmerTokenizer:
    """``kmer<k>`` (or ``kmer<k>-overlap``): its vocabulary and ``tokenizer.json``, no training."""
    return KmerTokenizer(k, overlap, _word_level_json(_kmer_vocab(k), _KMER_REGEX.format(k=k), wrap=overlap))


# --------------------------------------------------------------------------- HuggingFace overlap

_MARKS = dict(zip("ACGT", "WXYZ", strict=True))


def _overlap_rules(k: int) -> list[tuple[str, str, bool]]:
    """Replace rules (pattern, literal content, pattern is a regex) of a ``tokenizers``
    normaliser that writes out the stride-1 windows of ``kmer<k>-overlap``, separated by
    spaces, so that a WordLevel model on whitespace-split words gives exactly the ids of
    :meth:`KmerTokenizer.encode` (checked against it on random records in
    ``tests/test_hf_export.py``).

    HuggingFace pre-tokenizers and models only cut text into disjoint pieces, so the
    windows are made by the normaliser, which may insert text. Each symbol becomes a
    "group": the symbol, upper case, followed by lower-case copies of the symbols after it.

    1. Every symbol other than ``A C G T N`` becomes ``?`` (the toolkit reads them all as
       one unknown symbol), so that lower case, ``W X Y Z``, space and ``§`` below cannot
       come from the input.
    2. ``§`` is appended when the record has at least k symbols (windows, not single
       bases), an ``N`` that starts a window becomes ``?`` (its window is ``[UNK]``), and a
       base that starts a window holding N or ``?`` is marked ``W X Y Z`` (still a base for
       the windows before it).
    3. Round r = 1..k-1 appends to every group that has r-1 copies the copy of the r-th
       symbol after it, when that symbol is a base (4 zero-width insertions per round; a
       group stops growing at the first N or ``?``). A window that starts at a base and
       holds only bases is then a group with k-1 copies.
    4. With ``§``: the last k-1 groups (no window starts there) and ``§`` are deleted and
       marked groups become ``?``. Without (a record shorter than k): the copies are
       deleted, leaving single bases.
    5. A space before every group, and the copies upper-cased: the words are the k-mers,
       ``A``..``N`` and ``?`` (not in the vocabulary: ``[UNK]``).
    """
    base, sym, any_ = "[ACGTWXYZ]", "[ACGTN?]", "[ACGTN?WXYZ]"
    rules = [("[^ACGTN]", "?", True),
             (rf"(?<={sym}{{{k}}})\z", "§", True),
             (rf"N(?={sym}{{{k - 1}}})", "?", True)]
    # One rule per base, reading the marks as bases: the order of the four does not matter.
    rules += [(rf"(?!{base}{{{k}}}){b}(?={any_}{{{k - 1}}})", m, True) for b, m in _MARKS.items()]
    for r in range(1, k):
        # After a group of exactly r - 1 copies, skip the next r - 1 groups (r - 1 or r
        # copies each by now; upper case ends a group), then the r-th symbol must be b.
        rules += [(rf"(?<={base}[acgt]{{{r - 1}}})(?=(?:{base}[acgt]*){{{r - 1}}}[{b}{m}])", b.lower(), True)
                  for b, m in _MARKS.items()]
    rules.append((rf"(?:{sym}[acgt]*){{{k - 1}}}§\z", "", True))
    rules.append(("[WXYZ][acgt]*", "?", True))
    if k > 2:  # short records: groups of 1..k-2 copies (complete windows have k - 1)
        rules.append((rf"(?<=[ACGT])[acgt]{{1,{k - 2}}}(?![acgt])", "", True))
    rules.append((r"(?=[ACGTN?])", " ", True))
    rules += [(b.lower(), b, False) for b in "ACGT"]
    return rules
